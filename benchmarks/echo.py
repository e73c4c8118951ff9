"""Scoring through `fedpt serve` as evaluation harnesses do it: lm-eval's log-likelihood request (`/v1/completions`
with `echo: true, max_tokens: 1, logprobs: 1`, one request per choice), on the real pair proxy-tuned, against one
in-process prefill of the same prompts (`LanguageModel.logprobs` over every position, one prompt at a time).

Targets (issue 22): a scoring request within 1.5x of the in-process prefill, and 8 concurrent clients at least 4x
the requests per second of one. Variants alternate --rounds times; figures are medians over rounds.

    python benchmarks/echo.py [--backend transformers|llama.cpp] [--out runs/benchmarks/echo.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedpt.models import pad_left
from fedpt.proxy import Fusion
from fedpt.proxy.spec import ModelSpec
from fedpt.runtime import setup_process
from fedpt.serving import running

SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
QUESTIONS = [
    ("Which data structure gives O(1) average lookup by key?", ["a hash table", "a linked list"]),
    ("What does the Python keyword 'yield' make a function?", ["a generator", "a class"]),
    ("Which sorting algorithm is stable: merge sort or heap sort?", ["merge sort", "heap sort"]),
    ("What is the result of 2 ** 10 in Python?", ["1024", "20"]),
    ("Which HTTP status code means 'not found'?", ["404", "500"]),
    ("What does SQL's JOIN combine?", ["rows of two tables", "two databases"]),
    ("Which Python type is immutable: list or tuple?", ["tuple", "list"]),
    ("What does 'git commit' record?", ["a snapshot of the staged changes", "a remote branch"]),
]
PROMPTS = [f"Question: {q}\nAnswer: {choice}" for q, choices in QUESTIONS for choice in choices]


def score(url: str, prompts: list[str]) -> int:
    import openai

    api = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=3600)
    for prompt in prompts:
        reply = api.completions.create(model="fedpt", prompt=prompt, max_tokens=1, echo=True, logprobs=1,
                                       temperature=0)
        assert reply.choices[0].logprobs.token_logprobs[0] is None
    return len(prompts)


def served(url: str, clients: int) -> float:
    """Requests per second with `clients` users at once, the prompts dealt among them."""
    plans = [PROMPTS[c::clients] for c in range(clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = sum(pool.map(lambda p: score(url, p), plans))
    return done / (time.perf_counter() - started)


def prefill(lm, prompts: list[str]) -> float:
    """Seconds per prompt of one in-process pass over every position, one prompt at a time."""
    started = time.perf_counter()
    for prompt in prompts:
        ids, mask = pad_left([lm.tokenizer(prompt)["input_ids"]], 0)
        lm.logprobs(ids, mask, last=ids.shape[1])
    return (time.perf_counter() - started) / len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["transformers", "llama.cpp"], default="transformers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/echo.json"))
    args = parser.parse_args()
    setup_process()
    from backends import random_adapter

    adapter = random_adapter(Path(tempfile.mkdtemp()) / "adapter")  # timing only: values do not change the cost
    lm = ModelSpec(large=LARGE, small=SMALL, adapter=adapter, fusion=Fusion(alpha=1.0), backend=args.backend,
                   dtype="float32").open()
    rows: dict[str, list[float]] = {"prefill_s": [], "one_client_rps": [], "eight_clients_rps": []}
    with running(lm, max_batch=8) as url:
        score(url, PROMPTS[:1])  # warm-up
        prefill(lm, PROMPTS[:1])
        for _ in range(args.rounds):
            rows["prefill_s"].append(prefill(lm, PROMPTS))
            rows["one_client_rps"].append(served(url, 1))
            rows["eight_clients_rps"].append(served(url, 8))
            print({k: round(v[-1], 4) for k, v in rows.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    over_prefill = (1 / med["one_client_rps"]) / med["prefill_s"]
    scaling = med["eight_clients_rps"] / med["one_client_rps"]
    result = {"benchmark": "echo", "small": SMALL, "large": LARGE, "backend": args.backend, "dtype": "float32",
              "requests": len(PROMPTS), "mean_prompt_tokens": statistics.mean(len(lm.tokenizer(p)["input_ids"])
                                                                           for p in PROMPTS),
              "machine": {"cpus": os.cpu_count()}, "median": med, "runs": rows,
              "targets": {"request_over_prefill_at_most_1.5": {"value": over_prefill, "met": over_prefill <= 1.5},
                          "eight_over_one_client_at_least_4": {"value": scaling, "met": scaling >= 4}}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
