"""Ways to combine the large model with the small pair, beyond a fixed alpha.

All take next-token log-probabilities of the large model and of the small base and tuned models, and return
log-probabilities (normalised over the shared vocabulary):

- proxy: `log_softmax(large + alpha * (tuned - base))` (proxy-tuning, Liu et al. 2024);
- mixture: `log_softmax((1 - w) * proxy + w * tuned)`, a geometric mixture that leans on the tuned small
  model itself by a fixed share w;
- dynamic: alpha chosen per token, with no data, so that the large model moves away from its own prediction
  as far as tuning moved the small one: KL(fused || large) ~ KL(tuned || base) (dynamic logit fusion,
  Fan et al. 2024).

Fixed weights (alpha, w) are fitted on a validation split, never on the test split (see fedpt/experiment/).

A black-box large model may report only its top-k tokens (-inf for the rest): `fill_tail` first makes it a
distribution over the whole vocabulary, in the shape of the small base model (see docs/design.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedpt.errors import FedptError

DYNAMIC_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
ALPHA_RANGE = (0.0, 4.0)  # where proxy-tuning steers; a spec outside it must say force (fedpt/proxy/spec.py)
BELOW_KNOWN = math.log(0.999)  # a filled token stays just below the smallest reported one


def fill_tail(logprobs: Tensor, shape: Tensor | None = None) -> Tensor:
    """A distribution over the whole vocabulary from a top-k one (-inf where a token was not reported).

    The unreported tokens share the leftover mass 1 - sum(reported) in proportion to `shape` (log-probs of the
    same positions, e.g. the small base model; uniformly without one), each capped just below the smallest
    reported probability, since a top-k list holds the largest. Rows with nothing missing are unchanged.
    """
    unknown = torch.isneginf(logprobs)
    if not unknown.any():
        return logprobs
    known_mass = logprobs.logsumexp(-1, keepdim=True)  # log sum p(reported); exp(-inf) adds nothing
    leftover = torch.log1p(-known_mass.exp().clamp(max=1 - 1e-6))  # log(1 - sum p(reported))
    weights = torch.zeros_like(logprobs) if shape is None else shape[..., : logprobs.shape[-1]].float()
    weights = weights.masked_fill(~unknown, -math.inf)
    filled = leftover + weights - weights.logsumexp(-1, keepdim=True)  # leftover * w(t) / sum of w(unreported)
    floor = logprobs.masked_fill(unknown, math.inf).amin(-1, keepdim=True) + BELOW_KNOWN
    return torch.where(unknown, torch.minimum(filled, floor), logprobs)


@dataclass(frozen=True)
class Fusion:
    alpha: float = 1.0
    weight: float = 0.0  # share of the tuned small model in the geometric mixture
    dynamic: bool = False  # per-token alpha from DYNAMIC_ALPHAS (ignores `alpha`)

    @property
    def label(self) -> str:
        core = "dynamic alpha" if self.dynamic else f"alpha={self.alpha:g}"
        return core if self.weight == 0 else f"{core}, w={self.weight:g}"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and math.isfinite(self.weight)):
            raise FedptError(f"alpha and the mixture weight must be finite numbers, got {self.alpha}, {self.weight}")
        if not 0 <= self.weight <= 1:
            raise FedptError(f"the mixture weight must lie in [0, 1], got {self.weight}")

    def steer(self, large: Tensor, base: Tensor, tuned: Tensor) -> Tensor:
        """The proxy part: scores of the large model shifted by the small pair (fixed or per-token alpha)."""
        v = min(large.shape[-1], base.shape[-1], tuned.shape[-1])
        large = large.to(tuned.device)  # a remote or llama.cpp large model answers on the host; the small pair may not
        large, base, tuned = fill_tail(large[..., :v], base[..., :v]), base[..., :v], tuned[..., :v]
        return dynamic_proxy(large, base, tuned) if self.dynamic else large + self.alpha * (tuned - base)

    def mix(self, steered: Tensor, tuned: Tensor) -> Tensor:
        """Log-probs: the steered scores, mixed with the tuned small model if weight > 0."""
        if self.weight:
            # geometric mixture: a weighted sum in log space, renormalised below
            tuned = tuned[..., : steered.shape[-1]]
            steered = (1 - self.weight) * torch.log_softmax(steered, dim=-1) + self.weight * tuned
        return torch.log_softmax(steered, dim=-1)

    def __call__(self, large: Tensor, base: Tensor, tuned: Tensor) -> Tensor:
        return self.mix(self.steer(large, base, tuned), tuned)


def kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p || q) per position, from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def dynamic_proxy(large: Tensor, base: Tensor, tuned: Tensor, alphas: tuple[float, ...] = DYNAMIC_ALPHAS) -> Tensor:
    """Per position, the proxy log-probs whose shift from the large model best matches the small model's shift."""
    target = kl(torch.log_softmax(tuned, -1), torch.log_softmax(base, -1))
    large_log = torch.log_softmax(large, -1)
    delta = tuned - base
    best, best_gap = large_log, (kl(large_log, large_log) - target).abs()
    for alpha in alphas[1:]:
        candidate = torch.log_softmax(large + alpha * delta, -1)
        gap = (kl(candidate, large_log) - target).abs()
        better = gap < best_gap
        best = torch.where(better[..., None], candidate, best)
        best_gap = torch.where(better, gap, best_gap)
    return best
