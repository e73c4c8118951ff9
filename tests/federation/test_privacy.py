"""Client-level differential privacy: clipping, the noise's scale, the accountant against dp-accounting called
directly, calibration to a target epsilon, and whole federations that account and stop at their budget."""

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedpt import config as cfg
from fedpt.errors import FedptError
from fedpt.federation import privacy as dp
from fedpt.federation.run_folder import read_metrics
from fedpt.federation.strategy import build_strategy


def setting(n=10, m=3, rounds=5, **privacy):
    federation = cfg.FederationConfig(clients=n, fraction=m / n, rounds=rounds)
    return cfg.PrivacyConfig(**{"dp": "central", "noise_multiplier": 1.0, **privacy}), federation


def test_the_accountant_is_dp_accountings_for_fedpts_sampling():
    from dp_accounting import dp_event, rdp

    privacy, federation = setting(n=10, m=3, noise_multiplier=1.1)
    accountant = dp.Accountant(privacy, federation, 1.1)
    accountant.spend(5)
    # m of N clients without replacement under "replace one": sensitivity 2C, so the Gaussian's multiplier is z/2
    direct = rdp.RdpAccountant(neighboring_relation=rdp.rdp_privacy_accountant.NeighborRel.REPLACE_ONE)
    direct.compose(dp_event.SampledWithoutReplacementDpEvent(10, 3, dp_event.GaussianDpEvent(0.55)), 5)
    assert accountant.delta == 1e-5  # min(1e-5, 0.1 / N): before, 1 / N = 0.1, which one published client meets
    assert accountant.epsilon() == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)
    assert accountant.epsilon_after(2) > accountant.epsilon() > 0
    assert accountant.rounds == 5  # epsilon_after changed nothing


def test_local_dp_composes_a_clients_participations_without_amplification():
    from dp_accounting import dp_event, rdp

    privacy, federation = setting(n=4, m=2, rounds=6, dp="local", noise_multiplier=3.0, delta=1e-3)
    taken = dp.participations(0, federation, 6)
    assert 3 <= taken <= 6 and dp.releases(0, privacy, federation, 6) == taken
    accountant = dp.Accountant(privacy, federation, 3.0)
    accountant.spend(taken)
    direct = rdp.RdpAccountant()
    direct.compose(dp_event.GaussianDpEvent(1.5), taken)
    assert accountant.epsilon() == pytest.approx(direct.get_epsilon(1e-3), rel=1e-12)


def test_a_target_epsilon_calibrates_the_noise():
    privacy, federation = setting(n=100, m=10, rounds=20, noise_multiplier=0.0, target_epsilon=8.0, delta=0.01)
    z = dp.calibrate(0, privacy, federation)

    def spent(multiplier):
        accountant = dp.Accountant(privacy, federation, multiplier)
        accountant.spend(20)
        return accountant.epsilon()

    assert spent(z) <= 8.0 < spent(z * 0.99)
    assert dp.noise_multiplier(0, privacy, federation) == z
    assert dp.noise_multiplier(0, cfg.replace(cfg.RunConfig(), privacy={"dp": "central", "noise_multiplier": 2.0})
                               .privacy, federation) == 2.0


