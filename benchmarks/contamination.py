"""Contamination check of the real tasks: which test problems share a run of N words with the text clients train
on (N = 10, as GPT-3's and Llama's contamination studies use 8-13 word n-grams).

  - HumanEval (out of distribution for the code experiment) against every CodeI/O text a client trains on
    (description, input/output spec, reference code);
  - held-out CodeI/O tasks against the CodeI/O training split: any shared run (stock phrases such as "you are
    given an integer n, your task is to find the" count), and near-duplicates (half of the runs shared);
  - math: test instances against the training split, separately for seen and unseen templates (instances of a
    seen template share its wording by construction: that is what "seen" means; unseen templates must not).

    python benchmarks/contamination.py [--words 10]   # -> runs/benchmarks/contamination.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from fedpt.tasks import codeio, gsm, humaneval


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def overlapping(tests: dict[str, str], train_texts: list[str], n: int, share: float = 0.0) -> list[str]:
    """Ids of the test texts that share an n-word run with any training text (share 0), or whose n-word runs are
    at least `share` seen in training (near-duplicates, not a shared stock phrase)."""
    seen: set[tuple[str, ...]] = set()
    for text in train_texts:
        seen |= ngrams(text, n)
    found = []
    for key, text in tests.items():
        grams = ngrams(text, n)
        if grams and len(grams & seen) > share * len(grams):
            found.append(key)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/contamination.json"))
    args = parser.parse_args()
    n = args.words
    code_train = [f"{p.description}\n{p.spec}\n{p.code}" for p in codeio.split("train")]
    he = overlapping({p.id: p.prompt for p in humaneval.problems()}, code_train, n)
    cio_tests = {p.id: f"{p.description}\n{p.spec}" for p in codeio.problems()}
    cio = overlapping(cio_tests, code_train, n)
    cio_near = overlapping(cio_tests, code_train, n, share=0.5)
    math_train = [f"{p.question}\n{p.solution}" for p in gsm.split("train")]
    test = gsm.problems()
    by_kind = {kind: overlapping({p.id: p.question for p in test if p.seen == kind}, math_train, n)
               for kind in (True, False)}
    result = {
        "benchmark": "contamination", "words": n,
        "humaneval_vs_codeio_train": {"problems": 164, "overlapping": len(he), "ids": he},
        "codeio_test_vs_train": {"problems": len(cio_tests), "overlapping": len(cio), "ids": cio},
        "codeio_test_near_duplicates": {"problems": len(cio_tests), "overlapping": len(cio_near), "ids": cio_near,
                                        "rule": "half or more of the test text's 10-word runs occur in training"},
        "gsm_seen_templates_test_vs_train": {"problems": sum(p.seen for p in test), "overlapping": len(by_kind[True])},
        "gsm_unseen_templates_test_vs_train": {"problems": sum(not p.seen for p in test),
                                               "overlapping": len(by_kind[False]), "ids": by_kind[False][:20]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v["overlapping"] if isinstance(v, dict) else v for k, v in result.items()}))
    print(args.out)


if __name__ == "__main__":
    main()
