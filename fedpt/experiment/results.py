"""results.json, the one record of an experiment: its schema (a version, typed and checked before anything is
drawn or served), its model keys and labels, its targets, the gap formula, the costs read from each federation's
metrics, and reading and writing the file. Torch-free, so reports and comparisons run anywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from fedpt.errors import FedptError
from fedpt.federation.run_folder import read_metrics
from fedpt.files import write_atomic

RESULTS = "results.json"
VERSION = 2  # 2: fusions stored as data ("fusions"); 1 (no "version"): fusions known by their labels only
NAMES = {  # model key -> label, in the report's order
    "small_base": "small base",
    "small_fedpt": "small, federated (FedPT step 1)",
    "small_central": "small, tuned centrally",
    "small_fedpt_distill": "small, federated + distillation",
    "large_base": "large base",
    "fedpt_proxy": "FedPT: proxy-tuned large (configured alpha)",
    "fedpt_best": "FedPT: fusion chosen on validation",
    "fedpt_distill_proxy": "FedPT + distillation (configured alpha)",
    "fedpt_distill_best": "FedPT + distillation (chosen fusion)",
    "large_direct": "large, federated directly (baseline)",
}
ORDER = list(NAMES)
HEADLINE = "fedpt_best"  # the model the gap target is judged on
COST_KEYS = ("peak_memory_bytes", "seconds_per_step", "bytes_down_per_client_round", "bytes_up_per_client_round",
             "flops_per_client_round", "client_seconds_per_round")
GAP_TARGET = "gap_closed_nll_at_least_0.8"
MEMORY_TARGET = "peak_memory_at_most_0.5"
STEP_TARGET = "seconds_per_step_at_most_0.5"
BYTES_TARGET = "bytes_per_round_at_most_0.5"
COST_TARGETS = (MEMORY_TARGET, STEP_TARGET, BYTES_TARGET)


def gap_closed(proxy: float, large_base: float, large_tuned: float) -> float:
    """Share of the large base -> large tuned improvement that the proxy achieves: (m4 - m3) / (m5 - m3)."""
    gap = large_tuned - large_base
    return float("nan") if gap == 0 else (proxy - large_base) / gap


def gaps(models: dict[str, dict], metric: str) -> dict[str, float]:
    """Every model's share of the gap on `metric` ("nll", "rouge_l" or "accuracy"), where it was measured."""
    base, direct = models["large_base"].get(metric), models["large_direct"].get(metric)
    if base is None or direct is None:
        return {}
    return {name: gap_closed(row[metric], base, direct) for name, row in models.items() if metric in row}


def task_gaps(models: dict[str, dict], task: str) -> dict[str, dict[str, Any]]:
    """Every model's share of the large base -> large direct gap in a task's pass@1, with a paired bootstrap 95%
    interval over the problems all three were judged on."""
    from fedpt.tasks.metrics import gap_interval

    base, direct = _verdicts(models, "large_base", task), _verdicts(models, "large_direct", task)
    gaps = {}
    for name in models:
        mine = _verdicts(models, name, task)
        common = sorted(set(mine) & set(base) & set(direct))
        if common and name not in ("large_base", "large_direct"):
            value, low, high = gap_interval([mine[i] for i in common], [base[i] for i in common],
                                            [direct[i] for i in common])
            gaps[name] = {"value": value, "interval_95": [low, high], "problems": len(common)}
    return gaps


def _verdicts(models: dict[str, dict], name: str, task: str) -> dict[str, bool]:
    return models.get(name, {}).get("tasks", {}).get(task, {}).get("passed", {})


