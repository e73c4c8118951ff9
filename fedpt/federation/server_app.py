"""The Flower ServerApp: rounds of federated fine-tuning of the small model, checkpointed and resumable.

Each round uses a Flower strategy (fedpt/federation/strategy.py) for what it is made for, building the train
messages and aggregating the replies, and adds what a long-running federation needs around it: clients
sampled reproducibly by partition, updates checked before aggregation, the global model scored on held-out
pairs and written to `round-K/` after every round (fedpt/federation/run_folder.py), and a resume that ends
where an uninterrupted run ends.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedpt.config import RunConfig, from_flat
from fedpt.errors import FedptError, first_line
from fedpt.federation.run_folder import LOG, METRICS, RunFolder, read_metrics
from fedpt.federation.strategy import (
    build_strategy,
    check_update,
    clean_reply,
    client_error,
    norm_outliers,
    restore_strategy_state,
    sample_clients,
    strategy_state,
    update_norm,
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

        # setup: everything is validated (the folder, data, model, a resumed state, the clients' partitions)
        # before anything is written to the output folder
        config, fed = self.config, self.config.federation
        start = self.folder.check(self.resume)
        heldout = load_splits(config.data)["test"][: fed.eval_examples or None]
        model, tokenizer, _ = load_model(config.model.small, dtype=config.tuning.dtype)
        model = make_trainable(model, config.tuning, seed=config.seed)
        strategy = build_strategy(fed)
        after_round = self.after_round or make_distiller(config)
        if start:
            state, saved_strategy = self.folder.load_round(start)
            self._check_saved(state, trainable_state(model), start)
            set_trainable_state(model, state)
            restore_strategy_state(strategy, saved_strategy)
        state = trainable_state(model)
        discovered = self._discover()
        nodes = {pid: node for pid, (node, _) in discovered.items()}
        sizes = {pid: examples for pid, (_, examples) in discovered.items()}
        self.folder.claim(config, start)
        if self.folder.note:
            self._warn(self.folder.note)
        handler = logging.FileHandler(self.folder.out / LOG, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        try:
            return self._rounds(start, model, tokenizer, state, strategy, after_round, nodes, sizes,
                                lambda: nll(HFCausalLM(model, tokenizer), heldout, max_length=config.score_max_length))
        finally:
            log.removeHandler(handler)
            handler.close()

    def _check_saved(self, saved: dict[str, np.ndarray], fresh: dict[str, np.ndarray], server_round: int) -> None:
        """A resumed run must fit the weights it resumes (a changed LoRA rank or target would not)."""
        if saved.keys() != fresh.keys() or any(saved[k].shape != fresh[k].shape for k in fresh):
            raise FedptError(f"round {server_round} of {self.folder.out} holds weights of other names or shapes than "
                             "this config trains (changed tuning settings?); resume with the run's own settings")

    def _rounds(self, start: int, model: Any, tokenizer: Any, state: dict[str, np.ndarray], strategy: Any,
                after_round: AfterRound | None, nodes: dict[int, int], sizes: dict[int, int],
                score: Any) -> Path:
        """fit: the rounds left, each checkpointed; then the final model."""
        from fedpt.tuning.local import set_trainable_state, trainable_state

        config, fed = self.config, self.config.federation
        if start == 0:
            self._record({"round": 0, "global": score(), "clients": [], "rejected": []})
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
                accepted, rejected, clients, norms = {}, [], [], {}
                for reply in replies:
                    pid = wanted.get(reply.metadata.src_node_id, -1)
                    if reply.has_error():
                        log.warning("round %d: client %d failed:\n%s", server_round, pid, reply.error.reason)
                    reason = check_update(reply, state, sizes.get(pid, 0))
                    if reason is None:
                        norms[pid] = update_norm(reply.content["arrays"], state)
                        accepted[pid] = reply
                    else:
                        rejected.append({"partition-id": pid, "reason": reason})
                for pid, reason in norm_outliers(norms, fed.max_norm_ratio, fed.max_update_norm).items():
                    del accepted[pid]
                    rejected.append({"partition-id": pid, "reason": reason})
                for item in rejected:
                    where = f" (details in {self.folder.out / LOG})" if item["reason"].startswith("client failed") \
                        else ""
                    self._warn(f"round {server_round}: rejected client {item['partition-id']}: {item['reason']}{where}")
                for pid, reply in accepted.items():
                    clients.append({**dict(reply.content["metrics"]), "partition-id": pid, "update_norm": norms[pid],
                                    "bytes_down": arrays.count_bytes(),
                                    "bytes_up": reply.content["arrays"].count_bytes()})
                new_state, failed = self._aggregate(strategy, server_round, accepted)
                if failed:
                    self._warn(f"round {server_round} failed: {failed}; the global model stays")
                else:
                    state = new_state
                    set_trainable_state(model, state)
                distilled = after_round(server_round, model, tokenizer) if after_round and not failed else None
                if distilled:
                    state = trainable_state(model)
                self.folder.save_round(server_round, model, tokenizer, state, strategy_state(strategy))
                self._record({
                    "round": server_round, "seconds": time.time() - started, "global": score(),
                    "clients": sorted(clients, key=lambda c: c["partition-id"]), "rejected": rejected,
                    "distilled": distilled, **({"failed": failed} if failed else {}),
                })
                self.folder.mark_done(server_round)
                progress.advance(rounds)
        self._check_trained()
        return self.folder.write_final(fed.rounds)

    def _aggregate(self, strategy: Any, server_round: int,
                   accepted: dict[int, Message]) -> tuple[dict[str, np.ndarray], str | None]:
        """(new global weights, None), or (empty, why the round failed): too few updates, the strategy refused
        them, or their aggregate is not finite. A failed round never replaces the global model."""
        minimum = self.config.federation.min_clients
        if len(accepted) < minimum:
            return {}, f"{len(accepted)} update(s) accepted, federation.min_clients is {minimum}"
        # a fixed summation order (by partition): a resumed run is bit-identical to an uninterrupted one
        replies = [clean_reply(accepted[pid]) for pid in sorted(accepted)]
        try:
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
        except Exception as e:  # Flower's strategies raise their own types (and AppExitException subclasses)
            return {}, f"the strategy could not aggregate: {first_line(e)}"
        if new_arrays is None:
            return {}, "the strategy returned no aggregate"
        state = {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in new_arrays.items()}
        bad = next((k for k, v in state.items() if not np.isfinite(v).all()), None)
        if bad is not None:
            return {}, f"the aggregate of {bad} is not finite"
        return state, None

    def _check_trained(self) -> None:
        """A run that did not train is an error, not a final model."""
        rows = [r for r in read_metrics(self.folder.out) if r["round"] > 0]
        if rows and all(r.get("failed") for r in rows):
            raise FedptError(f"no round of the federation trained ({rows[-1]['failed']}); see "
                             f"{self.folder.out / METRICS} for each client's reason")
        final = rows[-1]["global"]["nll"] if rows else None
        if final is not None and not math.isfinite(final):
            raise FedptError(f"the global model's held-out loss is {final} after round {rows[-1]['round']}: the "
                             "federation diverged; lower tuning.learning_rate or check the clients' data")

    def _warn(self, message: str) -> None:
        log.warning("%s", message)  # to server.log (and wherever the caller's logging goes)
        self.console.print(f"[yellow]{message}", markup=True, highlight=False)

    def _record(self, row: dict[str, Any]) -> None:
        """Append a round's row to metrics.jsonl and show its held-out loss."""
        self.folder.append_metrics(row)
        self.console.print(f"round {row['round']}: held-out NLL {row['global']['nll']:.4f}"
                           + (f", {len(row['clients'])} clients" if row["round"] else ""))

    def _discover(self) -> dict[int, tuple[int, int]]:
        """Partition id -> (node id, examples it holds), asked of every connected node (node ids are random,
        partitions are not). The examples bound what a node may later claim to have trained on."""
        fed = self.config.federation
        deadline = time.time() + fed.timeout
        while len(list(self.grid.get_node_ids())) < fed.clients:
            if time.time() > deadline:
                raise FedptError(f"only {len(list(self.grid.get_node_ids()))} of {fed.clients} clients connected")
            time.sleep(0.5)
        record = RecordDict({"config": ConfigRecord(self.config.flat())})
        messages = [Message(record, dst_node_id=node, message_type=MessageType.QUERY)
                    for node in self.grid.get_node_ids()]
        nodes: dict[int, tuple[int, int]] = {}
        for reply in self.grid.send_and_receive(messages, timeout=fed.timeout):
            if reply.has_error():
                log.warning("a client could not start:\n%s", reply.error.reason)
                raise FedptError(f"a client could not start: {client_error(reply.error.reason)}")
            try:
                metrics = reply.content["metrics"]
                pid, examples = int(metrics["partition-id"]), int(metrics["num-examples"])
            except (KeyError, TypeError, ValueError):
                raise FedptError(f"node {reply.metadata.src_node_id} described itself without a partition id and "
                                 "an example count") from None
            nodes[pid] = (reply.metadata.src_node_id, examples)
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
