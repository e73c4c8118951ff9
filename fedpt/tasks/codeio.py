"""CodeI/O (`reasoning-gym==0.1.25`'s `data/codeio.jsonl.gz`, Apache-2.0): write `main_solution` from a task's
description and input/output spec, judged by running it on generated inputs against the reference solution.

Each of the 3,002 rows is a task description, an input/output spec, a reference `main_solution` and an input
generator. As training data a task is an instruction/answer pair (the answer: the reference in a code block);
as a test, the model's `main_solution` and the reference run on the same 5 generated inputs, in one sandboxed
process, and every output must agree (floats to a relative 1e-6). What was cut to fit a 2-core machine: tasks
whose description, spec and code exceed 2,000 characters (1,364 of 2,999 distinct tasks are kept, about 600
tokens each); tests also leave out tasks whose reference draws random numbers (its outputs are not a function of
its inputs). Topic (what a Dirichlet partition skews over) is what the reference imports first.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
from dataclasses import dataclass

INSTRUCTION = ("Write a Python function `main_solution` for the task below, taking the inputs as keyword arguments "
               "and returning the output as specified. Answer with the code in one Python code block.")
MAX_CHARS = 2000
CHECKS = 5  # generated inputs per test
INSTALL = "pip install 'fedpt[tasks]'"
TOPICS = {"numeric": {"numpy", "math", "cmath", "decimal", "fractions", "sympy", "scipy", "statistics"},
          "random": {"random"}, "algorithms": {"collections", "itertools", "functools", "heapq", "bisect", "copy",
                                               "operator"},
          "text": {"re", "string", "json", "csv", "datetime"}}


@dataclass(frozen=True)
class Problem:
    id: str  # "codeio/<sha8 of the description>"
    description: str
    spec: str
    code: str  # the reference main_solution
    generator: str  # def generate_inputs(rng) -> dict
    topic: str


def topic_of(code: str) -> str:
    imported = [m for m in re.findall(r"^\s*(?:import|from)\s+(\w+)", code, re.M) if m not in ("typing", "__future__")]
    first = imported[0] if imported else ""
    return next((name for name, modules in TOPICS.items() if first in modules), "other" if first else "plain")


def tasks() -> list[Problem]:
    """The distinct tasks short enough for this machine, in the file's order."""
    return list(_tasks())


@functools.lru_cache(maxsize=1)
def _tasks() -> tuple[Problem, ...]:  # read once a process: every split and the data source use it
    from fedpt.data import package_data

    path = package_data("reasoning_gym", "data/codeio.jsonl.gz", "the CodeI/O task", INSTALL)
    found: dict[str, Problem] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            text = row["task_description"].strip()
            size = len(text) + len(row["input_output_spec"]) + len(row["code_sample"])
            if text in found or size > MAX_CHARS or "def main_solution" not in row["code_sample"]:
                continue
            found[text] = Problem(f"codeio/{hashlib.sha256(text.encode()).hexdigest()[:8]}", text,
                                  row["input_output_spec"].strip(), row["code_sample"].strip(),
                                  row["input_generator"].strip(), topic_of(row["code_sample"]))
    return tuple(found.values())


def split(name: str, test_percent: int = 10, validation_percent: int = 10) -> list[Problem]:
    """One split's tasks, fixed by a hash of the description, as every fedpt split."""
    from fedpt.data import hashed_split

    chosen = [p for p in tasks() if hashed_split(p.description, test_percent, validation_percent) == name]
    if name != "train":  # a reference that draws random numbers cannot be compared with
        chosen = [p for p in chosen if not re.search(r"\brandom\b", p.code)]
    return chosen


def problems(limit: int | None = None, test_percent: int = 10, validation_percent: int = 10,
             name: str = "test") -> list[Problem]:
    """The held-out tasks of the test split, or of the validation split (where a recipe is chosen)."""
    return split(name, test_percent, validation_percent)[:limit]


def prompt(problem: Problem, chat: bool = True) -> str:
    return f"{INSTRUCTION}\n\n{problem.description}\n\n{problem.spec}"


def answer(problem: Problem) -> str:
    """The reference answer a client trains on."""
    return f"```python\n{problem.code}\n```"


# Runs in the sandbox: reference outputs first (before the candidate's code exists), then the candidate's.
CHECK = '''
import copy, json, math, random
from random import Random
def _run(source, name):
    space = {"__name__": name}
    exec(compile(source, name, "exec"), space)
    return space
def _same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6,
                                                                                              abs_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b
def _plain(value):  # what a JSON answer holds: numpy scalars and arrays, tuples and sets become plain values
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else sorted(v)
                                 if isinstance(v, (set, frozenset)) else str(v)))
_imports = "from random import Random\\nimport random, math, string\\n"
_imports += "import numpy as np\\n" if "np." in GENERATOR else ""
_generate = _run(_imports + GENERATOR, "<generator>")["generate_inputs"]
_reference = _run(REFERENCE, "<reference>")["main_solution"]
_rng = Random(0)
_inputs = [_generate(_rng) for _ in range(CHECKS)]
_expected = [_plain(_reference(**copy.deepcopy(x))) for x in _inputs]
_candidate = _run(CANDIDATE, "<candidate>")["main_solution"]
for _i, (_x, _want) in enumerate(zip(_inputs, _expected)):
    _got = _plain(_candidate(**copy.deepcopy(_x)))
    assert _same(_got, _want), f"input {_i}: got {str(_got)[:80]}, expected {str(_want)[:80]}"
'''


def program(problem: Problem, candidate: str) -> str:
    """One program that checks the candidate against the reference on CHECKS generated inputs."""
    values = {"GENERATOR": problem.generator, "REFERENCE": problem.code, "CANDIDATE": candidate, "CHECKS": CHECKS}
    return "".join(f"{name} = {value!r}\n" for name, value in values.items()) + CHECK


def judge(problem: Problem, answer_text: str, chat: bool, timeout: float) -> tuple[str, bool, str]:
    """(the code run, passed, reason): the answer's first Python code block (or the whole answer) in the sandbox."""
    from fedpt.tasks import sandbox
    from fedpt.tasks.humaneval import CODE_BLOCK

    found = CODE_BLOCK.search(answer_text)
    code = found.group(1) if found else answer_text
    if "def main_solution" not in code:
        return code, False, "failed: no main_solution in the answer"
    outcome = sandbox.run(program(problem, code), timeout=timeout)
    return code, outcome.passed, outcome.result

