"""What the server does with a round's replies: the Flower strategy, the checks every update must pass first,
which clients train in a round, and the strategy's own state across a resume."""

from __future__ import annotations

import math
import random
import re
import statistics
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedpt.config import FederationConfig
from fedpt.errors import first_line


def build_strategy(federation: FederationConfig) -> Any:
    """The Flower strategy; every node gets the train message, fedpt picks which nodes get one."""
    from flwr.serverapp import strategy as flower

    common = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1, "min_available_nodes": 1}
    f = federation.malicious_clients
    match federation.strategy:
        case "fedavg":
            return flower.FedAvg(**common)
        case "fedprox":
            return flower.FedProx(**common, proximal_mu=federation.proximal_mu)
        case "fedmedian":
            return flower.FedMedian(**common)
        case "fedtrimmedavg":
            return flower.FedTrimmedAvg(**common, beta=federation.trim_beta)
        case "krum":
            return flower.Krum(**common, num_malicious_nodes=f)
        case "multikrum":
            return flower.MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=federation.multikrum_select)
        case "bulyan":
            return flower.Bulyan(**common, num_malicious_nodes=f)
    optimiser = {"eta": federation.server_lr, "beta_1": federation.beta_1, "beta_2": federation.beta_2,
                 "tau": federation.tau}
    return (flower.FedAdam if federation.strategy == "fedadam" else flower.FedYogi)(**common, **optimiser)


def check_update(reply: Message, expected: dict[str, np.ndarray], max_examples: float = math.inf,
                 nonce: int | None = None) -> str | None:
    """Why a client's reply cannot be aggregated, or None if it can.

    `expected` holds the global weights (their keys, shapes and dtypes); `max_examples` is how many examples the
    client's partition holds, as the node said when asked at the start; `nonce` is the round's, which an update
    computed from this round's global model carries back (a replayed or stale update does not)."""
    if reply.has_error():
        return f"client failed: {client_error(reply.error.reason)}"
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
        value, want = array.numpy(), expected[key]
        if tuple(value.shape) != want.shape:
            return f"weight {key} has shape {tuple(value.shape)}, expected {want.shape}"
        if value.dtype != want.dtype:
            return f"weight {key} has dtype {value.dtype}, expected {want.dtype}"
        if not np.isfinite(value).all():
            return f"weight {key} has NaN or inf values"
    if nonce is not None and content["metrics"].get("round-nonce") != nonce:
        return "the update does not carry this round's nonce: replayed from an earlier round, or stale"
    examples = content["metrics"].get("num-examples")
    if not finite_number(examples) or examples <= 0:
        return f"num-examples must be a finite positive number, got {examples!r}"
    if examples > max_examples:
        return f"num-examples {examples:g} is more than the {max_examples:g} examples its partition holds"
    for key, value in content["metrics"].items():  # extra keys are fine (they are not aggregated); odd values not
        if not finite_number(value):
            return f"metric {key!r} is not a finite number"
    return None


def finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def examples_cap(sizes: dict[int, int], ratio: float) -> float:
    """The most examples a node may weigh in an aggregate: `ratio` times the lower median of the partition sizes
    the nodes described (one node's claim cannot move the median of three or more); inf when ratio is 0."""
    return ratio * statistics.median_low(sizes.values()) if ratio and sizes else math.inf


def client_error(reason: str) -> str:
    """The one line that matters of a client's failure, which Flower and Ray wrap in class names and tracebacks."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)  # Ray colours its lines
    if "Message: " in text:  # Flower's ClientAppException: "Exception X occurred. Message: <the error>"
        return first_line(Exception(text.rsplit("Message: ", 1)[1].rstrip("'>")))
    if "Traceback" in text:  # the last line of a traceback names the error
        return [line for line in text.splitlines() if line.strip()][-1].strip().rstrip("'>")
    return first_line(Exception(text))


def l2_norm(tensors: dict[str, np.ndarray]) -> float:
    """The L2 norm over all tensors together, in float64."""
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in tensors.values()))


def update_norm(arrays: Any, global_state: dict[str, np.ndarray]) -> float:
    """How far an update moves the model: the L2 norm of (client weights - global weights) over all tensors."""
    return l2_norm({k: arrays[k].numpy().astype(np.float64) - v for k, v in global_state.items()})


def norm_outliers(norms: dict[int, float], ratio: float, bound: float) -> dict[int, str]:
    """Clients whose update moves the model too far: beyond `bound`, or beyond `ratio` times the round's lower
    median move (the lower median: with two clients, the smaller one, so one huge update cannot raise it)."""
    reasons = {}
    median = statistics.median_low(norms.values()) if norms else 0.0
    for pid, norm in norms.items():
        if bound and norm > bound:
            reasons[pid] = f"update norm {norm:.3g} is over the bound {bound:g}"
        elif ratio and median > 0 and norm > ratio * median:
            reasons[pid] = f"update norm {norm:.3g} is over {ratio:g}x the round's median {median:.3g}"
    return reasons


def clean_reply(reply: Message, uniform: bool = False, cap: float = math.inf) -> Message:
    """What the strategy aggregates of a checked reply: its weights and example count only, so that a client's
    extra or missing metric keys cannot make Flower refuse the whole round (InconsistentMessageReplies).
    `uniform` weighs every client alike (the example count becomes 1); `cap` bounds the example count."""
    examples = 1 if uniform else min(reply.content["metrics"]["num-examples"], cap)
    return as_reply(reply.content["arrays"], examples, reply.metadata.src_node_id)


def as_reply(arrays: ArrayRecord, examples: float, node: int = 0) -> Message:
    """Weights and their example count in the form Flower's strategies aggregate: a train reply."""
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": examples})})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


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
