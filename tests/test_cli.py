import json

import pytest


def test_generate_one_prompt_and_alpha_zero_equals_large(cli, tiny, tiny_adapter):
    common = ["generate", "--large", tiny["large"], "--prompt", "hello world", "--max-new-tokens", 8,
              "--dtype", "float32"]
    code, alone, err = cli(*common)
    assert code == 0, err
    proxy = ["--small", tiny["small"], "--adapter", tiny_adapter]
    code, zero, err = cli(*common, *proxy, "--alpha", 0)
    assert code == 0, err
    assert zero == alone
    code, steered, _ = cli(*common, *proxy, "--alpha", 3)
    assert code == 0 and steered != alone


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_prompts_file_gives_jsonl(cli, tiny, tmp_path, suffix):
    prompts = ["hello world", "what is\nyour name"] if suffix == ".jsonl" else ["hello world", "what is your name"]
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    else:
        path.write_text("\n".join(prompts) + "\n\n")
    code, out, err = cli("generate", "--large", tiny["large"], "--prompts-file", path,
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
        (["--prompt", "x", "--dtype", "int3"], "Invalid value for '--dtype': 'int3' is not one of 'bfloat16'"),
        (["--prompt", "x", "--top-p", "many"], "Invalid value for '--top-p': 'many' is not a valid float"),
    ],
)
def test_errors_are_one_line(cli, tiny, args, message):
    code, _, err = cli("generate", "--large", tiny["large"], *args)
    assert code == 2
    assert err.startswith("fedpt: error: ") and message in err and err.count("\n") == 1


def test_missing_model_folder(cli):
    code, _, err = cli("generate", "--large", "/no/such/model", "--prompt", "x")
    assert code == 2 and "neither a known model name" in err


def test_vocabulary_mismatch_on_the_command_line(cli, tiny):
    code, _, err = cli("generate", "--large", tiny["large"], "--small", tiny["other"],
                       "--adapter", tiny["other"], "--prompt", "x")
    assert code == 2 and "different tokenizers" in err


def test_models_list(cli, fedpt_home):
    code, out, _ = cli("models", "list")
    assert code == 0 and "qwen2.5-coder-0.5b-instruct" in out and "not prepared" in out
    assert "Q4_K_M GGUF built from the AWQ checkpoint" in out  # what the weights really are


def test_version_and_help(cli, monkeypatch):
    from fedpt import __version__

    monkeypatch.setenv("COLUMNS", "250")  # rich wraps help text at the terminal's width

    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"fedpt {__version__}"
    code, out, _ = cli("report", "--help")
    assert code == 0 and "an experiment folder with results.json" in out  # positional arguments have help too
    code, out, _ = cli("generate", "--help")
    for text in ("random seed of sampling", "prompts decoded together", "bfloat16|float32|float16", "cpu|cuda|mps"):
        assert text in out, text


def test_unknown_command_is_one_line(cli):
    code, _, err = cli("frobnicate")
    assert code == 2 and err.startswith("fedpt: error: No such command 'frobnicate'") and err.count("\n") == 1
