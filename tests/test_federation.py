"""Federation on tiny models: strategies against hand-computed aggregates, partitions, update checks, resume,
and whole runs in Flower's simulation engine."""

import json
from collections import Counter

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedpt import config as cfg
from fedpt.data import Example
from fedpt.errors import FedptError
from fedpt.federation.partition import partition
from fedpt.federation.server_app import build_strategy, check_update, sample_clients

KEYS = {"a": (2, 3), "b": (4,)}


@pytest.fixture(autouse=True)
def in_a_flower_task(monkeypatch):
    """Flower stamps messages with the identity of the running task; unit tests have none, so give one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def reply(arrays: dict, examples: int = 10, node: int = 1) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples})})
    message = Message(content, dst_node_id=node, message_type="train")
    return Message(content, reply_to=message)


def updates(seed=0, n=3):
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=s) for k, s in KEYS.items()} for _ in range(n)]


def aggregate(strategy_name: str, start: dict, client_arrays: list, examples: list, rounds: int = 1, **extra):
    fed = cfg.FederationConfig(strategy=strategy_name, **extra)
    strategy = build_strategy(fed)
    arrays = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in start.items()})

    class OneNodeGrid:
        def get_node_ids(self):
            return [1]

    for server_round in range(1, rounds + 1):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({}), OneNodeGrid()))
        arrays, _ = strategy.aggregate_train(server_round, [reply(a, e) for a, e in zip(client_arrays, examples)])
    return {k: a.numpy() for k, a in arrays.items()}, messages


def test_fedavg_weights_by_examples():
    start, clients, examples = updates(1, 1)[0], updates(2), [10, 30, 60]
    got, _ = aggregate("fedavg", start, clients, examples)
    for k in KEYS:
        expected = sum(n * c[k] for n, c in zip(examples, clients)) / 100
        np.testing.assert_allclose(got[k], expected, rtol=1e-5)


def test_fedprox_sends_mu_and_averages_like_fedavg():
    start, clients, examples = updates(1, 1)[0], updates(2), [1, 1, 2]
    got, messages = aggregate("fedprox", start, clients, examples, proximal_mu=0.5)
    assert messages[0].content["config"]["proximal-mu"] == 0.5
    np.testing.assert_allclose(got["a"], (clients[0]["a"] + clients[1]["a"] + 2 * clients[2]["a"]) / 4, rtol=1e-5)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimisers_against_hand_computed_steps(name):
    start, clients, examples = updates(1, 1)[0], updates(2), [1, 2, 3]
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    got, _ = aggregate(name, start, clients, examples, rounds=2, server_lr=eta, beta_1=b1, beta_2=b2, tau=tau)
    x = {k: np.asarray(v, dtype=np.float64) for k, v in start.items()}
    m = {k: 0.0 for k in KEYS}
    v = {k: 0.0 for k in KEYS}
    for t in (1, 2):  # the same client updates each round
        for k in KEYS:
            mean = sum(n * c[k] for n, c in zip(examples, clients)) / sum(examples)
            delta = mean - x[k]
            m[k] = b1 * m[k] + (1 - b1) * delta
            if name == "fedadam":
                v[k] = b2 * v[k] + (1 - b2) * delta**2
            else:
                v[k] = v[k] - (1 - b2) * delta**2 * np.sign(v[k] - delta**2)
            step = eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1)) if name == "fedadam" else eta
            x[k] = x[k] + step * m[k] / (np.sqrt(v[k]) + tau)
    for k in KEYS:
        np.testing.assert_allclose(got[k], x[k], rtol=1e-4, atol=1e-6)


def test_bad_updates_are_rejected_with_a_reason():
    good = {k: np.ones(s) for k, s in KEYS.items()}
    assert check_update(reply(good), KEYS) is None
    assert "unknown" in check_update(reply({**good, "c": np.ones(1)}), KEYS)
    assert "missing" in check_update(reply({"a": good["a"]}), KEYS)
    assert "shape" in check_update(reply({**good, "b": np.ones(5)}), KEYS)
    assert "NaN or inf" in check_update(reply({**good, "a": np.full((2, 3), np.nan)}), KEYS)
    assert "NaN or inf" in check_update(reply({**good, "b": np.array([1, np.inf, 0, 0])}), KEYS)
    assert "num-examples" in check_update(reply(good, examples=0), KEYS)
    failed = Message(Error(code=0, reason="out of memory"), reply_to=Message(RecordDict(), dst_node_id=1,
                                                                                message_type="train"))
    assert "out of memory" in check_update(failed, KEYS)


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


def test_natural_partition_needs_one_client_per_group():
    with pytest.raises(FedptError, match="has 3 groups.*clients = 2"):
        partition(examples_with_groups({"x": 3, "y": 3, "z": 3}), cfg.FederationConfig(clients=2), seed=0)


def test_client_sampling_depends_on_seed_and_round_only():
    assert sample_clients(0, 3, 10, 4) == sample_clients(0, 3, 10, 4)
    assert len(set(sample_clients(0, 3, 10, 4))) == 4
    assert {tuple(sample_clients(0, r, 10, 4)) for r in range(1, 6)} != {tuple(sample_clients(0, 1, 10, 4))}


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 3\n[federation]\nclients = 2\nrounds = 4\n[tuning]\ntarget_modules = ["q_proj"]\n')
    run = cfg.load(path, ["federation.rounds=5", "federation.strategy=fedyogi", "data.categories=ai,food"])
    assert (run.seed, run.federation.clients, run.federation.rounds, run.federation.strategy) == (3, 2, 5, "fedyogi")
    assert run.tuning.target_modules == ["q_proj"] and run.data.categories == ["ai", "food"]
    assert cfg.from_flat(run.flat()) == run
    with pytest.raises(FedptError, match=r"unknown key\(s\) \['rank'\] in \[tuning\]"):
        cfg.load(path, ["tuning.rank=4"])
    with pytest.raises(FedptError, match="federation.rounds must be int"):
        cfg.load(path, ["federation.rounds=many"])
    with pytest.raises(FedptError, match="unknown strategy"):
        cfg.load(None, ["federation.strategy=fedsgd"])
    with pytest.raises(FedptError, match=r"kd_every is written `\[distill\] every = K`"):
        cfg.load(None, ["kd_every=2"])
    with pytest.raises(FedptError, match="does not exist"):
        cfg.load(tmp_path / "nope.toml")
    path.write_text("[federation\n")
    with pytest.raises(FedptError, match="not valid TOML"):
        cfg.load(path)


# --- whole runs in the simulation engine ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    """Three groups of question/answer pairs in the tiny tokenizer's words."""
    rows = []
    topics = {"names": ["what is your name", "my name is fedpt"], "jokes": ["tell me a joke", "why did the chicken"],
              "hello": ["hello world", "good morning to you"]}
    for group, (q, a) in topics.items():
        for i in range(12):
            rows.append({"prompt": f"{q} {i}", "response": f"{a} {i}", "topic": group})
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_run(tiny, qa_file, out, **sections) -> cfg.RunConfig:
    base = cfg.load(None, [], out=str(out))
    run = cfg.replace(
        base,
        model={"small": str(tiny["small"])},
        data={"source": str(qa_file), "group_field": "topic", "test_percent": 20, "validation_percent": 0},
        federation={"clients": 3, "rounds": 2, "eval_examples": 8, "client_cpus": 1},
        tuning={"dtype": "float32", "local_steps": 2, "batch_size": 2, "max_length": 32, "learning_rate": 5e-3},
    )
    return cfg.replace(run, **sections) if sections else run


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_simulation_three_clients_two_rounds(tiny, qa_file, tmp_path):
    from fedpt.federation.run import simulate

    final = simulate(tiny_run(tiny, qa_file, tmp_path / "run"))
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
        simulate(tiny_run(tiny, qa_file, tmp_path / "run"))


