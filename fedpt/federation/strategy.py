"""What the server does with a round's replies: the Flower strategy, the checks every update must pass first,
which clients train in a round, and the strategy's own state across a resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from flwr.app import Message

from fedpt.config import FederationConfig


def build_strategy(federation: FederationConfig) -> Any:
    """The Flower strategy; every node gets the train message, fedpt picks which nodes get one."""
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

    common = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1, "min_available_nodes": 1}
    if federation.strategy == "fedavg":
        return FedAvg(**common)
    if federation.strategy == "fedprox":
        return FedProx(**common, proximal_mu=federation.proximal_mu)
    optimiser = {"eta": federation.server_lr, "beta_1": federation.beta_1, "beta_2": federation.beta_2,
                 "tau": federation.tau}
    return (FedAdam if federation.strategy == "fedadam" else FedYogi)(**common, **optimiser)


def check_update(reply: Message, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why a client's reply cannot be aggregated, or None if it can."""
    if reply.has_error():
        return f"client failed: {reply.error.reason}"
    content = reply.content
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return "reply lacks 'arrays' or 'metrics'"
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return "reply has more than one array or metric record"
    arrays = content["arrays"]
    unknown, missing = set(arrays) - set(expected), set(expected) - set(arrays)
    if unknown:
        return f"unknown weight(s) {sorted(unknown)[:3]}"
    if missing:
        return f"missing weight(s) {sorted(missing)[:3]}"
    for key, array in arrays.items():
        value = array.numpy()
        if tuple(value.shape) != expected[key]:
            return f"weight {key} has shape {tuple(value.shape)}, expected {expected[key]}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"weight {key} has dtype {value.dtype}, expected a float type"
        if not np.isfinite(value).all():
            return f"weight {key} has NaN or inf values"
    examples = content["metrics"].get("num-examples")
    if not isinstance(examples, int | float) or examples <= 0:
        return f"num-examples must be a positive number, got {examples!r}"
    return None


def sample_clients(seed: int, server_round: int, clients: int, per_round: int) -> list[int]:
    """Partition ids that train in a round: a function of the seed and the round only."""
    return sorted(random.Random(f"{seed}/{server_round}").sample(range(clients), per_round))


# Flower 1.42 offers no API to save or restore a strategy's state; of fedpt's strategies only the server
# optimisers (FedOpt: FedAdam, FedYogi) carry any, as their documented moment attributes m_t and v_t.
MOMENTS = ("m_t", "v_t")


def strategy_state(strategy: Any) -> dict[str, np.ndarray]:
    """The server optimiser's moments as flat arrays ("m_t/KEY", "v_t/KEY"); empty for stateless strategies."""
    from flwr.serverapp.strategy.fedopt import FedOpt

    if not isinstance(strategy, FedOpt):
        return {}
    return {f"{name}/{key}": value for name in MOMENTS for key, value in (getattr(strategy, name) or {}).items()}


def restore_strategy_state(strategy: Any, saved: dict[str, np.ndarray]) -> None:
    """Give a fresh strategy the moments `strategy_state` saved, so a resumed run continues the same steps."""
    for name in MOMENTS:
        moments = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith(f"{name}/")}
        if moments:
            setattr(strategy, name, moments)
