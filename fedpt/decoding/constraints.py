"""What a request may do to the next-token distribution besides temperature and top-p: OpenAI's `logit_bias`,
presence and frequency penalties, and structured output (a JSON schema enforced by llguidance, the grammar library
vLLM uses). All act on the fused log-probs, after fusion, so they hold for every fusion and backend; the log-probs a
client is shown stay the model's own (vLLM's default).
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import torch
from torch import Tensor

from fedpt.errors import FedptError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # json.dumps' layout
MAX_BIAS = 100.0  # OpenAI's range for a logit_bias value


def json_grammar(schema: str) -> str:
    """The llguidance grammar of a JSON schema given as JSON text ("{}": any JSON object); a schema it cannot
    enforce is a FedptError."""
    import llguidance

    try:
        parsed = json.loads(schema) or {"type": "object"}
        if not isinstance(parsed, dict):
            raise ValueError("a schema is a JSON object")
        grammar = llguidance.LLMatcher.grammar_from_json_schema(parsed, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise FedptError(f"the JSON schema is not valid: {e}") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise FedptError(f"the JSON schema cannot be enforced: {problem.splitlines()[0]}")
    return grammar


_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HF tokenizer -> {width: llguidance's}
_lock = threading.Lock()


def _ll_tokenizer(tokenizer: Any, width: int, end_tokens: list[int]) -> Any:
    """llguidance's view of a HF fast tokenizer (about 1 s to build: built once per tokenizer)."""
    import llguidance.hf
    import transformers

    if not isinstance(tokenizer, transformers.PreTrainedTokenizerFast):
        raise FedptError("structured output needs a fast (tokenizer.json) Hugging Face tokenizer")
    with _lock:
        built = _tokenizers.setdefault(tokenizer, {})
        if width not in built:
            built[width] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=width, eos_token=end_tokens)
        return built[width]


def check_bias(bias: tuple[tuple[int, float], ...]) -> None:
    for token, value in bias:
        if token < 0:
            raise FedptError(f"logit_bias names token {token}: token ids are >= 0")
        if not -MAX_BIAS <= value <= MAX_BIAS:  # NaN fails too
            raise FedptError(f"logit_bias values lie in [-100, 100], got {value} for token {token}")


class Constraints:
    """One request's adjustments to the next-token log-probs, and what it has generated so far: built by the
    engine when the request joins (`Sampling.constrained`), so a bad constraint fails only its own request."""

    def __init__(self, sampling: Any, tokenizer: Any, vocab_size: int, end_tokens: set[int]):
        self.bias = dict(sampling.logit_bias)
        if self.bias and max(self.bias) >= vocab_size:
            raise FedptError(f"logit_bias names token {max(self.bias)}, outside the vocabulary [0, {vocab_size})")
        self.presence, self.frequency = sampling.presence_penalty, sampling.frequency_penalty
        self.counts: dict[int, int] = {}  # generated token -> times
        self._matcher: Any = None
        if sampling.grammar is not None:
            import llguidance

            ll_tokenizer = _ll_tokenizer(tokenizer, vocab_size, sorted(end_tokens))
            self._matcher = llguidance.LLMatcher(ll_tokenizer, sampling.grammar, log_level=0)
            if self._matcher.is_error():
                raise FedptError(f"structured output failed: {self._matcher.get_error()}")

    def apply(self, logprobs: Tensor) -> Tensor:
        """(V,) log-probs -> (V,) scores to choose from: tokens the grammar forbids at -inf."""
        scores = logprobs.float().clone()
        if self.bias:
            scores[torch.tensor(list(self.bias))] += torch.tensor(list(self.bias.values()))
        if self.counts and (self.presence or self.frequency):
            ids = torch.tensor(list(self.counts))
            counts = torch.tensor(list(self.counts.values()), dtype=scores.dtype)
            scores[ids] -= counts * self.frequency + self.presence  # OpenAI's rule, over generated tokens only
        if self._matcher is not None:
            words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)  # (ceil(V/32),)
            bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1  # (ceil(V/32), 32): bit j of word i
            allowed = torch.zeros(len(scores), dtype=torch.bool)
            allowed[:min(len(scores), bits.numel())] = bits.flatten()[:len(scores)].bool()
            scores[~allowed] = float("-inf")
        return scores

    def accept(self, token: int) -> None:
        self.counts[token] = self.counts.get(token, 0) + 1
        if self._matcher is not None and not self._matcher.consume_token(token):
            raise FedptError(f"the grammar refused token {token}: {self._matcher.get_error()}")
