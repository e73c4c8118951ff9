"""Strategies against hand-computed aggregates, the update checks, client sampling, and the strategy's state."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedpt import config as cfg
from fedpt.federation.strategy import (
    build_strategy,
    check_update,
    clean_reply,
    norm_outliers,
    restore_strategy_state,
    sample_clients,
    strategy_state,
    update_norm,
)

pytestmark = pytest.mark.usefixtures("in_a_flower_task")


KEYS = {"a": (2, 3), "b": (4,)}
GLOBAL = {k: np.zeros(s, dtype=np.float32) for k, s in KEYS.items()}


@pytest.fixture(autouse=True)
def in_a_flower_task(monkeypatch):
    """Flower stamps messages with the identity of the running task; unit tests have none, so give one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def reply(arrays: dict, examples=10, node: int = 1, dtype=np.float32, **metrics) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v, dtype=dtype)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples, **metrics})})
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
    assert check_update(reply(good), GLOBAL, max_examples=10) is None
    assert "unknown" in check_update(reply({**good, "c": np.ones(1)}), GLOBAL)
    assert "missing" in check_update(reply({"a": good["a"]}), GLOBAL)
    assert "shape" in check_update(reply({**good, "b": np.ones(5)}), GLOBAL)
    assert "dtype float64, expected float32" in check_update(reply(good, dtype=np.float64), GLOBAL)
    assert "NaN or inf" in check_update(reply({**good, "a": np.full((2, 3), np.nan)}), GLOBAL)
    assert "NaN or inf" in check_update(reply({**good, "b": np.array([1, np.inf, 0, 0])}), GLOBAL)
    for examples in (0, -3, float("nan"), float("inf")):
        assert "finite positive number" in check_update(reply(good, examples=examples), GLOBAL)
    # a node cannot claim more examples than its partition holds (FedAvg would follow it alone)
    assert "more than the 40 examples" in check_update(reply(good, examples=10**12), GLOBAL, max_examples=40)
    failed = Message(Error(code=0, reason='Traceback (most recent call last):\n  File "x.py", line 1\n'
                                          'RuntimeError: out of memory\n'),
                     reply_to=Message(RecordDict(), dst_node_id=1, message_type="train"))
    assert check_update(failed, GLOBAL) == "client failed: RuntimeError: out of memory"


def test_updates_that_move_the_model_too_far_are_rejected():
    base = {k: np.zeros(s) for k, s in KEYS.items()}
    moved = {k: v + 1.0 for k, v in base.items()}  # norm sqrt(10)
    assert update_norm(reply(moved).content["arrays"], GLOBAL) == \
        pytest.approx(np.sqrt(10))
    norms = {0: 1.0, 1: 1.2, 2: 50.0}
    assert set(norm_outliers(norms, ratio=10, bound=0)) == {2}
    assert norm_outliers({0: 1.0, 1: 1e6}, ratio=10, bound=0) == {1: "update norm 1e+06 is over 10x the round's "
                                                                     "median 1"}  # two clients: the lower median
    assert set(norm_outliers(norms, ratio=0, bound=1.1)) == {1, 2}
    assert norm_outliers(norms, ratio=0, bound=0) == {}


def test_a_reply_with_extra_metric_keys_does_not_stop_aggregation():
    clients = updates(3)
    replies = [reply(clients[0], 1), reply(clients[1], 1, extra=5.0)]
    assert check_update(replies[1], GLOBAL) is None  # an extra number is fine; an odd value is not:
    assert "metric 'junk' is not a finite number" in check_update(reply(clients[1], 1, junk=[1.0, 2.0]), GLOBAL)
    assert "metric 'loss' is not a finite number" in check_update(reply(clients[1], 1, loss=float("nan")), GLOBAL)
    strategy = build_strategy(cfg.FederationConfig())
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord({}), OneNode())
    arrays, _ = strategy.aggregate_train(1, [clean_reply(r) for r in replies])
    np.testing.assert_allclose(arrays["a"].numpy(), (clients[0]["a"] + clients[1]["a"]) / 2, rtol=1e-5)


class OneNode:
    def get_node_ids(self):
        return [1]


def test_fedmedian_and_trimmed_mean_against_hand_computation():
    start, clients = updates(1, 1)[0], updates(2, 5)
    clients[4] = {k: v * 1000 for k, v in clients[4].items()}  # one attacker with a huge update
    got, _ = aggregate("fedmedian", start, clients, [1] * 5)
    for k in KEYS:
        np.testing.assert_allclose(got[k], np.median(np.stack([c[k] for c in clients]), axis=0), rtol=1e-5)
    got, _ = aggregate("fedtrimmedavg", start, clients, [1] * 5, trim_beta=0.2)
    for k in KEYS:  # per coordinate: drop the lowest and the highest of five, average the three left
        ordered = np.sort(np.stack([c[k] for c in clients]), axis=0)
        np.testing.assert_allclose(got[k], ordered[1:4].mean(axis=0), rtol=1e-5)


