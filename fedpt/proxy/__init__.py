"""Proxy-tuning: the small pair, the ways to fuse it with the large model, and the proxy-tuned LM."""

from fedpt.proxy.fusion import Fusion
from fedpt.proxy.pair import AdapterPair, ExpertPair, SeparatePair, load_expert, load_tuned
from fedpt.proxy.tuned_lm import ProxyTunedLM

__all__ = ["Fusion", "ExpertPair", "AdapterPair", "SeparatePair", "load_expert", "load_tuned", "ProxyTunedLM"]
