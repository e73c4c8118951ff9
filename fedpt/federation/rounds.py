"""What one round does between sending the global model and replacing it: collect the clients' updates (each
checked on its own, or their masked mean under SecAgg+) into a RoundResult, then aggregate it.

The collectors know the grid, the checks and the privacy mechanism; the round loop (server_app.py) knows
neither, and reads one RoundResult per round whatever the mode.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid
from rich.progress import Progress

from fedpt.config import RunConfig
from fedpt.errors import FedptError, first_line
from fedpt.federation.compression import decode
from fedpt.federation.privacy import RunPrivacy
from fedpt.federation.strategy import (
    as_reply,
    check_update,
    clean_reply,
    client_error,
    examples_cap,
    finite_number,
    l2_norm,
    norm_outliers,
    update_norm,
)
from fedpt.runtime import task

log = logging.getLogger("fedpt.federation")
Weights = dict[str, np.ndarray]


def to_record(state: Weights) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in state.items()})


@dataclass
class RoundResult:
    """What the clients of a round gave: the replies the strategy aggregates (in partition order; under SecAgg+
    the masked mean as one reply of weight 1), the rejected clients with their reasons, one metrics row per
    client, and why the round failed (None if it did not)."""

    replies: list[Message] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)
    failed: str | None = None


class Collector:
    """Sends a round's messages and gathers the replies into a RoundResult (each update checked on its own)."""

    def __init__(self, config: RunConfig, grid: Grid, privacy: RunPrivacy | None, sizes: dict[int, int]):
        self.config, self.grid, self.privacy = config, grid, privacy
        self.sizes = sizes  # partition id -> examples the node said it holds (a bound on what it may claim)
        self.cap = examples_cap(sizes, config.federation.max_examples_ratio)  # the most one node may weigh

    def round_config(self, nonce: int) -> dict[str, Any]:
        """What a round's clients get besides the run's config: the round's nonce, which an update must carry
        back, and the weight cap (clients of a SecAgg+ round weigh their own update)."""
        return {"round-nonce": nonce, "max-examples": 0.0 if math.isinf(self.cap) else float(self.cap)}

    def collect(self, server_round: int, messages: list[Message], wanted: dict[int, int], state: Weights,
                progress: Progress, bytes_down: int, nonce: int | None = None) -> RoundResult:
        fed = self.config.federation
        messages = [m for m in messages if m.metadata.dst_node_id in wanted]
        result, accepted, norms, sent = RoundResult(), {}, {}, {}
        replies = self._send(messages, progress, f"round {server_round}: clients")
        answered = {reply.metadata.src_node_id for reply in replies}
        result.rejected += [{"partition-id": pid, "reason": f"no answer within federation.timeout = {fed.timeout:g} s"}
                            for node, pid in sorted(wanted.items(), key=lambda item: item[1]) if node not in answered]
        for reply in replies:
            pid = wanted.get(reply.metadata.src_node_id, -1)
            if reply.has_error():
                log.warning("round %d: client %d failed:\n%s", server_round, pid, reply.error.reason)
            sent[pid] = _arrays_bytes(reply)  # as it came over the wire, before decoding
            reason = self._decode(reply, state) or check_update(reply, state, self.sizes.get(pid, 0), nonce)
            if reason is None:
                norms[pid], accepted[pid] = update_norm(reply.content["arrays"], state), reply
            else:
                result.rejected.append({"partition-id": pid, "reason": reason})
        # with DP, clipping bounds every update instead: a rejection that depends on the other clients' updates
        # would leak them
        outliers = self.privacy.over_clip_norm(norms) if self.privacy else \
            norm_outliers(norms, fed.max_norm_ratio, fed.max_update_norm)
        for pid, reason in outliers.items():
            del accepted[pid]
            result.rejected.append({"partition-id": pid, "reason": reason})
        result.clients = [{**dict(reply.content["metrics"]), "partition-id": pid, "update_norm": norms[pid],
                           "bytes_down": bytes_down, "bytes_up": sent[pid]} for pid, reply in accepted.items()]
        if len(accepted) < fed.min_clients:
            result.failed = f"{len(accepted)} update(s) accepted, federation.min_clients is {fed.min_clients}"
        # a fixed summation order (by partition): a resumed run is bit-identical to an uninterrupted one
        uniform = bool(self.privacy and self.privacy.central)
        result.replies = [clean_reply(accepted[pid], uniform=uniform, cap=self.cap) for pid in sorted(accepted)]
        return result

    def _decode(self, reply: Message, state: Weights) -> str | None:
        """A compressed update (federation.update_format) replaced by the weights it stands for, global + update, so
        the checks and the strategy see weights as from any client; or why it cannot be read."""
        fmt = self.config.federation.update_format
        if fmt == "float32" or reply.has_error() or "arrays" not in reply.content.array_records:
            return None
        try:
            update = decode({k: a.numpy() for k, a in reply.content["arrays"].items()},
                            {k: v.shape for k, v in state.items()}, fmt)
        except FedptError as e:
            return str(e)
        reply.content["arrays"] = to_record({k: state[k] + update[k] for k in state})
        return None

    def _send(self, messages: list[Message], progress: Progress, label: str) -> list[Message]:
        """Push the round's messages and collect replies as they come, showing each client as it finishes."""
        ids = list(self.grid.push_messages(messages))
        replies: list[Message] = []
        timeout = self.config.federation.timeout
        deadline = time.time() + timeout
        with task(progress, label, len(messages)) as advance:
            while len(replies) < len(ids) and time.time() < deadline:
                answered = {r.metadata.reply_to_message_id for r in replies}
                new = list(self.grid.pull_messages([i for i in ids if i not in answered]))
                replies += new
                advance(len(new))
                if not new:
                    time.sleep(0.2)
        if len(replies) < len(ids):
            log.warning("%d of %d clients did not answer within %.0f s", len(ids) - len(replies), len(ids), timeout)
        return replies


