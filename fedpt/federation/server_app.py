"""The Flower ServerApp: rounds of federated fine-tuning of the small model, checkpointed and resumable.

Each round uses a Flower strategy (fedpt/federation/strategy.py) for what it is made for, building the train
messages and aggregating the replies, and adds what a long-running federation needs around it: clients
sampled reproducibly by partition, updates checked before aggregation, the global model scored on held-out
pairs and written to `round-K/` after every round (fedpt/federation/run_folder.py), and a resume that ends
where an uninterrupted run ends.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedpt.config import RunConfig, from_flat
from fedpt.errors import FedptError
from fedpt.federation.run_folder import RunFolder
from fedpt.federation.strategy import (
    build_strategy,
    check_update,
    restore_strategy_state,
    sample_clients,
    strategy_state,
)
from fedpt.runtime import setup_process, task
from fedpt.tuning.distill import AfterRound, make_distiller

log = logging.getLogger("fedpt.federation")


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in state.items()})


class Federation:
    """One federated run of the small model, driven through a Flower Grid.

    fedpt runs its own round loop rather than Flower's `Strategy.start`: `start` always begins at round 1 (no
    resume), picks nodes itself (fedpt samples by partition, reproducibly), and sums replies in arrival order
    (fedpt sums in partition order, so a resumed run is bit-identical to an uninterrupted one).
    """

    def __init__(self, config: RunConfig, grid: Grid, resume: bool = False, after_round: AfterRound | None = None):
        self.config, self.grid, self.resume, self.after_round = config, grid, resume, after_round
        self.folder = RunFolder(config.out)
        self.console = Console(stderr=True)

    def run(self) -> Path:
        """Train the remaining rounds; return the final model folder."""
        from fedpt.data import load_splits
        from fedpt.models import HFCausalLM, load_model
        from fedpt.scoring import nll
        from fedpt.tuning.local import make_trainable, set_trainable_state, trainable_state

        config, fed = self.config, self.config.federation
        start = self.folder.begin(config, self.resume)
        model, tokenizer, _ = load_model(config.model.small, dtype=config.tuning.dtype)
        model = make_trainable(model, config.tuning, seed=config.seed)
        heldout = load_splits(config.data)["test"][: fed.eval_examples or None]
        strategy = build_strategy(fed)
        after_round = self.after_round or make_distiller(config)
        if start:
            state, saved_strategy = self.folder.load_round(start)
            set_trainable_state(model, state)
            restore_strategy_state(strategy, saved_strategy)
        state = trainable_state(model)
        expected = {k: tuple(v.shape) for k, v in state.items()}

        def score() -> dict[str, float]:
            return nll(HFCausalLM(model, tokenizer), heldout, max_length=config.score_max_length)

        if start == 0:
            self._record({"round": 0, "global": score(), "clients": [], "rejected": []})
        nodes = self._discover()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True) as progress:
            rounds = progress.add_task("rounds", total=fed.rounds, completed=start)
            for server_round in range(start + 1, fed.rounds + 1):
                started = time.time()
                chosen = sample_clients(config.seed, server_round, fed.clients, fed.clients_per_round())
                wanted = {nodes[pid]: pid for pid in chosen}
                arrays = to_record(state)
                messages = strategy.configure_train(server_round, arrays, ConfigRecord(config.flat()), self.grid)
                messages = [m for m in messages if m.metadata.dst_node_id in wanted]
                replies = self._send(messages, progress, f"round {server_round}: clients")
                accepted, rejected, clients = [], [], []
                for reply in replies:
                    pid = wanted.get(reply.metadata.src_node_id, -1)
                    reason = check_update(reply, expected)
                    if reason:
                        log.warning("round %d: rejected the update of client %d: %s", server_round, pid, reason)
                        self.console.print(f"[yellow]round {server_round}: rejected client {pid}: {reason}")
                        rejected.append({"partition-id": pid, "reason": reason})
                        continue
                    accepted.append((pid, reply))
                    clients.append({**dict(reply.content["metrics"]), "partition-id": pid,
                                    "bytes_down": arrays.count_bytes(),
                                    "bytes_up": reply.content["arrays"].count_bytes()})
                accepted.sort(key=lambda item: item[0])  # a fixed summation order: resumed == uninterrupted
                if accepted:
                    new_arrays, _ = strategy.aggregate_train(server_round, [reply for _, reply in accepted])
                    state = {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in new_arrays.items()}
                    set_trainable_state(model, state)
                else:
                    log.warning("round %d: no update could be aggregated; the global model stays", server_round)
                distilled = after_round(server_round, model, tokenizer) if after_round else None
                if distilled:
                    state = trainable_state(model)
                self.folder.save_round(server_round, model, tokenizer, state, strategy_state(strategy))
                self._record({
                    "round": server_round, "seconds": time.time() - started, "global": score(),
                    "clients": sorted(clients, key=lambda c: c["partition-id"]), "rejected": rejected,
                    "distilled": distilled,
                })
                self.folder.mark_done(server_round)
                progress.advance(rounds)
        return self.folder.write_final(fed.rounds)

    def _record(self, row: dict[str, Any]) -> None:
        """Append a round's row to metrics.jsonl and show its held-out loss."""
        self.folder.append_metrics(row)
        self.console.print(f"round {row['round']}: held-out NLL {row['global']['nll']:.4f}"
                           + (f", {len(row['clients'])} clients" if row["round"] else ""))

    def _discover(self) -> dict[int, int]:
        """Partition id -> node id, asked of every connected node (node ids are random, partitions are not)."""
        fed = self.config.federation
        deadline = time.time() + fed.timeout
        while len(list(self.grid.get_node_ids())) < fed.clients:
            if time.time() > deadline:
                raise FedptError(f"only {len(list(self.grid.get_node_ids()))} of {fed.clients} clients connected")
            time.sleep(0.5)
        record = RecordDict({"config": ConfigRecord(self.config.flat())})
        messages = [Message(record, dst_node_id=node, message_type=MessageType.QUERY)
                    for node in self.grid.get_node_ids()]
        nodes: dict[int, int] = {}
        for reply in self.grid.send_and_receive(messages, timeout=fed.timeout):
            if reply.has_error():
                raise FedptError(f"a client could not start: {reply.error.reason}")
            nodes[int(reply.content["metrics"]["partition-id"])] = reply.metadata.src_node_id
        missing = sorted(set(range(fed.clients)) - set(nodes))
        if missing:
            raise FedptError(f"no connected client holds partition(s) {missing}")
        return nodes

    def _send(self, messages: list[Message], progress: Progress, label: str) -> list[Message]:
        """Push the round's messages and collect replies as they come, showing each client as it finishes."""
        ids = list(self.grid.push_messages(messages))
        replies: list[Message] = []
        deadline = time.time() + self.config.federation.timeout
        with task(progress, label, len(messages)) as advance:
            while len(replies) < len(ids) and time.time() < deadline:
                answered = {r.metadata.reply_to_message_id for r in replies}
                new = list(self.grid.pull_messages([i for i in ids if i not in answered]))
                replies += new
                advance(len(new))
                if not new:
                    time.sleep(0.2)
        if len(replies) < len(ids):
            log.warning("%d of %d clients did not answer within %.0f s", len(ids) - len(replies), len(ids),
                        self.config.federation.timeout)
        return replies


def make_server_app(config: RunConfig | None = None, resume: bool = False,
                    after_round: AfterRound | None = None) -> ServerApp:
    """A ServerApp for `config`, or for Flower's run config (deployment engine) when config is None; there the
    extra key `resume = true` continues the run already in `out`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        setup_process()
        flat = dict(context.run_config)
        again = bool(flat.pop("resume", False)) or resume
        Federation(config or from_flat(flat), grid, again, after_round).run()

    return app


app = make_server_app()