def task_targets(models: dict[str, dict], task_gaps: dict[str, dict[str, dict]]) -> dict[str, dict[str, Any]]:
    """Per real task: FedPT (chosen fusion) closes 80% of the gap in the task metric; and the premise, that direct
    tuning lifted the large model beyond its paired 95% interval (without it there is no gap to close)."""
    from fedpt.tasks.metrics import bootstrap_interval

    found: dict[str, dict[str, Any]] = {}
    for task, gaps in task_gaps.items():
        base, direct = _verdicts(models, "large_base", task), _verdicts(models, "large_direct", task)
        common = sorted(set(base) & set(direct))
        if not common:
            continue
        gain, low, high = bootstrap_interval([direct[i] for i in common], other=[base[i] for i in common])
        found[f"{task}_direct_beats_large_base"] = {"value": gain, "interval_95": [low, high], "met": bool(low > 0)}
        if HEADLINE in gaps:
            gap = gaps[HEADLINE]
            found[f"{task}_gap_closed_at_least_0.8"] = {"value": gap["value"], "interval_95": gap["interval_95"],
                                                        "met": bool(gap["value"] >= 0.8), "model": HEADLINE}
    return found


def costs_of(federation_folder: Path) -> dict[str, Any]:
    """What each client paid per round, from a federation's metrics.jsonl."""
    rows = read_metrics(federation_folder)
    rounds = [r for r in rows if r["round"] > 0]
    clients = [c for r in rounds for c in r["clients"]]

    def mean(key: str) -> float:
        return float(np.mean([c[key] for c in clients]))

    return {
        "rounds": len(rounds),
        "client_rounds": len(clients),
        "flops_per_client_round": mean("flops"),
        "client_seconds_per_round": mean("seconds"),
        "seconds_per_step": mean("seconds_per_step"),
        "peak_memory_bytes": float(max(c["peak_memory_bytes"] for c in clients)),
        "mean_peak_memory_bytes": mean("peak_memory_bytes"),
        "bytes_down_per_client_round": mean("bytes_down"),
        "bytes_up_per_client_round": mean("bytes_up"),
        "bytes_total": float(sum(c["bytes_down"] + c["bytes_up"] for c in clients)),
        "server_seconds_per_round": float(np.mean([r["seconds"] for r in rounds])),
        "heldout_nll_per_round": [r["global"]["nll"] for r in rows],
        "train_loss_per_round": [float(np.mean([c["train_loss"] for c in r["clients"]])) if r["clients"]
                                 else math.nan for r in rounds],
        "failed_rounds": [r["round"] for r in rounds if r.get("failed")],  # no update accepted: the model stayed
        **({"privacy": rounds[-1]["privacy"]} if rounds and "privacy" in rounds[-1] else {}),
    }


def cost_ratios(fedpt: dict[str, Any], direct: dict[str, Any]) -> dict[str, float]:
    """FedPT client / direct client, for each cost."""
    return {key: fedpt[key] / direct[key] for key in COST_KEYS}


