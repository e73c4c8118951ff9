"""pass@k against its definition, and bootstrap intervals that cover what they should."""

import itertools
import math

import numpy as np
import pytest

from fedpt.errors import FedptError
from fedpt.tasks.metrics import bootstrap_interval, pass_at_k


@pytest.mark.parametrize("n, c, k", [(10, 0, 1), (10, 3, 1), (10, 3, 5), (5, 5, 2), (20, 1, 10), (7, 4, 7)])
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_pass(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_1_is_the_share_that_passes_and_large_n_does_not_overflow():
    assert pass_at_k(200, 37, 1) == pytest.approx(37 / 200)
    assert 0 < pass_at_k(2000, 3, 100) < 1
    with pytest.raises(FedptError, match="pass@k needs"):
        pass_at_k(5, 6, 1)


def test_bootstrap_intervals_single_and_paired():
    rng = np.random.default_rng(1)
    a = rng.random(300) < 0.6
    mean, low, high = bootstrap_interval(a)
    assert low < mean < high and high - low < 0.15 and low < 0.6 < high
    b = a.copy()
    b[:30] = ~b[:30]  # differs on 30 problems
    diff, low, high = bootstrap_interval(a, other=b)
    assert diff == pytest.approx(a.mean() - b.mean()) and low <= diff <= high
    assert bootstrap_interval([1.0, 1.0], other=[1.0, 1.0]) == (0.0, 0.0, 0.0)
    with pytest.raises(FedptError, match="same problems"):
        bootstrap_interval([1.0], other=[1.0, 0.0])


def test_the_gap_closed_and_its_paired_interval():
    from fedpt.tasks.metrics import gap_interval

    base, tuned = [0, 0, 0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 1, 1, 0, 0]  # 0.25 -> 0.625
    value, low, high = gap_interval([1, 0, 1, 0, 1, 1, 0, 0], base, tuned)  # 0.5: two thirds of the gap
    assert value == pytest.approx(2 / 3) and low <= value <= high
    assert gap_interval(tuned, base, tuned)[0] == 1.0 and gap_interval(base, base, tuned)[0] == 0.0
    assert np.isnan(gap_interval(base, base, base)[0])  # no gap to close
    with pytest.raises(FedptError, match="same problems"):
        gap_interval([1], [1, 0], [0, 1])