@pytest.mark.slow
def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny, qa_file, tmp_path):
    from fedpt.federation.run import simulate

    extra = {"federation": {"clients": 3, "rounds": 3, "eval_examples": 4, "client_cpus": 1, "fraction": 0.67,
                            "strategy": "fedadam", "server_lr": 0.01}}
    simulate(tiny_run(tiny, qa_file, tmp_path / "whole", **extra))

    class Killed(Exception):
        pass

    def kill_in_round_2(server_round, model, tokenizer):
        if server_round == 2:
            raise Killed  # after aggregation, before round 2 is saved: as if the server died mid-round
        return None

    with pytest.raises(Killed):
        simulate(tiny_run(tiny, qa_file, tmp_path / "killed", **extra), after_round=kill_in_round_2)
    assert [r["round"] for r in read_metrics(tmp_path / "killed")] == [0, 1]
    simulate(tiny_run(tiny, qa_file, tmp_path / "killed", **extra), resume=True)
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


@pytest.mark.slow
def test_a_bad_client_is_rejected_and_the_round_goes_on(tiny, qa_file, tmp_path):
    from fedpt.federation.run import simulate

    run = tiny_run(tiny, qa_file, tmp_path / "run", federation={"clients": 3, "rounds": 1, "eval_examples": 4,
                                                                "client_cpus": 1})
    simulate(run, client_app=poisoned_client_app())
    row = read_metrics(tmp_path / "run")[1]
    assert [c["partition-id"] for c in row["clients"]] == [0, 2]
    assert len(row["rejected"]) == 1 and row["rejected"][0]["partition-id"] == 1
    assert "NaN" in row["rejected"][0]["reason"]


