"""Plots and a readable report of an experiment, made from its results.json alone (`fedpt report DIR`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedpt.experiment.plots import plot
from fedpt.experiment.results import (
    BYTES_TARGET,
    COST_TARGETS,
    HEADLINE,
    MEMORY_TARGET,
    NAMES,
    ORDER,
    STEP_TARGET,
    gap_closed,
    is_missing,
    load_results,
)
from fedpt.files import write_atomic


def _fmt(value: Any, digits: int = 3) -> str:
    if is_missing(value):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def why(results: dict[str, Any], missed: list[str]) -> list[str]:
    """The measured facts behind each missed target, so a reader sees where the shortfall comes from."""
    models, costs = results["models"], results["costs"]
    fedpt, direct = costs["fedpt"], costs["direct"]
    lines = []
    if any(name.startswith("gap_closed") for name in missed):
        small_gain = models["small_base"]["nll"] - models["small_fedpt"]["nll"]
        large_gain = models["large_base"]["nll"] - models["large_direct"]["nll"]
        lines.append(
            f"Gap: proxy-tuning adds the small model's shift to the large model. Federation lowered the small "
            f"model's test NLL by {small_gain:.3f} and direct tuning lowered the large model's by {large_gain:.3f}; "
            f"the small model alone, tuned, reaches {models['small_fedpt']['nll']:.3f} against the large base's "
            f"{models['large_base']['nll']:.3f} and the direct baseline's {models['large_direct']['nll']:.3f}.")
    for task in [t for t in results.get("gap_closed_task", {}) if any(n.startswith(f"{t}_") for n in missed)]:
        scores = [f"{NAMES[k]} {models[k]['tasks'][task]['pass@1']['value']:.3f}" for k in ("large_base", HEADLINE,
                  "large_direct") if task in models.get(k, {}).get("tasks", {})]
        lines.append(f"{task}: pass@1 {', '.join(scores)}. A share of the gap means something only where direct "
                     "tuning lifted the large model beyond its paired interval.")
    if MEMORY_TARGET in missed:
        lines.append(
            f"Memory: a FedPT client peaked at {fedpt['peak_memory_bytes'] / 1e9:.2f} GB against "
            f"{direct['peak_memory_bytes'] / 1e9:.2f} GB; both include the same fixed share (Python, torch, "
            "tokenizer, the client runtime), which the smaller model cannot shrink.")
    if STEP_TARGET in missed:
        lines.append(
            f"Time: {fedpt['seconds_per_step']:.2f} s against {direct['seconds_per_step']:.2f} s per local step, "
            "at the same batch and sequence length.")
    if BYTES_TARGET in missed:
        lines.append(
            f"Bytes: {fedpt['bytes_up_per_client_round'] / 1e6:.2f} MB against "
            f"{direct['bytes_up_per_client_round'] / 1e6:.2f} MB sent per client and round: the adapted modules' "
            "widths decide the adapter's size.")
    return lines


def markdown(results: dict[str, Any], notes: str = "") -> str:
    """The report; `notes` (a folder's notes.md) adds the author's reading of the results."""
    lines = ["# FedPT experiment report", ""]
    for section in (_recipe, _targets, _results_table, _tasks, _levers, _distillation, _privacy, _device_costs,
                    _verdict):
        lines += section(results)
    if notes:
        lines += ["", "## Notes", "", notes.strip()]
    lines += _samples(results)
    return "\n".join(lines) + "\n"


def _recipe(results: dict[str, Any]) -> list[str]:
    data, config = results.get("data", {}), results.get("config", {})
    fed, tuning, model = config.get("federation", {}), config.get("tuning", {}), config.get("model", {})
    lines = ["Made by:", "", f"    {results['command']}", ""] if results.get("command") else []
    return lines + [
        f"Task: `{data.get('source')}` ({data.get('train')} training, {data.get('validation')} validation, "
        f"{data.get('test')} test pairs; metric {data.get('metric')}). Small model `{model.get('small')}`,"
        f" large model `{model.get('large')}`. Recipe: {fed.get('clients')} clients "
        f"({fed.get('partition')} partition), {fed.get('rounds')} rounds of {tuning.get('local_steps')} local steps, "
        f"batch {tuning.get('batch_size')}, {fed.get('strategy')}, LoRA r={tuning.get('lora_r')} on "
        f"{', '.join(tuning.get('target_modules', []))}, learning rate {tuning.get('learning_rate')}.", ""]


def _targets(results: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "", "| target | value | met |", "|---|---|---|"]
    for name, t in results["targets"].items():
        band = f" (95%: {_fmt(t['interval_95'][0])} to {_fmt(t['interval_95'][1])})" if "interval_95" in t else ""
        lines.append(f"| {name} | {_fmt(t['value'])}{band} | {'yes' if t['met'] else '**no**'} |")
    return lines


def _results_table(results: dict[str, Any]) -> list[str]:
    models, gaps = results["models"], results.get("gap_closed_nll", {})
    lines = ["", "## Results on the test split", "",
             "| model | NLL | perplexity | ROUGE-L | exact match | accuracy | gap closed (NLL) | s / token |",
             "|---|---|---|---|---|---|---|---|"]
    for key in [k for k in ORDER if k in models]:
        m = models[key]
        name = NAMES[key] + (f" [{m['fusion']}]" if m.get("fusion") else "")
        lines.append(f"| {name} | {_fmt(m.get('nll'))} | {_fmt(m.get('perplexity'), 1)} | {_fmt(m.get('rouge_l'))} | "
                     f"{_fmt(m.get('exact_match'))} | {_fmt(m.get('accuracy'))} | {_fmt(gaps.get(key), 2)} | "
                     f"{_fmt(m.get('seconds_per_token'))} |")
    return lines + ["", "Gap closed = (m - large base) / (large direct - large base), on the test NLL. "
                    "Seconds per token: greedy decoding of the first test prompts, batches of 8, on this machine.", "",
                    "![metrics](metrics.png)", ""]


def _tasks(results: dict[str, Any]) -> list[str]:
    """Each real task: every model's greedy pass@1 with its interval, and its share of the gap with a paired one."""
    lines, models = [], results["models"]
    for task, gaps in results.get("gap_closed_task", {}).items():
        lines += [f"## {task}: greedy pass@1 (bootstrap 95% intervals over problems)", "",
                  "| model | pass@1 | 95% interval | gap closed | its 95% interval (paired) |", "|---|---|---|---|---|"]
        for key in [k for k in ORDER if k in models and task in models[k].get("tasks", {})]:
            score, gap = models[key]["tasks"][task], gaps.get(key, {})
            low, high = score["pass@1"]["interval_95"]
            band = gap.get("interval_95", [float("nan")] * 2)
            lines.append(f"| {NAMES[key]} | {_fmt(score['pass@1']['value'])} | {_fmt(low)}-{_fmt(high)} | "
                         f"{_fmt(gap.get('value'), 2)} | "
                         f"{'-' if is_missing(band[0]) else f'{_fmt(band[0], 2)} to {_fmt(band[1], 2)}'} |")
        kinds = [f"{NAMES[k]}: " + ", ".join(f"{n.removeprefix('pass@1 ')} {_fmt(v['value'])}"
                                            for n, v in models[k]["tasks"][task].items() if n.endswith("templates"))
                 for k in ("large_base", "fedpt_best", "large_direct") if task in models[k].get("tasks", {})]
        unanswered = [f"{NAMES[k]} {_fmt(models[k]['tasks'][task]['no final number']['value'])}" for k in ORDER
                      if k in models and "no final number" in models[k].get("tasks", {}).get(task, {})]
        lines += ["", f"Problems: {next(iter(gaps.values()), {}).get('problems', '-')}. "
                  + (f"By template: {'; '.join(kinds)}." if any("templates" in k for k in kinds) else "")
                  + (" Share of answers without a final number (cut at experiment.task_max_tokens, or never "
                     f"written), judged wrong: {', '.join(unanswered)}." if unanswered else ""), ""]
    return lines


def _levers(results: dict[str, Any]) -> list[str]:
    models, chosen, grid = results["models"], results.get("chosen_on_validation", {}), results.get("fusion_grid", {})
    if not grid:
        return []
    on = chosen.get("on", "nll")
    task = [] if on == "nll" else [f"validation {on} pass@1"]
    lines = ["## Levers: alpha and fusion, chosen on the validation split", "",
             f"Chosen on validation NLL: best alpha `{chosen.get('alpha')}`, best mixture `{chosen.get('mixture')}`, "
             f"best dynamic `{chosen.get('dynamic')}`. Chosen overall (on {on if task else 'validation NLL'}): "
             f"`{chosen.get('overall')}` (the test column is shown for every setting, but none was picked on it).",
             "", "| " + " | ".join(["fusion", "validation NLL", *task, "test NLL", "gap closed (test NLL)"]) + " |",
             "|---|---|---|---|" + "---|" * len(task)]
    base, direct = models["large_base"]["nll"], models["large_direct"]["nll"]
    for label, split in grid.items():
        gap = gap_closed(split["test"]["nll"], base, direct)
        cells = [label, _fmt(split["validation"]["nll"]), *[_fmt(split["validation"]["tasks"][on], 2) for _ in task],
                 _fmt(split["test"]["nll"]), _fmt(gap, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _distillation(results: dict[str, Any]) -> list[str]:
    models = results["models"]
    if "small_fedpt_distill" not in models or "fedpt_distill_proxy" not in models:
        return []
    d, p = models["fedpt_distill_proxy"]["nll"], models["fedpt_proxy"]["nll"]
    verdict = "helped" if d < p else "did not help"
    return ["## Lever: distillation between rounds", "",
            f"Distilling the proxy into the small model between rounds {verdict}: FedPT with the configured "
            f"alpha reached test NLL {_fmt(d)} with distillation against {_fmt(p)} without; the small model "
            f"itself {_fmt(models['small_fedpt_distill']['nll'])} against {_fmt(models['small_fedpt']['nll'])}.", ""]


def _privacy(results: dict[str, Any]) -> list[str]:
    private = {name: c["privacy"] for name, c in results["costs"].items() if isinstance(c, dict) and "privacy" in c}
    if not private:
        return []
    lines = ["## Privacy spent", "",
             "Client-level differential privacy, accounted with an RDP accountant for m of N clients sampled "
             "without replacement each round (docs/privacy.md).", "",
             "| federation | DP | epsilon | delta | noise multiplier | clip norm | releases |",
             "|---|---|---|---|---|---|---|"]
    for name, p in private.items():
        lines.append(f"| {name} | {p['dp']} | {_fmt(p['epsilon'])} | {p['delta']:.3g} | "
                     f"{_fmt(p['noise_multiplier'])} | {_fmt(p['clip_norm'])} | {p['releases']} |")
    return lines + [""]


def _device_costs(results: dict[str, Any]) -> list[str]:
    costs, ratio = results["costs"], results["cost_ratio_fedpt_over_direct"]
    lines = ["## What a device pays", "",
             "| per client and round | FedPT (small) | direct (large) | FedPT / direct |", "|---|---|---|---|"]
    for key, label, scale, unit in [
        ("peak_memory_bytes", "peak memory", 1e9, "GB"), ("seconds_per_step", "seconds per local step", 1, "s"),
        ("client_seconds_per_round", "wall seconds per round", 1, "s"),
        ("bytes_down_per_client_round", "bytes received", 1e6, "MB"),
        ("bytes_up_per_client_round", "bytes sent", 1e6, "MB"),
        ("flops_per_client_round", "training FLOPs (estimate)", 1e12, "TFLOP"),
    ]:
        lines.append(f"| {label} | {costs['fedpt'][key] / scale:.3f} {unit} | {costs['direct'][key] / scale:.3f} {unit}"
                     f" | {ratio[key]:.2f} |")
    return lines + ["", f"Total bytes over the run: FedPT {costs['fedpt']['bytes_total'] / 1e6:.1f} MB, direct "
                    f"{costs['direct']['bytes_total'] / 1e6:.1f} MB.", "", "![costs](costs.png)", "",
                    "## Loss per round", "", "![rounds](rounds.png)", ""]


def _verdict(results: dict[str, Any]) -> list[str]:
    missed = [name for name, t in results["targets"].items() if not t["met"]]
    unequal = [f"- **{name}: round(s) {', '.join(map(str, c['failed_rounds']))} failed** (no update accepted; see its "
               "metrics.jsonl): it trained fewer rounds than the recipe says, so the comparison is not like for like."
               for name, c in results["costs"].items() if isinstance(c, dict) and c.get("failed_rounds")]
    if not missed:
        return ["## Verdict", "", "Every target is met on this run.", *([""] + unequal if unequal else [])]
    return ["## Verdict", "", f"Missed: {', '.join(missed)}. The evaluation was not changed to pass.", "",
            *unequal, *[f"- {line}" for line in why(results, missed)]]


def _samples(results: dict[str, Any]) -> list[str]:
    models = results["models"]
    samples = models.get("fedpt_best", {}).get("samples") or []
    if not samples:
        return []
    lines = ["", "## Sample answers (test prompts)", "", "| prompt | reference | large base | FedPT (chosen) |",
             "|---|---|---|---|"]
    base_samples = models.get("large_base", {}).get("samples") or [{}] * len(samples)
    for s, b in zip(samples, base_samples):
        cells = [s["prompt"], s["reference"], b.get("answer", ""), s["answer"]]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return lines


def write_report(results: dict[str, Any], folder: Path) -> Path:
    """The plots and report.md of an experiment folder (with the folder's notes.md, if any)."""
    plot(results, folder)
    notes = folder / "notes.md"
    path = folder / "report.md"
    write_atomic(path, markdown(results, notes.read_text() if notes.is_file() else ""))
    return path


def _recipe_differences(runs: list[dict[str, Any]]) -> list[str]:
    """Per run, the config values (section.key) that are not the same in every run."""
    flat = [{f"{s}.{k}": v for s, section in r.get("config", {}).items() if isinstance(section, dict)
             for k, v in section.items()} for r in runs]
    keys = sorted({k for f in flat for k in f if len({json.dumps(g.get(k)) for g in flat}) > 1})
    skip = ("experiment.distill_variant", "experiment.central_small")  # which extras ran, not the recipe
    return [", ".join(f"{k}={f.get(k)}" for k in keys if k not in skip) or "-" for f in flat]


def compare(folders: list[Path]) -> str:
    """One markdown table over several experiments (ablations): the recipe that differs, NLLs, gap, cost ratios."""
    runs = [load_results(folder) for folder in folders]
    lines = ["| run | differs in | small federated | large base | large direct | FedPT alpha (gap) | "
             "FedPT chosen (gap) | chosen fusion | memory | s / step | bytes / round |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for folder, r, diff in zip(folders, runs, _recipe_differences(runs)):
        m, gaps, targets = r["models"], r.get("gap_closed_nll", {}), r["targets"]
        cells = [folder.name, diff, _fmt(m["small_fedpt"]["nll"]), _fmt(m["large_base"]["nll"]),
                 _fmt(m["large_direct"]["nll"]),
                 f"{_fmt(m['fedpt_proxy']['nll'])} ({_fmt(gaps.get('fedpt_proxy'), 2)})",
                 f"{_fmt(m['fedpt_best']['nll'])} ({_fmt(gaps.get('fedpt_best'), 2)})",
                 m["fedpt_best"].get("fusion", "-"),
                 *(_fmt(targets[name]["value"], 2) for name in COST_TARGETS)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "NLL per answer token on each run's test split; gap = share of the large base -> large direct "
              "NLL gap closed; memory, s / step, bytes: FedPT client / direct client."]
    return "\n".join(lines) + "\n"