class SecureCollector(Collector):
    """SecAgg+ (fedpt/federation/secagg.py): the mean update as one reply, or why the round failed. What can be
    checked without seeing an update is: the example counts and metrics each client sent in the clear, enough
    survivors, and the mean's finiteness and norm."""

    def collect(self, server_round: int, messages: list[Message], wanted: dict[int, int], state: Weights,
                progress: Progress, bytes_down: int, nonce: int | None = None) -> RoundResult:
        from fedpt.federation.secagg import masked_bytes, secure_round

        settings, fed = self.config.privacy, self.config.federation
        central = bool(self.privacy and self.privacy.central)
        with task(progress, f"round {server_round}: SecAgg+", 1) as advance:
            outcome = secure_round(self.grid, self.config, server_round, sorted(wanted, key=wanted.get), state,
                                   max_weight=1.0 if central else float(min(max(self.sizes.values()), self.cap)),
                                   extra=self.round_config(nonce) if nonce is not None else None)
            advance(1)
        result = RoundResult(rejected=[{"partition-id": -1, "reason": f"client failed: {client_error(f)}"}
                                       for f in outcome.failures])
        for failure in outcome.failures:
            log.warning("round %d: a SecAgg+ client failed:\n%s", server_round, failure)
        problems = []
        for node, metrics in outcome.clients.items():
            pid = wanted.get(node, -1)
            examples, limit = metrics.get("num-examples"), (1 if central else min(self.sizes.get(pid, 0), self.cap))
            if not finite_number(examples) or not 0 < examples <= limit:
                problems.append(f"client {pid} reported weight {examples!r}, its limit is {limit:g}")
            if nonce is not None and metrics.get("round-nonce") != nonce:
                problems.append(f"client {pid}'s update does not carry this round's nonce")
            if not all(finite_number(v) for v in metrics.values()):
                problems.append(f"client {pid} sent a metric that is not a finite number")
            result.clients.append({**metrics, "partition-id": pid, "bytes_down": bytes_down,
                                   "bytes_up": masked_bytes(state)})
        if outcome.mean_update is None:
            result.clients, result.failed = [], "; ".join(outcome.failures) or "SecAgg+ halted"
        elif len(result.clients) < fed.min_clients:
            result.failed = (f"{len(result.clients)} client(s) survived SecAgg+, federation.min_clients is "
                             f"{fed.min_clients}")
        elif problems:  # the masked mean already holds that client: the whole round goes
            result.failed = "; ".join(problems) + " (the masked mean included it)"
        else:
            norm = l2_norm(outcome.mean_update)
            bound = settings.clip_norm if central else fed.max_update_norm
            step = 2 * settings.secagg_range / settings.secagg_levels * math.sqrt(sum(v.size for v in state.values()))
            if bound and norm > bound + step:  # the mean of updates clipped to C has norm <= C, up to the rounding
                result.failed = f"the mean update's norm {norm:.3g} is over {bound:g}: a client did not clip its update"
            else:  # Flower's strategies aggregate replies: the mean enters as one reply of weight 1
                result.replies = [as_reply(to_record({k: state[k] + outcome.mean_update[k] for k in state}), 1)]
        return result


def aggregate(strategy: Any, server_round: int, result: RoundResult, state: Weights,
              privacy: RunPrivacy | None) -> tuple[Weights, str | None]:
    """(new global weights, None), or (empty, why the round failed): the strategy refused the replies, or their
    aggregate is not finite. With central DP: updates clipped, averaged with equal weights, and noised."""
    central = bool(privacy and privacy.central)
    replies = result.replies
    if central:
        for reply in replies:
            weights = {k: a.numpy() for k, a in reply.content["arrays"].items()}
            reply.content["arrays"] = to_record(privacy.clip(weights, state))
    try:
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
    except Exception as e:  # Flower's strategies raise their own types (and AppExitException subclasses)
        return {}, f"the strategy could not aggregate: {first_line(e)}"
    if new_arrays is None:
        return {}, "the strategy returned no aggregate"
    new = {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in new_arrays.items()}
    if central:
        new = privacy.noise(new, server_round)
    bad = next((k for k, v in new.items() if not np.isfinite(v).all()), None)
    if bad is not None:
        return {}, f"the aggregate of {bad} is not finite"
    return new, None


def _arrays_bytes(reply: Message) -> int:
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return 0
    return reply.content["arrays"].count_bytes()