def reply(weights, node):
    arrays = ArrayRecord({"w": Array(np.asarray(weights, dtype=np.float32))})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10 * node})})
    message = Message(content, dst_node_id=node, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_src_node_id"] = node
    return message


def aggregate(global_weights, clients, tmp_path, seed=0, **privacy):
    """The server's own aggregation step (fedpt.federation.rounds.aggregate) for one round of central DP."""
    from fedpt.federation.rounds import RoundResult
    from fedpt.federation.rounds import aggregate as server_aggregate
    from fedpt.federation.strategy import clean_reply

    run = cfg.replace(cfg.RunConfig(), seed=seed, out=str(tmp_path / "never-written"),
                      federation={"clients": len(clients), "rounds": 1},
                      privacy={"dp": "central", **privacy})
    privacy = dp.RunPrivacy(run)
    state = {"w": np.asarray(global_weights, dtype=np.float32)}
    accepted = {pid: reply(state["w"] + np.asarray(u, np.float32), pid + 1) for pid, u in enumerate(clients)}
    result = RoundResult(replies=[clean_reply(accepted[pid], uniform=True) for pid in sorted(accepted)])
    new, failed = server_aggregate(build_strategy(run.federation), 1, result, state, privacy)
    assert failed is None, failed
    assert not (tmp_path / "never-written").exists()
    return new["w"].astype(np.float64) - state["w"]


def test_server_side_clipping_bounds_every_contribution(in_a_flower_task, tmp_path):
    updates = [[0.3, 0.4, 0, 0], [300.0, 0, 400, 0], [0, 0, 0, -2.0], [0, 0, 0, 0]]
    # no noise to speak of: the mean of clipped updates, equally weighted (the clients hold 10, 20, 30, 40 examples)
    mean = aggregate(np.ones(4), updates, tmp_path, clip_norm=1.0, noise_multiplier=1e-9)
    # by hand: norms 0.5 (kept), 500 (scaled to 1), 2 (scaled to 1), 0 (kept: Flower's own clipping divides by it)
    by_hand = np.mean([[0.3, 0.4, 0, 0], [0.6, 0, 0.8, 0], [0, 0, 0, -1.0], [0, 0, 0, 0]], axis=0)
    np.testing.assert_allclose(mean, by_hand, atol=1e-6)
    assert all(np.linalg.norm(dp.clipped({"w": np.float32(u)}, {"w": np.float32(0 * u)}, 1.0)["w"]) <= 1 + 1e-6
               for u in np.asarray(updates, np.float32))


def test_the_noise_has_the_configured_scale(in_a_flower_task, tmp_path):
    d, m, z, clip_norm = 20_000, 4, 2.0, 0.5
    noise = aggregate(np.ones(d), [np.zeros(d)] * m, tmp_path, clip_norm=clip_norm, noise_multiplier=z)
    want = z * clip_norm / m  # std z*C on the sum, so z*C/m on the mean
    # std estimated from d samples: relative standard error 1/sqrt(2d) = 0.5%; allow 5 of them
    assert abs(noise.std() / want - 1) < 5 / math.sqrt(2 * d)
    assert abs(noise.mean()) < 5 * want / math.sqrt(d)
    again = aggregate(np.ones(d), [np.zeros(d)] * m, tmp_path, clip_norm=clip_norm, noise_multiplier=z)
    np.testing.assert_array_equal(noise, again)  # the same seed and round, the same noise: runs repeat
    other = aggregate(np.ones(d), [np.zeros(d)] * m, tmp_path, seed=1, clip_norm=clip_norm, noise_multiplier=z)
    assert not np.allclose(noise, other)


def test_local_noise_clips_then_adds_the_clients_own_noise():
    sent = {"a": np.zeros(3, np.float32), "b": np.zeros(20_000, np.float32)}
    weights = {"a": np.array([30.0, 40.0, 0.0], np.float32), "b": np.zeros(20_000, np.float32)}
    privacy = cfg.PrivacyConfig(dp="local", noise_multiplier=1e-9, clip_norm=5.0)
    np.testing.assert_allclose(dp.local_noise(weights, sent, privacy, 0)["a"], [3.0, 4.0, 0.0], atol=1e-6)
    privacy = cfg.PrivacyConfig(dp="local", noise_multiplier=0.4, clip_norm=5.0)
    noised = dp.local_noise(weights, sent, privacy, 0)["b"].astype(np.float64)
    assert abs(noised.std() / 2.0 - 1) < 5 / math.sqrt(2 * noised.size)


def test_privacy_settings_that_cannot_work_are_one_line_errors():
    with pytest.raises(FedptError, match="needs federation.strategy 'fedavg' or 'fedprox', not 'fedmedian'"):
        cfg.load(None, ["privacy.dp='central'", "privacy.noise_multiplier=1.0", "federation.strategy='fedmedian'"])
    with pytest.raises(FedptError, match="noise_multiplier > 0 or a target_epsilon"):
        cfg.load(None, ["privacy.dp='local'"])
    with pytest.raises(FedptError, match="privacy.dp must be one of off, central, local"):
        cfg.load(None, ["privacy.dp='global'"])


@pytest.mark.slow
def test_a_federation_accounts_every_round_and_stops_at_its_budget(tiny_run, tmp_path):
    from fedpt.federation.simulation import simulate

    privacy = {"dp": "central", "clipping": "client", "clip_norm": 0.05, "noise_multiplier": 1.0}
    base = tiny_run(tmp_path / "probe", federation={"clients": 3, "rounds": 3, "eval_examples": 4, "client_cpus": 1},
                    privacy=privacy)
    accountant = dp.Accountant(base.privacy, base.federation, 1.0)
    accountant.spend(2)
    budget = (accountant.epsilon() + accountant.epsilon_after(1)) / 2  # two rounds fit, three do not
    run = cfg.replace(base, out=str(tmp_path / "run"), privacy={**privacy, "target_epsilon": budget})
    final = simulate(run)
    rows = read_metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [0, 1, 2]
    epsilons = [r["privacy"]["epsilon"] for r in rows[1:]]
    assert epsilons[0] < epsilons[1] <= budget
    assert epsilons[1] == pytest.approx(accountant.epsilon(), rel=1e-9)
    for row in rows[1:]:
        for client in row["clients"]:  # the clients clipped their own updates (Flower's fixedclipping_mod)
            assert client["update_norm"] <= 0.05 * (1 + 1e-5)
    assert (final / "adapter_config.json").is_file()
    assert json.loads((final / ".fedpt-final").read_text()) == {"round": 2}  # the last round within the budget

    too_tight = cfg.replace(base, out=str(tmp_path / "none"), privacy={**privacy, "target_epsilon": 1e-3})
    with pytest.raises(FedptError, match="one round alone spends epsilon"):
        simulate(too_tight)
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_local_dp_clients_send_clipped_noised_updates(tiny_run, tmp_path):
    from fedpt.federation.simulation import simulate

    run = tiny_run(tmp_path / "run", federation={"clients": 3, "rounds": 1, "eval_examples": 2, "client_cpus": 1},
                   privacy={"dp": "local", "clip_norm": 0.01, "noise_multiplier": 0.5})
    simulate(run)
    row = read_metrics(tmp_path / "run")[1]
    assert not row["rejected"] and row["privacy"]["dp"] == "local" and row["privacy"]["releases"] == 1
    # each update: clipped to 0.01, plus noise of std 0.005 on every coordinate, so its norm is about
    # 0.005 * sqrt(coordinates) (>> 0.01), and the same for every client
    coordinates = sum(v.size for v in np.load(tmp_path / "run" / "round-1" / "state.npz").values())
    for client in row["clients"]:
        assert client["update_norm"] == pytest.approx(0.005 * math.sqrt(coordinates), rel=0.05)


def test_a_delta_that_says_nothing_is_refused_and_bad_settings_are_one_line():
    from fedpt.errors import FedptError

    base = cfg.load(None, [])
    with pytest.raises(FedptError, match=r"privacy.delta 0.25 is at least 1/4 .*allow_large_delta"):
        cfg.replace(base, privacy={"dp": "central", "noise_multiplier": 1.0, "delta": 0.25})
    cfg.replace(base, privacy={"dp": "central", "noise_multiplier": 1.0, "delta": 0.25, "allow_large_delta": True})
    cfg.replace(base, privacy={"dp": "central", "noise_multiplier": 1.0, "delta": 1e-6})
    for bad in ({"noise_multiplier": float("inf")}, {"clip_norm": float("nan")}, {"target_epsilon": float("inf")}):
        with pytest.raises(FedptError, match="finite"):
            cfg.replace(base, privacy={"dp": "central", "noise_multiplier": 1.0, **bad})
    with pytest.raises(FedptError, match="max_update_norm a finite number"):
        cfg.replace(base, federation={"max_update_norm": float("nan")})