def test_the_shipped_config_is_the_embedded_default():
    from pathlib import Path

    shipped = cfg.load(Path(__file__).parent.parent / "configs" / "chatterbot.toml")
    assert shipped == cfg.RunConfig()


@pytest.mark.slow
def test_distillation_between_rounds(tiny, qa_file, tmp_path):
    from fedpt.federation.run import simulate

    run = tiny_run(tiny, qa_file, tmp_path / "run", model={"small": str(tiny["small"]), "large": str(tiny["large"])},
                   distill={"every": 1, "n_texts": 4, "max_new_tokens": 4, "steps": 2, "top_k": 8})
    simulate(run)
    rows = read_metrics(tmp_path / "run")
    assert all(r["distilled"]["distill_texts"] > 0 for r in rows[1:])


@pytest.mark.slow
def test_experiment_end_to_end_on_tiny_models(tiny, qa_file, tmp_path):
    from fedpt.experiment import run_experiment

    run = tiny_run(tiny, qa_file, tmp_path / "unused", model={"small": str(tiny["small"]), "large": str(tiny["large"])},
                   data={"source": str(qa_file), "group_field": "topic", "test_percent": 25, "validation_percent": 25},
                   federation={"clients": 3, "rounds": 2, "eval_examples": 4, "client_cpus": 1},
                   distill={"every": 1, "n_texts": 4, "max_new_tokens": 4, "steps": 2, "top_k": 8},
                   experiment={"alphas": [0.5, 1.0], "fusion_weights": [0.5], "generate_examples": 3,
                               "max_new_tokens": 4})
    results = run_experiment(run, tmp_path / "exp", command="test")
    models = results["models"]
    for name in ("small_base", "small_fedpt", "large_base", "fedpt_proxy", "fedpt_best", "large_direct",
                 "small_central", "small_fedpt_distill", "fedpt_distill_proxy"):
        assert np.isfinite(models[name]["nll"]), name
    assert models["fedpt_proxy"]["fusion"] == "alpha=1"
    chosen = results["chosen_on_validation"]["overall"]
    grid = results["fusion_grid"]
    assert grid[chosen]["validation"]["nll"] == min(v["validation"]["nll"] for v in grid.values())
    assert models["fedpt_best"]["nll"] == grid[chosen]["test"]["nll"]
    assert 0 < results["cost_ratio_fedpt_over_direct"]["bytes_up_per_client_round"] < 1  # the tiny small is smaller
    for name in ("results.json", "report.md", "rounds.png", "metrics.png", "costs.png"):
        assert (tmp_path / "exp" / name).is_file()
    # a second call reuses every trained stage
    again = run_experiment(run, tmp_path / "exp", command="test")
    assert again["models"]["fedpt_best"]["nll"] == pytest.approx(models["fedpt_best"]["nll"], abs=1e-6)
