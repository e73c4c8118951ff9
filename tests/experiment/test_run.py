"""The experiment end to end on tiny models: every stage, results.json, the report, and a rerun that reuses
every trained stage; with LoRA and with full fine-tuning."""

import json

import numpy as np
import pytest

from fedpt.experiment.run import run_experiment

pytestmark = pytest.mark.slow

SETTINGS = {
    "data": {"group_field": "topic", "test_percent": 25, "validation_percent": 25},
    "federation": {"clients": 3, "rounds": 2, "eval_examples": 4, "client_cpus": 1},
    "distill": {"every": 1, "n_texts": 4, "max_new_tokens": 4, "steps": 2, "top_k": 8},
    "experiment": {"alphas": [0.5, 1.0], "fusion_weights": [0.5], "generate_examples": 3, "max_new_tokens": 4},
}


def experiment_config(tiny_run, qa_file, tmp_path, **tuning):
    run = tiny_run(tmp_path / "unused", **{**SETTINGS, "data": {**SETTINGS["data"], "source": str(qa_file)}})
    if tuning:
        from fedpt import config as cfg

        run = cfg.replace(run, tuning=tuning)
    return run


def check_results(results, folder):
    models = results["models"]
    for name in ("small_base", "small_fedpt", "large_base", "fedpt_proxy", "fedpt_best", "large_direct",
                 "small_central", "small_fedpt_distill", "fedpt_distill_proxy"):
        assert np.isfinite(models[name]["nll"]), name
    assert models["fedpt_proxy"]["fusion"] == "alpha=1"
    chosen = results["chosen_on_validation"]["overall"]
    grid = results["fusion_grid"]
    assert grid[chosen]["validation"]["nll"] == min(v["validation"]["nll"] for v in grid.values())
    assert models["fedpt_best"]["nll"] == grid[chosen]["test"]["nll"]
    assert 0 < results["cost_ratio_fedpt_over_direct"]["bytes_up_per_client_round"] < 1  # the tiny small is smaller
    for name in ("results.json", "report.md", "rounds.png", "metrics.png", "costs.png"):
        assert (folder / name).is_file()


def test_experiment_end_to_end_on_tiny_models(tiny_run, qa_file, tmp_path, monkeypatch):
    from fedpt.experiment import evaluation

    run = experiment_config(tiny_run, qa_file, tmp_path)
    results = run_experiment(run, tmp_path / "exp", command="test")
    check_results(results, tmp_path / "exp")
    # a second call reuses every trained stage and every score made (a resumed evaluation scores nothing again)
    for scorer in ("response_logprobs", "fusion_logprobs"):
        monkeypatch.setattr(evaluation, scorer, lambda *a, **k: pytest.fail("scored again"))
    again = run_experiment(run, tmp_path / "exp", command="test")
    assert again["models"]["fedpt_best"]["nll"] == pytest.approx(results["models"]["fedpt_best"]["nll"], abs=1e-6)


def test_experiment_with_full_fine_tuning(tiny_run, qa_file, tmp_path):
    run = experiment_config(tiny_run, qa_file, tmp_path, mode="full", dtype="float32", local_steps=2, batch_size=2,
                            max_length=32, learning_rate=1e-3)
    results = run_experiment(run, tmp_path / "exp", command="test")
    check_results(results, tmp_path / "exp")
    # the tuned models differ from their bases: full fine-tuning trained every weight
    assert results["models"]["small_fedpt"]["nll"] != results["models"]["small_base"]["nll"]
    assert results["models"]["large_direct"]["nll"] != results["models"]["large_base"]["nll"]


