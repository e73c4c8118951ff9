"""Seconds per generated token on the real pair: large alone, the naive proxy loop, and fedpt's proxy decoding
(exact, and with the small pair's frozen weights in int8), and the same doubled batch run by peft's own
mixed-adapter batches (`adapter_names`) instead of fedpt's row-mask hooks.

Same prompts, greedy, one process; the three variants take turns within every round, so drifts in machine
speed hit all of them alike, and the ratios to the large model alone come from the same run.

    python benchmarks/decode.py [--tokens 48] [--rounds 3] [--out runs/benchmarks/decode.json]
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

from fedpt.data import encode_prompt
from fedpt.models import HFCausalLM, LanguageModel, load_model, pad_left
from fedpt.models.int8 import quantize_int8
from fedpt.proxy import AdapterPair, ExpertPair, ProxyTunedLM
from fedpt.runtime import setup_process

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "What is your favourite book, and why?",
    "Explain what a hash table is in two sentences.",
]


class NaiveProxy:
    """Three separate models, each with its own cache, one after the other: the loop fedpt improves on."""

    def __init__(self, large: HFCausalLM, base: HFCausalLM, tuned: HFCausalLM):
        self.models = (large, base, tuned)

    def start(self, ids: torch.Tensor, mask: torch.Tensor):
        outs = [m.start(ids, mask) for m in self.models]
        return self._combine([lp for lp, _ in outs]), [s for _, s in outs]

    def step(self, states, tokens: torch.Tensor) -> torch.Tensor:
        return self._combine([m.step(s, tokens) for m, s in zip(self.models, states)])

    @staticmethod
    def _combine(lps):
        large, base, tuned = lps
        return torch.log_softmax(large + (tuned - base), dim=-1)


class _WithAdapterNames:
    """A peft model called with `adapter_names` per row: "__base__" rows skip LoRA, "default" rows use it."""

    def __init__(self, peft_model: torch.nn.Module):
        self.peft_model, self.names = peft_model, None

    def __call__(self, **kwargs):
        return self.peft_model(**kwargs, adapter_names=self.names)

    def eval(self) -> _WithAdapterNames:
        self.peft_model.eval()
        return self

    def __getattr__(self, name: str):
        return getattr(self.peft_model, name)


class PeftMixedPair(ExpertPair):
    """fedpt's AdapterPair, with peft's mixed-adapter batches in place of fedpt's row-mask hooks."""

    def __init__(self, peft_model: torch.nn.Module, tokenizer):
        self.model = _WithAdapterNames(peft_model)
        self._lm = HFCausalLM(self.model, tokenizer, name="small+adapter (peft mixed)")
        self.name, self.tokenizer, self.vocab_size = self._lm.name, tokenizer, self._lm.vocab_size

    @property
    def tuned(self) -> LanguageModel:
        return self._lm

    def _rows(self, batch: int) -> None:
        self.model.names = ["__base__"] * batch + ["default"] * batch

    def start(self, ids, mask):
        self._rows(len(ids))
        lp, state = self._lm.start(ids.repeat(2, 1), mask.repeat(2, 1))
        return (*lp.chunk(2), state)

    def step(self, state, tokens):
        self._rows(len(tokens))
        return self._lm.step(state, tokens.repeat(2)).chunk(2)

    def logprobs(self, ids, mask, last):
        self._rows(len(ids))
        return self._lm.logprobs(ids.repeat(2, 1), mask.repeat(2, 1), last).chunk(2)


def time_decoding(lm: LanguageModel | NaiveProxy, ids: torch.Tensor, mask: torch.Tensor, tokens: int) -> dict:
    """Greedy decoding of exactly `tokens` tokens (no early stop), prefill and steps timed apart."""
    started = time.perf_counter()
    logprobs, state = lm.start(ids, mask)
    prefill = time.perf_counter() - started
    chosen = []
    started = time.perf_counter()
    for _ in range(tokens - 1):
        token = logprobs.argmax(-1)
        chosen.append(int(token[0]))
        logprobs = lm.step(state, token)
    steps = time.perf_counter() - started
    return {"prefill_s": prefill, "step_s": steps / (tokens - 1), "total_s": prefill + steps, "tokens": chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/decode.json"))
    args = parser.parse_args()
    setup_process()

    from peft import LoraConfig, get_peft_model

    large = HFCausalLM.load(args.large)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(load_model(args.small)[0], lora)
    with torch.no_grad():  # a small nonzero adapter, as after training; its values do not change the cost
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    tokenizer = large.tokenizer

    def copy_of_tuned() -> torch.nn.Module:
        copy = get_peft_model(load_model(args.small)[0], lora)
        copy.load_state_dict(peft_model.state_dict())
        return copy

    # the naive loop keeps base and tuned as two separate models in memory
    int8_model = copy_of_tuned()
    quantize_int8(int8_model)
    variants = {
        "large_alone": large,
        "naive_proxy": NaiveProxy(large, HFCausalLM.load(args.small), HFCausalLM(copy_of_tuned(), tokenizer)),
        "fedpt_proxy": ProxyTunedLM(large, AdapterPair(peft_model, tokenizer)),
        "fedpt_proxy_int8": ProxyTunedLM(large, AdapterPair(int8_model, tokenizer)),
        "fedpt_proxy_peft_mixed": ProxyTunedLM(large, PeftMixedPair(copy_of_tuned(), tokenizer)),
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for prompt in PROMPTS:
            ids, mask = pad_left([encode_prompt(tokenizer, prompt)], tokenizer.pad_token_id)
            for name, lm in variants.items():
                runs[name].append(time_decoding(lm, ids, mask, args.tokens))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    summary = {}
    for name, rows in runs.items():
        summary[name] = {
            "s_per_token": statistics.median(r["step_s"] for r in rows),
            "s_per_token_with_prefill": statistics.median(r["total_s"] / args.tokens for r in rows),
            "prefill_s": statistics.median(r["prefill_s"] for r in rows),
        }
    for name in summary:
        for key in ("s_per_token", "s_per_token_with_prefill"):
            summary[name][f"ratio_{key}"] = summary[name][key] / summary["large_alone"][key]
    def agreement(a: str, b: str) -> str:
        """Share of generated tokens that match, position by position, between two variants."""
        same = total = 0
        for x, y in zip(runs[a], runs[b]):
            same += sum(i == j for i, j in zip(x["tokens"], y["tokens"]))
            total += len(x["tokens"])
        return f"{same}/{total}"

    result = {
        "benchmark": "decode",
        "small": args.small,
        "large": args.large,
        "tokens_per_prompt": args.tokens,
        "prompts": len(PROMPTS),
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        # greedy paths may split where bf16 rounding differs; after a split the rest differs too
        "same_greedy_tokens": {
            "fedpt_proxy_vs_naive_proxy": agreement("fedpt_proxy", "naive_proxy"),
            "fedpt_proxy_int8_vs_fedpt_proxy": agreement("fedpt_proxy_int8", "fedpt_proxy"),
            "fedpt_proxy_peft_mixed_vs_fedpt_proxy": agreement("fedpt_proxy_peft_mixed", "fedpt_proxy"),
        },
        "results": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
