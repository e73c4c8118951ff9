"""Client-level differential privacy: Flower's clipping and noise, and an accountant that knows fedpt's sampling.

The mechanism is DP-FedAvg (McMahan et al. 2018), as Flower's `DifferentialPrivacy*FixedClipping` wrappers
implement it: each update (client weights - global weights) is clipped to L2 norm C, by the server or by the
client, the clipped updates are averaged with equal weights, and Gaussian noise of std z*C/m is added to the
mean of m. fedpt does the clipping and noise itself, in its round loop: Flower 1.42's clipping divides by the
update's norm, so a single client that sends back the global weights unchanged (a zero update) raises
ZeroDivisionError and would fail every round it takes part in. With `dp = "local"` each client adds
N(0, (z*C)^2) to its own clipped update before sending it.

Accounting uses Flower's RDP accountant (Google's dp-accounting underneath) on the schedule fedpt really runs:
m of N clients sampled without replacement each round (fedpt.federation.strategy.sample_clients). That
sampling is analysed under "replace one client", where one client's clipped update can move the sum by up to
2C, so the accountant is given z/2 (the noise std over that sensitivity). Flower's own wrappers account only
without sampling amplification, so fedpt keeps the accountant itself. Local DP gets no amplification (the
server knows who took part): each client composes one Gaussian release, again z/2, per round it took part in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedpt.config import FederationConfig, PrivacyConfig, RunConfig, replace
from fedpt.errors import FedptError
from fedpt.federation.partition import round_seed


def delta_of(privacy: PrivacyConfig, federation: FederationConfig) -> float:
    """The delta reported: as configured, or min(1e-5, 0.1 / N) (N = clients): well below 1/N, at which
    publishing one client's data in full would meet the guarantee."""
    return privacy.delta or min(1e-5, 0.1 / federation.clients)


class Accountant:
    """The (epsilon, delta) a run has spent, one `spend` per round whose aggregate was released."""

    def __init__(self, privacy: PrivacyConfig, federation: FederationConfig, noise_multiplier: float):
        from flwr.supercore.privacy_accounting import (
            GaussianPrivacyEvent,
            NeighboringRelation,
            SamplingMethod,
        )
        from flwr.supercore.privacy_accounting import (
            PrivacyConfig as FlowerPrivacy,
        )
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        self.privacy, self.federation = privacy, federation
        self.local = privacy.dp == "local"
        self.delta = delta_of(privacy, federation)
        self.noise_multiplier = noise_multiplier
        n, m = federation.clients, federation.clients_per_round()
        sampling = ((SamplingMethod.NO_AMPLIFICATION, NeighboringRelation.ADD_OR_REMOVE_ONE) if self.local
                    else (SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE))
        self.accountant = RdpAccountant(FlowerPrivacy(target_delta=self.delta, population_size=n,
                                                      sampling_method=sampling[0], neighboring_relation=sampling[1]))
        # replacing one client moves the clipped sum (or its own update) by up to 2C: noise std z*C is z/2 of that
        self.event = GaussianPrivacyEvent(noise_multiplier=noise_multiplier / 2, sample_size=1 if self.local else m,
                                          population_size=n)
        self.rounds = 0

    def spend(self, rounds: int = 1) -> None:
        """Compose `rounds` more releases (for local DP: rounds the most-sampled client took part in)."""
        if rounds:
            self.accountant.compose(self.event, rounds)
            self.rounds += rounds

    def epsilon(self) -> float:
        return self.accountant.get_epsilon(self.delta) if self.rounds else 0.0

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon had `rounds` more releases been composed (nothing is changed)."""
        projected = Accountant(self.privacy, self.federation, self.noise_multiplier)
        projected.spend(self.rounds + rounds)
        return projected.epsilon()


def participations(seed: int, federation: FederationConfig, rounds: int) -> int:
    """How many of rounds 1..`rounds` the most-sampled client trains in (local DP composes per client)."""
    from fedpt.federation.strategy import sample_clients

    counts = [0] * federation.clients
    for server_round in range(1, rounds + 1):
        for pid in sample_clients(seed, server_round, federation.clients, federation.clients_per_round()):
            counts[pid] += 1
    return max(counts)


def releases(seed: int, privacy: PrivacyConfig, federation: FederationConfig, rounds: int) -> int:
    """Releases a client's privacy composes over rounds 1..`rounds`."""
    return participations(seed, federation, rounds) if privacy.dp == "local" else rounds


def calibrate(seed: int, privacy: PrivacyConfig, federation: FederationConfig) -> float:
    """The smallest noise multiplier (within 0.1%) that spends at most target_epsilon over all rounds."""
    spent = releases(seed, privacy, federation, federation.rounds)

    def epsilon(z: float) -> float:
        accountant = Accountant(privacy, federation, z)
        accountant.spend(spent)
        return accountant.epsilon()

    low, high = 1e-3, 1.0
    while epsilon(high) > privacy.target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise FedptError(f"no noise multiplier up to 1e4 keeps epsilon <= {privacy.target_epsilon} over "
                             f"{federation.rounds} rounds")
    while high - low > 1e-3 * high:  # bisection: epsilon falls as the noise grows
        mid = (low + high) / 2
        low, high = (mid, high) if epsilon(mid) > privacy.target_epsilon else (low, mid)
    return high


def noise_multiplier(seed: int, privacy: PrivacyConfig, federation: FederationConfig) -> float:
    """The run's z: as configured, or calibrated to the target epsilon."""
    return privacy.noise_multiplier or calibrate(seed, privacy, federation)


