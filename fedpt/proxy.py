"""Proxy-tuning: steer a large LM with the difference a fine-tuning made to a small LM.

At every step the proxy-tuned model predicts

    log_softmax(large + alpha * (small_tuned - small_base))

over the vocabulary the models share (Liu et al., 2024). Log-probabilities and logits give the same result,
since each differs from the other by a per-row constant that the final log_softmax removes. The proxy is a
LanguageModel itself, so it is decoded, scored and served like any other model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedpt.errors import FedptError
from fedpt.fusion import Fusion
from fedpt.lm import HFCausalLM, LanguageModel, load_model, quantize_int8


class ExpertPair(ABC):
    """The small model before (`base`) and after (`tuned`) fine-tuning, read at the same positions."""

    name: str
    tokenizer: Any
    vocab_size: int

    @abstractmethod
    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Any]:
        """Like LanguageModel.start, returning (base log-probs, tuned log-probs, state)."""

    @abstractmethod
    def step(self, state: Any, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Like LanguageModel.step, returning (base log-probs, tuned log-probs)."""

    @abstractmethod
    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> tuple[Tensor, Tensor]:
        """Like LanguageModel.logprobs, returning (base log-probs, tuned log-probs)."""


class AdapterPair(ExpertPair):
    """A small model and its LoRA adapter: base and tuned in one batched forward over shared weights.

    Each batch is doubled; the adapter's contribution is multiplied by 0 on the first half of the rows and by
    1 on the second, so one set of weights and one forward serve both models.
    """

    def __init__(self, peft_model: torch.nn.Module, tokenizer: Any, name: str = "small+adapter"):
        self.lm = HFCausalLM(peft_model, tokenizer, name=name)
        self.name, self.tokenizer, self.vocab_size = name, tokenizer, self.lm.vocab_size
        self._row_mask: Tensor | None = None
        self._hook_lora(peft_model)

    def _hook_lora(self, model: torch.nn.Module) -> None:
        from peft.tuners.lora import LoraLayer

        hooked = 0
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter, lora_b in module.lora_B.items():
                if adapter in getattr(module, "lora_variant", {}) or not isinstance(lora_b, torch.nn.Linear):
                    raise FedptError(
                        f"{self.name}: only plain LoRA on linear layers can share weights between base and tuned "
                        "(no DoRA, no embedding LoRA); merge the adapter and pass the merged folder instead"
                    )
                lora_b.register_forward_hook(self._mask_rows)
                hooked += 1
        if hooked == 0:
            raise FedptError(f"{self.name}: the adapter has no LoRA layers")

    def _mask_rows(self, module: torch.nn.Module, inputs: Any, output: Tensor) -> Tensor:
        if self._row_mask is None:  # outside this pair's calls the adapter behaves as usual
            return output
        # zero the adapter's output on the rows that play the base model
        return output * self._row_mask.to(output.dtype).view(-1, *([1] * (output.dim() - 1)))

    @contextmanager
    def _base_then_tuned(self, batch: int) -> Iterator[None]:
        self._row_mask = torch.cat([torch.zeros(batch), torch.ones(batch)]).to(self.lm.device)
        try:
            yield
        finally:
            self._row_mask = None

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Any]:
        with self._base_then_tuned(len(input_ids)):
            lp, state = self.lm.start(input_ids.repeat(2, 1), attention_mask.repeat(2, 1))
        base, tuned = lp.chunk(2)
        return base, tuned, state

    def step(self, state: Any, tokens: Tensor) -> tuple[Tensor, Tensor]:
        with self._base_then_tuned(len(tokens)):
            base, tuned = self.lm.step(state, tokens.repeat(2)).chunk(2)
        return base, tuned

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> tuple[Tensor, Tensor]:
        with self._base_then_tuned(len(input_ids)):
            base, tuned = self.lm.logprobs(input_ids.repeat(2, 1), attention_mask.repeat(2, 1), last).chunk(2)
        return base, tuned


