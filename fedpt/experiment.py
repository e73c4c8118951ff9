"""The FedPT experiment: does a proxy-tuned large model come close to the large model tuned by federation,
at a fraction of the devices' cost?

Trained, with one recipe (the run config's data, federation and tuning sections):
  fedpt   - the small model, federated (FedPT step 1);
  direct  - the large model, federated by the same recipe (the costly baseline);
  fedpt-distill - FedPT with the iterative loop ([distill] every > 0), if enabled;
  central - the small model tuned centrally on all training data, same number of steps (an upper bound).
Evaluated on one held-out test split: small base, small federated, large base, FedPT as published (proxy
with the configured alpha), FedPT with alpha and fusion chosen on the validation split, the direct baseline,
and the extras. Every stage writes to its own folder, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from fedpt import config as cfg
from fedpt.config import RunConfig
from fedpt.data import Example, load_examples, splits
from fedpt.errors import FedptError
from fedpt.evaluate import (
    choice_accuracy,
    exact_match,
    fusion_logprobs,
    gap_closed,
    option_examples,
    response_logprobs,
    rouge_l,
    summarize,
)
from fedpt.fusion import Fusion

console = Console(stderr=True)


def federate(config: RunConfig, folder: Path) -> Path:
    """Run (or finish, or reuse) one federation into `folder`; return its final model folder."""
    from fedpt.federation.run import simulate

    if (folder / "final").is_dir():
        return folder / "final"
    run = cfg.from_dict({**config.to_dict(), "out": str(folder)})
    return simulate(run, resume=(folder / "config.json").is_file())


def tune_centrally(config: RunConfig, train: Sequence[Example], folder: Path) -> tuple[Path, dict]:
    """The small model tuned on all training data at once, with as many steps as the whole federation took."""
    from fedpt.lm import load_model
    from fedpt.train import make_trainable
    from fedpt.train import train as run_training

    adapter, stats_file = folder / "adapter", folder / "stats.json"
    if stats_file.is_file():
        return adapter, json.loads(stats_file.read_text())
    fed = config.federation
    steps = fed.rounds * fed.clients_per_round() * config.tuning.local_steps
    model, tokenizer, _ = load_model(config.model.small, dtype=config.tuning.dtype)
    model = make_trainable(model, config.tuning, seed=config.seed)
    tuning = cfg.replace(config, tuning={"local_steps": steps, "local_epochs": 0.0}).tuning
    with Progress(console=console, transient=True) as progress:
        stats = run_training(model, tokenizer, train, tuning, seed=config.seed, progress=progress)
    model.save_pretrained(adapter)
    stats_file.write_text(json.dumps(stats))
    return adapter, stats


def fusions_for(experiment: cfg.ExperimentConfig) -> list[Fusion]:
    """The grid searched on validation: each alpha alone, each alpha with each mixture weight, and dynamic alpha."""
    alphas = sorted({*experiment.alphas, experiment.alpha})
    grid = [Fusion(alpha=a, weight=w) for a in alphas for w in (0.0, *experiment.fusion_weights)]
    if experiment.dynamic:
        grid += [Fusion(dynamic=True, weight=w) for w in (0.0, *experiment.fusion_weights)]
    return grid


def best(scores: dict[str, float], labels: Sequence[str]) -> str:
    return min(labels, key=lambda label: scores[label])


def costs(folder: Path) -> dict[str, Any]:
    """What each client paid per round, from a federation's metrics.jsonl."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
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
    }


