"""Compressed client updates: each format's rounding bound and size, error feedback, malformed messages, and a
federation whose clients send int4 updates."""

import numpy as np
import pytest

from fedpt import config as cfg
from fedpt.errors import FedptError
from fedpt.federation.compression import BLOCK, SCALE, compress, decode, encode


def updates(seed=0):
    rng = np.random.default_rng(seed)
    # an odd size (int4 packs two per byte), a block of zeros, a matrix like LoRA's B
    zeros = np.zeros((3, BLOCK), np.float32)
    zeros[2] = rng.normal(0, 1e-3, BLOCK)
    return {"a": rng.normal(0, 0.01, (8, 129)).astype(np.float32), "b": zeros,
            "c": rng.normal(0, 1.0, (7,)).astype(np.float32)}


def shapes(update):
    return {k: v.shape for k, v in update.items()}


@pytest.mark.parametrize("fmt, levels, ratio", [("int8", 127, 1.07 / 4), ("int4", 7, 0.57 / 4)])
def test_blockwise_quantisation_rounds_within_half_a_step_and_shrinks_the_bytes(fmt, levels, ratio):
    update = updates()
    encoded = encode(update, fmt)
    decoded = decode(encoded, shapes(update), fmt)
    for key, value in update.items():
        flat = np.zeros(-(-value.size // BLOCK) * BLOCK, np.float32)
        flat[: value.size] = value.ravel()
        step = np.abs(flat.reshape(-1, BLOCK)).max(1) / levels  # each block's quantisation step
        error = np.abs(decoded[key] - value).ravel()
        bound = np.repeat(step / 2, BLOCK)[: value.size] * (1 + 1e-6) + 1e-12
        assert decoded[key].shape == value.shape and (error <= bound).all()
    assert (decoded["b"][:2] == 0).all()  # zeros stay exactly zero
    sent = sum(v.nbytes for v in encoded.values())
    full = sum(v.nbytes for v in update.values())
    assert sent <= ratio * full * 1.15  # 1 byte (or half) per value, plus a float32 scale per 64 values


def test_half_precision_and_float32():
    update = updates()
    half = encode(update, "float16")
    assert all(v.dtype == np.float16 for v in half.values())
    for key, value in decode(half, shapes(update), "float16").items():
        np.testing.assert_allclose(value, update[key], rtol=1e-3, atol=1e-7)
    assert all((decode(encode(update, "float32"), shapes(update), "float32")[k] == v).all() for k, v in update.items())


def test_error_feedback_delays_rounding_but_never_loses_it():
    """Over rounds, what the server received sums to what the client meant to send, minus the last residual."""
    rng = np.random.default_rng(1)
    residual, meant, received = None, 0.0, 0.0
    for _ in range(30):
        update = {"w": rng.normal(0, 0.01, (4, 100)).astype(np.float32)}
        encoded, residual = compress(update, "int4", residual)
        meant = meant + update["w"].astype(np.float64)
        received = received + decode(encoded, {"w": (4, 100)}, "int4")["w"]
    np.testing.assert_allclose(received + residual["w"], meant, atol=1e-5)
    # without feedback, the rounding errors pile up as a random walk
    plain = sum(decode(encode({"w": u}, "int4"), {"w": (4, 100)}, "int4")["w"] - u for u in
                (np.random.default_rng(1).normal(0, 0.01, (4, 100)).astype(np.float32) for _ in range(30)))
    assert np.abs(residual["w"]).mean() < np.abs(plain).mean() / 2


@pytest.mark.parametrize("fmt, edit, message", [
    ("int8", lambda e: e.pop("a" + SCALE), "missing"),
    ("int8", lambda e: e.update(extra=np.zeros(1, np.int8)), "unknown"),
    ("int8", lambda e: e.update(a=e["a"].astype(np.int16)), "expected int8"),
    ("int4", lambda e: e.update(a=e["a"][:-1]), "expected uint8"),
    ("int4", lambda e: e.update(a=np.zeros_like(e["a"])), "beyond"),  # nibble 0 is -8
    ("int8", lambda e: e["c" + SCALE].__setitem__(0, np.nan), "finite"),
    ("float16", lambda e: e.update(a=e["a"].astype(np.float32)), "expected float16"),
])
def test_a_malformed_update_is_a_one_line_error(fmt, edit, message):
    update = updates()
    encoded = encode(update, fmt)
    edit(encoded)
    with pytest.raises(FedptError, match=message) as caught:
        decode(encoded, shapes(update), fmt)
    assert "\n" not in str(caught.value)


def test_settings_that_cannot_work_are_one_line_errors():
    with pytest.raises(FedptError, match="update_format must be one of"):
        cfg.FederationConfig(update_format="int2")
    with pytest.raises(FedptError, match="quantises updates itself"):
        cfg.load(None, ["federation.update_format='int8'", "privacy.secagg=true"])
    with pytest.raises(FedptError, match="clip_norm"):
        cfg.load(None, ["federation.update_format='int8'", "privacy.dp='central'", "privacy.clipping='client'",
                        "privacy.noise_multiplier=1.0"])
    cfg.load(None, ["federation.update_format='int8'", "federation.error_feedback=false", "privacy.dp='central'",
                    "privacy.clipping='client'", "privacy.noise_multiplier=1.0"])


@pytest.mark.slow
def test_clients_sending_int4_updates_train_the_model_and_report_the_bytes_sent(tiny_run, tmp_path):
    from flwr.app import Array, ArrayRecord

    from fedpt.federation.run_folder import read_metrics
    from fedpt.federation.simulation import simulate

    simulate(tiny_run(tmp_path / "run", federation={"clients": 3, "rounds": 2, "eval_examples": 8, "client_cpus": 1,
                                                    "update_format": "int4"}))
    rows = read_metrics(tmp_path / "run")
    state = dict(np.load(tmp_path / "run" / "round-1" / "state.npz"))
    int4 = ArrayRecord({k: Array(v) for k, v in encode(state, "int4").items()})
    assert sum(v.nbytes for v in encode(state, "int4").values()) < 0.15 * sum(v.nbytes for v in state.values())
    for row in rows[1:]:
        assert not row["rejected"] and len(row["clients"]) == 3
        for client in row["clients"]:
            # down: the float32 weights; up: exactly an int4 message of those shapes (headers included)
            assert client["bytes_up"] == int4.count_bytes() < client["bytes_down"]
    assert rows[2]["global"]["nll"] < rows[0]["global"]["nll"]


def test_the_server_reads_a_compressed_update_as_weights_and_rejects_a_malformed_one(in_a_flower_task, tmp_path):
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    from fedpt.federation.rounds import Collector
    from fedpt.federation.strategy import check_update

    run = cfg.replace(cfg.RunConfig(), out=str(tmp_path / "never-written"), federation={"update_format": "int8"})
    server = Collector(run, grid=None, privacy=None, sizes={})
    state = {"w": np.ones((3, 100), np.float32)}
    update = {"w": np.random.default_rng(0).normal(0, 0.01, (3, 100)).astype(np.float32)}

    def reply(arrays):
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": 5})})
        return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)

    good = reply(encode(update, "int8"))
    assert server._decode(good, state) is None and check_update(good, state, 5) is None
    np.testing.assert_allclose(good.content["arrays"]["w"].numpy(), state["w"] + update["w"], atol=0.01 / 127 * 5)
    broken = encode(update, "int8")
    broken["w"] = broken["w"][:-1]
    assert "expected int8 (300,)" in server._decode(reply(broken), state)
    assert "expected int8" in server._decode(reply({"w": update["w"], "w::scale": np.ones(5, np.float32)}), state)
    assert not (tmp_path / "never-written").exists()
