"""SecAgg+ in fedpt's round loop (Flower's simulation engine, tiny models): the securely aggregated model equals
the plainly aggregated one within the quantisation's error bound, also when a client drops out mid-protocol."""

import sys

import numpy as np
import pytest

from fedpt import config as cfg
from fedpt.errors import FedptError
from fedpt.federation.run_folder import read_metrics
from fedpt.federation.simulation import simulate

pytestmark = pytest.mark.slow


def crashing_client_app(pid_that_crashes):
    """The real ClientApp (SecAgg+ mod included), except that one client crashes when it should train: in a
    SecAgg+ round that is the third stage, after it has shared its keys."""
    import cloudpickle
    from flwr.clientapp import ClientApp

    from fedpt.federation import client_app
    from fedpt.federation.secagg import secagg_mod

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    app = ClientApp(mods=[secagg_mod])
    app.query()(client_app.describe)

    @app.train()
    def train(message, context):
        if int(context.node_config["partition-id"]) == pid_that_crashes:
            raise RuntimeError("this client dropped out")
        return client_app.train_round(message, context)

    return app


def run(tiny_run, folder, secagg, crash=-1):
    config = tiny_run(folder, federation={"clients": 3, "rounds": 1, "eval_examples": 2, "client_cpus": 1,
                                          "partition": "iid"},
                      privacy={"secagg": secagg, "secagg_range": 0.5})
    simulate(config, client_app=crashing_client_app(crash))
    rows = read_metrics(folder)
    state = dict(np.load(folder / "round-1" / "state.npz"))
    return config, rows, state


def bound(config, rows, sizes):
    """Largest error SecAgg+'s quantisation can make in one coordinate of the mean: each client's weighted update
    is rounded to a step of 2R/L; the sum is divided by the sum of the weights (n_i / max n)."""
    step = 2 * config.privacy.secagg_range / config.privacy.secagg_levels
    ratios = [n / max(sizes.values()) for n in sizes.values()]
    return len(ratios) * step / sum(ratios) + 1e-7  # + float32 rounding of the weights themselves


@pytest.mark.parametrize("crash", [-1, 2], ids=["all clients", "a client drops out"])
def test_secure_aggregate_is_the_plain_one_within_the_quantisation_error(tiny_run, tmp_path, crash):
    config, plain_rows, plain = run(tiny_run, tmp_path / "plain", secagg=False, crash=crash)
    _, secure_rows, secure = run(tiny_run, tmp_path / "secure", secagg=True, crash=crash)
    assert "failed" not in secure_rows[1], secure_rows[1]
    survivors = {c["partition-id"]: c["num-examples"] for c in plain_rows[1]["clients"]}
    assert sorted(survivors) == ([0, 1] if crash == 2 else [0, 1, 2])
    assert sorted(c["partition-id"] for c in secure_rows[1]["clients"]) == sorted(survivors)
    if crash == 2:  # the dropped client is named among the rejected, and the round went on without it
        assert any("this client dropped out" in r["reason"] for r in secure_rows[1]["rejected"])
    worst = max(float(np.abs(secure[k].astype(np.float64) - plain[k]).max()) for k in plain)
    moved = max(float(np.abs(plain[k]).max()) for k in plain if "lora_B" in k)  # LoRA's B starts at zero
    assert moved > 100 * bound(config, plain_rows, survivors)  # the round really moved the model
    assert worst <= bound(config, plain_rows, survivors)
    for client in secure_rows[1]["clients"]:  # what a client sent: its masked vector, an int64 per coordinate
        assert client["bytes_up"] == 8 * (sum(v.size for v in plain.values()) + 1)


def test_secagg_settings_that_cannot_work_are_one_line_errors():
    with pytest.raises(FedptError, match="strategy 'krum' needs each client's update"):
        cfg.load(None, ["privacy.secagg=true", "federation.strategy='krum'", "federation.clients=5"])
    with pytest.raises(FedptError, match="set privacy.clipping = 'client'"):
        cfg.load(None, ["privacy.secagg=true", "privacy.dp='central'", "privacy.noise_multiplier=1.0"])