def add_noise(state: dict[str, np.ndarray], z: float, clip_norm: float, m: int, seed: int) -> dict[str, np.ndarray]:
    """Central DP's release: the mean of m clipped updates plus N(0, (z*C/m)^2) per coordinate (std z*C on the sum,
    as Flower's `compute_stdv`), drawn from the round's own generator so that runs and resumed runs repeat."""
    rng = np.random.default_rng([seed, 2])
    std = z * clip_norm / m
    return {k: (v + rng.normal(0.0, std, v.shape)).astype(v.dtype) for k, v in state.items()}


def clip(update: dict[str, np.ndarray], clip_norm: float) -> dict[str, np.ndarray]:
    """The update scaled to L2 norm at most `clip_norm` over all tensors (Flower's flat clipping)."""
    from fedpt.federation.strategy import l2_norm

    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v * scale).astype(v.dtype) for k, v in update.items()}


def clipped(weights: dict[str, np.ndarray], sent: dict[str, np.ndarray], clip_norm: float) -> dict[str, np.ndarray]:
    """The weights moved from `sent` by at most `clip_norm` (their update clipped)."""
    update = clip({k: weights[k] - sent[k] for k in sent}, clip_norm)
    return {k: (sent[k] + update[k]).astype(sent[k].dtype) for k in sent}


def local_noise(weights: dict[str, np.ndarray], sent: dict[str, np.ndarray], privacy: PrivacyConfig,
                seed: int) -> dict[str, np.ndarray]:
    """Local DP on a client: its update clipped to C, plus N(0, (z*C)^2) per coordinate."""
    rng = np.random.default_rng([seed, 1])  # a stream apart from the one training draws from
    std = privacy.noise_multiplier * privacy.clip_norm
    return {k: (v + rng.normal(0.0, std, v.shape)).astype(v.dtype)
            for k, v in clipped(weights, sent, privacy.clip_norm).items()}


class RunPrivacy:
    """A run's differential privacy as the server applies it: the noise multiplier (calibrated to the target
    epsilon if asked), the epsilon spent so far, the budget check before each round, and the central mechanism
    (clip each update, noise the mean)."""

    def __init__(self, config: RunConfig):
        settings, fed = config.privacy, config.federation
        z = noise_multiplier(config.seed, settings, fed)
        self.config = replace(config, privacy={"noise_multiplier": z})  # the clients read z from the config
        self.settings, self.federation, self.seed = self.config.privacy, fed, config.seed
        self.accountant = Accountant(self.settings, fed, z)
        self.central = settings.dp == "central"
        first = self.accountant.epsilon_after(releases(self.seed, settings, fed, 1))
        if settings.target_epsilon and first > settings.target_epsilon:
            raise FedptError(f"one round alone spends epsilon {first:.3g} > privacy.target_epsilon "
                             f"{settings.target_epsilon:g}: raise privacy.noise_multiplier (now {z:g}) or the target")

    @classmethod
    def of(cls, config: RunConfig) -> RunPrivacy | None:
        return None if config.privacy.dp == "off" else cls(config)

    def resume(self, released: int) -> None:
        """What the rounds kept by a resumed run have spent."""
        self.accountant.spend(released)

    def over_budget(self, server_round: int) -> str | None:
        """Why the round would take epsilon over privacy.target_epsilon (the run stops before it), or None."""
        target = self.settings.target_epsilon
        if not target:
            return None
        after = self.accountant.epsilon_after(self._releases(server_round) - self.accountant.rounds)
        if after <= target:
            return None
        return (f"round {server_round} would spend epsilon {after:.3g} > privacy.target_epsilon {target:g} (delta "
                f"{self.accountant.delta:.3g}): the run stops after round {server_round - 1}")

    def spend(self, server_round: int, failed: str | None) -> dict[str, Any]:
        """Account the round's release and return the metrics' privacy entry. Local DP releases each client's
        noised update whatever the server does with it; central DP releases the aggregate only if it is kept."""
        if self.accountant.local or not failed:
            self.accountant.spend(self._releases(server_round) - self.accountant.rounds if self.accountant.local
                                  else 1)
        return {"dp": self.settings.dp, "epsilon": self.accountant.epsilon(), "delta": self.accountant.delta,
                "noise_multiplier": self.accountant.noise_multiplier, "clip_norm": self.settings.clip_norm,
                "releases": self.accountant.rounds}

    def over_clip_norm(self, norms: dict[int, float]) -> dict[int, str]:
        """Central DP with client-side clipping: an update over the clip norm broke the protocol."""
        if not self.central or self.settings.clipping != "client":
            return {}
        clip_norm = self.settings.clip_norm
        return {pid: f"update norm {norm:.3g} is over privacy.clip_norm {clip_norm:g} (the client did not clip)"
                for pid, norm in norms.items() if norm > clip_norm * (1 + 1e-4)}

    def clip(self, weights: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return clipped(weights, state, self.settings.clip_norm)

    def noise(self, state: dict[str, np.ndarray], server_round: int) -> dict[str, np.ndarray]:
        return add_noise(state, self.accountant.noise_multiplier, self.settings.clip_norm,
                         self.federation.clients_per_round(), round_seed(self.seed, server_round, -1))

    def _releases(self, server_round: int) -> int:
        return releases(self.seed, self.settings, self.federation, server_round)
