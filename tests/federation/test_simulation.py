"""Whole federations in Flower's simulation engine, on tiny models: a run, a resume after a kill, a bad client,
distillation between rounds, full fine-tuning."""

import numpy as np
import pytest
from flwr.app import Array

from fedpt.errors import FedptError
from fedpt.federation.run_folder import read_metrics
from fedpt.federation.simulation import simulate

pytestmark = pytest.mark.slow


def test_simulation_three_clients_two_rounds(tiny, tiny_run, tmp_path):
    final = simulate(tiny_run(tmp_path / "run"))
    rows = read_metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert [c["partition-id"] for c in row["clients"]] == [0, 1, 2] and not row["rejected"]
        for client in row["clients"]:
            assert client["bytes_up"] > 0 and client["bytes_down"] > 0 and client["peak_memory_bytes"] > 0
            assert client["seconds"] > 0 and client["num-examples"] > 0 and np.isfinite(client["train_loss"])
    assert rows[2]["global"]["nll"] < rows[0]["global"]["nll"]
    assert (final / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "round-1" / "adapter_config.json").is_file()
    # the final adapter is what `fedpt generate --adapter` takes
    from fedpt.proxy import load_expert

    load_expert(tiny["small"], final, dtype="float32")
    with pytest.raises(FedptError, match="already holds a run"):
        simulate(tiny_run(tmp_path / "run"))


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_run, tmp_path):
    extra = {"federation": {"clients": 3, "rounds": 3, "eval_examples": 4, "client_cpus": 1, "fraction": 0.67,
                            "strategy": "fedadam", "server_lr": 0.01}}
    simulate(tiny_run(tmp_path / "whole", **extra))

    class Killed(Exception):
        pass

    def kill_in_round_2(server_round, model, tokenizer):
        if server_round == 2:
            raise Killed  # after aggregation, before round 2 is saved: as if the server died mid-round
        return None

    with pytest.raises(Killed):
        simulate(tiny_run(tmp_path / "killed", **extra), after_round=kill_in_round_2)
    assert [r["round"] for r in read_metrics(tmp_path / "killed")] == [0, 1]
    simulate(tiny_run(tmp_path / "killed", **extra), resume=True)
    whole = dict(np.load(tmp_path / "whole" / "round-3" / "state.npz"))
    resumed = dict(np.load(tmp_path / "killed" / "round-3" / "state.npz"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_array_equal(whole[key], resumed[key])
    assert [r["round"] for r in read_metrics(tmp_path / "killed")] == [0, 1, 2, 3]


def poisoned_client_app():
    """The real ClientApp, except that client 1 sends NaN weights."""
    import sys

    import cloudpickle
    from flwr.clientapp import ClientApp

    from fedpt.federation import client_app

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    app = ClientApp()
    app.query()(client_app.describe)

    @app.train()
    def train(message, context):
        answer = client_app.train_round(message, context)
        if context.node_config["partition-id"] == 1:
            arrays = answer.content["arrays"]
            for key in list(arrays):
                arrays[key] = Array(np.full(arrays[key].numpy().shape, np.nan, dtype=np.float32))
        return answer

    return app


def test_a_bad_client_is_rejected_and_the_round_goes_on(tiny_run, tmp_path):
    run = tiny_run(tmp_path / "run", federation={"clients": 3, "rounds": 1, "eval_examples": 4,
                                                                "client_cpus": 1})
    simulate(run, client_app=poisoned_client_app())
    row = read_metrics(tmp_path / "run")[1]
    assert [c["partition-id"] for c in row["clients"]] == [0, 2]
    assert len(row["rejected"]) == 1 and row["rejected"][0]["partition-id"] == 1
    assert "NaN" in row["rejected"][0]["reason"]


def test_distillation_between_rounds(tiny_run, tmp_path):
    run = tiny_run(tmp_path / "run", distill={"every": 1, "n_texts": 4, "max_new_tokens": 4, "steps": 2, "top_k": 8})
    simulate(run)
    rows = read_metrics(tmp_path / "run")
    assert all(r["distilled"]["distill_texts"] > 0 for r in rows[1:])
    # the saved global adapter is the distilled one: the distillation moved it, and that is what round K holds
    assert all(r["distilled"]["distill_update_norm"] > 0 for r in rows[1:])




def test_full_fine_tuning_with_distillation(tiny, tiny_run, tmp_path):
    from fedpt.proxy import SeparatePair, load_expert

    run = tiny_run(tmp_path / "run", tuning={"mode": "full", "dtype": "float32", "local_steps": 2, "batch_size": 2,
                                             "max_length": 32, "learning_rate": 1e-3},
                   federation={"clients": 3, "rounds": 1, "eval_examples": 4, "client_cpus": 1},
                   distill={"every": 1, "n_texts": 4, "max_new_tokens": 4, "steps": 2, "top_k": 8})
    final = simulate(run)
    row = read_metrics(tmp_path / "run")[1]
    assert len(row["clients"]) == 3 and not row["rejected"] and row["distilled"]["distill_update_norm"] > 0
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    assert isinstance(load_expert(tiny["small"], final, dtype="float32"), SeparatePair)
