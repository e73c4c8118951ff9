"""lm-evaluation-harness against `fedpt serve`: its `local-completions` model (echo log-likelihoods over HTTP)
and its own `hf` model on the same weights give the same per-choice log-likelihoods and the same accuracy, on a
small multiple-choice task written here (no hub).

    pip install 'lm-eval[api,hf]==0.4.*'        # not a fedpt dependency
    python benchmarks/lm_eval_check.py [--model qwen2.5-coder-0.5b-instruct] [--out runs/benchmarks/lm_eval.json]

Target (issue 22): accuracy equal, per-item log-likelihoods within 1e-3 (float32).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedpt.models.store import resolve
from fedpt.runtime import setup_process

QUESTIONS = [
    ("What is 2 + 3?", ["5", "6", "23"], 0), ("What is the capital of France?", ["Berlin", "Paris", "Rome"], 1),
    ("Which Python keyword defines a function?", ["class", "def", "lambda"], 1),
    ("How many legs does a spider have?", ["six", "eight", "ten"], 1),
    ("What colour is the sky on a clear day?", ["green", "blue", "red"], 1),
    ("Which is a prime number?", ["9", "15", "7"], 2), ("What is 10 times 10?", ["100", "1000", "20"], 0),
    ("Which language is used for styling web pages?", ["CSS", "SQL", "C"], 0),
    ("What does CPU stand for?", ["central processing unit", "computer power unit", "core program unit"], 0),
    ("Which planet is closest to the sun?", ["Venus", "Mercury", "Mars"], 1),
    ("Which data structure is last in, first out?", ["queue", "stack", "heap"], 1),
    ("What is the boiling point of water in Celsius?", ["90", "100", "120"], 1),
    ("Which keyword leaves a loop in Python?", ["break", "return", "pass"], 0),
    ("How many days are in a week?", ["five", "seven", "ten"], 1),
    ("What is the opposite of hot?", ["cold", "warm", "big"], 0),
    ("Which animal says 'meow'?", ["dog", "cow", "cat"], 2),
    ("What is 9 minus 4?", ["5", "13", "4"], 0), ("Which is a version control system?", ["git", "gcc", "grep"], 0),
    ("What is the largest ocean?", ["Atlantic", "Pacific", "Indian"], 1),
    ("Which symbol starts a comment in Python?", ["//", "#", "--"], 1),
]
TASK = """task: fedpt_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def loglikelihoods(result: dict) -> list[list[float]]:
    """Per item, each choice's log-likelihood, from lm-eval's logged samples."""
    samples = sorted(result["samples"]["fedpt_check"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/lm_eval.json"))
    args = parser.parse_args()
    setup_process()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from fedpt.models import HFCausalLM
    from fedpt.serving import running

    folder = resolve(args.model)
    work = Path(tempfile.mkdtemp())
    (work / "data.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                             for q, c, a in QUESTIONS))
    (work / "fedpt_check.yaml").write_text(TASK.format(data=work / "data.jsonl"))
    tasks = TaskManager(include_path=str(work))
    found, seconds = {}, {}
    with running(HFCausalLM.load(folder, dtype="float32"), max_batch=8) as url:
        started = time.perf_counter()
        found["fedpt_serve"] = lm_eval.simple_evaluate(
            model="local-completions", model_args=f"model=fedpt,base_url={url}/completions,tokenizer={folder},"
            "tokenized_requests=True,num_concurrent=1", tasks=["fedpt_check"], task_manager=tasks, log_samples=True)
        seconds["fedpt_serve"] = time.perf_counter() - started
    started = time.perf_counter()
    found["hf"] = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32,device=cpu",
                                          tasks=["fedpt_check"], task_manager=tasks, log_samples=True, batch_size=1)
    seconds["hf"] = time.perf_counter() - started
    ours, theirs = loglikelihoods(found["fedpt_serve"]), loglikelihoods(found["hf"])
    gap = max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y))
    acc = {k: v["results"]["fedpt_check"]["acc,none"] for k, v in found.items()}
    result = {"benchmark": "lm_eval_check", "model": args.model, "dtype": "float32", "items": len(QUESTIONS),
              "choices": sum(len(c) for _, c, _ in QUESTIONS), "accuracy": acc, "seconds": seconds,
              "max_abs_loglikelihood_difference": gap,
              "targets": {"accuracy_equal": acc["fedpt_serve"] == acc["hf"], "loglikelihoods_within_1e-3": gap <= 1e-3},
              "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "0.4"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
