"""A federation's output folder, and the one owner of its file formats:

    config.json      the run's config (a resume reads it back)
    round-K/         the global model after round K (what `fedpt generate --adapter` takes), its exact float32
                     weights (state.npz), the strategy's state (server-state.npz), and round.json, written last
                     with the sha256 of every other file: a round folder without it is incomplete, and one whose
                     files do not match it is damaged; neither is ever used
    metrics.jsonl    one JSON row per round (0 = before training): the held-out loss of the global model, each
                     client's metrics, rejected updates, distillation stats, and `failed` for a failed round
    final/           a copy of the last round's model folder without the bookkeeping
    server.log       warnings with their whole text (clients' tracebacks), where a one-line message points
    flower.log       Flower's own messages in a simulation (appended; not part of the run's state)

Every file is written whole or not at all (fedpt/files.py), and fedpt writes only these names: a new run
refuses a folder that holds any of them (flower.log aside), and nothing else in the folder is ever touched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fedpt.config import RunConfig
from fedpt.errors import FedptError
from fedpt.files import checksums, damage, sync_folder, write_atomic

CONFIG = "config.json"
METRICS = "metrics.jsonl"
STATE = "state.npz"  # exact global weights of a round, for resuming
SERVER_STATE = "server-state.npz"  # the strategy's state (the server optimiser's moments)
DONE = "round.json"
LOG = "server.log"
FINAL = "final"
FINAL_MARK = ".fedpt-final"  # in final/: fedpt wrote this folder and may replace it


def read_metrics(out: str | Path, drop_torn_tail: bool = False) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, in order. A last line cut short by a crash is dropped when
    `drop_torn_tail` (a resume rewrites the file); any other unreadable line is an error naming it."""
    path = Path(out) / METRICS
    if not path.is_file():
        raise FedptError(f"{Path(out)} has no {METRICS}: not a fedpt federation folder")
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("round"), int):
                raise ValueError
        except ValueError:
            if drop_torn_tail and number == len(lines):
                break
            raise FedptError(f"{path}, line {number} is not a metrics row; `fedpt train --resume` repairs a last "
                             "line cut short, or restore the file") from None
        rows.append(row)
    return rows


