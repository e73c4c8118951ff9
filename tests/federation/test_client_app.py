"""The ClientApp's own logic: which examples a node trains on, and its seeds."""

import pytest

from fedpt import config as cfg
from fedpt.data import load_splits
from fedpt.errors import FedptError
from fedpt.federation.client_app import client_examples
from fedpt.federation.partition import round_seed


def test_round_seed_depends_on_run_round_and_client_only():
    assert round_seed(0, 2, 1) == round_seed(0, 2, 1)
    assert len({round_seed(s, r, p) for s in (0, 1) for r in (1, 2) for p in (0, 1)}) == 8
    assert 0 <= round_seed(123, 4, 5) < 2**32


def test_a_node_with_its_own_data_file(tiny_run, qa_file, tmp_path):
    run = tiny_run(tmp_path)
    pid, examples = client_examples(run, {"data": str(qa_file), "partition-id": 2})
    expected = load_splits(cfg.replace(run, data={"source": str(qa_file)}).data)["train"]
    assert pid == 2 and examples == expected and len(examples) > 0


def test_a_node_with_a_partition_of_the_run_data(tiny_run, tmp_path):
    run = tiny_run(tmp_path, federation={"clients": 3, "partition": "natural"})
    parts = [client_examples(run, {"partition-id": i, "num-partitions": 3}) for i in range(3)]
    assert [pid for pid, _ in parts] == [0, 1, 2]
    assert [len({e.group for e in examples}) for _, examples in parts] == [1, 1, 1]  # a topic each
    assert sum(len(examples) for _, examples in parts) == len(load_splits(run.data)["train"])


@pytest.mark.parametrize("node, message", [
    ({}, "neither 'partition-id' nor 'data'"),
    ({"partition-id": 3, "num-partitions": 3}, "node partition 3 of 3 does not fit"),
    ({"partition-id": 0, "num-partitions": 2}, "node partition 0 of 2 does not fit federation.clients = 3"),
])
def test_node_config_errors(tiny_run, tmp_path, node, message):
    with pytest.raises(FedptError, match=message):
        client_examples(tiny_run(tmp_path), node)


def test_a_node_carries_its_rounding_error_into_its_next_update(tiny_run, tmp_path):
    """Error feedback across rounds: the node's state holds what int4 rounding lost, and the next message adds it."""
    import numpy as np
    from flwr.app import Context, RecordDict

    from fedpt.federation.client_app import _encoded
    from fedpt.federation.compression import decode

    run = tiny_run(tmp_path, federation={"update_format": "int4"})
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    rng = np.random.default_rng(0)
    sent = {"w": np.zeros((4, 70), np.float32)}
    updates = [{"w": rng.normal(0, 0.01, (4, 70)).astype(np.float32)} for _ in range(3)]
    received = sum(decode(_encoded(run, u, sent, context), {"w": (4, 70)}, "int4")["w"] for u in updates)
    residual = context.state["residual"]["w"].numpy()
    assert np.abs(residual).max() > 0
    np.testing.assert_allclose(received + residual, sum(u["w"] for u in updates), atol=1e-6)
    plain = cfg.replace(run, federation={"error_feedback": False})
    fresh = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    _encoded(plain, updates[0], sent, fresh)
    assert "residual" not in fresh.state.array_records
