"""results.json, the one record of an experiment: its model keys and labels, its targets, the gap formula, the
costs read from each federation's metrics, and reading and writing the file. Torch-free, so reports and
comparisons run anywhere.

    {"command", "config", "data",
     "models": {KEY: {"nll", "perplexity", "tokens", ["accuracy"], ["rouge_l", "exact_match",
                       "seconds_per_token", "samples"], ["fusion"], ["validation_nll"]}},
     "fusion_grid": {LABEL: {"validation": {...}, "test": {...}}}, "chosen_on_validation": {...},
     "gap_closed_nll": {KEY: share}, "gap_closed_metric": {KEY: share},
     "costs": {"fedpt"|"direct"|"fedpt_distill": costs_of(...), "central": {...}},
     "cost_ratio_fedpt_over_direct": {COST_KEY: ratio}, "targets": {TARGET: {"value", "met"}}, "seconds"}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedpt.errors import FedptError
from fedpt.federation.run_folder import read_metrics
from fedpt.files import write_atomic

RESULTS = "results.json"
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
        "train_loss_per_round": [float(np.mean([c["train_loss"] for c in r["clients"]])) for r in rounds],
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


def save_results(results: dict[str, Any], folder: Path) -> Path:
    path = folder / RESULTS
    write_atomic(path, json.dumps(results, indent=2))
    return path


def load_results(folder: Path) -> dict[str, Any]:
    path = folder / RESULTS
    if not path.is_file():
        raise FedptError(f"{folder} has no {RESULTS}; run `fedpt experiment` first")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FedptError(f"{path} is not valid JSON: {e}") from None
    missing = {"models", "costs", "targets", "cost_ratio_fedpt_over_direct"} - set(results)
    if missing:
        raise FedptError(f"{path} lacks {sorted(missing)}: not a fedpt experiment result")
    return results


def recommended(folder: Path) -> dict[str, Any]:
    """What an experiment recommends serving: its models, its FedPT adapter and the fusion chosen on validation."""
    results = load_results(folder)
    try:
        fusion = results["chosen_on_validation"]["overall"]
        model = results["config"]["model"]
        small, large = model["small"], model["large"]
    except (KeyError, TypeError):
        raise FedptError(f"{folder / RESULTS} lacks the fusion chosen on validation or the models") from None
    return {"fusion": fusion, "small": small, "large": large, "adapter": folder / "fedpt" / "final"}


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