class RunFolder:
    """Checkpoints, resume points and metrics of one federated run."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.note: str | None = None  # what a resume had to skip, said once to the user

    def check(self, resume: bool) -> int:
        """The round to continue after, writing nothing: a new run needs a folder without fedpt's files; a resume
        continues after the last round whose files are intact (saying, in `note`, which later ones were not)."""
        if not resume:
            taken = [p.name for p in (self.out.iterdir() if self.out.is_dir() else [])
                     if p.name in (CONFIG, METRICS, LOG, FINAL) or p.name.startswith(("round-", ".round-"))]
            if taken:
                raise FedptError(f"output folder {self.out} already holds a run ({', '.join(sorted(taken)[:3])}); "
                                 "resume it with --resume or pick another")
            return 0
        if not (self.out / CONFIG).is_file():
            raise FedptError(f"{self.out} has no {CONFIG}: nothing to resume")
        read_metrics(self.out, drop_torn_tail=True)  # an unreadable line in the middle stops here, before writing
        return self.last_intact_round()

    def claim(self, config: RunConfig, start: int) -> None:
        """Write the config, and cut metrics.jsonl back to round `start` (after everything is validated); a row
        of a kept round that a crash tore away is restored from the copy its round.json holds. At start 0 nothing
        is kept: the server scores round 0 again."""
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / CONFIG, json.dumps(config.to_dict(), indent=2, sort_keys=True))
        if (self.out / METRICS).is_file():
            earlier = read_metrics(self.out, drop_torn_tail=True) if start else []
            rows = {r["round"]: r for r in earlier if r["round"] <= start}
            for server_round in range(1, start + 1):
                if server_round not in rows:
                    kept = self._recorded_row(server_round)
                    if kept is not None:
                        rows[server_round] = kept
                        self.note = (self.note + "; " if self.note else "") + \
                            f"round {server_round}'s metrics row was torn: restored from its {DONE}"
            write_atomic(self.out / METRICS, "".join(json.dumps(rows[k]) + "\n" for k in sorted(rows)))

    def _recorded_row(self, server_round: int) -> dict[str, Any] | None:
        try:
            return json.loads((self.round_dir(server_round) / DONE).read_text()).get("metrics")
        except (OSError, ValueError, AttributeError):
            return None

    def last_intact_round(self) -> int:
        done = sorted((int(p.name.split("-")[1]) for p in self.out.glob("round-*") if (p / DONE).is_file()),
                      reverse=True)
        skipped = []
        for server_round in done:
            problem = self._damage(server_round)
            if problem is None:
                break
            skipped.append(f"round {server_round} ({problem})")
        else:
            server_round = 0
        if skipped:
            self.note = f"{'; '.join(skipped)} damaged: continuing after round {server_round}"
        return server_round

    def _damage(self, server_round: int) -> str | None:
        folder = self.round_dir(server_round)
        try:
            done = json.loads((folder / DONE).read_text())
        except ValueError:
            done = None
        if not isinstance(done, dict) or done.get("round") != server_round:
            return f"{DONE} is unreadable"
        if "sha256" not in done:  # written by a fedpt before checksums: nothing to verify against
            return None
        return damage(folder, done["sha256"])

    def _describe(self, folder: Path, server_round: int) -> None:
        """final/ as a model card: README.md says what the model is and how it was trained (peft leaves an empty
        template), and the adapter names its base as the run did (a name, not this machine's cache path)."""
        try:
            config = json.loads((self.out / CONFIG).read_text())
            rows = read_metrics(self.out)
        except (OSError, ValueError, FedptError):
            return  # nothing recorded to describe (a folder written by hand)
        model, fed, tuning = config.get("model", {}), config.get("federation", {}), config.get("tuning", {})
        adapter = folder / "adapter_config.json"
        if adapter.is_file():
            settings = json.loads(adapter.read_text())
            settings["base_model_name_or_path"] = model.get("small")
            adapter.write_text(json.dumps(settings, indent=2))
        nll = [f"round {r['round']}: {r['global']['nll']:.4f}" for r in rows if isinstance(r.get("global"), dict)]
        (folder / "README.md").write_text(f"""---
base_model: {model.get('small')}
library_name: peft
tags: [fedpt, federated-learning, proxy-tuning, lora]
---

# {model.get('small')}, tuned by federation (fedpt)

The small model of a FedPT run: {fed.get('clients')} clients, {fed.get('strategy')}, {server_round} rounds of
{tuning.get('local_steps')} local steps ({tuning.get('mode')}, r={tuning.get('lora_r')} on
{', '.join(tuning.get('target_modules', []))}), data `{config.get('data', {}).get('source')}`,
seed {config.get('seed')}. It steers the large model `{model.get('large')}` by proxy-tuning:

    fedpt generate --large {model.get('large')} --small {model.get('small')} --adapter THIS_FOLDER --alpha 1 \\
        --prompt "..."

Held-out NLL per answer token of the global model: {'; '.join(nll)}.
Everything else about the run is in `../config.json` and `../metrics.jsonl`.
""")

    def round_dir(self, server_round: int) -> Path:
        return self.out / f"round-{server_round}"

    def load_round(self, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(global weights, strategy state) saved after a round."""
        folder = self.round_dir(server_round)
        return dict(np.load(folder / STATE)), dict(np.load(folder / SERVER_STATE))

    def save_round(self, server_round: int, model: Any, tokenizer: Any, state: dict[str, np.ndarray],
                   strategy_state: dict[str, np.ndarray], base: str | None = None) -> None:
        """Write round-K/ through a temporary folder and a rename (not yet marked done); `base`: the model it
        tunes, recorded so that it is never loaded onto another (fedpt/models/base_record.py)."""
        folder = self.round_dir(server_round)
        temporary = self.out / f".round-{server_round}.partial"
        shutil.rmtree(temporary, ignore_errors=True)
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        np.savez(temporary / STATE, **state)
        np.savez(temporary / SERVER_STATE, **strategy_state)
        if base is not None:
            from fedpt.models.base_record import record_base

            record_base(temporary, base)
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished or damaged earlier attempt at this round
        temporary.rename(folder)
        sync_folder(self.out)

    def mark_done(self, server_round: int, row: dict[str, Any] | None = None) -> None:
        """round.json, written last: the checksums of the round's files and a copy of its metrics row."""
        folder = self.round_dir(server_round)
        write_atomic(folder / DONE, json.dumps({"round": server_round, "sha256": checksums(folder, skip=(DONE,)),
                                                **({"metrics": row} if row is not None else {})}))

    def append_metrics(self, row: dict[str, Any]) -> None:
        """One line more, in O(1): a line torn by a crash can only be the last, and a resume's `claim` rewrites
        the file without it."""
        with open(self.out / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_final(self, server_round: int) -> Path:
        """final/: the model folder of `server_round`, without the bookkeeping files."""
        final, temporary = self.out / FINAL, self.out / ".final.partial"
        if final.exists() and not (final / FINAL_MARK).is_file():
            raise FedptError(f"{final} was not written by fedpt; move it away so that fedpt can write the final model")
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.copytree(self.round_dir(server_round), temporary,
                        ignore=shutil.ignore_patterns(STATE, SERVER_STATE, DONE))
        self._describe(temporary, server_round)
        (temporary / FINAL_MARK).write_text(json.dumps({"round": server_round}))
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        sync_folder(self.out)
        return final
