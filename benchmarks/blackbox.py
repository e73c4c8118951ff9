"""What a black-box large model costs FedPT: the 1.5B GGUF (llama.cpp) steered with the default chatterbot
experiment's FedPT adapter and chosen fusion, when only its top k log-probabilities per position are known (what
a server reports); then, in process and side by side, the large model with transformers (bf16) and with llama.cpp, alone
and proxy-tuned; then the overlap of a remote request with the small pair's forward.

Train the adapters first, with the experiment's recipe (the same seeds give the experiment's adapters; on a CPU
without native bfloat16, dtype auto trains in float32):

    fedpt train --config configs/experiment-chatterbot.toml --set distill.every=0 --out runs/blackbox/fedpt
    fedpt train --config configs/experiment-chatterbot.toml --set distill.every=0 \\
        --set model.small=qwen2.5-coder-1.5b-instruct --out runs/blackbox/direct
    python benchmarks/blackbox.py [--test-examples 24] [--ks 1 5 20 100 0] [--out runs/benchmarks/blackbox.json]

k = 0 means the full vocabulary. NLL is over the first --test-examples pairs of the experiment's test split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from fedpt import config as cfg
from fedpt.data import encode_prompt, load_splits
from fedpt.experiment.results import gap_closed
from fedpt.models import HFCausalLM, LanguageModel, pad_left, store
from fedpt.models.llama_cpp import LlamaCppLM
from fedpt.models.remote import Endpoint, RemoteLM
from fedpt.proxy import Fusion, ProxyTunedLM, load_expert, load_tuned
from fedpt.runtime import setup_process
from fedpt.scoring import nll

sys.path.insert(0, str(Path(__file__).parent))
from decode import time_decoding  # noqa: E402

SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
PROMPTS = ["Write a Python function that checks whether a string is a palindrome.",
           "What is your favourite book, and why?", "Explain what a hash table is in two sentences."]


def greedy_tokens(lm, prompts: list[str], tokens: int) -> tuple[list[list[int]], float]:
    """Greedy tokens of each prompt (batch 1, exactly `tokens`), and the median seconds per step."""
    out, steps = [], []
    for prompt in prompts:
        ids, mask = pad_left([encode_prompt(lm.tokenizer, prompt)], lm.tokenizer.pad_token_id)
        run = time_decoding(lm, ids, mask, tokens)
        out.append(run["tokens"])
        steps.append(run["step_s"])
    return out, statistics.median(steps)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two greedy runs chose the same token (paths split once a token differs)."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / sum(len(r) for r in a)


class TopKOnly(LanguageModel):
    """What a server that reports the top k log-probabilities tells: the model's own, -inf outside its top k."""

    def __init__(self, lm: LanguageModel, k: int):
        self.lm, self.k = lm, k
        self.name, self.tokenizer, self.vocab_size = f"{lm.name} top-{k}", lm.tokenizer, lm.vocab_size
        self.eos_token_ids = lm.eos_token_ids

    def _cut(self, logprobs: torch.Tensor) -> torch.Tensor:
        kept = logprobs.topk(self.k, dim=-1)
        return torch.full_like(logprobs, -math.inf).scatter(-1, kept.indices, kept.values)

    def start(self, ids, mask):
        logprobs, state = self.lm.start(ids, mask)
        return self._cut(logprobs), state

    def step(self, state, tokens):
        return self._cut(self.lm.step(state, tokens))

    def logprobs(self, ids, mask, last):
        return self._cut(self.lm.logprobs(ids, mask, last))


