"""The proxy-tuned large model: a LanguageModel built from the large model and the small pair.

At every step it predicts

    log_softmax(large + alpha * (small_tuned - small_base))

over the vocabulary the models share (Liu et al., 2024). Log-probabilities and logits give the same result,
since each differs from the other by a per-row constant that the final log_softmax removes. Being a
LanguageModel itself, the proxy is decoded, scored and served like any other model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fedpt.models import LanguageModel, check_same_vocabulary
from fedpt.proxy.fusion import Fusion
from fedpt.proxy.pair import ExpertPair


@dataclass
class ProxyState:
    large: Any
    expert: Any


class ProxyTunedLM(LanguageModel):
    """`log_softmax(large + alpha * (tuned - base))`: a LanguageModel built from two others.

    `fusion` replaces the fixed-alpha rule by another way of combining the three (fedpt/proxy/fusion.py).
    """

    def __init__(self, large: LanguageModel, expert: ExpertPair, alpha: float = 1.0, fusion: Fusion | None = None):
        check_same_vocabulary(large, expert)
        self.large, self.expert = large, expert
        self.fusion = fusion or Fusion(alpha=alpha)
        self.name = f"proxy({large.name}, {expert.name}, {self.fusion.label})"
        self.tokenizer = large.tokenizer
        self.vocab_size = min(large.vocab_size, expert.vocab_size)
        self.eos_token_ids = large.eos_token_ids

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ProxyState]:
        large, large_state = self.large.start(input_ids, attention_mask)
        base, tuned, expert_state = self.expert.start(input_ids, attention_mask)
        return self.fusion(large, base, tuned), ProxyState(large_state, expert_state)

    def step(self, state: ProxyState, tokens: Tensor) -> Tensor:
        large = self.large.step(state.large, tokens)
        base, tuned = self.expert.step(state.expert, tokens)
        return self.fusion(large, base, tuned)

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> Tensor:
        large = self.large.logprobs(input_ids, attention_mask, last)
        base, tuned = self.expert.logprobs(input_ids, attention_mask, last)
        return self.fusion(large, base, tuned)