class Evaluation:
    """Scores models on the test split (and the fusion grid on validation), collecting one row per model."""

    def __init__(self, config: RunConfig, test: list[Example], validation: list[Example], progress: Progress):
        self.config, self.test, self.validation, self.progress = config, test, validation, progress
        self.experiment = config.experiment
        self.max_length = config.tuning.max_length * 2
        self.options = sorted({e.response for e in test + validation}) if self.experiment.metric == "choice" else []
        self.rows: dict[str, dict[str, Any]] = {}

    def score(self, name: str, lm: Any) -> None:
        """NLL (and accuracy over the options) of one LanguageModel on the test split."""
        row = self.rows.setdefault(name, {})
        row.update(summarize(response_logprobs(lm, self.test, max_length=self.max_length, progress=self.progress)))
        if self.options:
            scores = response_logprobs(lm, option_examples(self.test, self.options), max_length=self.max_length,
                                       progress=self.progress)
            row["accuracy"] = choice_accuracy(scores, self.test, self.options)

    def score_fusions(self, large: Any, expert: Any, fusions: list[Fusion], prefix: str) -> dict[str, dict]:
        """The large base, the small pair and every fusion, on validation and test, each model run once."""
        found: dict[str, dict] = {}
        for split, examples in (("validation", self.validation), ("test", self.test)):
            scores = fusion_logprobs(large, expert, examples, fusions, max_length=self.max_length,
                                     progress=self.progress)
            for key, values in scores.items():
                found.setdefault(key, {})[split] = summarize(values)
            if self.options:
                option_scores = fusion_logprobs(large, expert, option_examples(examples, self.options), fusions,
                                                max_length=self.max_length, progress=self.progress)
                for key, values in option_scores.items():
                    found[key][split]["accuracy"] = choice_accuracy(values, examples, self.options)
        return {f"{prefix}{k}": v for k, v in found.items()}

    def answers(self, name: str, lm: Any) -> None:
        """Greedy answers to the first test prompts: ROUGE-L, exact match, and seconds per generated token."""
        from fedpt.decoding import GenerationConfig, generate

        if self.experiment.metric != "rouge" or not self.experiment.generate_examples:
            return
        examples = self.test[: self.experiment.generate_examples]
        started = time.perf_counter()
        texts = generate(lm, [e.prompt for e in examples],
                         GenerationConfig(max_new_tokens=self.experiment.max_new_tokens), progress=self.progress)
        seconds = time.perf_counter() - started
        tokens = sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
        row = self.rows.setdefault(name, {})
        row["rouge_l"] = float(np.mean([rouge_l(t, e.response) for t, e in zip(texts, examples)]))
        row["exact_match"] = float(np.mean([exact_match(t, e.response) for t, e in zip(texts, examples)]))
        row["seconds_per_token"] = seconds / max(tokens, 1)
        row["samples"] = [{"prompt": e.prompt, "reference": e.response, "answer": t}
                          for e, t in list(zip(examples, texts))[:6]]


