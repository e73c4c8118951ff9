"""GSM-style math (`reasoning-gym==0.1.25`, Apache-2.0): grade-school word problems from templates, judged by
exact match on the final number.

reasoning-gym's `gsm_symbolic` turns 100 GSM8K problems into templates (`generate_0..99`), 85 of them marked
sound by the package (`tasks_ok`); each draws names and numbers from a seed and returns a question, a GSM8K-style
chain of thought ending in `#### N`, and N. The splits are by template, so that generalization can be told from
memorization:
  - 15 of the 85 templates (fixed by a hash) are *unseen*: no client, no validation, only the test split;
  - the other 70 are *seen*: each template's instances go to train, validation or test by a hash of the question,
    and a natural partition deals whole templates to clients, so that no two clients share a template.
The test split is both: instances of seen templates that nobody trained on, and the unseen templates.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from random import Random

from fedpt.errors import FedptError

INSTRUCTION = "Reason step by step, then give the final number on the last line as: #### <number>"
UNSEEN_TEMPLATES = 15
INSTANCES = 40  # seeds drawn per template (distinct questions are kept: about 35 per template)
INSTALL = "pip install 'fedpt[tasks]'"
# the number after "####" or inside \boxed{}, past a currency sign: "#### $1,234" -> "1,234"
FINAL = re.compile(r"####[^\S\n]*[^\d\s.-]{0,3}[^\S\n]*(-?[\d,]*\.?\d+)|\\boxed\{\s*[^\d\s.-]{0,3}\s*(-?[\d,]*\.?\d+)")


@dataclass(frozen=True)
class Problem:
    id: str  # "gsm/<template>/<seed>"
    question: str
    solution: str  # chain of thought ending in "#### N"
    answer: str  # N
    template: int
    seen: bool  # a template clients train on


def templates() -> tuple[list[int], list[int]]:
    """(seen, unseen): the package's sound templates, 15 of them held out by a fixed hash."""
    try:
        from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok
    except ImportError:
        raise FedptError(f"the math task needs the package reasoning-gym: {INSTALL}") from None
    ranked = sorted(tasks_ok, key=lambda t: hashlib.sha256(f"gsm-template-{t}".encode()).hexdigest())
    return sorted(ranked[UNSEEN_TEMPLATES:]), sorted(ranked[:UNSEEN_TEMPLATES])


def instances(template: int, seen: bool) -> list[Problem]:
    """The distinct questions of one template, drawn from seeds 0..INSTANCES-1."""
    from reasoning_gym.arithmetic.gsm_symbolic import generators_00_49, generators_50_99

    module = generators_00_49 if template < 50 else generators_50_99
    generate = getattr(module, f"generate_{template}")
    found: dict[str, Problem] = {}
    for seed in range(INSTANCES):
        row = generate(Random(seed))
        if row["question"] not in found:
            found[row["question"]] = Problem(f"gsm/{template}/{seed}", row["question"], row["metadata"]["answer_cot"],
                                             str(row["answer"]), template, seen)
    return list(found.values())


def split_of(problem: Problem, test_percent: int, validation_percent: int) -> str:
    """Unseen templates: test. Seen ones: by a hash of the question."""
    from fedpt.data import hashed_split

    return hashed_split(problem.question, test_percent, validation_percent) if problem.seen else "test"


def split(name: str, test_percent: int = 10, validation_percent: int = 10) -> list[Problem]:
    """One split's problems, in template then seed order."""
    return [p for p in _everything() if split_of(p, test_percent, validation_percent) == name]


@functools.lru_cache(maxsize=1)
def _everything() -> tuple[Problem, ...]:  # generated once a process: every split and the data source use it
    seen, unseen = templates()
    return (*(p for t in seen for p in instances(t, True)), *(p for t in unseen for p in instances(t, False)))


def problems(limit: int | None = None, test_percent: int = 10, validation_percent: int = 10,
             name: str = "test") -> list[Problem]:
    """The test split (seen templates' held-out instances, then the unseen templates), or the validation split
    (seen templates only: a recipe is chosen there); with `limit`, a fixed random sample of it (in the same
    order), so that a short run still measures both kinds."""
    chosen = split(name, test_percent, validation_percent)
    if limit is None or limit >= len(chosen):
        return chosen
    return sorted(Random(0).sample(chosen, limit), key=chosen.index)


def prompt(problem: Problem, chat: bool) -> str:
    """The question and the answer format (chat); a GSM8K-style 'Question/Answer' continuation (raw)."""
    return f"{problem.question}\n{INSTRUCTION}" if chat else f"Question: {problem.question}\nAnswer:"


def final_number(text: str) -> str | None:
    """The last `#### N` or `\\boxed{N}` of an answer, without thousands separators; None if there is none."""
    found = [a or b for a, b in FINAL.findall(text)]
    return found[-1].replace(",", "") if found else None


def same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def judge(problem: Problem, answer: str, chat: bool, timeout: float) -> tuple[str, bool, str]:
    """(extracted final number, passed, reason): exact match on the final number."""
    if not chat:
        answer = answer.split("\nQuestion:")[0]
    got = final_number(answer)
    if got is None:
        return "", False, "failed: no final number (#### N or \\boxed{N})"
    if same_number(got, problem.answer):
        return got, True, "passed"
    return got, False, f"failed: {got} where {problem.answer} is right"
