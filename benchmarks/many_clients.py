"""Many clients on one machine: a simulation of 100 clients (Dirichlet partitions of the chatterbot corpus, a
fraction of them per round) on the real small model, with its wall time per round and its peak memory.

    python benchmarks/many_clients.py [--clients 100] [--fraction 0.1] [--rounds 2] [--local-steps 5]
                                      [--out runs/many-clients] [--json docs/results/benchmarks/many_clients.json]

Simulated clients share one loaded base model per Ray worker (fedpt/federation/client_app.py keeps it for the
worker's life, and each client only overwrites the adapter), so memory grows with the workers, not the clients.
Peak memory is sampled every 0.2 s: the resident memory of this process and all its children (the server, Ray
and its workers), and the machine's memory in use (MemTotal - MemAvailable) above what it used before the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import psutil

from fedpt import config as cfg
from fedpt.files import write_atomic
from fedpt.runtime import quiet_transformers, setup_process
from fedpt.tuning.costs import PeakMemory


def tree_rss() -> int:
    """Resident memory of this process and all its children (the server, Ray and its workers)."""
    me, total = psutil.Process(), 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a worker that just exited
            pass
    return total


def used_memory() -> int:
    memory = psutil.virtual_memory()
    return memory.total - memory.available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/experiment-chatterbot.toml")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--update-format", default="float32")
    parser.add_argument("--out", type=Path, default=Path("runs/many-clients"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    setup_process()
    quiet_transformers()
    from fedpt.data import load_splits
    from fedpt.federation.partition import partition
    from fedpt.federation.run_folder import read_metrics
    from fedpt.federation.simulation import simulate

    run = cfg.load(args.config, [f"federation.clients={args.clients}", f"federation.fraction={args.fraction}",
                                 f"federation.rounds={args.rounds}", f"tuning.local_steps={args.local_steps}",
                                 f"federation.eval_examples={args.eval_examples}", "federation.partition='dirichlet'",
                                 f"federation.update_format='{args.update_format}'", "distill.every=0"],
                   out=str(args.out))
    sizes = [len(p) for p in partition(load_splits(run.data)["train"], run.federation, run.seed)]
    if args.out.exists():
        shutil.rmtree(args.out)
    baseline = used_memory()
    started = time.time()
    with PeakMemory(interval=0.2, measure=tree_rss) as tree, PeakMemory(interval=0.2, measure=used_memory) as used:
        simulate(run)
    wall = time.time() - started
    rows = read_metrics(args.out)
    clients = [c for r in rows[1:] for c in r["clients"]]
    result = {
        "benchmark": "many_clients", "config": args.config, "clients": args.clients,
        "clients_per_round": run.federation.clients_per_round(), "rounds": args.rounds,
        "local_steps": args.local_steps, "update_format": args.update_format, "machine": {"cpus": os.cpu_count()},
        "examples_per_client": {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes)},
        "wall_seconds": wall, "seconds_per_round": [r["seconds"] for r in rows[1:]],
        "heldout_nll": [r["global"]["nll"] for r in rows],
        "clients_trained": len(clients), "rejected": sum(len(r["rejected"]) for r in rows),
        "client_peak_memory_bytes": max(c["peak_memory_bytes"] for c in clients),
        "process_tree_peak_rss_bytes": tree.peak, "machine_memory_peak_above_start_bytes": used.peak - baseline,
        "machine_memory_total_bytes": psutil.virtual_memory().total,
    }
    for path in [args.out / "many_clients.json", *([args.json] if args.json else [])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
