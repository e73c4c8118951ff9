"""What a device pays per round: FedPT's small-model LoRA against direct federated LoRA of the large model.

Both federations run in Flower's simulation engine with the same recipe (data, clients, rounds, steps,
batch, LoRA rank and targets), one after the other in one invocation; only the federated model differs.
Per round and client: bytes down and up, client peak memory, seconds per local step.

    python benchmarks/federation.py [--rounds 2] [--clients 2] [--steps 4] [--out runs/benchmarks/federation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from fedpt import config as cfg
from fedpt.federation.run_folder import read_metrics
from fedpt.federation.simulation import simulate

MEASURES = ("bytes_down", "bytes_up", "peak_memory_bytes", "seconds_per_step")


def federate(model: str, args: argparse.Namespace, out: Path) -> dict:
    run = cfg.load(args.config, [
        f"federation.rounds={args.rounds}", f"federation.clients={args.clients}",
        f"tuning.local_steps={args.steps}", f"federation.eval_examples={args.eval_examples}",
        f'data.categories="{",".join(args.categories[: args.clients])}"',
    ], out=str(out))
    run = cfg.replace(run, model={"small": model})
    simulate(run)
    rows = read_metrics(out)
    per_round = [{"round": r["round"], "clients": [{k: c[k] for k in ("partition-id", *MEASURES, "train_loss")}
                                                   for c in r["clients"]]} for r in rows if r["round"] > 0]
    clients = [c for r in per_round for c in r["clients"]]
    return {
        "model": model,
        "per_round": per_round,
        "mean": {k: statistics.mean(c[k] for c in clients) for k in MEASURES},
        "max": {k: max(c[k] for c in clients) for k in MEASURES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="base run config (default: the embedded chatterbot one)")
    parser.add_argument("--small", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--eval-examples", type=int, default=8)
    parser.add_argument("--categories", nargs="+", default=["ai", "emotion", "psychology", "humor"])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/federation.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        fedpt = federate(args.small, args, Path(work) / "small")
        direct = federate(args.large, args, Path(work) / "large")
    recipe = cfg.load(args.config).tuning
    result = {
        "benchmark": "federation",
        "recipe": {"rounds": args.rounds, "clients": args.clients, "local_steps": args.steps,
                   "batch_size": recipe.batch_size, "max_length": recipe.max_length, "lora_r": recipe.lora_r,
                   "target_modules": recipe.target_modules, "dtype": recipe.dtype},
        "machine": {"cpus": os.cpu_count()},
        "fedpt_small_lora": fedpt,
        "direct_large_lora": direct,
        # how many times more the direct baseline costs a device than FedPT's small model
        "ratio_direct_over_fedpt": {k: direct["mean"][k] / fedpt["mean"][k] for k in MEASURES},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("recipe", "ratio_direct_over_fedpt")}, indent=2))
    print(json.dumps({"fedpt_small_lora": fedpt["mean"], "direct_large_lora": direct["mean"]}, indent=2))


if __name__ == "__main__":
    main()