def test_experiment_on_a_real_task_reports_pass_at_1_and_its_gap_with_intervals(tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("reasoning_gym", reason="the math task comes with reasoning-gym")
    import shutil

    from fedpt.experiment import run as stages

    settings = {**SETTINGS, "data": {"source": "gsm", "group_field": "", "test_percent": 10, "validation_percent": 10},
                "distill": {"every": 0},
                "experiment": {**SETTINGS["experiment"], "tasks": ["gsm"], "task_problems": 4, "task_max_tokens": 4,
                               "test_examples": 6, "validation_examples": 6, "distill_variant": False,
                               "central_small": False, "choose_on": "gsm", "choose_problems": 3}}
    run = tiny_run(tmp_path / "unused", **settings)
    out = tmp_path / "exp"
    results = run_experiment(run, out, command="test")
    for name in ("small_base", "small_fedpt", "large_base", "fedpt_proxy", "fedpt_best", "large_direct"):
        score = results["models"][name]["tasks"]["gsm"]
        assert score["problems"] == 4 and len(score["passed"]) == 4 and "interval_95" in score["pass@1"]
        assert (out / "tasks" / "gsm" / name / "samples.jsonl").is_file()
    assert set(results["gap_closed_task"]["gsm"]) >= {"fedpt_proxy", "fedpt_best", "small_fedpt"}
    assert "## gsm: greedy pass@1" in (out / "report.md").read_text()
    # the fusion is chosen on the task's validation problems: each fusion answered 3 of them, the best pass@1 won
    chosen, grid = results["chosen_on_validation"], results["fusion_grid"]
    validation = {label: grid[label]["validation"]["tasks"]["gsm"] for label in grid}
    assert chosen["on"] == "gsm" and validation[chosen["overall"]] == max(validation.values())
    assert results["models"]["fedpt_best"]["fusion"] == chosen["overall"]
    for label in grid:
        answered = json.loads((out / "tasks" / "gsm-validation" / label.replace(", ", "_") / "results.json")
                              .read_text())
        assert answered["split"] == "validation" and answered["problems"] == 3
    # a lost machine: the trained models are gone, every judgment is kept; nothing is trained or opened again
    for stage in ("fedpt", "direct"):
        shutil.rmtree(out / stage / "final")
    monkeypatch.setattr(stages, "federate", lambda *a: pytest.fail("trained again"))
    again = run_experiment(run, out, command="test")
    assert again["models"] == results["models"] and again["costs"] == results["costs"]


def test_a_typo_in_a_model_name_fails_before_anything_is_written_and_never_blocks_the_fix(tiny_run, qa_file,
                                                                                          tmp_path):
    from fedpt import config as cfg
    from fedpt.errors import FedptError
    from fedpt.experiment.run import setup

    run = experiment_config(tiny_run, qa_file, tmp_path)
    typo = cfg.replace(run, model={"small": str(tmp_path / "no-such-model")})
    with pytest.raises(FedptError, match="no-such-model"):
        setup(typo, tmp_path / "exp")
    assert not (tmp_path / "exp" / "config.json").exists()  # before: written, and the corrected rerun refused
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "config.json").write_text('{"an": "older setup that failed"}')
    setup(run, tmp_path / "exp")  # nothing trained after that config: the corrected one replaces it
    (tmp_path / "exp" / "fedpt").mkdir()
    with pytest.raises(FedptError, match="another config"):
        setup(cfg.replace(run, seed=7), tmp_path / "exp")
    saved = json.loads((tmp_path / "exp" / "config.json").read_text())
    del saved["experiment"]["alphas"]  # as if saved before the key existed: it reads as its default
    (tmp_path / "exp" / "config.json").write_text(json.dumps(saved))
    setup(cfg.replace(run, experiment={"alphas": cfg.ExperimentConfig().alphas}), tmp_path / "exp")
    with pytest.raises(FedptError, match="another config"):
        setup(cfg.replace(run, experiment={"alphas": [9.0]}), tmp_path / "exp")


def test_each_training_is_judged_before_the_next_one_starts(tiny_run, qa_file, tmp_path, monkeypatch):
    """A machine lost during the costly direct federation must not take FedPT's judgments with it."""
    from fedpt.experiment import run as stages

    config = experiment_config(tiny_run, qa_file, tmp_path)
    out, seen = tmp_path / "exp", []
    federate = stages.federate

    def recording(run, folder):
        seen.append((folder.name, sorted(p.name for p in (out / "scores").glob("*.json"))))
        return federate(run, folder)

    monkeypatch.setattr(stages, "federate", recording)
    run_experiment(config, out, command="test")
    scores = [(stage, [n for n in kept if not n.startswith("rouge-")]) for stage, kept in seen]
    assert scores == [("fedpt", []), ("direct", ["fusion-grid.json"]),
                      ("fedpt-distill", ["fusion-grid.json", "large_direct.json"])]
    assert {"rouge-large_base.json", "rouge-small_base.json"} <= set(seen[1][1])  # greedy answers are kept too
    assert "rouge-large_direct.json" in seen[2][1]
