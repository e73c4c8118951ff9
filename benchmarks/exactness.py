"""How close the all-llama.cpp proxy comes to the transformers float32 proxy with a trained adapter: greedy answers
to held-out chatterbot prompts (tokens equal up to the first split, whole answers equal) and held-out NLL.

    fedpt demo --out runs/demo-x          # or any federated adapter of the 0.5B
    python benchmarks/exactness.py --adapter runs/demo-x/final [--prompts 16] [--tokens 32] [--pairs 48]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from fedpt.config import load
from fedpt.data import encode_prompt, load_splits
from fedpt.decoding import Sampling, generate_tokens
from fedpt.proxy import Fusion, ProxyTunedLM
from fedpt.proxy.spec import ModelSpec
from fedpt.runtime import quiet_transformers, setup_process
from fedpt.scoring import nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/exactness.json"))
    args = parser.parse_args()
    setup_process()
    quiet_transformers()

    config = load(None, [])
    test = load_splits(config.data)["test"]
    prompts = list(dict.fromkeys(e.prompt for e in test))[: args.prompts]
    result: dict = {"benchmark": "exactness", "adapter": str(args.adapter), "prompts": len(prompts),
                    "tokens": args.tokens, "pairs": min(args.pairs, len(test)), "fusion": "alpha=1"}
    answers, scores = {}, {}
    for backend, dtype in (("transformers", "float32"), ("llama.cpp", "auto")):
        spec = dataclasses.replace(ModelSpec.from_config(config.model, adapter=args.adapter, fusion=Fusion(alpha=1.0),
                                                         dtype=dtype), backend=backend)
        proxy = ProxyTunedLM(spec.open_large(), spec.open_expert(), fusion=spec.fusion)
        started = time.perf_counter()
        encoded = [encode_prompt(proxy.tokenizer, p) for p in prompts]
        answers[backend] = generate_tokens(proxy, encoded, Sampling(max_tokens=args.tokens))
        scores[backend] = nll(proxy, test[: args.pairs], max_length=config.score_max_length)
        result[f"{backend}_seconds"] = time.perf_counter() - started
        del proxy
    pairs = list(zip(answers["transformers"], answers["llama.cpp"]))
    before_split = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in pairs]
    result.update({
        "tokens_equal_before_first_split": sum(before_split),
        "tokens_transformers": sum(len(a) for a, _ in pairs),
        "answers_equal": sum(a == b for a, b in pairs),
        "heldout_nll": {backend: s["nll"] for backend, s in scores.items()},
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
