"""What a request asks of decoding (one config for `generate`, the experiment, distillation and `serve`), and
the rule that picks the next token."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedpt.decoding.constraints import check_bias, json_grammar
from fedpt.errors import FedptError

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (vLLM's rule)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16  # new tokens at most (0: read the prompt only, for echo scoring)
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh seed per request (sampling only)
    stop: tuple[str, ...] = ()  # the answer ends before the first of these texts
    top_logprobs: int | None = None  # None: no log-probs; n: the chosen token's and the n most likely ones'
    echo_logprobs: bool = False  # also report the prompt's own log-probs (scoring)
    ignore_eos: bool = False  # decode through end tokens up to max_tokens (benchmarks; vLLM's extension)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its log-prob in [-100, 100])
    presence_penalty: float = 0.0  # subtracted from a generated token's score, once (OpenAI's, in [-2, 2])
    frequency_penalty: float = 0.0  # ... and this much per time it was generated
    json_schema: str | None = None  # the answer is JSON valid under this schema (JSON text; "{}": any object)
    grammar: str | None = field(default=None, init=False, repr=False, compare=False)  # json_schema compiled

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise FedptError(f"max_tokens must be at least 0, got {self.max_tokens}")
        if not (0 <= self.temperature and math.isfinite(self.temperature)):
            raise FedptError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FedptError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise FedptError("stop strings must not be empty: an empty one would end every answer at once")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(v)) for t, v in self.logit_bias))
        check_bias(self.logit_bias)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise FedptError(f"{name} lies in [-2, 2], got {getattr(self, name)}")
        if self.json_schema is not None:
            if self.ignore_eos:
                raise FedptError("ignore_eos cannot go with a json_schema: the answer ends where its JSON does")
            object.__setattr__(self, "grammar", json_grammar(self.json_schema))

    @property
    def constrained(self) -> bool:
        """Whether anything besides temperature and top-p shapes the choice (fedpt/decoding/constraints.py)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty or self.grammar)


def choose(logprobs: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """Pick one token per row: argmax when temperature is 0, else sample from the top-p nucleus.

    The draw is by inverse CDF from one uniform number per row, taken from `generator` (a CPU generator), so the
    (rows x vocabulary) tensors stay on whatever device the model left them and a seed draws the same way there."""
    if temperature < GREEDY_BELOW:  # dividing by 1e-40 overflows to NaN; this close to 0, sampling is greedy
        return logprobs.argmax(-1)
    probs = torch.softmax(logprobs.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # drop a token once the tokens ranked above it already hold top_p of the mass
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        outside[..., 0] = False  # the most likely token always stays (a top_p that underflows in float32 is 0)
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(len(probs), 1, generator=generator).to(cdf.device) * cdf[:, -1:]  # uniform over the kept mass
    # the first token whose cumulative mass passes u: never a dropped (zero-probability) token
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
