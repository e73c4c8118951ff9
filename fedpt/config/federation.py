"""The federation's and privacy's sections of the run config: who trains, how updates are checked and weighed,
and what differential privacy and secure aggregation promise (split from schema.py, which re-exports them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedpt.errors import FedptError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
PARTITIONS = ("natural", "iid", "dirichlet")
UPDATE_FORMATS = ("float32", "float16", "int8", "int4")


@dataclass
class FederationConfig:
    clients: int = 4
    rounds: int = 3
    fraction: float = 1.0  # share of clients trained in each round
    strategy: str = "fedavg"
    proximal_mu: float = 0.0  # FedProx
    server_lr: float = 0.01  # FedAdam / FedYogi: the server's step size (eta)
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    partition: str = "natural"  # natural: whole groups (category, template, group_field) per client; iid; dirichlet
    dirichlet_alpha: float = 0.5  # smaller is more skewed: each client's share of each group ~ Dirichlet(alpha)
    eval_examples: int = 64  # held-out pairs the server scores after each round; 0 scores all
    client_cpus: int = 2  # CPUs per simulated client: with 2 on a 2-core machine, one client trains at a time
    timeout: float = 900.0  # seconds the server waits for a round's replies (a chatterbot round: ~190 s on 2 cores)
    trim_beta: float = 0.2  # FedTrimmedAvg: the share of values cut at each end, per coordinate
    malicious_clients: int = 0  # Krum, MultiKrum, Bulyan: how many clients per round may be malicious
    multikrum_select: int = 2  # MultiKrum: updates averaged
    min_clients: int = 1  # accepted updates a round needs; with fewer, the round fails and the global model stays
    max_norm_ratio: float = 10.0  # reject an update that moves the model over this many times the round's median
    max_examples_ratio: float = 4.0  # a node weighs at most this many times the median partition size; 0: no cap
    #                               move (the lower median); 0 turns the check off
    max_update_norm: float = 0.0  # reject an update that moves the model farther than this (L2); 0: no bound
    update_format: str = "float32"  # what a client sends (fedpt/federation/compression.py): its float32 weights, or
    #                                 its update as float16, int8 or int4 (blockwise absmax)
    error_feedback: bool = True  # int8/int4/float16: a client adds what rounding lost to its next update
    client_gpus: float = 0.25  # GPUs per simulated client where CUDA is present (a share: 0.25 puts 4 on a GPU)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise FedptError(f"unknown strategy '{self.strategy}'; choose one of {', '.join(STRATEGIES)}")
        if self.partition not in PARTITIONS:
            raise FedptError(f"unknown partition '{self.partition}'; choose one of {', '.join(PARTITIONS)}")
        if self.clients < 1 or self.rounds < 1:
            raise FedptError("federation.clients and federation.rounds must be at least 1")
        if not 0 < self.fraction <= 1:
            raise FedptError(f"federation.fraction must be in (0, 1], got {self.fraction}")
        if round(self.fraction * self.clients) < 1:
            raise FedptError(f"federation.fraction {self.fraction:g} of {self.clients} clients rounds to no client")
        if not 0 < self.timeout < math.inf:
            raise FedptError(f"federation.timeout must be a finite number of seconds > 0, got {self.timeout}")
        if self.eval_examples < 0 or self.client_cpus < 1:
            raise FedptError(f"federation.eval_examples must be >= 0 (0: all) and client_cpus >= 1, got "
                             f"{self.eval_examples} and {self.client_cpus}")
        if (self.strategy == "fedprox") != (self.proximal_mu > 0):
            raise FedptError("federation.proximal_mu > 0 goes with strategy = 'fedprox', and only with it")
        if not 1 <= self.min_clients <= self.clients_per_round():
            raise FedptError(f"federation.min_clients must lie in 1..{self.clients_per_round()} (the clients of a "
                             f"round), got {self.min_clients}")
        if not (self.max_norm_ratio == 0 or self.max_norm_ratio >= 1) or not 0 <= self.max_update_norm < math.inf:
            raise FedptError("federation.max_norm_ratio must be 0 (off) or at least 1, and max_update_norm a finite "
                             "number >= 0")
        if not (self.max_examples_ratio == 0 or self.max_examples_ratio >= 1):
            raise FedptError(f"federation.max_examples_ratio must be 0 (no cap) or at least 1, got "
                             f"{self.max_examples_ratio}")
        if self.update_format not in UPDATE_FORMATS:
            raise FedptError(f"federation.update_format must be one of {', '.join(UPDATE_FORMATS)}, got "
                             f"'{self.update_format}'")
        if not 0 <= self.client_gpus <= 64:
            raise FedptError(f"federation.client_gpus must lie in [0, 64], got {self.client_gpus}")
        if not 0 <= self.trim_beta < 0.5:
            raise FedptError(f"federation.trim_beta must lie in [0, 0.5), got {self.trim_beta}")
        # Krum needs n > 2f + 2 updates, Bulyan n >= 4f + 3 (Blanchard et al. 2017; El Mhamdi et al. 2018)
        need = {"krum": 2 * self.malicious_clients + 3, "multikrum": 2 * self.malicious_clients + 3,
                "bulyan": 4 * self.malicious_clients + 3}.get(self.strategy, 1)
        if self.clients_per_round() < need:
            raise FedptError(f"strategy '{self.strategy}' with {self.malicious_clients} malicious client(s) needs at "
                             f"least {need} clients per round, the run has {self.clients_per_round()}")

    def clients_per_round(self) -> int:
        return max(1, round(self.fraction * self.clients))


DP_MODES = ("off", "central", "local")


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (fedpt/federation/privacy.py): every client's update clipped to
    `clip_norm`, Gaussian noise of std noise_multiplier x clip_norm added to their sum (central) or to each
    update (local), and the (epsilon, delta) spent accounted after every round."""

    dp: str = "off"  # "off", "central" (the server is trusted with updates, not the public with the model), "local"
    clipping: str = "server"  # central DP: who clips, "server" or "client" (the client clips before sending)
    clip_norm: float = 1.0  # L2 bound on a client's update (its weights minus the global weights)
    noise_multiplier: float = 0.0  # noise std / clip_norm; 0 with a target_epsilon: calibrated to spend it
    target_epsilon: float = 0.0  # the budget: the noise is calibrated to it, or the run stops before a round that
    #                              would exceed it; 0: no budget
    delta: float = 0.0  # 0: min(1e-5, 0.1 / federation.clients); at or above 1 / clients only with allow_large_delta
    allow_large_delta: bool = False
    secagg: bool = False  # SecAgg+ (fedpt/federation/secagg.py): the server sees only the round's mean update
    secagg_range: float = 1.0  # an update's coordinates are clipped to +-this, then quantised
    secagg_levels: int = 4194304  # quantisation levels over that range (2^22, Flower's default)
    secagg_shares: float = 1.0  # share of the round's clients each client's key shares go to
    secagg_threshold: float = 0.5  # share of those shares that rebuilds a dropped client's mask

    def __post_init__(self) -> None:
        if self.dp not in DP_MODES:
            raise FedptError(f"privacy.dp must be one of {', '.join(DP_MODES)}, got '{self.dp}'")
        if self.clipping not in ("server", "client"):
            raise FedptError(f"privacy.clipping must be 'server' or 'client', got '{self.clipping}'")
        if self.dp != "off":
            values = (self.clip_norm, self.noise_multiplier, self.target_epsilon)
            if not self.clip_norm > 0 or not (self.noise_multiplier >= 0 and self.target_epsilon >= 0) \
                    or not all(math.isfinite(v) for v in values):
                raise FedptError("privacy.clip_norm must be > 0, noise_multiplier and target_epsilon >= 0, all finite")
            if self.noise_multiplier == 0 and self.target_epsilon == 0:
                raise FedptError("differential privacy needs privacy.noise_multiplier > 0 or a target_epsilon to "
                                 "calibrate it to")
        if not 0 <= self.delta < 1:
            raise FedptError(f"privacy.delta must lie in [0, 1), got {self.delta}")
        if not self.secagg_range > 0 or not 1 < self.secagg_levels < 2**31:
            raise FedptError("privacy.secagg_range must be > 0 and secagg_levels in 2..2^31")
        if not (0 < self.secagg_shares <= 1 and 0 < self.secagg_threshold <= 1):
            raise FedptError("privacy.secagg_shares and secagg_threshold are shares: they lie in (0, 1]")
