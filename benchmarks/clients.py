"""What a FedPT client sends and holds, on the real pair: the update formats (float32, float16, int8, int4 with
error feedback) and the frozen-weight formats (float: the machine's auto dtype; int8), each as a whole federation
with the gap closed it leaves (test NLL, alpha = 1), against a client tuning the large model directly at float32.

    python benchmarks/clients.py --out runs/clients [--rounds 2] [--local-steps 5] [--test-examples 48]
                                 [--variants float32 float16 int8 int4 int8-weights]
                                 [--json docs/results/benchmarks/clients.json]

A variant's folder is reused when it holds a final model (a rerun continues; the direct baseline of
benchmarks/privacy.py, the same recipe and seed, can be copied in as `direct`). Reported per variant: bytes up
per client and round (as metrics.jsonl has them: the message's bytes), their ratio to the direct client's, each
client's peak resident memory (max over clients and rounds) and seconds per local step, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from privacy import read_rows, score, train  # noqa: I001 (benchmarks/ is the script's folder)

from fedpt import config as cfg
from fedpt.files import write_atomic
from fedpt.runtime import quiet_transformers, setup_process

VARIANTS = {  # name: overrides of the recipe
    "float32": {},
    "float16": {"federation": {"update_format": "float16"}},
    "int8": {"federation": {"update_format": "int8"}},
    "int4": {"federation": {"update_format": "int4"}},
    "int8-weights": {"tuning": {"quantize": "int8"}},
    "int8-weights-int4": {"tuning": {"quantize": "int8"}, "federation": {"update_format": "int4"}},
}


def costs(folder: Path) -> dict:
    clients = [c for row in read_rows(folder)[1:] for c in row["clients"]]
    return {"bytes_up_per_client_round": statistics.mean(c["bytes_up"] for c in clients),
            "bytes_down_per_client_round": statistics.mean(c["bytes_down"] for c in clients),
            "peak_memory_bytes": max(c["peak_memory_bytes"] for c in clients),
            "seconds_per_step": statistics.mean(c["seconds_per_step"] for c in clients),
            "small_heldout_nll": read_rows(folder)[-1]["global"]["nll"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/experiment-chatterbot.toml")
    parser.add_argument("--out", type=Path, default=Path("runs/clients"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4, help="simulated clients, all trained every round")
    parser.add_argument("--test-examples", type=int, default=48)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    setup_process()
    quiet_transformers()
    base = cfg.load(args.config, [f"federation.rounds={args.rounds}", f"tuning.local_steps={args.local_steps}",
                                  f"federation.clients={args.clients}", "federation.fraction=1.0",
                                  "distill.every=0"])
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "clients.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.update({"benchmark": "clients", "config": args.config, "rounds": args.rounds,
                    "local_steps": args.local_steps, "clients_per_round": args.clients,
                    "test_examples": args.test_examples, "variants": results.get("variants", {})})

    def save() -> None:
        write_atomic(results_file, json.dumps(results, indent=2))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(args.json, json.dumps(results, indent=2))

    direct = train(cfg.replace(base, model={"small": base.model.large}), args.out / "direct")
    results["direct"] = costs(direct)
    save()
    variants = {name: cfg.replace(base, **VARIANTS[name]) for name in args.variants}
    for name, config in variants.items():
        folder = train(config, args.out / name)
        entry = results["variants"].setdefault(name, {})
        entry.update(costs(folder))
        for key in ("bytes_up_per_client_round", "peak_memory_bytes", "seconds_per_step"):
            entry[f"{key}_over_direct"] = entry[key] / results["direct"][key]
        save()
    score(base, args, results, variants, save)
    reference = results["variants"].get("float32", {}).get("gap_closed")
    for entry in results["variants"].values():
        if reference is not None:
            entry["gap_closed_minus_float32"] = entry["gap_closed"] - reference
    save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
