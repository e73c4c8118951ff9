from collections import Counter

import numpy as np
import pytest

from fedpt import config as cfg
from fedpt.data import Example
from fedpt.errors import FedptError
from fedpt.federation.partition import partition


def examples_with_groups(counts: dict) -> list[Example]:
    return [Example(f"q{g}{i}", f"a{g}{i}", g) for g, n in counts.items() for i in range(n)]


@pytest.mark.parametrize("kind", ["natural", "iid", "dirichlet"])
def test_partitions_lose_and_duplicate_nothing(kind):
    data = examples_with_groups({"x": 30, "y": 50, "z": 20})
    parts = partition(data, cfg.FederationConfig(clients=3, partition=kind), seed=1)
    flat = [e for p in parts for e in p]
    assert sorted(flat, key=lambda e: e.prompt) == sorted(data, key=lambda e: e.prompt)
    assert all(parts)
    if kind == "natural":
        assert [{e.group for e in p} for p in parts] == [{"x"}, {"y"}, {"z"}]
    if kind == "iid":
        assert sorted(len(p) for p in parts) == [33, 33, 34]


def test_dirichlet_skew_follows_alpha():
    data = examples_with_groups({g: 200 for g in "abcd"})

    def skew(alpha):  # mean share of each client's largest group
        parts = partition(data, cfg.FederationConfig(clients=4, partition="dirichlet", dirichlet_alpha=alpha), seed=3)
        return np.mean([max(Counter(e.group for e in p).values()) / len(p) for p in parts])

    assert skew(0.1) > 0.6 > 0.4 > skew(100.0)


def test_natural_partition_needs_a_group_per_client():
    with pytest.raises(FedptError, match="has 3 groups.*clients = 4"):
        partition(examples_with_groups({"x": 3, "y": 3, "z": 3}), cfg.FederationConfig(clients=4), seed=0)


def test_natural_partition_deals_whole_groups_when_there_are_more_groups_than_clients():
    data = examples_with_groups({f"template-{t:02d}": 5 for t in range(10)})
    parts = partition(data, cfg.FederationConfig(clients=3), seed=2)
    held = [{e.group for e in p} for p in parts]
    assert sorted(len(h) for h in held) == [3, 3, 4]  # dealt round robin
    assert set.union(*held) == {e.group for e in data} and sum(len(h) for h in held) == 10  # no group shared
    assert held == [{e.group for e in p} for p in partition(data, cfg.FederationConfig(clients=3), seed=2)]
    assert held != [{e.group for e in p} for p in partition(data, cfg.FederationConfig(clients=3), seed=5)]


