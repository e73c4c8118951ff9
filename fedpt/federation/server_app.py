"""The Flower ServerApp: rounds of federated fine-tuning of the small model, checkpointed and resumable.

Each round uses a Flower strategy (fedpt/federation/strategy.py) for what it is made for, building the train
messages and aggregating the replies, and adds what a long-running federation needs around it: clients
sampled reproducibly by partition, updates checked before aggregation (fedpt/federation/rounds.py), the global
model scored on held-out pairs and written to `round-K/` after every round (fedpt/federation/run_folder.py),
differential privacy accounted round by round (fedpt/federation/privacy.py), and a resume that ends where an
uninterrupted run ends.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedpt.config import CLIENT_SECTIONS, RunConfig, from_flat
from fedpt.errors import FedptError
from fedpt.federation.privacy import RunPrivacy
from fedpt.federation.rounds import Collector, SecureCollector, aggregate, to_record
from fedpt.federation.run_folder import LOG, METRICS, RunFolder, read_metrics
from fedpt.federation.strategy import (
    build_strategy,
    client_error,
    finite_number,
    restore_strategy_state,
    sample_clients,
    strategy_state,
)
from fedpt.runtime import setup_process
from fedpt.tuning.distill import AfterRound, make_distiller

log = logging.getLogger("fedpt.federation")
DESCRIBE_TIMEOUT = 300.0  # seconds nodes get to start and describe themselves (at least federation.timeout)


class Trainee:
    """The global small model of the run: the model, its tokenizer, and the trainable weights the clients get."""

    def __init__(self, model: Any, tokenizer: Any, state: dict[str, np.ndarray]):
        self.model, self.tokenizer, self.state = model, tokenizer, state


class Federation:
    """One federated run of the small model, driven through a Flower Grid.

    fedpt runs its own round loop rather than Flower's `Strategy.start`: `start` always begins at round 1 (no
    resume), picks nodes itself (fedpt samples by partition, reproducibly), and sums replies in arrival order
    (fedpt sums in partition order, so a resumed run is bit-identical to an uninterrupted one).
    """

    def __init__(self, config: RunConfig, grid: Grid, resume: bool = False, after_round: AfterRound | None = None):
        self.privacy = RunPrivacy.of(config)  # None without DP; it fixes the noise multiplier the clients read
        self.config = self.privacy.config if self.privacy else config
        self.grid, self.resume, self.after_round = grid, resume, after_round
        self.folder = RunFolder(config.out)
        self.console = Console(stderr=True)
        self.notes: list[str] = []  # what setup found wrong but not fatal, said once the run's log is open

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
        model, tokenizer, _ = load_model(config.model.small, dtype=config.tuning.dtype, device=config.model.device)
        model = make_trainable(model, config.tuning, seed=config.seed)
        strategy = build_strategy(fed)
        self.after_round = self.after_round or make_distiller(config)
        if start:
            from fedpt.models.base_record import check_base

            check_base(self.folder.round_dir(start), config.model.small)  # another small model: refused
            state, saved_strategy = self.folder.load_round(start)
            self._check_saved(state, trainable_state(model), start)
            set_trainable_state(model, state)
            restore_strategy_state(strategy, saved_strategy)
        discovered = self._discover()
        nodes = {pid: node for pid, (node, _) in discovered.items()}
        sizes = {pid: examples for pid, (_, examples) in discovered.items()}
        self.folder.claim(config, start)
        if start:
            self.console.print(f"resuming after round {start} of {fed.rounds} ({self.folder.round_dir(start)})",
                               soft_wrap=True)
        if self.folder.note:
            self._warn(self.folder.note)
        if self.privacy and start:  # what the rounds kept so far have spent
            released = [r for r in read_metrics(self.folder.out) if 0 < r["round"] <= start and "privacy" in r]
            self.privacy.resume(released[-1]["privacy"]["releases"] if released else 0)
        collector = (SecureCollector if config.privacy.secagg else Collector)(config, self.grid, self.privacy, sizes)
        handler = logging.FileHandler(self.folder.out / LOG, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        for note in self.notes:
            self._warn(note)
        try:
            return self._rounds(start, Trainee(model, tokenizer, trainable_state(model)), strategy, collector, nodes,
                                lambda: nll(HFCausalLM(model, tokenizer), heldout, max_length=config.score_max_length))
        finally:
            log.removeHandler(handler)
            handler.close()

    def _rounds(self, start: int, trainee: Trainee, strategy: Any, collector: Collector, nodes: dict[int, int],
                score: Callable[[], dict]) -> Path:
        """fit: the rounds left, each checkpointed; then the final model."""
        fed = self.config.federation
        if start == 0:
            self._record({"round": 0, "global": score(), "clients": [], "rejected": []})
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True) as progress:
            rounds = progress.add_task("rounds", total=fed.rounds, completed=start)
            for server_round in range(start + 1, fed.rounds + 1):
                over = self.privacy.over_budget(server_round) if self.privacy else None
                if over:
                    self._warn(over)
                    break
                row = self._round(server_round, trainee, strategy, collector, nodes, progress)
                self.folder.save_round(server_round, trainee.model, trainee.tokenizer, trainee.state,
                                       strategy_state(strategy), base=self.config.model.small)
                row = {**row, "global": score()}
                self._record(row)
                self.folder.mark_done(server_round, row)
                progress.advance(rounds)
        self._check_trained()
        last = max([r["round"] for r in read_metrics(self.folder.out)])
        return self.folder.write_final(last)

    def _round(self, server_round: int, trainee: Trainee, strategy: Any, collector: Collector,
               nodes: dict[int, int], progress: Progress) -> dict[str, Any]:
        """One round: send the global model to the sampled clients, collect, aggregate, distil; its metrics row."""
        from fedpt.tuning.local import set_trainable_state, trainable_state

        config, fed = self.config, self.config.federation
        started = time.time()
        chosen = sample_clients(config.seed, server_round, fed.clients, fed.clients_per_round())
        arrays = to_record(trainee.state)
        nonce = secrets.randbits(62)  # an update must carry it back: one computed for an earlier round cannot
        record = ConfigRecord({**config.flat(CLIENT_SECTIONS), **collector.round_config(nonce)})
        messages = strategy.configure_train(server_round, arrays, record, self.grid)
        result = collector.collect(server_round, messages, {nodes[pid]: pid for pid in chosen if pid in nodes},
                                   trainee.state, progress, arrays.count_bytes(), nonce)
        result.rejected += [{"partition-id": pid, "reason": "no accepted node holds this partition"}
                            for pid in chosen if pid not in nodes]
        for item in result.rejected:
            where = f" (details in {self.folder.out / LOG})" if item["reason"].startswith("client failed") else ""
            self._warn(f"round {server_round}: rejected client {item['partition-id']}: {item['reason']}{where}")
        new_state, failed = ({}, result.failed) if result.failed else \
            aggregate(strategy, server_round, result, trainee.state, self.privacy)
        if failed:
            self._warn(f"round {server_round} failed: {failed}; the global model stays")
        else:
            trainee.state = new_state
            set_trainable_state(trainee.model, new_state)
        distilled = (self.after_round(server_round, trainee.model, trainee.tokenizer)
                     if self.after_round and not failed else None)
        if distilled:
            trainee.state = trainable_state(trainee.model)
        return {"round": server_round, "seconds": time.time() - started, "global": None,  # scored by the caller
                "clients": sorted(result.clients, key=lambda c: c["partition-id"]), "rejected": result.rejected,
                "distilled": distilled, **({"failed": failed} if failed else {}),
                **({"privacy": self.privacy.spend(server_round, failed)} if self.privacy else {})}

    def _check_saved(self, saved: dict[str, np.ndarray], fresh: dict[str, np.ndarray], server_round: int) -> None:
        """A resumed run must fit the weights it resumes (a changed LoRA rank or target would not)."""
        if saved.keys() != fresh.keys() or any(saved[k].shape != fresh[k].shape for k in fresh):
            raise FedptError(f"round {server_round} of {self.folder.out} holds weights of other names or shapes than "
                             "this config trains (changed tuning settings?); resume with the run's own settings")

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
        privacy = row.get("privacy")
        self.console.print(f"round {row['round']}: held-out NLL {row['global']['nll']:.4f}"
                           + (f", {len(row['clients'])} clients" if row["round"] else "")
                           + (f", epsilon {privacy['epsilon']:.3g} (delta {privacy['delta']:.2g}, "
                              f"{self.config.federation.clients} clients)" if privacy else ""))

    def _discover(self) -> dict[int, tuple[int, int]]:
        """Partition id -> (node id, examples it holds), asked of every connected node (node ids are random,
        partitions are not). The examples bound what a node may later claim to have trained on."""
        fed = self.config.federation
        deadline = time.time() + fed.timeout
        while len(list(self.grid.get_node_ids())) < fed.clients:
            if time.time() > deadline:
                raise FedptError(f"only {len(list(self.grid.get_node_ids()))} of {fed.clients} clients connected")
            time.sleep(0.5)
        record = RecordDict({"config": ConfigRecord(self.config.flat(CLIENT_SECTIONS))})
        messages = [Message(record, dst_node_id=node, message_type=MessageType.QUERY)
                    for node in self.grid.get_node_ids()]
        nodes: dict[int, tuple[int, int]] = {}
        # nodes start (and load their data) before they can answer: a round's deadline is too short for that
        replies = list(self.grid.send_and_receive(messages, timeout=max(fed.timeout, DESCRIBE_TIMEOUT)))
        if len(replies) < len(messages):
            self.notes.append(f"{len(messages) - len(replies)} of {len(messages)} nodes did not describe themselves "
                              f"within {max(fed.timeout, DESCRIBE_TIMEOUT):g} s")
        for reply in replies:
            if reply.has_error():
                log.warning("a client could not start:\n%s", reply.error.reason)
                raise FedptError(f"a client could not start: {client_error(reply.error.reason)}")
            node = reply.metadata.src_node_id
            try:
                metrics = reply.content["metrics"]
                pid, examples = metrics["partition-id"], metrics["num-examples"]
            except (KeyError, TypeError, ValueError):
                raise FedptError(f"node {node} described itself without a partition id and an example count") \
                    from None
            refused = describe_problem(pid, examples, fed.clients, nodes)
            if refused:  # the node takes no part in the run; its partition is missing unless another holds it
                self.notes.append(f"refused node {node}: {refused}")
                continue
            nodes[int(pid)] = (node, int(examples))
        missing = sorted(set(range(fed.clients)) - set(nodes))
        if len(nodes) < fed.min_clients:
            raise FedptError(f"only {len(nodes)} partition(s) have an accepted node (federation.min_clients is "
                             f"{fed.min_clients}); no node holds partition(s) {missing}"
                             + "".join(f"; {note}" for note in self.notes))
        if missing:
            self.notes.append(f"no accepted node holds partition(s) {missing}: rounds that sample them go on "
                              "without them")
        return nodes


def describe_problem(pid: Any, examples: Any, clients: int, nodes: dict[int, tuple[int, int]]) -> str | None:
    """Why a node's description of itself is refused, or None: the partition id must be one of the run's and not
    claimed by an earlier node; the example count a whole positive number (it bounds the node's later claims)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < clients:
        return f"partition id {pid!r} is not one of 0..{clients - 1}"
    if pid in nodes:
        return f"partition {pid} is already held by node {nodes[pid][0]} (a duplicate claim)"
    if not finite_number(examples) or examples < 1 or examples != int(examples):
        return f"its example count {examples!r} is not a whole positive number"
    return None


def make_server_app(config: RunConfig | None = None, resume: bool = False,
                    after_round: AfterRound | None = None, finished: Callable[[], None] | None = None) -> ServerApp:
    """A ServerApp for `config`, or for Flower's run config (deployment engine) when config is None; there the
    extra key `resume = true` continues the run already in `out`. `finished` is called when the run ends, however
    it ends."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        setup_process()
        flat = dict(context.run_config)
        again = bool(flat.pop("resume", False)) or resume
        try:
            Federation(config or from_flat(flat), grid, again, after_round).run()
        finally:
            if finished is not None:
                finished()

    return app


app = make_server_app()
