"""The plots of an experiment, drawn from its results.json: loss per round, every model's scores, device costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpt.experiment.results import NAMES, ORDER


def plot(results: dict[str, Any], folder: Path) -> list[str]:
    """rounds.png, metrics.png, costs.png; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for name, draw in (("rounds.png", _plot_rounds), ("metrics.png", _plot_metrics), ("costs.png", _plot_costs)):
        fig = draw(plt, results)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names


def _plot_rounds(plt: Any, results: dict[str, Any]) -> Any:
    """Held-out loss per round of each federation, with the proxies' final NLL as lines."""
    from matplotlib.ticker import MaxNLocator

    costs, models = results["costs"], results["models"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in [("fedpt", "FedPT: small model, federated"), ("fedpt_distill", "FedPT + distillation"),
                       ("direct", "baseline: large model, federated")]:
        if key in costs:
            curve = costs[key]["heldout_nll_per_round"]
            ax.plot(range(len(curve)), curve, marker="o", label=label)
    for key, style in [("fedpt_proxy", ":"), ("fedpt_best", "--")]:
        if key in models:
            ax.axhline(models[key]["nll"], linestyle=style, color="gray", label=f"{NAMES[key]} (final)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test NLL per answer token" if results.get("config", {}).get("federation", {}).get(
        "eval_examples") == 0 else "NLL per answer token, first test pairs")
    ax.set_title("Held-out loss per round")
    ax.legend(fontsize=7)
    return fig


def _plot_metrics(plt: Any, results: dict[str, Any]) -> Any:
    """Every model's NLL, and its task metric where measured, as bars."""
    models = results["models"]
    present = [k for k in ORDER if k in models]
    metric = "rouge_l" if all("rouge_l" in models[k] for k in present if k in ("large_base", "large_direct")) \
        else "accuracy"
    panels = [("nll", "NLL per answer token (lower is better)")]
    if any(metric in models[k] for k in present):
        panels.append((metric, f"{'ROUGE-L' if metric == 'rouge_l' else 'accuracy'} (higher is better)"))
    panels += [(f"task:{task}", f"{task}: greedy pass@1, 95% interval") for task in results.get("gap_closed_task", {})]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    axes = [axes] if len(panels) == 1 else axes
    for ax, (key, title) in zip(axes, panels):
        task = key.removeprefix("task:") if key.startswith("task:") else None
        keys = [k for k in present if (task in models[k].get("tasks", {}) if task else key in models[k])]
        scores = [models[k]["tasks"][task]["pass@1"] if task else {"value": models[k][key]} for k in keys]
        values = [s["value"] for s in scores]
        # error bars: distance from the score to each end of its interval, shape (2, models)
        spread = [[v - s["interval_95"][0] for v, s in zip(values, scores)],
                  [s["interval_95"][1] - v for v, s in zip(values, scores)]] if task else None
        ax.barh([NAMES[k] for k in keys], values, xerr=spread,
                color=["tab:orange" if k.startswith("fedpt") else "tab:blue" for k in keys])
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    return fig


def _plot_costs(plt: Any, results: dict[str, Any]) -> Any:
    """What a FedPT client and a direct client pay, side by side."""
    costs = results["costs"]
    measures = [("peak_memory_bytes", "client peak memory (GB)", 1e9),
                ("seconds_per_step", "seconds per local step", 1),
                ("bytes_up_per_client_round", "MB sent per client and round", 1e6),
                ("flops_per_client_round", "training TFLOPs per client and round", 1e12)]
    fig, axes = plt.subplots(1, len(measures), figsize=(14, 3.5))
    for ax, (key, title, scale) in zip(axes, measures):
        ax.bar(["FedPT", "direct"], [costs["fedpt"][key] / scale, costs["direct"][key] / scale],
               color=["tab:orange", "tab:blue"])
        ax.set_title(title, fontsize=9)
    return fig
