"""Scoring the experiment's models on the held-out splits: the fusion grid on validation and test (each model run
once), the choice made on validation, single models on test, and greedy answers. Every score is kept in the
experiment's folder as it is made (OUT/scores/*.json, OUT/tasks/), so a resumed evaluation goes on from there.

Models come as functions that open them (`Opener`), called only when a score is missing: a judgment already kept
needs neither the model nor the training that made it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpt.config import ExperimentConfig, RunConfig
from fedpt.data import Example
from fedpt.decoding import Sampling, generate
from fedpt.files import write_atomic
from fedpt.models import LanguageModel
from fedpt.proxy import ExpertPair, Fusion
from fedpt.scoring import (
    choice_accuracy,
    exact_match,
    fusion_logprobs,
    option_examples,
    response_logprobs,
    rouge_l,
    summarize,
)

Opener = Callable[[], LanguageModel]


def fusions_for(experiment: ExperimentConfig) -> list[Fusion]:
    """The grid searched on validation: each alpha alone, each alpha with each mixture weight, and dynamic alpha."""
    alphas = sorted({*experiment.alphas, experiment.alpha})
    grid = [Fusion(alpha=a, weight=w) for a in alphas for w in (0.0, *experiment.fusion_weights)]
    if experiment.dynamic:
        grid += [Fusion(dynamic=True, weight=w) for w in (0.0, *experiment.fusion_weights)]
    return grid


def best(validation_nll: dict[str, float], labels: Sequence[str]) -> str:
    return min(labels, key=lambda label: validation_nll[label])


def choose(grid: dict[str, dict], fusions: Sequence[Fusion]) -> dict[str, str | None]:
    """The best fusion of each kind by validation NLL (the test split is never looked at)."""
    validation_nll = {label: grid[label]["validation"]["nll"] for label in grid}
    dynamic = [f.label for f in fusions if f.dynamic]
    return {
        "alpha": best(validation_nll, [f.label for f in fusions if not f.dynamic and not f.weight]),
        "mixture": best(validation_nll, [f.label for f in fusions if f.weight]),
        "dynamic": best(validation_nll, dynamic) if dynamic else None,
        "overall": best(validation_nll, [f.label for f in fusions]),
        "on": "nll",
    }


def choose_on_task(grid: dict[str, dict], fusions: Sequence[Fusion], task_name: str) -> dict[str, str | None]:
    """The fusion with the best pass@1 on the task's validation problems (grid[label]["validation"]["tasks"]);
    ties go to the lower validation NLL. The kinds' bests stay the NLL ones, shown beside it."""
    def rank(label: str) -> tuple[float, float]:
        return (-grid[label]["validation"]["tasks"][task_name], grid[label]["validation"]["nll"])

    return {**choose(grid, fusions), "overall": min((f.label for f in fusions), key=rank), "on": task_name}