def targets(gaps_nll: dict[str, float], ratio: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The claim's targets: FedPT closes 80% of the gap at half of the direct baseline's costs or less."""
    bytes_ratio = max(ratio["bytes_down_per_client_round"], ratio["bytes_up_per_client_round"])
    return {
        GAP_TARGET: {"value": gaps_nll[HEADLINE], "met": bool(gaps_nll[HEADLINE] >= 0.8), "model": HEADLINE},
        MEMORY_TARGET: {"value": ratio["peak_memory_bytes"], "met": bool(ratio["peak_memory_bytes"] <= 0.5)},
        STEP_TARGET: {"value": ratio["seconds_per_step"], "met": bool(ratio["seconds_per_step"] <= 0.5)},
        BYTES_TARGET: {"value": bytes_ratio, "met": bool(bytes_ratio <= 0.5)},
    }


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelRow(_Open):
    """One model's scores on the test split (NLL always; the rest where the task measures it)."""

    nll: float
    perplexity: float | None = None
    tokens: int | None = None
    validation_nll: float | None = None
    accuracy: float | None = None
    rouge_l: float | None = None
    exact_match: float | None = None
    seconds_per_token: float | None = None
    fusion: str | None = None  # the label of the fusion this row was scored with
    samples: list[dict[str, str]] | None = None


class FusionData(BaseModel):
    """A fusion as data: what fedpt.proxy.Fusion is built from."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = 1.0
    weight: float = 0.0
    dynamic: bool = False


class Target(_Open):
    value: float
    met: bool


class Results(_Open):
    """The schema of results.json."""

    version: int = 1
    command: str = ""
    config: dict[str, Any]
    data: dict[str, Any] = {}
    models: dict[str, ModelRow]
    fusion_grid: dict[str, dict[str, dict[str, Any]]] = {}
    fusions: dict[str, FusionData] = {}  # label -> fusion (version 2)
    chosen_on_validation: dict[str, str | None] = {}
    gap_closed_nll: dict[str, float] = {}
    gap_closed_metric: dict[str, float] = {}
    gap_closed_task: dict[str, dict[str, dict[str, Any]]] = {}  # task -> model -> value, interval_95, problems
    costs: dict[str, dict[str, Any]]
    cost_ratio_fedpt_over_direct: dict[str, float]
    targets: dict[str, Target]
    seconds: float | None = None

    @model_validator(mode="after")
    def _complete(self) -> Results:
        missing = [f"models.{k}" for k in ("small_base", "small_fedpt", "large_base", "fedpt_proxy", "fedpt_best",
                                           "large_direct") if k not in self.models]
        missing += [f"costs.{k}" for k in ("fedpt", "direct") if k not in self.costs]
        missing += [f"targets.{k}" for k in (GAP_TARGET, *COST_TARGETS) if k not in self.targets]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        return self


def save_results(results: dict[str, Any], folder: Path) -> Path:
    """Check `results` against the schema, then write it (atomically)."""
    results = {"version": VERSION, **results}
    _validated(results, folder / RESULTS)
    path = folder / RESULTS
    write_atomic(path, json.dumps(results, indent=2))
    return path


def load_results(folder: Path) -> dict[str, Any]:
    """results.json as a dict whose every key the schema promises is there, with its type; else one line."""
    path = folder / RESULTS
    if not path.is_file():
        raise FedptError(f"{folder} has no {RESULTS}; run `fedpt experiment` first")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise FedptError(f"{path} is not UTF-8 text (byte {e.start}): not a fedpt experiment result") from None
    except json.JSONDecodeError as e:
        raise FedptError(f"{path} is not valid JSON: {e}") from None
    _validated(results, path)
    return results


def _validated(results: Any, path: Path) -> Results:
    if not isinstance(results, dict):
        raise FedptError(f"{path} holds a {type(results).__name__}, not an experiment's results")
    if results.get("version", 1) > VERSION:
        raise FedptError(f"{path} is results.json version {results['version']}; this fedpt reads up to {VERSION}: "
                         "upgrade fedpt")
    try:
        return Results.model_validate(results)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FedptError(f"{path} is not a fedpt experiment result: {where + ': ' if where else ''}{first['msg']}") \
            from None


def fusion_data(label: str) -> dict[str, Any]:
    """The fusion a label names ("alpha=1", "alpha=1, w=0.5", "dynamic alpha, w=0.25"), for version-1 results
    that stored labels only."""
    core, _, rest = label.partition(",")
    try:
        weight = float(rest.strip().removeprefix("w=")) if rest else 0.0
        if core.strip() == "dynamic alpha":
            return {"alpha": 1.0, "weight": weight, "dynamic": True}
        if not core.strip().startswith("alpha="):
            raise ValueError
        return {"alpha": float(core.strip().removeprefix("alpha=")), "weight": weight, "dynamic": False}
    except ValueError:
        raise FedptError(f"'{label}' names no fusion (e.g. 'alpha=1', 'alpha=1, w=0.5', 'dynamic alpha')") from None


def recommended(folder: Path) -> dict[str, Any]:
    """What an experiment recommends serving: its models, its FedPT adapter and the fusion chosen on validation
    (as data: alpha, weight, dynamic)."""
    results = load_results(folder)
    label = results["chosen_on_validation"].get("overall")
    model = results["config"].get("model")
    if not label or not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in ("small", "large")):
        raise FedptError(f"{folder / RESULTS} lacks the fusion chosen on validation or the models")
    fusions = results.get("fusions") or {}
    fusion = fusions[label] if label in fusions else fusion_data(label)
    return {"fusion": fusion, "small": model["small"], "large": model["large"], "adapter": folder / "fedpt" / "final"}


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