def top_k_sweep(args: argparse.Namespace, large: LanguageModel, expert, fusion: Fusion, test,
                max_length: int) -> dict:
    """The proxy with the large model's top k only (-inf elsewhere, filled by fill_tail), for each k."""
    rows, full_tokens = {}, None
    for k in sorted(args.ks, key=lambda k: k or 10**9, reverse=True):  # the full vocabulary first: the reference
        proxy = ProxyTunedLM(TopKOnly(large, k) if k else large, expert, fusion=fusion)
        started = time.perf_counter()
        score = nll(proxy, test, max_length=max_length, batch_size=1)
        score_seconds = time.perf_counter() - started
        tokens, step_s = greedy_tokens(proxy, PROMPTS, args.tokens)
        full_tokens = full_tokens or tokens
        rows["full" if not k else str(k)] = {
            "top_k": k or large.vocab_size, "nll": score["nll"], "scored_tokens": score["tokens"],
            "scoring_seconds": score_seconds, "greedy_agreement_with_full": agreement(tokens, full_tokens),
            "s_per_token": step_s}
        print(f"k={rows['full' if not k else str(k)]}", flush=True)
    return rows


def in_process(args: argparse.Namespace, expert, fusion: Fusion) -> dict:
    """Large alone and proxy-tuned, transformers bf16 against llama.cpp, interleaved rounds in one process."""
    tokenizer = expert.tokenizer
    hf = HFCausalLM.load(LARGE)
    cpp = LlamaCppLM(store.gguf_file(LARGE), tokenizer, n_ctx=2048)
    variants = {"hf_large": hf, "llama_cpp_large": cpp, "hf_proxy": ProxyTunedLM(hf, expert, fusion=fusion),
                "llama_cpp_proxy": ProxyTunedLM(cpp, expert, fusion=fusion)}
    steps: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for prompt in PROMPTS:
            ids, mask = pad_left([encode_prompt(tokenizer, prompt)], tokenizer.pad_token_id)
            for name, lm in variants.items():
                steps[name].append(time_decoding(lm, ids, mask, args.tokens)["step_s"])
    base = statistics.median(steps["hf_large"])
    return {name: {"s_per_token": statistics.median(v), "ratio_to_hf_large": statistics.median(v) / base}
            for name, v in steps.items()}


