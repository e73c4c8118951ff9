"""Hostile nodes in the simulation engine, on tiny models: a node that lies about its size consistently, one that
describes an infinite size, two that claim one partition, one that replays an old update, one that never answers.
Each reproduces a failure of issue 22 (the liar took over FedAvg; infinity crashed the run; the duplicate ended it
before it started; the replay was accepted every round) and checks what the server does now."""

import time

import numpy as np
import pytest
from flwr.app import Array

from fedpt.federation.run_folder import read_metrics
from fedpt.federation.simulation import simulate

pytestmark = pytest.mark.slow
CONSTANT = 5.0  # the liar's weights: far from any trained LoRA weight


def hostile_client_app(behaviours: dict[int, str], sleep: float = 0.0):
    """The real ClientApp, except that the node of partition `pid` behaves as `behaviours[pid]` says."""
    import sys

    import cloudpickle
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedpt.federation import client_app

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    app = ClientApp()

    @app.query()
    def describe(message, context):
        answer = client_app.describe(message, context)
        metrics = dict(answer.content["metrics"])
        behaviour = behaviours.get(metrics["partition-id"])
        if behaviour == "liar":
            metrics["num-examples"] = 10**12
        if behaviour == "infinite":
            metrics["num-examples"] = float("inf")
        if behaviour == "duplicate":
            metrics["partition-id"] = 0
        answer.content["metrics"] = MetricRecord(metrics)
        return answer

    @app.train()
    def train(message, context):
        behaviour = behaviours.get(int(context.node_config["partition-id"]))
        if behaviour == "replay" and "old" in context.state.array_records:  # last round's answer, sent again
            return message.create_reply(RecordDict({"arrays": context.state["old"],
                                                    "metrics": MetricRecord(dict(context.state["old-metrics"]))}))
        if behaviour == "silent":
            time.sleep(sleep)
        if behaviour == "crash":
            raise RuntimeError("this client's disk is full")
        answer = client_app.train_round(message, context)
        if behaviour == "replay":
            context.state["old"] = ArrayRecord(dict(answer.content["arrays"]))
            context.state["old-metrics"] = ConfigRecord(dict(answer.content["metrics"]))
        if behaviour == "liar":
            arrays = answer.content["arrays"]
            for key in list(arrays):
                arrays[key] = Array(np.full(arrays[key].numpy().shape, CONSTANT, dtype=np.float32))
            metrics = dict(answer.content["metrics"])
            metrics["num-examples"] = 10**12
            answer.content["metrics"] = MetricRecord(metrics)
        return answer

    return app


def test_a_liar_weighs_at_most_the_cap_and_bad_descriptions_are_refused_with_reasons(tiny_run, tmp_path):
    run = tiny_run(tmp_path / "run", federation={"clients": 4, "rounds": 1, "eval_examples": 4, "client_cpus": 1,
                                                 "partition": "iid", "max_norm_ratio": 0.0})
    simulate(run, client_app=hostile_client_app({1: "infinite", 2: "duplicate", 3: "liar"}))
    row = read_metrics(tmp_path / "run")[1]
    reasons = {r["partition-id"]: r["reason"] for r in row["rejected"]}
    # partition 1 (infinite size) has no accepted node, and neither has partition 2 (its node claimed 0)
    assert reasons == {1: "no accepted node holds this partition", 2: "no accepted node holds this partition"}
    assert sorted(c["partition-id"] for c in row["clients"]) == [0, 3]
    log = (tmp_path / "run" / "server.log").read_text()
    assert "example count inf is not a whole positive number" in log
    assert "partition 0 is already held by node" in log and "(a duplicate claim)" in log
    # the liar's 10^12 examples weigh 4x the median partition (federation.max_examples_ratio): 4/5 of the mean,
    # not all of it (before: the global model was exactly the liar's weights)
    state = dict(np.load(tmp_path / "run" / "round-1" / "state.npz"))
    distance = max(float(np.abs(v - CONSTANT).max()) for v in state.values())
    assert 0.5 < distance < 2.0


def test_a_replayed_update_is_rejected_and_a_silent_node_is_left_at_the_deadline(tiny_run, tmp_path):
    run = tiny_run(tmp_path / "run", federation={"clients": 3, "rounds": 2, "eval_examples": 4, "client_cpus": 1,
                                                 "partition": "iid", "timeout": 15.0})
    started = time.time()
    final = simulate(run, client_app=hostile_client_app({1: "replay", 2: "silent"}, sleep=25.0))
    rows = read_metrics(tmp_path / "run")
    first, second = ({r["partition-id"]: r["reason"] for r in row["rejected"]} for row in rows[1:])
    assert first == {2: "no answer within federation.timeout = 15 s"}  # round 1: the replayer is still honest
    assert second[1] == "the update does not carry this round's nonce: replayed from an earlier round, or stale"
    assert second[2] == "no answer within federation.timeout = 15 s"
    assert [c["partition-id"] for c in rows[2]["clients"]] == [0] and final.is_dir()
    assert "rejected client 2: no answer" in (tmp_path / "run" / "server.log").read_text()
    assert time.time() - started < 240


def test_the_runs_ray_cluster_refuses_a_process_without_its_token(tiny_run, tmp_path):
    """Ray 2.55 listens on every interface; a process on the machine (or the network) that reaches its GCS
    without the run's token is refused (before: token authentication was off, and it could run code)."""
    import os
    import subprocess
    import sys

    found = {}

    def probe(server_round, model, tokenizer):
        import ray

        address = ray._private.worker.global_worker.node.gcs_address
        code = f"import ray; ray.init(address='{address}'); print('IN', ray.get(ray.remote(lambda: 1).remote()))"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        reply = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        found["outsider"] = (reply.returncode, "IN 1" in reply.stdout)
        found["mode"] = os.environ.get("RAY_AUTH_MODE")
        return None

    simulate(tiny_run(tmp_path / "run", federation={"clients": 2, "rounds": 1, "eval_examples": 4,
                                                    "client_cpus": 1, "partition": "iid"}), after_round=probe)
    if found["mode"] != "token":
        pytest.skip("Ray was imported before this test's simulation: its token mode is set per process")
    assert found["outsider"][0] != 0 and not found["outsider"][1]
