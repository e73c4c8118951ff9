"""`fedpt train`, `experiment`, `report`, `compare`, `demo` and `gate`: federations, the experiment that judges
them, and the gate in front of a deployment's SuperLink."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from fedpt.cli.app import app
from fedpt.errors import FedptError
from fedpt.runtime import quiet_transformers


@app.command()
def gate(
    superlink: Annotated[str, typer.Option(help="the SuperLink's address, on loopback (host:port)")],
    superlink_ca: Annotated[Path, typer.Option(help="CA certificate that signed the SuperLink's certificate")],
    cert: Annotated[Path, typer.Option(help="the gate's TLS certificate (may be the SuperLink's)")],
    key: Annotated[Path, typer.Option(help="its private key")],
    fleet: Annotated[str | None, typer.Option(help="host:port where SuperNodes connect")] = None,
    device_ca: Annotated[Path | None, typer.Option(help="CA whose certificates the fleet listener admits")] = None,
    control: Annotated[str | None, typer.Option(help="host:port for the operator's flwr CLI; none keeps the "
                                                     "Control API on the server's loopback")] = None,
    operator_ca: Annotated[Path | None, typer.Option(help="CA whose certificates the control listener admits")] = None,
) -> None:
    """Mutual TLS in front of a Flower SuperLink: devices' certificates reach the Fleet API only, operators'
    the Control API only (see docs/deployment.md)."""
    from fedpt.federation.mtls import Listener, run_gate

    listeners = []
    for api, address, ca, option in (("fleet", fleet, device_ca, "--device-ca"),
                                     ("control", control, operator_ca, "--operator-ca")):
        if address is not None:
            if ca is None:
                raise FedptError(f"--{api} needs {option}: the CA whose certificates that listener admits")
            listeners.append(Listener(api, address, ca))
    run_gate(superlink, superlink_ca, cert, key, listeners)


@app.command()
def train(
    config: Annotated[Path | None, typer.Option(help="run config (TOML); see configs/chatterbot.toml")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. federation.rounds=5")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default: the config's `out`)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue the run in this folder after its last round")] = None,
) -> None:
    """Federated fine-tuning of the small model in Flower's simulation engine."""
    from fedpt import config as cfg
    from fedpt.federation.simulation import simulate

    quiet_transformers()
    if resume is not None:
        if config is not None or out is not None:
            raise FedptError("--resume continues the run saved in that folder; drop --config and --out")
        run = cfg.load(resume / "config.json", set_, out=str(resume))
    else:
        run = cfg.load(config, set_, **({"out": str(out)} if out is not None else {}))
    final = simulate(run, resume=resume is not None)
    print(final)


@app.command()
def experiment(
    config: Annotated[Path | None, typer.Option(help="experiment config (TOML)")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder; an interrupted experiment continues there "
                                                 "(default: the config's `out`, else runs/experiment)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. federation.rounds=5")] = None,
) -> None:
    """FedPT against the large model tuned by federation: train, evaluate, write results.json and report.md."""
    from fedpt import config as cfg
    from fedpt.experiment.run import run_experiment

    quiet_transformers()
    run = cfg.load(config, set_ or [])
    if out is None:  # like `fedpt train`: the config names its folder; the embedded defaults get their own
        out = Path(run.out) if config is not None else Path("runs/experiment")
    command = shlex.join(["fedpt", "experiment", *(["--config", str(config)] if config else []), "--out", str(out),
                          *[arg for item in set_ or [] for arg in ("--set", item)]])
    results = run_experiment(run, out, command=command)
    print(out / "report.md")
    for name, target in results["targets"].items():
        print(f"{name}: {target['value']:.3f} ({'met' if target['met'] else 'missed'})")


@app.command()
def report(folder: Annotated[Path, typer.Argument(help="an experiment folder with results.json")]) -> None:
    """Rebuild the plots and report.md of an experiment from its results.json alone."""
    from fedpt.experiment.report import write_report
    from fedpt.experiment.results import load_results

    print(write_report(load_results(folder), folder))


@app.command()
def compare(folders: Annotated[list[Path], typer.Argument(help="experiment folders with results.json")]) -> None:
    """One table over several experiments, e.g. ablations of one recipe: what differs, NLLs, gap, cost ratios."""
    from fedpt.experiment.report import compare as table

    print(table(folders), end="")


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(help="output folder (default: a new one under runs/demo/)")] = None,
    questions: Annotated[int, typer.Option(help="held-out questions answered at the end")] = 6,
) -> None:
    """End to end: federate the small model on chatterbot clients, then answer held-out questions with the
    large model alone and proxy-tuned."""
    from fedpt.demo import demo_config, run_demo

    quiet_transformers()
    run_demo(demo_config(out), n_questions=questions)
