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
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedpt.config import RunConfig, from_flat, replace
from fedpt.errors import FedptError, first_line
from fedpt.federation import privacy as dp
from fedpt.federation.client_app import round_seed
from fedpt.federation.compression import decode
from fedpt.federation.run_folder import LOG, METRICS, RunFolder, read_metrics
from fedpt.federation.strategy import (
    build_strategy,
    check_update,
    clean_reply,
    client_error,
    finite_number,
    l2_norm,
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
        self.accountant: dp.Accountant | None = None

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
        strategy = self._private(build_strategy(fed))
        config = self.config
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
        if self.accountant and start:  # what the rounds kept so far have spent
            released = [r for r in read_metrics(self.folder.out) if 0 < r["round"] <= start and "privacy" in r]
            self.accountant.spend(released[-1]["privacy"]["releases"] if released else 0)
        handler = logging.FileHandler(self.folder.out / LOG, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        try:
            return self._rounds(start, model, tokenizer, state, strategy, after_round, nodes, sizes,
                                lambda: nll(HFCausalLM(model, tokenizer), heldout, max_length=config.score_max_length))
        finally:
            log.removeHandler(handler)
            handler.close()

    def _private(self, strategy: Any) -> Any:
        """With differential privacy: the noise multiplier fixed (calibrated to the target epsilon if asked) and the
        accountant started; the strategy stays as it is (clipping and noise happen in `_aggregate`)."""
        privacy, fed = self.config.privacy, self.config.federation
        if privacy.dp == "off":
            return strategy
        z = dp.noise_multiplier(self.config.seed, privacy, fed)
        self.config = replace(self.config, privacy={"noise_multiplier": z})  # the clients read z from the config
        self.accountant = dp.Accountant(self.config.privacy, fed, z)
        first = self.accountant.epsilon_after(dp.releases(self.config.seed, privacy, fed, 1))
        if privacy.target_epsilon and first > privacy.target_epsilon:
            raise FedptError(f"one round alone spends epsilon {first:.3g} > privacy.target_epsilon "
                             f"{privacy.target_epsilon:g}: raise privacy.noise_multiplier (now {z:g}) or the target")
        return strategy

    def _budget_allows(self, server_round: int) -> bool:
        """False when the round would take epsilon over privacy.target_epsilon (the run stops before it)."""
        privacy = self.config.privacy
        if not self.accountant or not privacy.target_epsilon:
            return True
        more = dp.releases(self.config.seed, privacy, self.config.federation, server_round) - self.accountant.rounds
        after = self.accountant.epsilon_after(more)
        if after <= privacy.target_epsilon:
            return True
        self._warn(f"round {server_round} would spend epsilon {after:.3g} > privacy.target_epsilon "
                   f"{privacy.target_epsilon:g} (delta {self.accountant.delta:.3g}): the run stops after round "
                   f"{server_round - 1}")
        return False

    def _spend(self, server_round: int, failed: str | None) -> dict[str, Any]:
        """Account the round's release and return the metrics' privacy entry. Local DP releases each client's
        noised update whatever the server does with it; central DP releases the aggregate only if it is kept."""
        privacy, fed = self.config.privacy, self.config.federation
        if self.accountant.local or not failed:
            self.accountant.spend(dp.releases(self.config.seed, privacy, fed, server_round) - self.accountant.rounds
                                  if self.accountant.local else 1)
        return {"dp": privacy.dp, "epsilon": self.accountant.epsilon(), "delta": self.accountant.delta,
                "noise_multiplier": self.accountant.noise_multiplier, "clip_norm": privacy.clip_norm,
                "releases": self.accountant.rounds}

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
                if not self._budget_allows(server_round):
                    break
                started = time.time()
                chosen = sample_clients(config.seed, server_round, fed.clients, fed.clients_per_round())
                wanted = {nodes[pid]: pid for pid in chosen}
                arrays = to_record(state)
                messages = strategy.configure_train(server_round, arrays, ConfigRecord(config.flat()), self.grid)
                collect = self._collect_secure if config.privacy.secagg else self._collect
                accepted, rejected, clients, failed = collect(server_round, messages, wanted, state, sizes, progress,
                                                              arrays.count_bytes())
                for item in rejected:
                    where = f" (details in {self.folder.out / LOG})" if item["reason"].startswith("client failed") \
                        else ""
                    self._warn(f"round {server_round}: rejected client {item['partition-id']}: {item['reason']}{where}")
                new_state, failed = ({}, failed) if failed else self._aggregate(strategy, server_round, accepted,
                                                                                  state)
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
                    **({"privacy": self._spend(server_round, failed)} if self.accountant else {}),
                })
                self.folder.mark_done(server_round)
                progress.advance(rounds)
        self._check_trained()
        last = max([r["round"] for r in read_metrics(self.folder.out)])
        return self.folder.write_final(last)

    def _collect(self, server_round: int, messages: list[Message], wanted: dict[int, int],
                 state: dict[str, np.ndarray], sizes: dict[int, int], progress: Progress, bytes_down: int) -> tuple:
        """(accepted replies by partition, rejected, client rows, None): each update checked on its own."""
        fed = self.config.federation
        messages = [m for m in messages if m.metadata.dst_node_id in wanted]
        replies = self._send(messages, progress, f"round {server_round}: clients")
        accepted, rejected, norms = {}, [], {}
        sent: dict[int, int] = {}
        for reply in replies:
            pid = wanted.get(reply.metadata.src_node_id, -1)
            if reply.has_error():
                log.warning("round %d: client %d failed:\n%s", server_round, pid, reply.error.reason)
            sent[pid] = _arrays_bytes(reply)  # as it came over the wire, before decoding
            reason = self._decode(reply, state) or check_update(reply, state, sizes.get(pid, 0))
            if reason is None:
                norms[pid] = update_norm(reply.content["arrays"], state)
                accepted[pid] = reply
            else:
                rejected.append({"partition-id": pid, "reason": reason})
        # with DP, clipping bounds every update instead: a rejection that depends on the other clients' updates
        # would leak them
        outliers = self._over_clip_norm(norms) if self.accountant else \
            norm_outliers(norms, fed.max_norm_ratio, fed.max_update_norm)
        for pid, reason in outliers.items():
            del accepted[pid]
            rejected.append({"partition-id": pid, "reason": reason})
        clients = [{**dict(reply.content["metrics"]), "partition-id": pid, "update_norm": norms[pid],
                    "bytes_down": bytes_down, "bytes_up": sent[pid]}
                   for pid, reply in accepted.items()]
        return accepted, rejected, clients, None

    def _decode(self, reply: Message, state: dict[str, np.ndarray]) -> str | None:
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

    def _collect_secure(self, server_round: int, messages: list[Message], wanted: dict[int, int],
                        state: dict[str, np.ndarray], sizes: dict[int, int], progress: Progress,
                        bytes_down: int) -> tuple:
        """SecAgg+ (fedpt/federation/secagg.py): the mean update as one reply, or why the round failed. What can
        be checked without seeing an update is: the example counts and metrics each client sent in the clear,
        enough survivors, and the mean's finiteness and norm."""
        from fedpt.federation.secagg import masked_bytes, secure_round

        privacy, fed = self.config.privacy, self.config.federation
        central = privacy.dp == "central"
        with task(progress, f"round {server_round}: SecAgg+", 1) as advance:
            result = secure_round(self.grid, self.config, server_round, sorted(wanted, key=wanted.get), state,
                                  max_weight=1.0 if central else float(max(sizes.values())))
            advance(1)
        rejected = [{"partition-id": -1, "reason": f"client failed: {client_error(f)}"} for f in result.failures]
        for failure in result.failures:
            log.warning("round %d: a SecAgg+ client failed:\n%s", server_round, failure)
        clients, problems = [], []
        for node, metrics in result.clients.items():
            pid = wanted.get(node, -1)
            examples, limit = metrics.get("num-examples"), (1 if central else sizes.get(pid, 0))
            if not finite_number(examples) or not 0 < examples <= limit:
                problems.append(f"client {pid} reported weight {examples!r}, its limit is {limit}")
            if not all(finite_number(v) for v in metrics.values()):
                problems.append(f"client {pid} sent a metric that is not a finite number")
            clients.append({**metrics, "partition-id": pid, "bytes_down": bytes_down, "bytes_up": masked_bytes(state)})
        if result.mean_update is None:
            return {}, rejected, [], "; ".join(result.failures) or "SecAgg+ halted"
        if len(clients) < fed.min_clients:
            return {}, rejected, clients, f"{len(clients)} client(s) survived SecAgg+, federation.min_clients is " \
                                          f"{fed.min_clients}"
        if problems:  # the masked mean already holds that client: the whole round goes
            return {}, rejected, clients, "; ".join(problems) + " (the masked mean included it)"
        norm = l2_norm(result.mean_update)
        bound = privacy.clip_norm if central else fed.max_update_norm
        step = 2 * privacy.secagg_range / privacy.secagg_levels * math.sqrt(sum(v.size for v in state.values()))
        if bound and norm > bound + step:  # the mean of updates clipped to C has norm <= C, up to the rounding
            return {}, rejected, clients, f"the mean update's norm {norm:.3g} is over {bound:g}: a client did not " \
                                          "clip its update"
        mean = {k: state[k] + result.mean_update[k] for k in state}
        content = RecordDict({"arrays": to_record(mean), "metrics": MetricRecord({"num-examples": 1})})
        return {0: Message(content, dst_node_id=0, message_type=MessageType.TRAIN)}, rejected, clients, None

    def _over_clip_norm(self, norms: dict[int, float]) -> dict[int, str]:
        """Central DP with client-side clipping: an update over the clip norm broke the protocol."""
        privacy = self.config.privacy
        if privacy.dp != "central" or privacy.clipping != "client":
            return {}
        return {pid: f"update norm {norm:.3g} is over privacy.clip_norm {privacy.clip_norm:g} (the client did not "
                     "clip)" for pid, norm in norms.items() if norm > privacy.clip_norm * (1 + 1e-4)}

    def _aggregate(self, strategy: Any, server_round: int, accepted: dict[int, Message],
                   state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str | None]:
        """(new global weights, None), or (empty, why the round failed): too few updates, the strategy refused
        them, or their aggregate is not finite. A failed round never replaces the global model. With central DP:
        updates clipped, averaged with equal weights, and noised (fedpt.federation.privacy)."""
        privacy, fed = self.config.privacy, self.config.federation
        if len(accepted) < fed.min_clients and not privacy.secagg:  # SecAgg+ counted its survivors already
            return {}, f"{len(accepted)} update(s) accepted, federation.min_clients is {fed.min_clients}"
        central = privacy.dp == "central"
        # a fixed summation order (by partition): a resumed run is bit-identical to an uninterrupted one
        replies = [clean_reply(accepted[pid], uniform=central) for pid in sorted(accepted)]
        if central:
            for reply in replies:
                weights = {k: a.numpy() for k, a in reply.content["arrays"].items()}
                reply.content["arrays"] = to_record(dp.clipped(weights, state, privacy.clip_norm))
        try:
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
        except Exception as e:  # Flower's strategies raise their own types (and AppExitException subclasses)
            return {}, f"the strategy could not aggregate: {first_line(e)}"
        if new_arrays is None:
            return {}, "the strategy returned no aggregate"
        state = {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in new_arrays.items()}
        if central:
            state = dp.add_noise(state, self.accountant.noise_multiplier, privacy.clip_norm, fed.clients_per_round(),
                                 round_seed(self.config.seed, server_round, -1))
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
        privacy = row.get("privacy")
        self.console.print(f"round {row['round']}: held-out NLL {row['global']['nll']:.4f}"
                           + (f", {len(row['clients'])} clients" if row["round"] else "")
                           + (f", epsilon {privacy['epsilon']:.3g} (delta {privacy['delta']:.2g})" if privacy else ""))

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


def _arrays_bytes(reply: Message) -> int:
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return 0
    return reply.content["arrays"].count_bytes()


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
