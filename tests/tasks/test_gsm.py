"""GSM-style math: template-disjoint splits, the final number found in the answer, exact match."""

import pytest

pytest.importorskip("reasoning_gym", reason="the math task comes with reasoning-gym: pip install 'fedpt[tasks]'")

from fedpt.config import DataConfig  # noqa: E402
from fedpt.data import load_splits  # noqa: E402
from fedpt.tasks import gsm  # noqa: E402


def test_unseen_templates_are_only_in_the_test_split_and_splits_are_disjoint():
    seen, unseen = gsm.templates()
    assert len(seen) == 70 and len(unseen) == 15 and not set(seen) & set(unseen)
    parts = {name: gsm.split(name) for name in ("train", "validation", "test")}
    for name in ("train", "validation"):
        assert parts[name] and {p.template for p in parts[name]} <= set(seen)
    test_templates = {p.template for p in parts["test"]}
    assert set(unseen) <= test_templates and test_templates & set(seen)  # both kinds in the test split
    questions = [{p.question for p in part} for part in parts.values()]
    assert sum(map(len, questions)) == len(set.union(*questions))  # no question in two splits
    assert len(parts["test"]) >= 300


def test_the_data_source_groups_by_template_and_the_test_split_is_what_evaluate_judges():
    splits = load_splits(DataConfig(source="gsm"))
    train = splits["train"]
    assert all(e.group.startswith("template-") and e.response.rstrip().split("#### ")[-1] for e in train)
    assert [e.prompt for e in splits["test"]] == [gsm.prompt(p, chat=True) for p in gsm.problems()]


@pytest.mark.parametrize("answer,number", [
    ("so 3 + 4 = 7\n#### 7", "7"), ("The answer is $\\boxed{1,250}$.", "1250"), ("#### $12.50", "12.50"),
    ("#### 5 then \\boxed{6}", "6"), ("#### -3", "-3"), ("it is 7", None), ("####\n7", None),
])
def test_the_final_number(answer, number):
    assert gsm.final_number(answer) == number


def test_exact_match_on_the_final_number():
    problem = gsm.problems(1)[0]
    assert gsm.judge(problem, problem.solution, True, 1.0)[1]
    assert gsm.judge(problem, f"#### {float(problem.answer):.2f}", True, 1.0)[1]  # 70.00 is 70
    wrong = gsm.judge(problem, f"#### {float(problem.answer) + 1}", True, 1.0)
    assert not wrong[1] and "is right" in wrong[2]
    assert gsm.judge(problem, "I do not know", True, 1.0)[2].startswith("failed: no final number")
    raw = f" {problem.solution}\nQuestion: what is 1 + 1?\nAnswer: #### 2"  # a raw continuation is cut there
    assert gsm.judge(problem, raw, False, 1.0)[1]
