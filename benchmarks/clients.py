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

import json
import statistics
from pathlib import Path

from privacy import read_rows, recipe, recipe_parser, score, train  # noqa: I001 (benchmarks/ is the script's folder)

from fedpt import config as cfg

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
    parser = recipe_parser(__doc__, "runs/clients")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    base, results, save = recipe(args, "clients")

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
