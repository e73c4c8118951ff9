"""The proxy-tuned large model: a LanguageModel built from the large model and the small pair.

At every step it predicts

    log_softmax(large + alpha * (small_tuned - small_base))

over the vocabulary the models share (Liu et al., 2024). Log-probabilities and logits give the same result,
since each differs from the other by a per-row constant that the final log_softmax removes. Being a
LanguageModel itself, the proxy is decoded, scored and served like any other model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fedpt.models import LanguageModel, check_same_vocabulary, shortest_context
from fedpt.proxy.fusion import Fusion
from fedpt.proxy.pair import ExpertPair


@dataclass
class ProxyState:
    large: Any
    expert: Any


class ProxyTunedLM(LanguageModel):
    """`log_softmax(large + alpha * (tuned - base))`: a LanguageModel built from two others.

    `fusion` says how the three combine (fedpt/proxy/fusion.py); the default is the formula above with alpha 1.
    """

    def __init__(self, large: LanguageModel, expert: ExpertPair, fusion: Fusion | None = None):
        check_same_vocabulary(large, expert)
        self.large, self.expert = large, expert
        self.fusion = fusion or Fusion(alpha=1.0)
        self.name = f"proxy({large.name}, {expert.name}, {self.fusion.label})"
        self.tokenizer = large.tokenizer
        self.vocab_size = min(large.vocab_size, expert.vocab_size)
        self.eos_token_ids = large.eos_token_ids
        self.max_context = shortest_context(large, expert)
        # a remote large model waits on the network: its request is in flight while the small pair computes
        self._overlap = ThreadPoolExecutor(max_workers=1) if getattr(large, "remote", False) else None

    def _both(self, large_call: Callable[[], Any], expert_call: Callable[[], Any]) -> tuple[Any, Any]:
        if self._overlap is None:
            return large_call(), expert_call()
        pending = self._overlap.submit(large_call)
        expert = expert_call()
        return pending.result(), expert

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ProxyState]:
        (large, large_state), (base, tuned, expert_state) = self._both(
            lambda: self.large.start(input_ids, attention_mask), lambda: self.expert.start(input_ids, attention_mask))
        return self.fusion(large, base, tuned), ProxyState(large_state, expert_state)

    def step(self, state: ProxyState, tokens: Tensor) -> Tensor:
        large, (base, tuned) = self._both(lambda: self.large.step(state.large, tokens),
                                          lambda: self.expert.step(state.expert, tokens))
        return self.fusion(large, base, tuned)

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> Tensor:
        large, (base, tuned) = self._both(lambda: self.large.logprobs(input_ids, attention_mask, last),
                                          lambda: self.expert.logprobs(input_ids, attention_mask, last))
        return self.fusion(large, base, tuned)

    def select(self, state: ProxyState, rows: Sequence[int]) -> ProxyState:
        return ProxyState(self.large.select(state.large, rows), self.expert.select(state.expert, rows))

    def join(self, state: ProxyState, other: ProxyState) -> ProxyState:
        return ProxyState(self.large.join(state.large, other.large), self.expert.join(state.expert, other.expert))