class SeparatePair(ExpertPair):
    """Base and tuned as two models (full fine-tuning, or two unrelated checkpoints), each with its own cache."""

    def __init__(self, base: LanguageModel, tuned: LanguageModel):
        check_same_vocabulary(base, tuned)
        self.base, self.tuned = base, tuned
        self.name = f"{base.name} -> {tuned.name}"
        self.tokenizer = base.tokenizer
        self.vocab_size = min(base.vocab_size, tuned.vocab_size)

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Any]:
        base, base_state = self.base.start(input_ids, attention_mask)
        tuned, tuned_state = self.tuned.start(input_ids, attention_mask)
        return base, tuned, (base_state, tuned_state)

    def step(self, state: Any, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.step(state[0], tokens), self.tuned.step(state[1], tokens)

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> tuple[Tensor, Tensor]:
        return self.base.logprobs(input_ids, attention_mask, last), self.tuned.logprobs(input_ids, attention_mask, last)


@dataclass
class ProxyState:
    large: Any
    expert: Any


class ProxyTunedLM(LanguageModel):
    """`log_softmax(large + alpha * (tuned - base))`: a LanguageModel built from two others.

    `fusion` replaces the fixed-alpha rule by another way of combining the three (fedpt/fusion.py).
    """

    def __init__(self, large: LanguageModel, expert: ExpertPair, alpha: float = 1.0, fusion: Fusion | None = None):
        check_same_vocabulary(large, expert)
        self.large, self.expert = large, expert
        self.fusion = fusion or Fusion(alpha=alpha)
        self.name = f"proxy({large.name}, {expert.name}, {self.fusion.label})"
        self.tokenizer = large.tokenizer
        self.vocab_size = min(large.vocab_size, expert.vocab_size)
        self.eos_token_ids = large.eos_token_ids

    def combine(self, large: Tensor, base: Tensor, tuned: Tensor) -> Tensor:
        return self.fusion(large, base, tuned)

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ProxyState]:
        large, large_state = self.large.start(input_ids, attention_mask)
        base, tuned, expert_state = self.expert.start(input_ids, attention_mask)
        return self.combine(large, base, tuned), ProxyState(large_state, expert_state)

    def step(self, state: ProxyState, tokens: Tensor) -> Tensor:
        large = self.large.step(state.large, tokens)
        base, tuned = self.expert.step(state.expert, tokens)
        return self.combine(large, base, tuned)

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> Tensor:
        large = self.large.logprobs(input_ids, attention_mask, last)
        base, tuned = self.expert.logprobs(input_ids, attention_mask, last)
        return self.combine(large, base, tuned)


def check_same_vocabulary(a: LanguageModel | ExpertPair, b: LanguageModel | ExpertPair) -> None:
    """Proxy-tuning adds scores token by token: both sides must mean the same token by each id."""
    va, vb = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    if va != vb:
        raise FedptError(
            f"models '{a.name}' (vocabulary {len(va)}) and '{b.name}' (vocabulary {len(vb)}) have different "
            "tokenizers; proxy-tuning needs a small and a large model with the same tokenizer"
        )


def load_expert(
    small: str | Path, adapter: str | Path, *, dtype: str = "bfloat16", device: str = "cpu", int8: bool = False
) -> ExpertPair:
    """The small base model and its tuned version: a LoRA adapter folder, or a fully fine-tuned model folder.

    `int8` stores the frozen weights in int8 (the adapter stays as trained): faster decoding, slightly
    different numbers; benchmarks/decode.py measures both.
    """
    path = Path(adapter).expanduser()
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        model, tokenizer, _ = load_model(small, dtype=dtype, device=device)
        try:
            peft_model = PeftModel.from_pretrained(model, path)
        except Exception as e:  # peft raises many types for a foreign or broken adapter
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FedptError(f"cannot load adapter {path} onto {small}: {first}") from None
        if int8:
            quantize_int8(peft_model)
        return AdapterPair(peft_model.eval(), tokenizer, name=f"{Path(str(small)).name}+{path.name}")
    if (path / "config.json").is_file():
        pair = [HFCausalLM.load(folder, dtype=dtype, device=device) for folder in (small, path)]
        if int8:
            for lm in pair:
                quantize_int8(lm.model)
        return SeparatePair(*pair)
    raise FedptError(
        f"adapter {path} is neither a LoRA adapter folder (adapter_config.json) nor a model folder (config.json)"
    )
