"""Split the training examples across clients: natural (by group), IID, or Dirichlet over the groups.

The splitting itself is done by flwr-datasets' partitioners; this module turns examples into a table they
accept and checks the result (every example in exactly one partition, none empty).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from fedpt.config import FederationConfig
from fedpt.data import Example
from fedpt.errors import FedptError


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A seed per (run, round, partition; -1 for the server): the same on a resumed run as on an uninterrupted
    one."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{server_round}/{partition_id}".encode()).digest()[:4], "little")


def partition(examples: Sequence[Example], federation: FederationConfig, seed: int) -> list[list[Example]]:
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    table = datasets.Dataset.from_dict({"group": [e.group for e in examples], "index": list(range(len(examples)))})
    groups = sorted(set(table["group"]))
    n = federation.clients
    if federation.partition == "natural":
        if len(groups) < n:
            raise FedptError(
                f"natural partition: the data has {len(groups)} groups ({', '.join(groups[:8])}"
                f"{', ...' if len(groups) > 8 else ''}) for federation.clients = {n}; use at most {len(groups)} "
                "clients or partition = 'iid' or 'dirichlet'"
            )
        # whole groups to clients: with as many groups as clients, client k holds the k-th group in sorted order;
        # with more, the groups are shuffled by the seed and dealt round robin (no two clients share a group)
        dealt = groups if len(groups) == n else random.Random(seed).sample(groups, len(groups))
        owner = {group: i % n for i, group in enumerate(dealt)}
        table = table.map(lambda row: {"client": owner[row["group"]]}).sort(["client", "index"])
        partitioner = NaturalIdPartitioner(partition_by="client")
    elif federation.partition == "iid":
        partitioner = IidPartitioner(num_partitions=n)
        table = table.shuffle(seed=seed)
    else:
        if len(groups) < 2:
            raise FedptError("dirichlet partition needs at least 2 groups in the data to skew over")
        partitioner = DirichletPartitioner(
            num_partitions=n, partition_by="group", alpha=federation.dirichlet_alpha, min_partition_size=1,
            self_balancing=False, seed=seed,
        )
    partitioner.dataset = table
    try:
        parts = [[examples[i] for i in partitioner.load_partition(k)["index"]] for k in range(n)]
    except ValueError as e:
        raise FedptError(f"{federation.partition} partition into {n} clients failed: {e}") from None
    for k, part in enumerate(parts):
        if not part:
            raise FedptError(f"{federation.partition} partition: client {k} of {n} got no examples; use fewer clients")
    return parts
