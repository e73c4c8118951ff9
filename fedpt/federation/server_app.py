"""The Flower ServerApp: rounds of federated fine-tuning of the small model, checkpointed and resumable.

Each round uses a Flower strategy (FedAvg, FedProx, FedAdam, FedYogi) for what it is made for, building the
train messages and aggregating the replies, and adds what a long-running federation needs around it: clients
sampled reproducibly by partition, updates checked before aggregation, the global model scored on held-out
pairs and written to `round-K/` after every round, and a resume that ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedpt.config import FederationConfig, RunConfig, from_flat
from fedpt.data import load_examples, splits
from fedpt.distill import make_distiller
from fedpt.errors import FedptError

log = logging.getLogger("fedpt.federation")
STATE = "state.npz"  # exact global weights of a round, for resuming
SERVER_STATE = "server-state.npz"  # the server optimiser's moments (FedAdam, FedYogi)
DONE = "round.json"  # written last: a round folder without it is incomplete

AfterRound = Callable[[int, Any, Any], dict | None]  # (round, model, tokenizer) -> stats if it changed the model


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


def last_completed_round(out: Path) -> int:
    done = [int(p.name.split("-")[1]) for p in out.glob("round-*") if (p / DONE).is_file()]
    return max(done, default=0)


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in state.items()})


class Federation:
    """One federated run of the small model, driven through a Flower Grid."""

    def __init__(self, config: RunConfig, grid: Grid, resume: bool = False, after_round: AfterRound | None = None):
        self.config, self.grid, self.resume, self.after_round = config, grid, resume, after_round
        self.out = Path(config.out)
        self.console = Console(stderr=True)

    def run(self) -> Path:
        from fedpt.evaluate import nll
        from fedpt.lm import HFCausalLM, load_model
        from fedpt.train import make_trainable, set_trainable_state, trainable_state

        config, fed = self.config, self.config.federation
        start = self._prepare_output()
        model, tokenizer, _ = load_model(config.model.small, dtype=config.tuning.dtype)
        model = make_trainable(model, config.tuning, seed=config.seed)
        heldout = splits(load_examples(config.data), config.data)["test"]
        heldout = heldout[: fed.eval_examples] if fed.eval_examples else heldout
        strategy = build_strategy(fed)
        after_round = self.after_round or make_distiller(config)
        if start:
            state = dict(np.load(self.out / f"round-{start}" / STATE))
            set_trainable_state(model, state)
            self._load_server_state(strategy, self.out / f"round-{start}")
        state = trainable_state(model)
        expected = {k: tuple(v.shape) for k, v in state.items()}

        def score() -> dict[str, float]:
            return nll(HFCausalLM(model, tokenizer), heldout, max_length=config.tuning.max_length * 2)

        if start == 0:
            self._append_metrics({"round": 0, "global": score(), "clients": [], "rejected": []})
        nodes = self._discover()
        run_config = {**config.flat()}
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True) as progress:
            rounds = progress.add_task("rounds", total=fed.rounds, completed=start)
            for server_round in range(start + 1, fed.rounds + 1):
                started = time.time()
                chosen = sample_clients(config.seed, server_round, fed.clients, fed.clients_per_round())
                wanted = {nodes[pid]: pid for pid in chosen}
                arrays = to_record(state)
                messages = strategy.configure_train(server_round, arrays, ConfigRecord(run_config), self.grid)
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
                    metrics = dict(reply.content["metrics"])
                    clients.append({**metrics, "partition-id": pid, "bytes_down": arrays.count_bytes(),
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
                self._checkpoint(server_round, model, tokenizer, state, strategy)
                self._append_metrics({
                    "round": server_round, "seconds": time.time() - started, "global": score(),
                    "clients": sorted(clients, key=lambda c: c["partition-id"]), "rejected": rejected,
                    "distilled": distilled,
                })
                self._mark_done(server_round)
                progress.advance(rounds)
        final = self.out / "final"
        shutil.rmtree(final, ignore_errors=True)
        bookkeeping = shutil.ignore_patterns(STATE, SERVER_STATE, DONE)
        shutil.copytree(self.out / f"round-{fed.rounds}", final, ignore=bookkeeping)
        return final

    def _prepare_output(self) -> int:
        """The round to continue after (0 for a new run); refuses to mix two runs in one folder."""
        self.out.mkdir(parents=True, exist_ok=True)
        saved = self.out / "config.json"
        current = json.dumps(self.config.to_dict(), indent=2, sort_keys=True)
        if self.resume:
            if not saved.is_file():
                raise FedptError(f"{self.out} has no config.json: nothing to resume")
            start = last_completed_round(self.out)
            self._trim_metrics(start)
            saved.write_text(current)  # a resume may extend the run, e.g. with more rounds
            return start
        if saved.is_file() or any(self.out.glob("round-*")):
            raise FedptError(f"output folder {self.out} already holds a run; resume it with --resume or pick another")
        saved.write_text(current)
        return 0

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
        task = progress.add_task(label, total=len(messages))
        ids = list(self.grid.push_messages(messages))
        replies: list[Message] = []
        deadline = time.time() + self.config.federation.timeout
        while len(replies) < len(ids) and time.time() < deadline:
            new = list(self.grid.pull_messages([i for i in ids if i not in {r.metadata.reply_to_message_id
                                                                          for r in replies}]))
            replies += new
            progress.update(task, completed=len(replies))
            if not new:
                time.sleep(0.2)
        progress.remove_task(task)
        if len(replies) < len(ids):
            log.warning("%d of %d clients did not answer within %.0f s", len(ids) - len(replies), len(ids),
                        self.config.federation.timeout)
        return replies

    def _checkpoint(self, server_round: int, model: Any, tokenizer: Any, state: dict, strategy: Any) -> None:
        folder = self.out / f"round-{server_round}"
        temporary = self.out / f".round-{server_round}.partial"
        shutil.rmtree(temporary, ignore_errors=True)
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        np.savez(temporary / STATE, **state)
        moments = {f"{name}/{key}": value for name in ("m_t", "v_t")
                   for key, value in (getattr(strategy, name, None) or {}).items()}
        np.savez(temporary / SERVER_STATE, **moments)
        shutil.rmtree(folder, ignore_errors=True)
        temporary.rename(folder)

    def _mark_done(self, server_round: int) -> None:
        (self.out / f"round-{server_round}" / DONE).write_text(json.dumps({"round": server_round}))

    @staticmethod
    def _load_server_state(strategy: Any, folder: Path) -> None:
        saved = dict(np.load(folder / SERVER_STATE))
        for name in ("m_t", "v_t"):
            moments = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith(f"{name}/")}
            if moments:
                setattr(strategy, name, moments)

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if row.get("global"):
            self.console.print(f"round {row['round']}: held-out NLL {row['global']['nll']:.4f}"
                               + (f", {len(row['clients'])} clients" if row["round"] else ""))

    def _trim_metrics(self, last_round: int) -> None:
        path = self.out / "metrics.jsonl"
        if path.is_file():
            rows = [line for line in path.read_text().splitlines() if json.loads(line)["round"] <= last_round]
            path.write_text("".join(r + "\n" for r in rows))


def make_server_app(config: RunConfig | None = None, resume: bool = False,
                    after_round: AfterRound | None = None) -> ServerApp:
    """A ServerApp for `config`, or for Flower's run config (deployment engine) when config is None; there the
    extra key `resume = true` continues the run already in `out`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        flat = dict(context.run_config)
        again = bool(flat.pop("resume", False)) or resume
        Federation(config or from_flat(flat), grid, again, after_round).run()

    return app


app = make_server_app()
