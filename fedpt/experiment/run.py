"""The FedPT experiment: does a proxy-tuned large model come close to the large model tuned by federation,
at a fraction of the devices' cost?

Stages, each a training judged as soon as it ends (each writes its own folder, and every judgment is kept, so an
interrupted experiment continues where it stopped; a training runs only when a judgment still needs its model):
  fedpt     - the small model, federated (FedPT step 1); judged on one held-out test split: both bases, the small
              federated, FedPT as published (the configured alpha) and with the fusion chosen on validation (by NLL,
              or by pass@1 on a task's validation problems: experiment.choose_on).
  direct    - the large model, federated by the same recipe (the costly baseline); judged likewise.
  distill   - FedPT with the iterative loop ([distill] every > 0), if enabled; central: the small model tuned
              centrally with as many steps (an upper bound), if enabled.
  summarize - gaps closed, what each device paid, the targets: results.json and report.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from fedpt import config as cfg
from fedpt.config import RunConfig
from fedpt.data import Example, load_splits
from fedpt.errors import FedptError
from fedpt.experiment import results as res
from fedpt.experiment.evaluation import Evaluation, choose, choose_on_task, fusions_for
from fedpt.files import write_atomic
from fedpt.proxy import Fusion

console = Console(stderr=True)


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


def run_experiment(config: RunConfig, out: Path, command: str = "") -> dict[str, Any]:
    """Train what is missing, each training judged as soon as it ends, then write results.json and the report.

    Judgments land in OUT/scores and OUT/tasks the moment they are made, so a lost machine loses at most the
    training under way, never the evaluations of the ones before it; a stage whose judgments are all kept is not
    trained again (its federation's metrics.jsonl still gives what the devices paid)."""
    from fedpt.experiment.report import write_report

    started = time.time()
    data = setup(config, out)
    ev = Evaluation(config, data.test, data.validation, None, out)
    exp = config.experiment
    stages = 2 + exp.distill_variant + exp.central_small
    console.rule(f"[bold]1/{stages} FedPT: federated tuning of the small model, then the proxy judged")
    with judging(ev):
        grid, chosen = evaluate_fedpt(config, ev, once(federate, cfg.replace(config, distill={"every": 0}),
                                                       out / "fedpt"))
    console.rule(f"[bold]2/{stages} baseline: federated tuning of the large model, same recipe, then judged")
    direct = cfg.replace(config, model={"small": direct_model(config)}, distill={"every": 0})
    with judging(ev):
        evaluate_direct(config, ev, once(federate, direct, out / "direct"))
    stats = None
    if exp.distill_variant:
        console.rule(f"[bold]3/{stages} FedPT with distillation between rounds, then judged")
        distill = cfg.replace(config, distill={"every": config.distill.every or 1})
        with judging(ev):
            evaluate_distill(config, ev, once(federate, distill, out / "fedpt-distill"), chosen_fusion(exp, chosen))
    if exp.central_small:
        console.rule(f"[bold]{stages}/{stages} the small model tuned centrally (upper bound of step 1), then judged")
        central, stats = tune_centrally(config, data.train, out / "central")
        with judging(ev):
            evaluate_central(config, ev, central)
    results = {"command": command, **summarize(config, data, stats, out, ev.rows, grid, chosen),
               "seconds": time.time() - started}
    res.save_results(results, out)
    write_report(results, out)
    return results


def once(train: Callable[..., Path], *args: Any) -> Callable[[], Path]:
    """A training to run the first time a judgment needs its model (never, if every judgment is kept)."""
    return functools.cache(functools.partial(train, *args))


@contextmanager
def judging(ev: Evaluation) -> Iterator[None]:
    """One progress display for an evaluation stage (none while a federation prints its own)."""
    with Progress(console=console, transient=True) as progress:
        ev.progress = progress
        try:
            yield
        finally:
            ev.progress = None


def setup(config: RunConfig, out: Path) -> Splits:
    """Claim `out` for this config (an existing experiment must have the same one) and split the data."""
    from fedpt.models.store import resolve

    exp = config.experiment
    for model in (config.model.small, direct_model(config)):  # a typo fails here, before config.json is written
        resolve(model)
    parts = load_splits(config.data)
    data = Splits(parts["train"], parts["validation"][: exp.validation_examples or None],
                  parts["test"][: exp.test_examples or None])
    if not data.test or not data.validation:
        raise FedptError("the experiment needs a test and a validation split: raise data.test_percent / "
                         "data.validation_percent")
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    trained = [name for name in ("fedpt", "direct", "fedpt-distill", "central", "tasks") if (out / name).exists()]
    if saved.is_file() and not _same_config(json.loads(saved.read_text()), config) and trained:
        raise FedptError(f"{out} holds an experiment with another config; pick another --out or delete it")
    # a config.json with nothing trained after it (a setup that failed) is replaced by the corrected one
    write_atomic(saved, json.dumps(config.to_dict(), indent=2))
    return data


def _same_config(saved: dict[str, Any], config: RunConfig) -> bool:
    """Whether a saved config.json is `config`; keys added to the schema since it was saved read as their defaults,
    so a new option does not lock out an experiment that is half run."""
    try:
        return cfg.from_dict(saved).to_dict() == config.to_dict()
    except (FedptError, TypeError, ValueError):  # a key since removed or renamed, or not a config at all
        return False


def direct_model(config: RunConfig) -> str:
    """The large model's weights, which the direct baseline trains: `large`, or `large_weights` beside a URL."""
    from fedpt.models.remote import is_url

    weights = config.model.large_weights or config.model.large
    if is_url(weights):
        raise FedptError(f"[model] large is the server {weights}, and the direct baseline trains the large model's "
                         "weights: set [model] large_weights to a local copy (a name or a folder)")
    return weights


def federate(config: RunConfig, folder: Path) -> Path:
    """Run (or finish, or reuse) one federation into `folder`; return its final model folder."""
    from fedpt.federation.simulation import simulate

    if (folder / "final").is_dir():
        return folder / "final"
    run = cfg.from_dict({**config.to_dict(), "out": str(folder)})
    return simulate(run, resume=(folder / "config.json").is_file())


def tune_centrally(config: RunConfig, train_set: Sequence[Example], folder: Path) -> tuple[Path, dict]:
    """The small model tuned on all training data at once, with as many steps as the whole federation took."""
    from fedpt.models.base_record import record_base
    from fedpt.tuning.local import load_trainable
    from fedpt.tuning.local import train as run_training

    tuned, stats_file = folder / "adapter", folder / "stats.json"
    if stats_file.is_file():
        return tuned, json.loads(stats_file.read_text())
    fed = config.federation
    steps = fed.rounds * fed.clients_per_round() * config.tuning.local_steps
    model, tokenizer = load_trainable(config.model.small, config.tuning, config.model.device, seed=config.seed)
    tuning = cfg.replace(config, tuning={"local_steps": steps, "local_epochs": 0.0}).tuning
    with Progress(console=console, transient=True) as progress:
        stats = run_training(model, tokenizer, train_set, tuning, seed=config.seed, progress=progress)
    model.save_pretrained(tuned)
    tokenizer.save_pretrained(tuned)
    record_base(tuned, config.model.small)
    write_atomic(stats_file, json.dumps(stats))
    return tuned, stats


def chosen_fusion(exp: cfg.ExperimentConfig, chosen: dict[str, str | None]) -> Fusion:
    return next(f for f in fusions_for(exp) if f.label == chosen["overall"])


def evaluate_fedpt(config: RunConfig, ev: Evaluation,
                   adapter: Callable[[], Path]) -> tuple[dict[str, dict], dict[str, str | None]]:
    """Both bases, the federated small model and the proxy (as published and as chosen on validation); return
    the fusion grid (validation and test) and the choices. One large model and one small pair in memory at a time."""
    from fedpt.proxy import ProxyTunedLM
    from fedpt.proxy.spec import ModelSpec

    spec = ModelSpec.from_config(config.model)  # every model below runs on its backend
    exp = config.experiment
    fusions = fusions_for(exp)
    published = Fusion(alpha=exp.alpha)
    rows = ev.rows
    large = functools.cache(spec.open_large)  # opened when first needed, once
    expert = functools.cache(lambda: ModelSpec.from_config(config.model, adapter=adapter()).open_expert())
    grid = ev.score_fusions("fusion-grid", large, expert, fusions)
    if exp.choose_on == "nll":
        chosen = choose(grid, fusions)
    else:  # each fusion answers the task's validation problems; the best pass@1 is chosen, test never looked at
        for f in fusions:
            grid[f.label]["validation"]["tasks"] = {exp.choose_on: ev.validation_task(
                f.label, lambda f=f: ProxyTunedLM(large(), expert(), fusion=f), exp.choose_on)}
        chosen = choose_on_task(grid, fusions, exp.choose_on)
    best = chosen_fusion(exp, chosen)
    for name, key in [("small_base", "small_base"), ("small_fedpt", "small_tuned"), ("large_base", "large"),
                      ("fedpt_proxy", published.label), ("fedpt_best", best.label)]:
        rows[name] = {**grid[key]["test"], "validation_nll": grid[key]["validation"]["nll"]}
    rows["fedpt_proxy"]["fusion"], rows["fedpt_best"]["fusion"] = published.label, best.label
    ev.answers("large_base", large)
    ev.answers("small_fedpt", lambda: expert().tuned)
    ev.answers("fedpt_proxy", lambda: ProxyTunedLM(large(), expert(), fusion=published))
    if best.label == published.label:  # the same model: greedy answers are the same, decoded once
        ev.same_answers("fedpt_best", "fedpt_proxy")
    else:
        ev.answers("fedpt_best", lambda: ProxyTunedLM(large(), expert(), fusion=best))
    large.cache_clear()
    expert.cache_clear()
    ev.answers("small_base", functools.cache(dataclasses.replace(spec, large=config.model.small,
                                                                 large_device_map="").open_large))
    return {f.label: grid[f.label] for f in fusions}, chosen


def evaluate_direct(config: RunConfig, ev: Evaluation, tuned_folder: Callable[[], Path]) -> None:
    """The baseline: the large model tuned by federation, on its own backend."""
    from fedpt.proxy.spec import ModelSpec

    tuned = functools.cache(lambda: ModelSpec.from_config(config.model).open_tuned(direct_model(config),
                                                                                   tuned_folder(), spread=True))
    ev.score("large_direct", tuned)
    ev.answers("large_direct", tuned)


def evaluate_distill(config: RunConfig, ev: Evaluation, adapter: Callable[[], Path], best: Fusion) -> None:
    """The small model of the distillation variant, alone and as the proxy's expert (published and chosen fusion)."""
    from fedpt.proxy import ProxyTunedLM
    from fedpt.proxy.spec import ModelSpec

    published = Fusion(alpha=config.experiment.alpha)
    large = functools.cache(ModelSpec.from_config(config.model).open_large)
    expert = functools.cache(lambda: ModelSpec.from_config(config.model, adapter=adapter()).open_expert())
    distilled = ev.score_fusions("fusion-grid-distill", large, expert, [published, best])
    ev.rows["small_fedpt_distill"] = distilled["small_tuned"]["test"]
    ev.rows["fedpt_distill_proxy"] = {**distilled[published.label]["test"], "fusion": published.label}
    ev.rows["fedpt_distill_best"] = {**distilled[best.label]["test"], "fusion": best.label}
    ev.answers("fedpt_distill_proxy", lambda: ProxyTunedLM(large(), expert(), fusion=published))


def evaluate_central(config: RunConfig, ev: Evaluation, tuned_folder: Path) -> None:
    from fedpt.proxy.spec import ModelSpec

    tuned = functools.cache(lambda: ModelSpec.from_config(config.model).open_tuned(config.model.small, tuned_folder,
                                                                                   spread=False))
    ev.score("small_central", tuned)
    ev.answers("small_central", tuned)


def summarize(config: RunConfig, data: Splits, central_stats: dict | None, out: Path, models: dict[str, dict],
              grid: dict[str, dict], chosen: dict[str, str | None]) -> dict[str, Any]:
    """Gaps closed, costs and targets, as results.json holds them."""
    exp = config.experiment
    gap_nll = {name: g for name, g in res.gaps(models, "nll").items() if name.startswith(("fedpt", "small"))}
    cost = {"fedpt": res.costs_of(out / "fedpt"), "direct": res.costs_of(out / "direct")}
    if exp.distill_variant:
        cost["fedpt_distill"] = res.costs_of(out / "fedpt-distill")
    if central_stats is not None:
        cost["central"] = {key: central_stats[key] for key in ("seconds_per_step", "peak_memory_bytes",
                                                                        "steps")}
    ratio = res.cost_ratios(cost["fedpt"], cost["direct"])
    task_gaps = {task: res.task_gaps(models, task) for task in exp.tasks}
    return {
        "version": res.VERSION,
        "config": config.to_dict(),
        "data": {"source": config.data.source, "train": len(data.train), "validation": len(data.validation),
                 "test": len(data.test), "metric": exp.metric},
        "models": models,
        "fusion_grid": grid,
        "fusions": {f.label: {"alpha": f.alpha, "weight": f.weight, "dynamic": f.dynamic}
                    for f in fusions_for(exp)},
        "chosen_on_validation": chosen,
        "gap_closed_nll": gap_nll,
        "gap_closed_metric": res.gaps(models, "rouge_l" if exp.metric == "rouge" else "accuracy"),
        "gap_closed_task": task_gaps,
        "costs": cost,
        "cost_ratio_fedpt_over_direct": ratio,
        "targets": {**res.targets(gap_nll, ratio), **res.task_targets(models, task_gaps)},
    }
