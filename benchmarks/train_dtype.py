"""Seconds per LoRA training step of the small model in each weight dtype, with the chatterbot experiment's recipe
(batch 4, up to 96 tokens, LoRA r=8 on q/v): where the CPU lacks native bfloat16, emulated bfloat16 is far slower
than float32, which is why `dtype = "auto"` picks float32 there.

    python benchmarks/train_dtype.py [--steps 3] [--dtypes float32 bfloat16] [--out runs/benchmarks/train_dtype.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from fedpt import config as cfg
from fedpt.data import load_splits
from fedpt.models import load_model
from fedpt.models.hf import native_bf16
from fedpt.runtime import setup_process
from fedpt.tuning.local import make_trainable, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/experiment-chatterbot.toml")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/train_dtype.json"))
    args = parser.parse_args()
    setup_process()
    run = cfg.load(args.config)
    examples = load_splits(run.data)["train"][:64]
    result = {"benchmark": "train_dtype", "small": run.model.small, "steps": args.steps,
              "machine": {"cpus": os.cpu_count(), "native_bf16": native_bf16()}, "seconds_per_step": {}}
    for dtype in args.dtypes:
        model, tokenizer, _ = load_model(run.model.small, dtype=dtype)
        model = make_trainable(model, run.tuning, seed=0)
        started = time.perf_counter()
        train(model, tokenizer, examples, cfg.replace(run, tuning={"local_steps": args.steps, "dtype": dtype}).tuning,
              seed=0)
        result["seconds_per_step"][dtype] = (time.perf_counter() - started) / args.steps
        print(dtype, result["seconds_per_step"][dtype], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