class LatencyServer:
    """A completions server that only waits `latency` seconds and answers a fixed top-k: what is measured is
    the overlap itself, not a second model competing for the same 2 cores."""

    def __init__(self, tokenizer, latency: float, k: int = 20):
        answer = json.dumps({"choices": [{"index": 0, "text": "a", "logprobs": {  # no echoed tokens to check
            "top_logprobs": [{tokenizer.decode([i]): -1.0 - i / 100 for i in range(100, 100 + k)}]}}]})

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply(b'{"data": [{"id": "latency"}]}')

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(latency)
                self._reply(answer.encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def overlap(args: argparse.Namespace, expert) -> dict:
    server = LatencyServer(expert.tokenizer, args.latency)
    black_box = RemoteLM(Endpoint(server.url, top_k=20), expert.tokenizer)
    proxy = ProxyTunedLM(black_box, expert)
    ids, mask = pad_left([encode_prompt(expert.tokenizer, PROMPTS[0])], expert.tokenizer.pad_token_id)

    def median_step(call, state_of) -> float:
        times = []
        for _ in range(args.overlap_rounds):
            state = state_of()
            for t in range(args.tokens):
                started = time.perf_counter()
                call(state, torch.tensor([100 + t]))
                times.append(time.perf_counter() - started)
        return statistics.median(times)

    large = median_step(black_box.step, lambda: black_box.start(ids, mask)[1])
    pair = median_step(expert.step, lambda: expert.start(ids, mask)[2])
    on = median_step(proxy.step, lambda: proxy.start(ids, mask)[1])
    pool, proxy._overlap = proxy._overlap, None  # the same proxy, one call after the other
    off = median_step(proxy.step, lambda: proxy.start(ids, mask)[1])
    proxy._overlap = pool
    server.httpd.shutdown()
    return {"injected_latency_s": args.latency, "large_request_s": large, "small_pair_step_s": pair,
            "proxy_step_overlap_on_s": on, "proxy_step_overlap_off_s": off,
            "on_over_max_of_parts": on / max(large, pair), "off_over_max_of_parts": off / max(large, pair)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/experiment-chatterbot.toml")
    parser.add_argument("--adapter", type=Path, default=Path("runs/blackbox/fedpt/final"))
    parser.add_argument("--direct", type=Path, default=Path("runs/blackbox/direct/final"),
                        help="the direct baseline's adapter (the gap's end point); skipped if missing")
    parser.add_argument("--results", type=Path, default=Path("docs/results/chatterbot-experiment/results.json"),
                        help="the experiment whose chosen fusion is used")
    parser.add_argument("--test-examples", type=int, default=24)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 20, 100, 0])
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--overlap-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--parts", nargs="+", default=["sweep", "in_process", "overlap"],
                        help="sweep needs the trained adapter; in_process and overlap time a random one if missing")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/blackbox.json"))
    args = parser.parse_args()
    setup_process()

    run = cfg.load(args.config)
    test = load_splits(run.data)["test"][: args.test_examples]
    chosen = json.loads(args.results.read_text())["chosen_on_validation"]["overall"]
    fusion = next(f for f in [Fusion(alpha=a, weight=w) for a in run.experiment.alphas
                              for w in (0.0, *run.experiment.fusion_weights)] if f.label == chosen)
    trained = args.adapter.exists()
    if "sweep" in args.parts and not trained:
        raise SystemExit(f"{args.adapter} is missing: train it first (see this file's docstring)")
    expert = load_expert(SMALL, args.adapter) if trained else random_expert(run)
    result: dict = {"benchmark": "blackbox", "small": SMALL, "large": LARGE, "fusion": fusion.label,
                    "adapter": str(args.adapter) if trained else "random (timing only)", "parts": args.parts,
                    "test_examples": len(test), "tokens": args.tokens, "machine": {"cpus": os.cpu_count()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # the quick parts first; the JSON is rewritten after each part, so a stopped run keeps what it measured
    for part, measure in [("in_process", lambda: {"in_process": in_process(args, expert, fusion)}),
                          ("overlap", lambda: {"overlap": overlap(args, expert)}),
                          ("sweep", lambda: sweep_with_gaps(args, run, expert, fusion, test))]:
        if part in args.parts:
            result.update(measure())
            args.out.write_text(json.dumps(result, indent=2))
            print(json.dumps(result, indent=2), flush=True)


def random_expert(run: cfg.RunConfig):
    """The experiment's LoRA recipe with small random B weights, as after some training: timing only."""
    from fedpt.models import load_model
    from fedpt.proxy import AdapterPair
    from fedpt.tuning.local import make_trainable

    model, tokenizer, _ = load_model(SMALL)
    peft_model = make_trainable(model, run.tuning, seed=0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return AdapterPair(peft_model.eval(), tokenizer)


def sweep_with_gaps(args: argparse.Namespace, run: cfg.RunConfig, expert, fusion: Fusion, test) -> dict:
    """The top-k sweep on the 1.5B GGUF through llama.cpp in process (full-vocabulary log-probs, cut to the top k
    as a server would report them), and the gap's ends on the same pairs. llama-cpp-python's server cannot be
    the black box here: when its greedy next token is an end token it reports no log-probabilities at all, and
    scoring asks for exactly that distribution after every answer."""
    large = LlamaCppLM(store.gguf_file(LARGE), expert.tokenizer, n_ctx=2048, threads=args.threads)
    large_base = nll(large, test, max_length=run.score_max_length, batch_size=1)["nll"]
    direct = nll(load_tuned(LARGE, args.direct), test, max_length=run.score_max_length)["nll"] \
        if args.direct.exists() else None
    result: dict = {"large": "llama.cpp in process, Q4_K_M GGUF", "large_base_nll": large_base,
                    "large_direct_nll": direct}
    sweep = top_k_sweep(args, large, expert, fusion, test, run.score_max_length)
    full = sweep["full"]["nll"]
    for row in sweep.values():
        row["share_of_full_vocabulary_improvement"] = (large_base - row["nll"]) / (large_base - full)
        if direct is not None:
            row["gap_closed"] = gap_closed(row["nll"], large_base, direct)
    result["top_k"] = sweep
    return result


if __name__ == "__main__":
    main()
