"""Seconds per token of the proxy by backend, on the real pair, side by side in one run: the large model alone in
transformers and in llama.cpp, the proxy all in transformers, the proxy with a llama.cpp large and a transformers
pair, and the proxy all in llama.cpp (large, small base and small tuned from GGUF files, the LoRA adapter
converted to GGUF); then tokens per second of the all-llama.cpp proxy at batch 1, 4 and 8 through the engine.

Greedy, exactly --tokens new tokens per prompt (end tokens ignored); the variants take turns within every round.

    python benchmarks/backends.py [--adapter DIR] [--tokens 32] [--rounds 2] [--out runs/benchmarks/backends.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedpt.data import encode_prompt
from fedpt.decoding import Engine, Request, Sampling
from fedpt.models import LanguageModel, load_model
from fedpt.proxy import Fusion, ProxyTunedLM
from fedpt.proxy.spec import ModelSpec
from fedpt.runtime import quiet_transformers, setup_process

SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "What is your favourite book, and why?",
    "Explain what a hash table is in two sentences.",
    "Write a function that merges two sorted lists.",
    "Say hello to a new colleague.",
    "What does the `yield` keyword do in Python?",
    "Give three tips for writing readable code.",
    "How do I reverse a list in Python?",
]


def random_adapter(folder: Path) -> Path:
    """A LoRA adapter (r=8 on q/v, as the chatterbot recipe) with nonzero weights: what it costs, not what it says."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(SMALL, dtype="float32")[0],
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.save_pretrained(folder)
    return folder


def decode(lm: LanguageModel, prompts: list[list[int]], tokens: int, batch: int) -> tuple[float, int]:
    """(seconds, tokens generated) for every prompt through the engine, `batch` rows at a time."""
    engine = Engine(lm, max_batch=batch, max_queue=0)
    requests = [Request(p, Sampling(max_tokens=tokens, ignore_eos=True), lambda r: None) for p in prompts]
    started = time.perf_counter()
    for request in requests:
        engine.submit(request)
    while any(engine.load.values()):
        engine.run_step()
    return time.perf_counter() - started, sum(len(r.generated) for r in requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, help="a trained adapter of the 0.5B (default: a random one)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/backends.json"))
    args = parser.parse_args()
    setup_process()
    quiet_transformers()

    adapter = args.adapter or random_adapter(Path(tempfile.mkdtemp()) / "adapter")
    fusion = Fusion(alpha=1.0)
    hf = ModelSpec(large=LARGE, small=SMALL, adapter=adapter, fusion=fusion)
    cpp = ModelSpec(large=LARGE, small=SMALL, adapter=adapter, fusion=fusion, backend="llama.cpp")
    hf_large, cpp_large = hf.open_large(), cpp.open_large()
    hf_pair, cpp_pair = hf.open_expert(), cpp.open_expert()
    variants = {
        "transformers_large_alone": hf_large,
        "llama_cpp_large_alone": cpp_large,
        "proxy_all_transformers": ProxyTunedLM(hf_large, hf_pair, fusion=fusion),
        "proxy_llama_cpp_large_transformers_pair": ProxyTunedLM(cpp_large, hf_pair, fusion=fusion),
        "proxy_all_llama_cpp": ProxyTunedLM(cpp_large, cpp_pair, fusion=fusion),
    }
    tokenizer = hf_large.tokenizer
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]
    batch1: dict[str, list[float]] = {name: [] for name in variants}
    batched: dict[int, list[float]] = {1: [], 4: [], 8: []}
    for round_ in range(args.rounds):
        for name, lm in variants.items():
            seconds, n = decode(lm, prompts[:2], args.tokens, 1)
            batch1[name].append(seconds / n)
        for width in batched:
            seconds, n = decode(variants["proxy_all_llama_cpp"], prompts, args.tokens, width)
            batched[width].append(n / seconds)
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.3f} s/token" for k, v in batch1.items()),
              flush=True)
    s_per_token = {name: statistics.median(v) for name, v in batch1.items()}
    tokens_per_s = {str(width): statistics.median(v) for width, v in batched.items()}
    result = {
        "benchmark": "backends",
        "small": SMALL, "large": LARGE, "adapter": str(args.adapter) if args.adapter else "random (timing only)",
        "tokens_per_prompt": args.tokens, "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "transformers_dtype": str(hf_large.model.dtype)},
        "s_per_token_batch_1": s_per_token,
        "ratio_to_llama_cpp_large_alone": {k: v / s_per_token["llama_cpp_large_alone"] for k, v in s_per_token.items()},
        "ratio_to_transformers_large_alone": {k: v / s_per_token["transformers_large_alone"]
                                              for k, v in s_per_token.items()},
        "proxy_all_llama_cpp_tokens_per_s": tokens_per_s,
        "batch_8_over_batch_1": tokens_per_s["8"] / tokens_per_s["1"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
