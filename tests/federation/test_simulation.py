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


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_run, tmp_path, capsys):
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
    capsys.readouterr()
    simulate(tiny_run(tmp_path / "killed", **extra), resume=True)
    assert f"resuming after round 1 of 3 ({tmp_path / 'killed' / 'round-1'})" in capsys.readouterr().err
    whole = dict(np.load(tmp_path / "whole" / "round-3" / "state.npz"))
    resumed = dict(np.load(tmp_path / "killed" / "round-3" / "state.npz"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_array_equal(whole[key], resumed[key])
    assert [r["round"] for r in read_metrics(tmp_path / "killed")] == [0, 1, 2, 3]


def misbehaving_client_app(behaviours: dict[int, str]):
    """The real ClientApp, except that client `pid` misbehaves as `behaviours[pid]` says."""
    import sys

    import cloudpickle
    from flwr.app import MetricRecord
    from flwr.clientapp import ClientApp

    from fedpt.federation import client_app

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    app = ClientApp()
    app.query()(client_app.describe)

    @app.train()
    def train(message, context):
        behaviour = behaviours.get(int(context.node_config["partition-id"]))
        if behaviour == "crash":
            raise RuntimeError("this client crashed\nwith a second line")
        answer = client_app.train_round(message, context)
        arrays, metrics = answer.content["arrays"], dict(answer.content["metrics"])
        for key in list(arrays):
            value = arrays[key].numpy()
            if behaviour == "nan":
                arrays[key] = Array(np.full(value.shape, np.nan, dtype=np.float32))
            if behaviour == "huge":
                arrays[key] = Array((value + 1e4).astype(np.float32))
        if behaviour == "nan-examples":
            metrics["num-examples"] = float("nan")
        if behaviour == "many-examples":
            metrics["num-examples"] = 10**12
        if behaviour == "extra-key":
            metrics["note"] = [1.0, 2.0]
        answer.content["metrics"] = MetricRecord(metrics)
        return answer

    return app


BEHAVIOURS = {1: "nan", 2: "huge", 3: "nan-examples", 4: "many-examples", 5: "extra-key", 6: "crash"}
REASONS = {1: "NaN or inf", 2: "over 10x the round's median", 3: "finite positive number",
           4: "more than the", 5: "metric 'note' is not a finite number", 6: "client failed"}


def test_each_kind_of_bad_client_is_rejected_with_its_reason_and_the_federation_completes(tiny_run, tmp_path):
    run = tiny_run(tmp_path / "run", federation={"clients": 8, "rounds": 1, "eval_examples": 4, "client_cpus": 1,
                                                 "partition": "iid", "min_clients": 2})
    final = simulate(run, client_app=misbehaving_client_app(BEHAVIOURS))
    row = read_metrics(tmp_path / "run")[1]
    assert [c["partition-id"] for c in row["clients"]] == [0, 7]
    reasons = {r["partition-id"]: r["reason"] for r in row["rejected"]}
    assert sorted(reasons) == sorted(BEHAVIOURS)
    for pid, words in REASONS.items():
        assert words in reasons[pid], (pid, reasons[pid])
    assert "\n" not in reasons[6] and "this client crashed" in reasons[6]
    assert "failed" not in row and np.isfinite(row["global"]["nll"]) and final.is_dir()


def test_a_federation_whose_clients_all_fail_exits_with_the_reason(tiny_run, tmp_path):
    run = tiny_run(tmp_path / "run", federation={"clients": 2, "rounds": 1, "eval_examples": 4, "client_cpus": 1,
                                                 "partition": "iid"})
    with pytest.raises(FedptError, match="no round of the federation trained .*0 update.*accepted"):
        simulate(run, client_app=misbehaving_client_app({0: "nan", 1: "crash"}))
    row = read_metrics(tmp_path / "run")[1]
    assert "min_clients" in row["failed"] and not (tmp_path / "run" / "final").exists()


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


def test_a_partition_error_is_one_line(tiny_run, tmp_path):
    run = tiny_run(tmp_path / "run", federation={"clients": 4, "rounds": 1, "eval_examples": 4, "client_cpus": 1})
    with pytest.raises(FedptError) as error:
        simulate(run)
    assert str(error.value).startswith("a client could not start: natural partition: the data has 3 groups")
    assert "\n" not in str(error.value) and "ray" not in str(error.value).lower()


def test_a_run_that_cannot_start_writes_nothing(tiny_run, tmp_path):
    run = tiny_run(tmp_path / "run", data={"source": str(tmp_path / "typo.jsonl")})
    with pytest.raises(FedptError, match="typo.jsonl"):
        simulate(run)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_resume_refuses_another_small_model_of_the_same_shapes(twin, tiny_run, tmp_path):
    from fedpt import config as cfg

    extra = {"federation": {"clients": 2, "rounds": 1, "eval_examples": 4, "client_cpus": 1, "partition": "iid"}}
    simulate(tiny_run(tmp_path / "run", **extra))
    swapped = cfg.replace(tiny_run(tmp_path / "run", **extra), model={"small": str(twin)},
                          federation={"rounds": 2})
    # before: accepted; config.json rewritten and metrics.jsonl mixing two models
    with pytest.raises(FedptError, match="was trained on .*whose weights differ"):
        simulate(swapped, resume=True)
    assert [r["round"] for r in read_metrics(tmp_path / "run")] == [0, 1]


def test_the_output_folder_and_the_data_fail_before_ray_starts(tiny_run, tmp_path):
    import time

    (tmp_path / "a-file").write_text("x")
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(b"\xff\xfe\x00binary")
    cases = [(tiny_run(tmp_path / "a-file"), "is a file, not a folder"),
             (tiny_run(tmp_path / "run", data={"source": str(binary)}), "is not UTF-8 text")]
    for run, words in cases:
        started = time.perf_counter()
        with pytest.raises(FedptError, match=words):
            simulate(run)
        assert time.perf_counter() - started < 10  # before: 26-142 s later, after Ray had started, a traceback