def test_krum_picks_an_honest_update_against_a_large_norm_attacker():
    start = updates(1, 1)[0]
    rng = np.random.default_rng(3)
    centre = {k: rng.normal(size=s) for k, s in KEYS.items()}
    honest = [{k: v + 0.01 * rng.normal(size=v.shape) for k, v in centre.items()} for _ in range(4)]
    attacker = {k: v + 100.0 for k, v in centre.items()}
    clients = [*honest, attacker]
    got, _ = aggregate("krum", start, clients, [1] * 5, malicious_clients=1, clients=5)
    # Krum's score: the sum of squared distances to the n - f - 2 = 2 nearest others; the smallest score wins
    flat = [np.concatenate([c[k].ravel() for k in KEYS]) for c in clients]
    scores = [sorted(float(np.sum((a - b) ** 2)) for j, b in enumerate(flat) if j != i)[:2] for i, a in enumerate(flat)]
    best = int(np.argmin([sum(s) for s in scores]))
    assert best < 4
    for k in KEYS:
        np.testing.assert_allclose(got[k], clients[best][k], rtol=1e-5)
    got, _ = aggregate("multikrum", start, clients, [1] * 5, malicious_clients=1, multikrum_select=3, clients=5)
    assert np.abs(got["a"] - centre["a"]).max() < 0.1
    got, _ = aggregate("bulyan", start, [*honest, *honest[:2], attacker], [1] * 7, malicious_clients=1, clients=7)
    assert np.abs(got["a"] - centre["a"]).max() < 0.1


def test_robust_strategies_need_enough_clients():
    with pytest.raises(cfg.FedptError, match="needs at least 7 clients per round"):
        cfg.FederationConfig(strategy="bulyan", malicious_clients=1, clients=5)


def test_client_sampling_depends_on_seed_and_round_only():
    assert sample_clients(0, 3, 10, 4) == sample_clients(0, 3, 10, 4)
    assert len(set(sample_clients(0, 3, 10, 4))) == 4
    assert {tuple(sample_clients(0, r, 10, 4)) for r in range(1, 6)} != {tuple(sample_clients(0, 1, 10, 4))}




def test_server_optimiser_state_survives_a_restore():
    start, clients, examples = updates(1, 1)[0], updates(2), [1, 2, 3]
    strategy = build_strategy(cfg.FederationConfig(strategy="fedadam"))
    assert strategy_state(build_strategy(cfg.FederationConfig())) == {}  # FedAvg keeps no state
    arrays = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in start.items()})

    class OneNodeGrid:
        def get_node_ids(self):
            return [1]

    replies = [reply(a, e) for a, e in zip(clients, examples)]
    strategy.configure_train(1, arrays, ConfigRecord({}), OneNodeGrid())
    arrays, _ = strategy.aggregate_train(1, replies)
    saved = strategy_state(strategy)
    assert sorted(saved) == sorted(f"{m}/{k}" for m in ("m_t", "v_t") for k in KEYS)
    # round 2 from the live strategy and from a fresh one given the saved state: the same step
    fresh = build_strategy(cfg.FederationConfig(strategy="fedadam"))
    restore_strategy_state(fresh, saved)
    results = []
    for s in (strategy, fresh):
        s.configure_train(2, arrays, ConfigRecord({}), OneNodeGrid())
        results.append({k: a.numpy() for k, a in s.aggregate_train(2, replies)[0].items()})
    for k in KEYS:
        np.testing.assert_array_equal(results[0][k], results[1][k])


def test_what_a_node_may_say_of_itself_and_what_it_may_weigh():
    import math

    from fedpt.federation.server_app import describe_problem
    from fedpt.federation.strategy import examples_cap

    held = {0: (11, 40)}
    assert describe_problem(1, 40, 3, held) is None
    assert "duplicate" in describe_problem(0, 40, 3, held)
    assert "not one of 0..2" in describe_problem(3, 40, 3, held) and "not one of" in describe_problem(True, 4, 3, {})
    for bad in (float("inf"), float("nan"), 0, -3, 2.5, "12", None):
        assert "not a whole positive number" in describe_problem(1, bad, 3, held), bad
    assert describe_problem(1, 7.0, 3, held) is None  # a float that is a whole number is one
    assert examples_cap({0: 10, 1: 30, 2: 10**12}, 4.0) == 120  # 4x the lower median: the liar cannot raise it
    assert math.isinf(examples_cap({0: 10}, 0.0))