class Evaluation:
    """Scores models on the test split (and fusion grids on validation too), collecting one row per model."""

    def __init__(self, config: RunConfig, test: list[Example], validation: list[Example], progress: Any,
                 out: Path | None = None):
        self.test, self.validation, self.progress, self.out = test, validation, progress, out
        self.data = config.data
        self.experiment = config.experiment
        self.max_length = config.score_max_length
        self.options = sorted({e.response for e in test + validation}) if self.experiment.metric == "choice" else []
        self.rows: dict[str, dict[str, Any]] = {}

    def kept(self, key: str, compute: Callable[[], dict]) -> dict:
        """OUT/scores/KEY.json if an earlier run of this experiment made it (the folder holds one config), else
        computed and kept there."""
        if self.out is None:
            return compute()
        path = self.out / "scores" / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        found = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(found, indent=1))
        return found

    def score(self, name: str, model: Opener) -> None:
        """NLL (and accuracy over the options) of one LanguageModel on the test split."""
        self.rows.setdefault(name, {}).update(self.kept(name, lambda: self._score(model())))

    def _score(self, lm: LanguageModel) -> dict[str, float]:
        row = summarize(response_logprobs(lm, self.test, max_length=self.max_length, progress=self.progress))
        if self.options:
            scores = response_logprobs(lm, option_examples(self.test, self.options), max_length=self.max_length,
                                       progress=self.progress)
            row["accuracy"] = choice_accuracy(scores, self.test, self.options)
        return row

    def score_fusions(self, key: str, large: Opener, expert: Callable[[], ExpertPair],
                      fusions: list[Fusion]) -> dict[str, dict]:
        """The large base, the small pair and every fusion, on validation and test, each model run once; kept as
        OUT/scores/KEY.json.

        Keys: "large", "small_base", "small_tuned" and each fusion's label; values {"validation": ..., "test": ...}.
        """
        return self.kept(key, lambda: self._score_fusions(large(), expert(), fusions))

    def _score_fusions(self, large: LanguageModel, expert: ExpertPair, fusions: list[Fusion]) -> dict[str, dict]:
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
        return found

    def answers(self, name: str, model: Opener) -> None:
        """Greedy answers: on the real tasks (experiment.tasks), and to the first test prompts (ROUGE-L)."""
        for task_name in self.experiment.tasks:
            self.task(name, model, task_name)
        if self.experiment.metric == "rouge" and self.experiment.generate_examples:
            self.rows.setdefault(name, {}).update(self.kept(f"rouge-{name}", lambda: self._rouge(model())))

    def validation_task(self, label: str, model: Opener, task_name: str) -> float:
        """Greedy pass@1 of one candidate on the first experiment.choose_problems validation problems of a task,
        in OUT/tasks/TASK-validation/LABEL (resumable): what choose_on_task picks by."""
        found = self._judge(self._folder(f"{task_name}-validation", label), model, task_name, "validation",
                            self.experiment.choose_problems)
        return found["scores"]["pass@1"]["value"]

    def same_answers(self, name: str, other: str) -> None:
        """`name` is the same model as `other` (the chosen fusion is the published one): its answers are `other`'s."""
        row, theirs = self.rows.setdefault(name, {}), self.rows[other]
        row.update({key: theirs[key] for key in ("tasks", "rouge_l", "exact_match", "seconds_per_token", "samples")
                    if key in theirs}, answers_of=other)

    def task(self, name: str, model: Opener, task_name: str) -> None:
        """Greedy pass@1 (or exact match) on a real task, in OUT/tasks/TASK/MODEL (resumable), as `fedpt evaluate`
        writes it; the row keeps the score and each problem's verdict, for paired intervals."""
        from fedpt.tasks.evaluate import verdicts

        folder = self._folder(task_name, name)
        found = self._judge(folder, model, task_name, "test", self.experiment.task_problems or None)
        row = self.rows.setdefault(name, {})
        row.setdefault("tasks", {})[task_name] = {**found["scores"], "problems": found["problems"],
                                                  "passed": verdicts(folder)}

    def _folder(self, task_folder: str, name: str) -> Path:
        if self.out is None:
            raise ValueError("an Evaluation with tasks needs the experiment's folder")
        return self.out / "tasks" / task_folder / name.replace(", ", "_")

    def _judge(self, folder: Path, model: Opener, task_name: str, split: str, limit: int | None) -> dict[str, Any]:
        """A finished judgment (its results.json, written once every sample is in) is read back; anything else
        is (re)run, resuming from the samples already there."""
        from fedpt.tasks.evaluate import RESULTS, evaluate

        kept = folder / RESULTS
        if kept.is_file():
            return json.loads(kept.read_text())
        return evaluate(model(), task_name, folder, sampling=Sampling(max_tokens=self.experiment.task_max_tokens),
                        limit=limit, progress=self.progress, split=split,
                        splits=(self.data.test_percent, self.data.validation_percent))

    def _rouge(self, lm: LanguageModel) -> dict[str, Any]:
        """Greedy answers to the first test prompts: ROUGE-L, exact match, and seconds per generated token."""
        examples = self.test[: self.experiment.generate_examples]
        started = time.perf_counter()
        texts = generate(lm, [e.prompt for e in examples],
                         Sampling(max_tokens=self.experiment.max_new_tokens), progress=self.progress)
        seconds = time.perf_counter() - started
        tokens = sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
        return {
            "rouge_l": float(np.mean([rouge_l(t, e.response) for t, e in zip(texts, examples)])),
            "exact_match": float(np.mean([exact_match(t, e.response) for t, e in zip(texts, examples)])),
            "seconds_per_token": seconds / max(tokens, 1),
            "samples": [{"prompt": e.prompt, "reference": e.response, "answer": t}
                        for e, t in list(zip(examples, texts))[:6]],
        }
