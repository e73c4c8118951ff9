"""A federation's output folder, and the one owner of its file formats:

    config.json      the run's config (a resume reads it back)
    round-K/         the global model after round K (what `fedpt generate --adapter` takes), its exact float32
                     weights (state.npz), the strategy's state (server-state.npz), and round.json, written last:
                     a round folder without it is incomplete and never used
    metrics.jsonl    one JSON row per round (0 = before training): the held-out loss of the global model, each
                     client's metrics, rejected updates, distillation stats
    final/           a copy of the last round's model folder without the bookkeeping
    server.log       warnings with their whole text (clients' tracebacks), where a one-line message points
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fedpt.config import RunConfig
from fedpt.errors import FedptError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
STATE = "state.npz"  # exact global weights of a round, for resuming
SERVER_STATE = "server-state.npz"  # the strategy's state (the server optimiser's moments)
DONE = "round.json"
LOG = "server.log"


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, in order."""
    path = Path(out) / METRICS
    if not path.is_file():
        raise FedptError(f"{Path(out)} has no {METRICS}: not a fedpt federation folder")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunFolder:
    """Checkpoints, resume points and metrics of one federated run."""

    def __init__(self, out: str | Path):
        self.out = Path(out)

    def begin(self, config: RunConfig, resume: bool) -> int:
        """Claim the folder for `config`; return the round to continue after (0 for a new run).

        A new run refuses a folder that already holds one; a resume continues after the last completed round
        (and may extend the run, e.g. with more rounds)."""
        self.out.mkdir(parents=True, exist_ok=True)
        saved = self.out / CONFIG
        current = json.dumps(config.to_dict(), indent=2, sort_keys=True)
        if resume:
            if not saved.is_file():
                raise FedptError(f"{self.out} has no {CONFIG}: nothing to resume")
            start = self.last_completed_round()
            self._trim_metrics(start)
        elif saved.is_file() or any(self.out.glob("round-*")):
            raise FedptError(f"output folder {self.out} already holds a run; resume it with --resume or pick another")
        else:
            start = 0
        saved.write_text(current)
        return start

    def last_completed_round(self) -> int:
        done = [int(p.name.split("-")[1]) for p in self.out.glob("round-*") if (p / DONE).is_file()]
        return max(done, default=0)

    def round_dir(self, server_round: int) -> Path:
        return self.out / f"round-{server_round}"

    def load_round(self, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(global weights, strategy state) saved after a round."""
        folder = self.round_dir(server_round)
        return dict(np.load(folder / STATE)), dict(np.load(folder / SERVER_STATE))

    def save_round(self, server_round: int, model: Any, tokenizer: Any, state: dict[str, np.ndarray],
                   strategy_state: dict[str, np.ndarray]) -> None:
        """Write round-K/ through a temporary folder and a rename (not yet marked done)."""
        folder = self.round_dir(server_round)
        temporary = self.out / f".round-{server_round}.partial"
        shutil.rmtree(temporary, ignore_errors=True)
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        np.savez(temporary / STATE, **state)
        np.savez(temporary / SERVER_STATE, **strategy_state)
        shutil.rmtree(folder, ignore_errors=True)
        temporary.rename(folder)

    def mark_done(self, server_round: int) -> None:
        (self.round_dir(server_round) / DONE).write_text(json.dumps({"round": server_round}))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _trim_metrics(self, last_round: int) -> None:
        if (self.out / METRICS).is_file():
            rows = [r for r in read_metrics(self.out) if r["round"] <= last_round]
            (self.out / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write_final(self, server_round: int) -> Path:
        """final/: the model folder of `server_round`, without the bookkeeping files."""
        final = self.out / "final"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(self.round_dir(server_round), final, ignore=shutil.ignore_patterns(STATE, SERVER_STATE, DONE))
        return final
