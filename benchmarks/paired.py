"""Is one evaluation better than another beyond chance? The paired difference of two `fedpt evaluate` runs on the
problems both judged, with a bootstrap 95% interval: how a recipe (rounds, learning rate) is chosen on the
validation split, never on test.

    fedpt evaluate --task gsm --split validation --limit 100 --large qwen2.5-coder-1.5b-instruct \
        --adapter runs/math-experiment/direct/final --backend llama.cpp --max-new-tokens 320 --out runs/val/direct
    fedpt evaluate --task gsm --split validation --limit 100 --large qwen2.5-coder-1.5b-instruct \
        --backend llama.cpp --max-new-tokens 320 --out runs/val/base
    python benchmarks/paired.py runs/val/direct runs/val/base [--out runs/val/direct-vs-base.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpt.errors import FedptError
from fedpt.tasks.evaluate import paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path, help="a finished `fedpt evaluate` folder")
    parser.add_argument("second", type=Path, help="another, on the same task and split")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON as well")
    args = parser.parse_args()
    try:
        text = json.dumps(paired(args.first, args.second), indent=2)
    except FedptError as error:
        raise SystemExit(f"paired: error: {error}") from None
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
