import json
from pathlib import Path

import pytest


def test_generate_one_prompt_and_alpha_zero_equals_large(cli, tiny, tiny_adapter):
    common = ["generate", "--large", tiny["large"], "--prompt", "hello world", "--max-new-tokens", 8,
              "--dtype", "float32"]
    code, alone, err = cli(*common)
    assert code == 0, err
    assert f"loading the large model {tiny['large']} (transformers, " in err and "loaded in" in err
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


def test_generate_answers_json_under_a_schema_file(cli, tiny, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9,
                                                                         "minimum": 0}},
                                  "required": ["n"], "additionalProperties": False}))
    code, out, err = cli("generate", "--large", tiny["large"], "--prompt", "hello", "--max-new-tokens", 32,
                         "--json-schema", schema)
    assert code == 0, err
    assert json.loads(out)["n"] in range(10)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--small", "S"], "--small proxy-tunes the large with its tuned version"),
        ([], "exactly one of --prompt or --prompts-file"),
        (["--prompts-file", "/nonexistent/p.txt"], "prompts file /nonexistent/p.txt does not exist"),
        (["--prompt", "x", "--max-new-tokens", 0], "max_new_tokens must be at least 1"),
        (["--prompt", "x", "--dtype", "int3"], "Invalid value for '--dtype': 'int3' is not one of 'auto'"),
        (["--prompt", "x", "--top-p", "many"], "Invalid value for '--top-p': 'many' is not a valid float"),
        (["--prompt", "x", "--alpha", "2"], "--alpha, --weight and --dynamic steer with a small pair"),
        (["--prompt", "x", "--temperature", "nan"], "temperature must be a finite number >= 0"),
        (["--prompt", "", "--raw"], "prompt 1 is empty"),
        (["--prompt", "x", "--small", "S", "--adapter", "A", "--alpha", "nan"], "must be finite numbers"),
        (["--prompt", "x", "--small", "S", "--adapter", "A", "--weight", "2"], "must lie in [0, 1]"),
        (["--prompt", "x", "--experiment", "/no/such/experiment"], "has no results.json"),
        (["--prompt", "x", "--json-schema", "/no/schema.json"], "JSON schema file /no/schema.json does not exist"),
        (["--prompt", "x", "--json-schema", '{"type": "nonsense"}'], "JSON schema cannot be enforced"),
    ],
)
def test_errors_are_one_line(cli, tiny, args, message):
    code, _, err = cli("generate", "--large", tiny["large"], *args)
    assert code == 2
    *loading, error = err.splitlines()  # what loaded before the error, if anything, then the error alone
    assert error.startswith("fedpt: error: ") and message in error
    assert all(line.startswith(("loading ", "loaded in ")) for line in loading)


