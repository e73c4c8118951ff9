"""`fedpt serve` under load, on the real pair, proxy-tuned, greedy: output tokens per second (all clients
together) and time to first token, at 1, 4 and 8 concurrent streaming clients.

The server runs in this process (fedpt.serving.running, the same engine and API as `fedpt serve`); each client is
a thread with the `openai` client sending its requests one after another; every request decodes exactly --tokens
tokens (`ignore_eos`, as serving benchmarks do), so every level does the same work per request. The concurrency
levels run in turn, --rounds times, so a drift in machine speed hits all of them; figures are medians over rounds.

    python benchmarks/serve.py [--adapter runs/blackbox/fedpt/final] [--tokens 32] [--backend llama.cpp]
                               [--out runs/benchmarks/serve.json]

Without a trained adapter the experiment's LoRA recipe with random weights is timed (the cost of decoding does
not depend on the adapter's values).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedpt import config as cfg
from fedpt.models import HFCausalLM
from fedpt.models.hf import torch_dtype
from fedpt.proxy import Fusion, ProxyTunedLM, load_expert
from fedpt.proxy.spec import ModelSpec
from fedpt.runtime import setup_process
from fedpt.serving import running

SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "What is your favourite book, and why?",
    "Explain what a hash table is in two sentences.",
    "Tell me about the history of computers.",
    "How do I sort a list of dictionaries by a key in Python?",
    "What is the difference between a list and a tuple?",
    "Give me three tips for writing clean code.",
    "What is recursion? Give an example.",
]


def client(url: str, prompts: list[str], tokens: int) -> list[dict]:
    """One user: streams its prompts one after another; per request: seconds to the first token, tokens, seconds."""
    import openai

    api = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=3600)
    out = []
    for prompt in prompts:
        started, first, count = time.perf_counter(), None, 0
        for chunk in api.chat.completions.create(model="fedpt", messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=tokens, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - started
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
        out.append({"ttft_s": first, "tokens": count, "seconds": time.perf_counter() - started})
    return out


def load(url: str, clients: int, requests_each: int, tokens: int) -> dict:
    """`clients` users at once, each with its own prompts; total output tokens per second over the wall time."""
    plans = [[PROMPTS[(c * requests_each + r) % len(PROMPTS)] for r in range(requests_each)] for c in range(clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(lambda p: client(url, p, tokens), plans) for r in rs]
    wall = time.perf_counter() - started
    total = sum(r["tokens"] for r in results)
    return {"tokens": total, "wall_s": wall, "tokens_per_s": total / wall,
            "ttft_median_s": statistics.median(r["ttft_s"] for r in results if r["ttft_s"] is not None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=Path("runs/blackbox/fedpt/final"))
    parser.add_argument("--alpha", type=float, default=1.0, help="the chatterbot experiment's choice: alpha 1,")
    parser.add_argument("--weight", type=float, default=0.5, help="mixture weight 0.5")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests-each", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--backend", choices=["transformers", "llama.cpp"], default="transformers")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/serve.json"))
    args = parser.parse_args()
    setup_process()

    fusion = Fusion(alpha=args.alpha, weight=args.weight)
    if args.backend == "llama.cpp":  # the whole proxy from GGUF files, the adapter converted to GGUF
        import tempfile

        from backends import random_adapter

        folder = args.adapter if args.adapter.exists() else random_adapter(Path(tempfile.mkdtemp()) / "adapter")
        adapter = str(args.adapter) if args.adapter.exists() else "random (timing only)"
        lm = ModelSpec(large=LARGE, small=SMALL, adapter=folder, fusion=fusion, backend="llama.cpp").open()
    else:
        if args.adapter.exists():
            expert, adapter = load_expert(SMALL, args.adapter, dtype=args.dtype), str(args.adapter)
        else:
            from blackbox import random_expert

            expert, adapter = random_expert(cfg.load("configs/experiment-chatterbot.toml")), "random (timing only)"
        lm = ProxyTunedLM(HFCausalLM.load(LARGE, dtype=args.dtype), expert, fusion=fusion)
    runs: dict[int, list[dict]] = {c: [] for c in args.concurrency}
    with running(lm, max_batch=max(args.concurrency)) as url:
        client(url, PROMPTS[:1], 4)  # warm-up
        for _ in range(args.rounds):
            for c in args.concurrency:
                runs[c].append(load(url, c, args.requests_each, args.tokens))
                print(f"{c} clients: {runs[c][-1]}", flush=True)
    table = {str(c): {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "ttft_median_s": statistics.median(r["ttft_median_s"] for r in rs), "runs": rs}
             for c, rs in runs.items()}
    one = table[str(min(args.concurrency))]["tokens_per_s"]
    for row in table.values():
        row["throughput_ratio_to_one_client"] = row["tokens_per_s"] / one
    top = table[str(max(args.concurrency))]["throughput_ratio_to_one_client"]
    result = {"benchmark": "serve", "small": SMALL, "large": LARGE, "adapter": adapter, "fusion": fusion.label,
              "backend": args.backend,
              "dtype": f"{args.dtype} ({str(torch_dtype(args.dtype)).removeprefix('torch.')})",
              "tokens_per_request": args.tokens, "requests_per_client": args.requests_each,
              "machine": {"cpus": os.cpu_count()}, "concurrency": table,
              "target": {"name": "8 clients >= 4x the tokens per second of 1", "value": top, "met": top >= 4}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "concurrency"}, indent=2))


if __name__ == "__main__":
    main()
