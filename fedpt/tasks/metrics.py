"""Scores of a task run: pass@k with the unbiased estimator, and bootstrap intervals (one score, or the paired
difference of two systems on the same problems)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedpt.errors import FedptError


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k of n samples passes, c of them passing: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), as a product so that large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise FedptError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def bootstrap_interval(scores: Sequence[float], *, other: Sequence[float] | None = None, samples: int = 10_000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of per-problem scores, or of their paired difference from `other` (same problems, same
    order): problems resampled with replacement, percentile interval."""
    x = np.asarray(scores, dtype=float)
    if other is not None:
        if len(other) != len(x):
            raise FedptError(f"a paired interval needs scores of the same problems ({len(x)} against {len(other)})")
        x = x - np.asarray(other, dtype=float)
    if not len(x):
        raise FedptError("no scores to bootstrap")
    draws = np.random.default_rng(seed).integers(0, len(x), size=(samples, len(x)))
    means = x[draws].mean(1)
    tail = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def gap_interval(system: Sequence[float], base: Sequence[float], tuned: Sequence[float], *, samples: int = 10_000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(share, low, high) of the gap from `base` to `tuned` that `system` closes, (s - b) / (t - b) of the mean
    per-problem scores, with a paired bootstrap (the same problems drawn for all three); NaN where a draw has no gap."""
    s, b, t = (np.asarray(v, dtype=float) for v in (system, base, tuned))
    if not len(s) == len(b) == len(t) or not len(s):
        raise FedptError(f"a gap needs scores of the same problems ({len(s)}, {len(b)}, {len(t)})")
    draws = np.random.default_rng(seed).integers(0, len(s), size=(samples, len(s)))
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = (s[draws].mean(1) - b[draws].mean(1)) / (t[draws].mean(1) - b[draws].mean(1))
        share = (s.mean() - b.mean()) / (t.mean() - b.mean()) if t.mean() != b.mean() else float("nan")
    finite = shares[np.isfinite(shares)]
    if not len(finite):
        return float(share), float("nan"), float("nan")
    tail = (1 - level) / 2
    return float(share), float(np.quantile(finite, tail)), float(np.quantile(finite, 1 - tail))
