"""Secure aggregation: one round of Flower's SecAgg+ inside fedpt's round loop, so that the server learns only the
(weighted) mean of the round's updates, never one client's.

Flower 1.42 runs SecAgg+ only through its legacy workflow (`SecAggPlusWorkflow` on a `LegacyContext`, with
`secaggplus_mod` on the clients). fedpt calls that workflow once per round with a one-round legacy strategy
that hands out fedpt's train messages to the clients fedpt sampled and keeps the unmasked mean; everything
else (sampling, checks, DP noise, checkpoints, resume) stays in fedpt's loop. In SecAgg mode a client sends
its *update* (weights - global weights), not its weights: updates are small, so a narrow quantisation range
(`privacy.secagg_range`) keeps the rounding error small.

What the server checks, since it cannot look at one update: each client's example count and metrics (sent
in the clear, next to the masked vector) against its partition, after the round; the mean update's
finiteness and norm (at most privacy.clip_norm when the clients clip for DP); and enough survivors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedpt.config import CLIENT_SECTIONS, RunConfig
from fedpt.errors import first_line


@dataclass
class SecureRound:
    """What one SecAgg+ round gave the server."""

    mean_update: dict[str, np.ndarray] | None  # None: the protocol halted (too many dropouts)
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)  # node id -> the metrics it sent in clear
    failures: list[str] = field(default_factory=list)


class _Proxy:
    """The workflow needs only a node id of a legacy ClientProxy."""

    def __init__(self, node_id: int):
        self.node_id = node_id
        self.cid = str(node_id)


def _one_round_strategy(nodes: list[int], global_state: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.server.strategy import Strategy

    class OneRound(Strategy):
        """Train messages for fedpt's chosen nodes; keeps what the protocol unmasked."""

        def __init__(self) -> None:
            super().__init__()
            self.results: list = []
            self.failures: list = []

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            ins = FitIns(ndarrays_to_parameters(list(global_state.values())), dict(config))
            return [(_Proxy(node), ins) for node in nodes]

        def aggregate_fit(self, server_round, results, failures):
            self.results, self.failures = results, failures
            return (results[0][1].parameters if results else None), {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return OneRound()


def secure_round(grid: Any, config: RunConfig, server_round: int, nodes: list[int],
                 global_state: dict[str, np.ndarray], max_weight: float, extra: dict[str, Any] | None = None
                 ) -> SecureRound:
    """Run SecAgg+ with `nodes`; the mean of their updates, weighted by the example counts they report (capped at
    `max_weight`, which is 1 when every client reports 1). `extra`: more round config (the round's nonce)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import parameters_to_ndarrays
    from flwr.server import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    privacy = config.privacy
    strategy = _one_round_strategy(nodes, global_state, {**config.flat(CLIENT_SECTIONS), **(extra or {}),
                                                         "server-round": server_round, "secagg": True})
    state = RecordDict({MAIN_PARAMS_RECORD: ArrayRecord(), MAIN_CONFIGS_RECORD:
                        ConfigRecord({Key.CURRENT_ROUND: server_round})})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=strategy)
    workflow = SecAggPlusWorkflow(num_shares=privacy.secagg_shares, reconstruction_threshold=privacy.secagg_threshold,
                                  max_weight=max_weight, clipping_range=privacy.secagg_range,
                                  quantization_range=privacy.secagg_levels, timeout=config.federation.timeout)
    try:
        workflow(grid, context)
    except Exception as e:  # a client's malformed protocol message must not end the federation
        return SecureRound(None, failures=[f"SecAgg+ failed: {first_line(e)}"])
    failures = [first_line(f) if isinstance(f, BaseException) else str(f) for f in strategy.failures]
    if not strategy.results:
        return SecureRound(None, failures=failures or ["SecAgg+ halted: too few clients answered"])
    mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
    clients = {proxy.node_id: {**fitres.metrics, "num-examples": fitres.num_examples}
               for proxy, fitres in strategy.results}
    update = {k: np.asarray(v, dtype=np.float32).reshape(global_state[k].shape)
              for k, v in zip(global_state, mean, strict=True)}
    return SecureRound(update, clients, failures)


def masked_bytes(global_state: dict[str, np.ndarray]) -> int:
    """Bytes of one client's masked vector: an int64 per coordinate, and one for its weight."""
    return 8 * (sum(v.size for v in global_state.values()) + 1)


def secagg_mod(message: Any, context: Any, call_next: Any) -> Any:
    """Flower's `secaggplus_mod` for the rounds that run SecAgg+; other messages pass untouched."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if message.has_content() and RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)
