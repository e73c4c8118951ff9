"""Run a federation in Flower's simulation engine, in this process (the ClientApps run in Ray workers)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedpt.config import RunConfig
from fedpt.federation.server_app import make_server_app
from fedpt.runtime import setup_process
from fedpt.tuning.distill import AfterRound


def quiet_flower() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no telemetry calls from offline machines
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("flwr").setLevel(logging.ERROR)  # fedpt shows rounds itself; Flower's INFO lines are noise


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
    from flwr.simulation import run_simulation

    if client_app is None:
        from fedpt.federation.client_app import app as client_app

    cpus = min(config.federation.client_cpus, os.cpu_count() or 1)  # more than the machine has never schedules
    gpus = client_gpus(config)
    run_simulation(
        server_app=make_server_app(config, resume=resume, after_round=after_round),
        client_app=client_app,
        num_supernodes=config.federation.clients,
        backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": gpus},
                        "init_args": {"logging_level": "ERROR", "log_to_driver": False}},
    )
    return Path(config.out) / "final"
