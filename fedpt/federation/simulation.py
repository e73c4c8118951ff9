"""Run a federation in Flower's simulation engine, in this process (the ClientApps run in Ray workers)."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedpt.config import RunConfig
from fedpt.errors import FedptError
from fedpt.federation import reaper
from fedpt.federation.server_app import make_server_app
from fedpt.runtime import setup_process
from fedpt.tuning.distill import AfterRound


def quiet_flower() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no telemetry calls from offline machines
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("flwr").setLevel(logging.ERROR)  # fedpt shows rounds itself; Flower's INFO lines are noise


def guard_ray() -> None:
    """Token authentication for the run's Ray cluster. Ray 2.55 binds its GCS, raylet and worker servers on every
    interface (it maps 127.0.0.1 to the machine's address; see docs/deployment.md), and whoever reaches them can
    run code as this user; with a token only this process and its workers may talk to them. Ray reads the mode
    when it is imported, so this must run first; a token the user set (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) is
    kept. The token is random per process and never printed."""
    if "ray" in sys.modules:  # too late to switch Ray's mode in this process: say so instead of breaking the run
        if os.environ.get("RAY_AUTH_MODE") != "token":
            logging.getLogger("fedpt.federation").warning("Ray was imported before the simulation: its token "
                                                          "authentication stays off in this process")
        return
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token" and not (os.environ.get("RAY_AUTH_TOKEN")
                                                       or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def check_before_ray(config: RunConfig, resume: bool) -> None:
    """What can fail without Ray fails before it starts (seconds, not minutes), in one line: the output folder
    and the data (every key was checked when the config was read)."""
    from fedpt.data import load_splits
    from fedpt.federation.run_folder import RunFolder

    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise FedptError(f"--out {out} is a file, not a folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise FedptError(f"--out {out}: {existing} is not writable")
    RunFolder(out).check(resume)  # an existing run without --resume, or nothing to resume
    load_splits(config.data)


def client_gpus(config: RunConfig) -> float:
    """GPUs each simulated client holds: federation.client_gpus where clients train on CUDA (Ray then gives each
    worker its share of a GPU, as FlowerTune does), none on CPU, so one config runs on both."""
    from fedpt.models.hf import pick_device

    return config.federation.client_gpus if pick_device(config.model.device).startswith("cuda") else 0.0


def simulate(config: RunConfig, resume: bool = False, after_round: AfterRound | None = None,
             client_app: Any = None) -> Path:
    """Train `config` with federation.clients simulated SuperNodes; return the folder of the final model."""
    setup_process()
    quiet_flower()
    check_before_ray(config, resume)
    guard_ray()
    reaper.watch()  # no process of the run outlives this one, even killed
    from flwr.simulation import run_simulation

    if client_app is None:
        from fedpt.federation.client_app import app as client_app

    cpus = min(config.federation.client_cpus, os.cpu_count() or 1)  # more than the machine has never schedules
    gpus = client_gpus(config)
    running, stopped = threading.Event(), threading.Event()
    running.set()
    started = time.time()

    def stop_stragglers() -> None:
        """Flower's simulation waits for every client call it started before it stops Ray: a client that never
        answers would keep the run alive for ever after final/ (seen: until killed). Give them a grace period,
        then end the client processes (this process's Ray actors), which ends their calls."""
        def later() -> None:
            if running.wait(0) and not _ended(running, SHUTDOWN_GRACE_S):
                import psutil

                logging.getLogger("fedpt.federation").warning(
                    "a client was still busy %.0f s after the run ended: ending it", SHUTDOWN_GRACE_S)
                stopped.set()
                for child in psutil.Process().children(recursive=True):
                    try:
                        if child.name().startswith("ray::ClientAppActor"):
                            child.kill()
                    except psutil.Error:
                        pass

        threading.Thread(target=later, name="fedpt-stop-stragglers", daemon=True).start()

    final = Path(config.out) / "final"
    try:
        flower_to_log(Path(config.out))
        run_simulation(
            server_app=make_server_app(config, resume=resume, after_round=after_round, finished=stop_stragglers),
            client_app=client_app,
            num_supernodes=config.federation.clients,
            backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": gpus},
                            "init_args": {"logging_level": "ERROR", "log_to_driver": False}},
        )
    except RuntimeError:  # Flower's complaint about the calls Ray's stop ended, after a run that did end
        mark = final / ".fedpt-final"
        if not (stopped.is_set() and mark.is_file() and mark.stat().st_mtime >= started):
            raise
    finally:
        running.clear()
        flower_to_log(None)
    return final


def flower_to_log(out: Path | None) -> None:
    """Flower's own messages (a failing client's Ray traceback is 30+ lines, one per client and round) go to the
    run's flower.log, not the console, where fedpt says in one line per round which client failed and why (the
    client's traceback is in server.log); before the run's folder exists they stay on the console (a refused
    run writes nothing). None puts them all back on the console."""
    flower = logging.getLogger("flwr")
    consoles = [h for h in flower.handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
    for handler in list(flower.handlers):
        if isinstance(handler, _RunLog):
            flower.removeHandler(handler)
            handler.close()
    for console in consoles:
        console.setLevel(logging.INFO if out is None else logging.CRITICAL + 1)
    if out is not None:
        flower.addHandler(_RunLog(out / "flower.log", consoles))


class _RunLog(logging.FileHandler):
    """Appends to the run's flower.log once the run's folder exists; until then hands records to the console."""

    def __init__(self, path: Path, consoles: list[logging.Handler]):
        super().__init__(path, encoding="utf-8", delay=True)  # the file is made on the first message
        self.setFormatter(logging.Formatter("%(asctime)s flwr %(levelname)s %(message)s"))
        self.consoles = consoles

    def emit(self, record: logging.LogRecord) -> None:
        if Path(self.baseFilename).parent.is_dir():
            super().emit(record)
        else:
            for console in self.consoles:
                console.emit(record)


SHUTDOWN_GRACE_S = 10.0  # seconds the clients still running get after the server finished


def _ended(running: threading.Event, seconds: float) -> bool:
    """Whether the simulation ended (running cleared) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not running.is_set():
            return True
        time.sleep(0.2)
    return not running.is_set()