def run_experiment(config: RunConfig, out: Path, command: str = "") -> dict[str, Any]:
    """Train what is missing, evaluate everything, write results.json and the report; return the results."""
    from fedpt.lm import HFCausalLM, load_model
    from fedpt.proxy import ProxyTunedLM, load_expert
    from fedpt.report import write_report

    started = time.time()
    exp = config.experiment
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    if saved.is_file() and json.loads(saved.read_text()) != config.to_dict():
        raise FedptError(f"{out} holds an experiment with another config; pick another --out or delete it")
    saved.write_text(json.dumps(config.to_dict(), indent=2))
    parts = splits(load_examples(config.data), config.data)
    test = parts["test"][: exp.test_examples or None]
    validation = parts["validation"][: exp.validation_examples or None]
    if not test or not validation:
        raise FedptError("the experiment needs a test and a validation split: raise data.test_percent / "
                         "data.validation_percent")

    console.rule("[bold]1/5 FedPT: federated tuning of the small model")
    fedpt_final = federate(cfg.replace(config, distill={"every": 0}), out / "fedpt")
    console.rule("[bold]2/5 baseline: federated tuning of the large model, same recipe")
    direct_config = cfg.replace(config, model={"small": config.model.large}, distill={"every": 0})
    direct_final = federate(direct_config, out / "direct")
    distill_final = None
    if exp.distill_variant:
        console.rule("[bold]3/5 FedPT with distillation between rounds")
        every = config.distill.every or 1
        distill_final = federate(cfg.replace(config, distill={"every": every}), out / "fedpt-distill")
    central = None
    if exp.central_small:
        console.rule("[bold]4/5 the small model tuned centrally (upper bound of step 1)")
        central = tune_centrally(config, parts["train"], out / "central")

    console.rule("[bold]5/5 evaluation on the held-out split")
    small, large_name = config.model.small, config.model.large
    fusions = fusions_for(exp)
    published = Fusion(alpha=exp.alpha)
    with Progress(console=console, transient=True) as progress:
        ev = Evaluation(config, test, validation, progress)
        large = HFCausalLM.load(large_name)
        expert = load_expert(small, fedpt_final)
        grid = ev.score_fusions(large, expert, fusions, prefix="")
        validation_nll = {label: grid[label]["validation"]["nll"] for label in grid}
        labels = [f.label for f in fusions]
        chosen = {
            "alpha": best(validation_nll, [f.label for f in fusions if not f.dynamic and not f.weight]),
            "mixture": best(validation_nll, [f.label for f in fusions if f.weight]),
            "dynamic": best(validation_nll, [f.label for f in fusions if f.dynamic]) if exp.dynamic else None,
            "overall": best(validation_nll, labels),
        }
        rows = ev.rows
        for name, key in [("small_base", "small_base"), ("small_fedpt", "small_tuned"), ("large_base", "large"),
                          ("fedpt_proxy", published.label), ("fedpt_best", chosen["overall"])]:
            rows[name] = {**grid[key]["test"], "validation_nll": grid[key]["validation"]["nll"]}
        rows["fedpt_proxy"]["fusion"], rows["fedpt_best"]["fusion"] = published.label, chosen["overall"]
        fusion_of = {f.label: f for f in fusions}
        ev.answers("large_base", large)
        ev.answers("small_fedpt", expert.lm)
        ev.answers("fedpt_proxy", ProxyTunedLM(large, expert, fusion=published))
        ev.answers("fedpt_best", ProxyTunedLM(large, expert, fusion=fusion_of[chosen["overall"]]))
        del expert
        small_base = HFCausalLM.load(small)
        ev.answers("small_base", small_base)
        del small_base

        if distill_final is not None:
            distill_expert = load_expert(small, distill_final)
            distilled = ev.score_fusions(large, distill_expert, [published, fusion_of[chosen["overall"]]], "")
            rows["small_fedpt_distill"] = distilled["small_tuned"]["test"]
            rows["fedpt_distill_proxy"] = {**distilled[published.label]["test"], "fusion": published.label}
            rows["fedpt_distill_best"] = {**distilled[chosen["overall"]]["test"], "fusion": chosen["overall"]}
            ev.answers("fedpt_distill_proxy", ProxyTunedLM(large, distill_expert, fusion=published))
            del distill_expert
        del large

        if central is not None:
            from peft import PeftModel

            model, tokenizer, _ = load_model(small)
            central_lm = HFCausalLM(PeftModel.from_pretrained(model, central[0]).eval(), tokenizer, "small_central")
            ev.score("small_central", central_lm)
            ev.answers("small_central", central_lm)
            del central_lm, model

        expert_direct = load_expert(large_name, direct_final)
        ev.score("large_direct", expert_direct.lm)
        ev.answers("large_direct", expert_direct.lm)
        del expert_direct

    gaps = {name: gap_closed(rows[name]["nll"], rows["large_base"]["nll"], rows["large_direct"]["nll"])
            for name in rows if name.startswith(("fedpt", "small"))}
    if exp.metric == "rouge":
        rouge_gap = {name: gap_closed(rows[name].get("rouge_l", float("nan")), rows["large_base"]["rouge_l"],
                                      rows["large_direct"]["rouge_l"]) for name in rows if "rouge_l" in rows[name]}
    else:
        rouge_gap = {name: gap_closed(rows[name]["accuracy"], rows["large_base"]["accuracy"],
                                      rows["large_direct"]["accuracy"]) for name in rows if "accuracy" in rows[name]}
    cost = {"fedpt": costs(out / "fedpt"), "direct": costs(out / "direct")}
    if distill_final is not None:
        cost["fedpt_distill"] = costs(out / "fedpt-distill")
    if central is not None:
        cost["central"] = {"seconds_per_step": central[1]["seconds_per_step"],
                           "peak_memory_bytes": central[1]["peak_memory_bytes"], "steps": central[1]["steps"]}
    ratio = {key: cost["fedpt"][key] / cost["direct"][key] for key in
             ("peak_memory_bytes", "seconds_per_step", "bytes_down_per_client_round", "bytes_up_per_client_round",
              "flops_per_client_round", "client_seconds_per_round")}
    headline = "fedpt_best"
    results = {
        "command": command,
        "config": config.to_dict(),
        "data": {"source": config.data.source, "train": len(parts["train"]), "validation": len(validation),
                 "test": len(test), "metric": exp.metric},
        "models": rows,
        "fusion_grid": {label: grid[label] for label in labels},
        "chosen_on_validation": chosen,
        "gap_closed_nll": gaps,
        "gap_closed_metric": rouge_gap,
        "costs": cost,
        "cost_ratio_fedpt_over_direct": ratio,
        "targets": {
            "gap_closed_nll_at_least_0.8": {"value": gaps[headline], "met": bool(gaps[headline] >= 0.8),
                                            "model": headline},
            "peak_memory_at_most_0.5": {"value": ratio["peak_memory_bytes"],
                                        "met": bool(ratio["peak_memory_bytes"] <= 0.5)},
            "seconds_per_step_at_most_0.5": {"value": ratio["seconds_per_step"],
                                             "met": bool(ratio["seconds_per_step"] <= 0.5)},
            "bytes_per_round_at_most_0.5": {
                "value": max(ratio["bytes_down_per_client_round"], ratio["bytes_up_per_client_round"]),
                "met": bool(max(ratio["bytes_down_per_client_round"], ratio["bytes_up_per_client_round"]) <= 0.5)},
        },
        "seconds": time.time() - started,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, out)
    return results
