"""CodeI/O: tasks as training pairs, held-out tasks judged by running the model's main_solution against the
reference on generated inputs."""

import pytest

pytest.importorskip("reasoning_gym", reason="CodeI/O comes with reasoning-gym: pip install 'fedpt[tasks]'")

from fedpt.config import DataConfig  # noqa: E402
from fedpt.data import load_splits  # noqa: E402
from fedpt.tasks import codeio  # noqa: E402


def test_splits_are_disjoint_tasks_and_the_data_source_matches_them():
    parts = {name: codeio.split(name) for name in ("train", "validation", "test")}
    ids = [{p.id for p in part} for part in parts.values()]
    assert sum(map(len, ids)) == len(set.union(*ids)) and len(parts["test"]) > 100
    assert all(len(p.description) + len(p.spec) + len(p.code) <= codeio.MAX_CHARS for p in parts["train"])
    splits = load_splits(DataConfig(source="codeio"))
    assert len({e.group for e in splits["train"]}) >= 4  # topics to partition over
    assert [e.prompt for e in splits["test"]] == [codeio.prompt(p) for p in codeio.problems()]
    assert splits["train"][0].response.startswith("```python\n")


def test_the_reference_solution_passes_and_broken_ones_fail():
    problem = codeio.problems(1)[0]
    assert codeio.judge(problem, codeio.answer(problem), True, 10.0)[1:] == (True, "passed")
    off = codeio.answer(problem).replace("def main_solution(", "def _reference(") + (
        "\n```\n```python\ndef main_solution(**kw):\n    return None\n```")
    assert not codeio.judge(problem, off, True, 10.0)[1]  # the first code block is judged
    wrong = codeio.judge(problem, "```python\ndef main_solution(**kw):\n    return 'nonsense'\n```", True, 10.0)
    assert not wrong[1] and "input 0" in wrong[2]
    assert codeio.judge(problem, "no code at all", True, 10.0)[2] == "failed: no main_solution in the answer"
    crash = codeio.judge(problem, "```python\nimport os\ndef main_solution(**kw):\n    os._exit(0)\n```", True, 10.0)
    assert not crash[1]


def test_topics_come_from_what_the_reference_imports():
    assert codeio.topic_of("import numpy as np\ndef main_solution(x): ...") == "numeric"
    assert codeio.topic_of("from collections import deque\n") == "algorithms"
    assert codeio.topic_of("def main_solution(x):\n    return x\n") == "plain"
