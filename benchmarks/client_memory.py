"""A long-lived client's resident memory, round after round: does it creep, and does padding stop it?

One fresh process per variant (CPU kernel caches are per process) trains the small model's LoRA for
`--rounds` rounds on the default experiment's clients in turn, as a simulation worker does, and records the
resident memory before each round, its peak during the round, and the seconds per step. Variants: batch
widths padded to a multiple of 1 (exact widths) and of 16 (fedpt's default).

    python benchmarks/client_memory.py [--rounds 6] [--steps 10] [--out runs/benchmarks/client_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def one_variant(model: str, config: str, rounds: int, steps: int, pad_multiple: int) -> list[dict]:
    from fedpt import config as cfg
    from fedpt.data import load_splits
    from fedpt.federation.partition import partition
    from fedpt.models import load_model
    from fedpt.runtime import setup_process
    from fedpt.tuning.costs import rss_bytes
    from fedpt.tuning.local import make_trainable, set_trainable_state, train, trainable_state

    setup_process()
    run = cfg.load(config, [f"tuning.local_steps={steps}", f"tuning.pad_multiple={pad_multiple}"])
    clients = partition(load_splits(run.data)["train"], run.federation, run.seed)
    lm, tokenizer, _ = load_model(model, dtype=run.tuning.dtype)
    lm = make_trainable(lm, run.tuning, seed=run.seed)
    start = trainable_state(lm)
    rows = []
    for r in range(rounds):
        set_trainable_state(lm, start)
        before = rss_bytes()
        stats = train(lm, tokenizer, clients[r % len(clients)], run.tuning, seed=r)
        rows.append({"round": r + 1, "client": r % len(clients), "rss_before_bytes": before,
                     "peak_memory_bytes": stats["peak_memory_bytes"], "seconds_per_step": stats["seconds_per_step"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--config", default="configs/experiment-chatterbot.toml")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pad-multiples", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--variant", type=int, help=argparse.SUPPRESS)  # a child process runs one variant
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/client_memory.json"))
    args = parser.parse_args()

    if args.variant is not None:
        print(json.dumps(one_variant(args.model, args.config, args.rounds, args.steps, args.variant)))
        return
    variants = {}
    for multiple in args.pad_multiples:
        child = subprocess.run([sys.executable, __file__, "--variant", str(multiple), "--model", args.model,
                                "--config", args.config, "--rounds", str(args.rounds), "--steps", str(args.steps)],
                               capture_output=True, text=True, check=True)
        rows = json.loads(child.stdout.strip().splitlines()[-1])
        first, last = rows[0], rows[-1]
        variants[f"pad_multiple_{multiple}"] = {
            "rounds": rows,
            "peak_first_round_gb": first["peak_memory_bytes"] / 1e9,
            "peak_max_gb": max(r["peak_memory_bytes"] for r in rows) / 1e9,
            "rss_growth_after_round_1_gb": (last["rss_before_bytes"] - rows[1]["rss_before_bytes"]) / 1e9
            if len(rows) > 1 else 0.0,
            "mean_seconds_per_step": sum(r["seconds_per_step"] for r in rows) / len(rows),
        }
        summary = {k: round(v, 3) for k, v in variants[f"pad_multiple_{multiple}"].items() if k != "rounds"}
        print(f"pad to a multiple of {multiple}: {summary}", flush=True)
    result = {"benchmark": "client_memory", "model": args.model, "config": args.config, "rounds": args.rounds,
              "steps": args.steps, "machine": {"cpus": os.cpu_count()}, "variants": variants}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(args.out)


if __name__ == "__main__":
    main()
