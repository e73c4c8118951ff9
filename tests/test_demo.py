"""The demo end to end on tiny models: federate, then answer held-out questions alone and proxy-tuned."""

import dataclasses
import importlib.util

import pytest

from fedpt.demo import demo_config, run_demo
from fedpt.federation.run_folder import read_metrics


@pytest.mark.slow
def test_demo_on_tiny_models(tiny_run, tmp_path, capsys):
    config = tiny_run(tmp_path / "demo", federation={"clients": 3, "rounds": 1, "eval_examples": 4, "client_cpus": 1})
    run_demo(config, n_questions=2)
    out = capsys.readouterr().out
    assert "held-out NLL per answer token, large alone" in out and "proxy-tuned" in out
    assert "demo finished" in out
    assert [r["round"] for r in read_metrics(tmp_path / "demo")] == [0, 1]
    assert (tmp_path / "demo" / "final" / "adapter_config.json").is_file()


def test_demo_config_is_the_embedded_default_in_a_new_folder(tmp_path):
    from fedpt.config import RunConfig

    config = demo_config(tmp_path / "x")
    assert config.out == str(tmp_path / "x")
    assert config.federation == RunConfig().federation
    # the models are the defaults'; the proxy runs in llama.cpp where it is installed (its fastest path)
    assert dataclasses.replace(config.model, backend="transformers") == RunConfig().model
    assert config.model.backend == ("llama.cpp" if importlib.util.find_spec("llama_cpp") else "transformers")
    assert demo_config().out.startswith("runs/demo/")
