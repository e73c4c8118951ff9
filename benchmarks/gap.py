"""What share of the gap between the large base and the large model tuned directly does a system close in a task
metric? (s - b) / (t - b) of the per-problem verdicts in `fedpt evaluate` folders, with a paired bootstrap 95%
interval (`fedpt.tasks.metrics.gap_interval`, as the experiment's report computes it), on the problems all three
judged: an evaluation still under way is compared on what it has judged so far, and says how many.

    python benchmarks/gap.py runs/math-task/tasks/gsm/large_base runs/math-task/tasks/gsm/large_direct \
        runs/math-task/tasks/gsm/fedpt_proxy [more systems...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpt.errors import FedptError
from fedpt.experiment.results import task_gaps
from fedpt.tasks.evaluate import verdicts


def gap(base: Path, direct: Path, system: Path) -> dict:
    """The experiment's own `task_gaps` on three judged folders, with each one's pass@1 on the problems they share."""
    judged = {"large_base": verdicts(base), "large_direct": verdicts(direct), "system": verdicts(system)}
    share = task_gaps({name: {"tasks": {"task": {"passed": v}}} for name, v in judged.items()}, "task").get("system")
    if share is None:
        raise FedptError(f"{base}, {direct} and {system} share no judged problem")
    ids = set.intersection(*(set(v) for v in judged.values()))
    mean = {name: sum(v[i] for i in ids) / len(ids) for name, v in judged.items()}
    return {"system": str(system), "problems": share["problems"], "pass@1": mean, "gap_closed": share["value"],
            "interval_95": share["interval_95"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="the large base's `fedpt evaluate` folder")
    parser.add_argument("direct", type=Path, help="the directly tuned large model's, on the same task and split")
    parser.add_argument("systems", type=Path, nargs="+", help="the systems to place in that gap")
    args = parser.parse_args()
    try:
        rows = [gap(args.base, args.direct, system) for system in args.systems]
    except FedptError as error:
        raise SystemExit(f"gap: error: {error}") from None
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