def test_a_prompts_file_that_is_not_utf8(cli, tiny, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    code, _, err = cli("generate", "--large", tiny["large"], "--prompts-file", path)
    assert code == 2 and "is not UTF-8 text" in err and err.count("\n") == 1


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
    for text in ("random seed of sampling", "prompts decoded together", "bfloat16|float32|float16", "cuda:N"):
        assert text in out, text


def test_unknown_command_is_one_line(cli):
    code, _, err = cli("frobnicate")
    assert code == 2 and err.startswith("fedpt: error: No such command 'frobnicate'") and err.count("\n") == 1


def fake_experiment(folder, tiny, tiny_adapter, fusion="alpha=1, w=0.5", **extra):
    """An experiment folder as `fedpt experiment` leaves it, as far as serving reads it."""
    import shutil

    (folder / "fedpt").mkdir(parents=True)
    shutil.copytree(tiny_adapter, folder / "fedpt" / "final")
    results = json.loads((Path(__file__).parent / "data" / "results-small.json").read_text())
    results["config"]["model"] = {"small": str(tiny["small"]), "large": str(tiny["large"])}
    results["chosen_on_validation"]["overall"] = fusion
    (folder / "results.json").write_text(json.dumps({**results, **extra}))
    return folder


@pytest.mark.parametrize("fusion, options", [("alpha=1, w=0.5", ["--weight", 0.5]),
                                             ("dynamic alpha", ["--dynamic"]), ("alpha=0.5", ["--alpha", 0.5])])
def test_generate_takes_the_fusion_an_experiment_chose(cli, tiny, tiny_adapter, tmp_path, fusion, options):
    experiment = fake_experiment(tmp_path / "exp", tiny, tiny_adapter, fusion)
    common = ["generate", "--prompt", "hello world", "--max-new-tokens", 8, "--dtype", "float32"]
    code, chosen, err = cli(*common, "--experiment", experiment)
    assert code == 0, err
    explicit = ["--large", tiny["large"], "--small", tiny["small"], "--adapter", tiny_adapter]
    assert cli(*common, *explicit, *options)[1] == chosen
    assert cli(*common, *explicit)[1] != chosen or fusion == "alpha=1"  # the fusion made a difference
    code, _, err = cli(*common, "--experiment", experiment, "--alpha", 2)
    assert code == 2 and "drop --alpha" in err


def test_an_experiment_stores_its_fusions_as_data(cli, tiny, tiny_adapter, tmp_path):
    """Version 2 of results.json: the chosen fusion is read from its data, whatever its label says."""
    common = ["generate", "--prompt", "hello world", "--max-new-tokens", 8, "--dtype", "float32"]
    experiment = fake_experiment(tmp_path / "exp", tiny, tiny_adapter, "the best one", version=2,
                                 fusions={"the best one": {"alpha": 0.5, "weight": 0.0, "dynamic": False}})
    code, chosen, err = cli(*common, "--experiment", experiment)
    assert code == 0, err
    explicit = ["--large", tiny["large"], "--small", tiny["small"], "--adapter", tiny_adapter]
    assert cli(*common, *explicit, "--alpha", 0.5)[1] == chosen


@pytest.mark.parametrize("damage, message", [
    (lambda r: {**r, "models": [1, 2]}, "models: Input should be a valid dictionary"),
    (lambda r: {**r, "targets": None}, "targets: Input should be a valid dictionary"),
    (lambda r: {k: v for k, v in r.items() if k != "costs"}, "costs: Field required"),
    (lambda r: {**r, "models": {k: v for k, v in r["models"].items() if k != "large_direct"}},
     "lacks models.large_direct"),
    (lambda r: {**r, "costs": {"direct": r["costs"]["direct"]}}, "lacks costs.fedpt"),
    (lambda r: {**r, "version": 99}, "version 99; this fedpt reads up to 2"),
])
def test_a_damaged_results_json_is_one_line(cli, tmp_path, damage, message):
    results = json.loads((Path(__file__).parent / "data" / "results-small.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps(damage(results)))
    for command in (["report", tmp_path], ["compare", tmp_path], ["generate", "--experiment", tmp_path,
                                                                   "--prompt", "x"]):
        code, _, err = cli(*command)
        assert code == 2 and message in err and err.count("\n") == 1, (command, err)
    (tmp_path / "results.json").write_bytes(b"\xff\xfe{not utf-8")
    code, _, err = cli("report", tmp_path)
    assert code == 2 and "is not UTF-8" in err and err.count("\n") == 1


def test_serve_refuses_a_port_in_use(cli, tiny):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = cli("serve", "--large", tiny["large"], "--port", port, "--dtype", "float32")
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1
    code, _, err = cli("serve", "--large", tiny["large"], "--port", 0)
    assert code == 2 and "--port must lie in 1..65535" in err


def test_experiment_writes_where_its_config_says_unless_told_otherwise(cli, monkeypatch, tmp_path):
    import fedpt.experiment.run

    folders = []
    monkeypatch.setattr(fedpt.experiment.run, "run_experiment",
                        lambda run, out, command: folders.append((out, command)) or {"targets": {}})
    config = tmp_path / "exp.toml"
    config.write_text(f'out = "{tmp_path / "from-config"}"\n')
    assert cli("experiment", "--config", config)[0] == 0
    assert cli("experiment", "--config", config, "--out", tmp_path / "given")[0] == 0
    assert [out for out, _ in folders] == [tmp_path / "from-config", tmp_path / "given"]
    assert f"--out {tmp_path / 'from-config'}" in folders[0][1]  # the report's command says where it went
