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
from fedpt.tasks.evaluate import verdicts
from fedpt.tasks.metrics import gap_interval


def gap(base: Path, direct: Path, system: Path) -> dict:
    b, t, s = verdicts(base), verdicts(direct), verdicts(system)
    ids = sorted(set(b) & set(t) & set(s))
    if not ids:
        raise FedptError(f"{base}, {direct} and {system} share no judged problem")
    share, low, high = gap_interval([s[i] for i in ids], [b[i] for i in ids], [t[i] for i in ids])
    mean = {name: sum(v[i] for i in ids) / len(ids) for name, v in (("base", b), ("direct", t), ("system", s))}
    return {"system": str(system), "problems": len(ids), "pass@1": mean, "gap_closed": share,
            "interval_95": [low, high]}


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
