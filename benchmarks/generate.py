"""Offline generation of prompts whose answers differ in length: static batches (fedpt's decoder before the
engine: a batch decodes until its longest answer is done, finished rows computing on) against the engine's
continuous batching (a finished row leaves and the next prompt takes its place), same prompts, greedy, one run.

The variants take turns within every round, so drifts in machine speed hit both alike.

    python benchmarks/generate.py [--model qwen2.5-coder-0.5b-instruct] [--max-tokens 96] [--batch 4]
                                  [--rounds 2] [--out runs/benchmarks/generate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fedpt.data import encode_prompt, pad_id
from fedpt.decoding import Sampling, generate_tokens
from fedpt.models import HFCausalLM, LanguageModel, pad_left
from fedpt.runtime import setup_process

# short and long answers mixed, as in a benchmark's or a user's prompt file
PROMPTS = [
    "Answer with one word: what colour is a clear sky?",
    "Write a Python function that merges two sorted lists into one sorted list, with a docstring.",
    "Is 17 a prime number? Answer yes or no.",
    "Explain what a hash table is and how collisions are handled.",
    "What is 12 + 30? Answer with the number only.",
    "Write a Python class for a stack with push, pop and peek, and explain each method.",
    "Name the capital of France in one word.",
    "Describe the difference between a list and a tuple in Python, with examples.",
    "Reply with OK.",
    "Write a function that returns the n-th Fibonacci number iteratively, and test it.",
    "Which is larger, 3 or 8? Answer with the number.",
    "Explain recursion to a beginner, with a short code example.",
    "Say hello.",
    "Write a Python function that counts the words in a text file and prints the ten most common.",
    "True or false: Python lists are mutable.",
    "Explain what a REST API is and give an example request.",
]


def static_batches(lm: LanguageModel, prompts: list[list[int]], max_tokens: int, batch: int) -> list[list[int]]:
    """fedpt's decoder before the engine (greedy): each batch of `batch` prompts, left-padded, decodes until every
    row is done; finished rows keep computing."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        logprobs, state = lm.start(*pad_left(chunk, pad_id(lm.tokenizer)))
        new: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for step in range(max_tokens):
            tokens = logprobs.argmax(-1)
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                if token in lm.eos_token_ids:
                    done[row] = True
                    continue
                new[row].append(token)
            if all(done) or step == max_tokens - 1:
                break
            logprobs = lm.step(state, tokens)
        out += new
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtype", default="float32", help="float32: the two paths must give the same tokens")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/generate.json"))
    args = parser.parse_args()
    setup_process()

    lm = HFCausalLM.load(args.model, dtype=args.dtype)
    prompts = [encode_prompt(lm.tokenizer, p) for p in PROMPTS]
    variants = {
        "static_batches": lambda: static_batches(lm, prompts, args.max_tokens, args.batch),
        "engine": lambda: generate_tokens(lm, prompts, Sampling(max_tokens=args.max_tokens), max_batch=args.batch),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, list[list[int]]] = {}
    for round_ in range(args.rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            tokens[name] = run()
            seconds[name].append(time.perf_counter() - started)
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n} {s[-1]:.1f} s" for n, s in seconds.items()),
              flush=True)

    lengths = [len(t) for t in tokens["engine"]]
    generated = sum(lengths)
    summary = {name: {"seconds": statistics.median(s), "tokens_per_s": generated / statistics.median(s)}
               for name, s in seconds.items()}
    result = {
        "benchmark": "generate",
        "model": args.model,
        "dtype": args.dtype,
        "prompts": len(PROMPTS),
        "max_tokens": args.max_tokens,
        "batch": args.batch,
        "rounds": args.rounds,
        "answer_lengths": lengths,
        "torch_threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "same_tokens": f"{sum(a == b for a, b in zip(tokens['engine'], tokens['static_batches']))}/{len(PROMPTS)}",
        "results": summary,
        "speedup_engine_over_static": summary["static_batches"]["seconds"] / summary["engine"]["seconds"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
