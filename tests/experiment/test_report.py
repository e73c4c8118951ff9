"""`fedpt report` and `fedpt compare`: plots and report.md rebuilt from a saved results.json alone."""

import json
import shutil
from pathlib import Path

DATA = Path(__file__).parent.parent / "data"


def test_report_is_rebuilt_from_results_json_alone(cli, tmp_path):
    shutil.copy(DATA / "results-small.json", tmp_path / "results.json")
    (tmp_path / "notes.md").write_text("The author's reading of the run.")
    code, out, err = cli("report", tmp_path)
    assert code == 0, err
    report = (tmp_path / "report.md").read_text()
    for png in ("rounds.png", "metrics.png", "costs.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"({png})" in report
    assert "| FedPT: fusion chosen on validation [alpha=0.5, w=0.5] | 1.650 |" in report
    assert "| gap_closed_nll_at_least_0.8 | 0.700 | **no** |" in report
    assert "Missed: gap_closed_nll_at_least_0.8, peak_memory_at_most_0.5, seconds_per_step_at_most_0.5" in report
    assert "- Gap: proxy-tuning adds the small model's shift" in report and "- Memory: a FedPT client" in report
    assert "- Bytes:" not in report and "## Notes\n\nThe author's reading of the run." in report
    assert "fedpt experiment --config tiny.toml --out runs/tiny" in report


def test_compare_tables_runs_and_the_recipe_that_differs(cli, tmp_path):
    results = json.loads((DATA / "results-small.json").read_text())
    for name, rounds in (("short", 2), ("long", 8)):
        (tmp_path / name).mkdir()
        results["config"]["federation"]["rounds"] = rounds
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    code, out, err = cli("compare", tmp_path / "short", tmp_path / "long")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith(("| short", "| long"))]
    assert len(rows) == 2 and "| federation.rounds=2 |" in rows[0] and "| federation.rounds=8 |" in rows[1]
    assert "1.650 (0.70)" in rows[0]
    code, _, err = cli("compare", tmp_path / "missing")
    assert code == 2 and "has no results.json" in err


def test_report_errors(cli, tmp_path):
    code, _, err = cli("report", tmp_path)
    assert code == 2 and "has no results.json" in err
    (tmp_path / "results.json").write_text("{}")
    code, _, err = cli("report", tmp_path)
    assert code == 2 and "not a fedpt experiment result" in err


def test_the_privacy_spent_is_in_the_report(tmp_path):
    from fedpt.experiment.report import markdown

    results = json.loads((DATA / "results-small.json").read_text())
    assert "## Privacy spent" not in markdown(results)
    results["costs"]["fedpt"]["privacy"] = {"dp": "central", "epsilon": 7.5, "delta": 0.25, "noise_multiplier": 1.2,
                                            "clip_norm": 0.1, "releases": 3}
    report = markdown(results)
    assert "## Privacy spent" in report and "| fedpt | central | 7.500 | 0.25 | 1.200 | 0.100 | 3 |" in report


def test_a_real_task_gets_its_targets_its_reasons_and_a_plot_panel(tmp_path):
    from fedpt.experiment import results as res
    from fedpt.experiment.report import write_report

    results = json.loads((DATA / "results-small.json").read_text())
    for name, solved in (("large_base", 10), ("fedpt_best", 12), ("large_direct", 20)):
        passed = {f"p{i}": i < solved for i in range(40)}
        results["models"][name]["tasks"] = {"gsm": {"pass@1": {"value": solved / 40, "interval_95": [0.1, 0.6]},
                                                    "problems": 40, "passed": passed,
                                                    "no final number": {"value": 0.5 if name == "large_base" else 0,
                                                                        "samples": 20}}}
    results["gap_closed_task"] = {"gsm": res.task_gaps(results["models"], "gsm")}
    results["targets"].update(res.task_targets(results["models"], results["gap_closed_task"]))
    write_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| gsm_gap_closed_at_least_0.8 | 0.200 (95%: " in report
    assert "| gsm_direct_beats_large_base | 0.250" in report
    assert "- gsm: pass@1 large base 0.250, FedPT: fusion chosen on validation 0.300" in report
    assert "without a final number (cut at experiment.task_max_tokens, or never written), judged wrong: " \
           "large base 0.500," in report
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    assert "failed**" not in report
    assert "Chosen overall (on validation NLL)" in report and "validation gsm pass@1" not in report
    for i, split in enumerate(results["fusion_grid"].values()):  # chosen on the task's validation problems instead
        split["validation"]["tasks"] = {"gsm": i / 10}
    results["chosen_on_validation"]["on"] = "gsm"
    write_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "Chosen overall (on gsm)" in report and "| fusion | validation NLL | validation gsm pass@1 |" in report
    assert f"| {next(iter(results['fusion_grid']))} | " in report and " | 0.00 | " in report
    results["costs"]["direct"]["failed_rounds"] = [2, 3]
    write_report(results, tmp_path)
    assert "- **direct: round(s) 2, 3 failed** (no update accepted" in (tmp_path / "report.md").read_text()
