"""Models: the LanguageModel contract, the transformers backend, int8 weights, and the offline model store."""

from fedpt.models.hf import HFCausalLM, load_model
from fedpt.models.interface import LanguageModel, check_same_vocabulary, pad_left, positions, shortest_context

__all__ = ["LanguageModel", "HFCausalLM", "load_model", "check_same_vocabulary", "pad_left", "positions",
           "shortest_context"]
