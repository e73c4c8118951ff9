import json
import sys

import pytest

from fedpt.cli import main


def run(monkeypatch, capsys, *args):
    """Run `fedpt ARGS` in this process; return (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fedpt", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_one_prompt_and_alpha_zero_equals_large(monkeypatch, capsys, tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    from fedpt.lm import load_model

    model, _, _ = load_model(tiny["small"], dtype="float32")
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "adapter")
    common = ["generate", "--large", tiny["large"], "--prompt", "hello world", "--max-new-tokens", 8,
              "--dtype", "float32"]
    code, alone, err = run(monkeypatch, capsys, *common)
    assert code == 0, err
    proxy = ["--small", tiny["small"], "--adapter", tmp_path / "adapter"]
    code, zero, err = run(monkeypatch, capsys, *common, *proxy, "--alpha", 0)
    assert code == 0, err
    assert zero == alone
    code, steered, _ = run(monkeypatch, capsys, *common, *proxy, "--alpha", 3)
    assert code == 0 and steered != alone


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_prompts_file_gives_jsonl(monkeypatch, capsys, tiny, tmp_path, suffix):
    prompts = ["hello world", "what is\nyour name"] if suffix == ".jsonl" else ["hello world", "what is your name"]
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    else:
        path.write_text("\n".join(prompts) + "\n\n")
    code, out, err = run(monkeypatch, capsys, "generate", "--large", tiny["large"], "--prompts-file", path,
                         "--max-new-tokens", 4, "--raw")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts and all(isinstance(r["completion"], str) for r in rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--small", "S"], "--small and --adapter go together"),
        ([], "exactly one of --prompt or --prompts-file"),
        (["--prompts-file", "/nonexistent/p.txt"], "prompts file /nonexistent/p.txt does not exist"),
        (["--prompt", "x", "--max-new-tokens", 0], "max_new_tokens must be at least 1"),
        (["--prompt", "x", "--dtype", "int3"], "unknown dtype 'int3'"),
    ],
)
def test_errors_are_one_line(monkeypatch, capsys, tiny, args, message):
    code, _, err = run(monkeypatch, capsys, "generate", "--large", tiny["large"], *args)
    assert code == 2
    assert err.startswith("fedpt: error: ") and message in err and err.count("\n") == 1


def test_missing_model_folder(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "generate", "--large", "/no/such/model", "--prompt", "x")
    assert code == 2 and "neither a known model name" in err


def test_vocabulary_mismatch_on_the_command_line(monkeypatch, capsys, tiny):
    code, _, err = run(monkeypatch, capsys, "generate", "--large", tiny["large"], "--small", tiny["other"],
                       "--adapter", tiny["other"], "--prompt", "x")
    assert code == 2 and "different tokenizers" in err


def test_models_list(monkeypatch, capsys, fedpt_home):
    code, out, _ = run(monkeypatch, capsys, "models", "list")
    assert code == 0 and "qwen2.5-coder-0.5b-instruct" in out and "not prepared" in out


def test_report_is_rebuilt_from_results_json_alone(monkeypatch, capsys, tmp_path):
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parent / "data" / "results-small.json", tmp_path / "results.json")
    (tmp_path / "notes.md").write_text("The author's reading of the run.")
    code, out, err = run(monkeypatch, capsys, "report", tmp_path)
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


def test_compare_tables_runs_and_the_recipe_that_differs(monkeypatch, capsys, tmp_path):
    from pathlib import Path

    results = json.loads((Path(__file__).parent / "data" / "results-small.json").read_text())
    for name, rounds in (("short", 2), ("long", 8)):
        (tmp_path / name).mkdir()
        results["config"]["federation"]["rounds"] = rounds
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    code, out, err = run(monkeypatch, capsys, "compare", tmp_path / "short", tmp_path / "long")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith(("| short", "| long"))]
    assert len(rows) == 2 and "| federation.rounds=2 |" in rows[0] and "| federation.rounds=8 |" in rows[1]
    assert "1.650 (0.70)" in rows[0]
    code, _, err = run(monkeypatch, capsys, "compare", tmp_path / "missing")
    assert code == 2 and "has no results.json" in err


def test_report_errors(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "report", tmp_path)
    assert code == 2 and "has no results.json" in err
    (tmp_path / "results.json").write_text("{}")
    code, _, err = run(monkeypatch, capsys, "report", tmp_path)
    assert code == 2 and "not a fedpt experiment result" in err
