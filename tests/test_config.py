from pathlib import Path

import pytest

from fedpt import config as cfg
from fedpt.errors import FedptError


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 3\n[federation]\nclients = 2\nrounds = 4\n[tuning]\ntarget_modules = ["q_proj"]\n')
    run = cfg.load(path, ["federation.rounds=5", "federation.strategy=fedyogi", "data.categories=ai,food"])
    assert (run.seed, run.federation.clients, run.federation.rounds, run.federation.strategy) == (3, 2, 5, "fedyogi")
    assert run.tuning.target_modules == ["q_proj"] and run.data.categories == ["ai", "food"]
    assert cfg.from_flat(run.flat()) == run
    with pytest.raises(FedptError, match=r"unknown key\(s\) \['rank'\] in \[tuning\]"):
        cfg.load(path, ["tuning.rank=4"])
    with pytest.raises(FedptError, match="federation.rounds must be int"):
        cfg.load(path, ["federation.rounds=many"])
    with pytest.raises(FedptError, match="unknown strategy"):
        cfg.load(None, ["federation.strategy=fedsgd"])
    with pytest.raises(FedptError, match=r"kd_every is written `\[distill\] every = K`"):
        cfg.load(None, ["kd_every=2"])
    with pytest.raises(FedptError, match="does not exist"):
        cfg.load(tmp_path / "nope.toml")
    path.write_text("[federation\n")
    with pytest.raises(FedptError, match="not valid TOML"):
        cfg.load(path)


def test_the_shipped_config_is_the_embedded_default():
    shipped = cfg.load(Path(__file__).parent.parent / "configs" / "chatterbot.toml")
    assert shipped == cfg.RunConfig()


def test_every_shipped_config_loads_and_the_real_task_ones_pin_their_training_dtype():
    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
    loaded = {path.stem: cfg.load(path) for path in configs}  # a typo in any of them fails here, not hours in
    assert {"experiment-math", "experiment-code"} <= set(loaded)
    # resumed on another machine, `auto` would switch between bf16 and float32 in the middle of a federation
    assert loaded["experiment-math"].tuning.dtype == loaded["experiment-code"].tuning.dtype == "float32"


def test_importing_the_schema_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, fedpt.config; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_derived_values_and_sections():
    run = cfg.load(None, ["tuning.max_length=40"])
    assert run.score_max_length == 80
    assert cfg.section("tuning", {"lora_r": 4}).lora_r == 4
    with pytest.raises(FedptError, match=r"unknown key\(s\) \['lora_rank'\] in \[tuning\]"):
        cfg.section("tuning", {"lora_rank": 8})
    with pytest.raises(FedptError, match="'seed' is not a section"):
        cfg.load(None, ["seed=3", "seed.part=1"])


@pytest.mark.parametrize("override, message", [
    ('experiment.alphas=["x"]', r"experiment.alphas\[0\] must be float, got str 'x'"),
    ('experiment.fusion_weights=[0.5, "x"]', r"experiment.fusion_weights\[1\] must be float, got str 'x'"),
    ("experiment.alphas=3", "experiment.alphas must be a list of float, got int 3"),
    ("tuning.target_modules=[1]", r"tuning.target_modules\[0\] must be str, got int 1"),
    ("federation.rounds=true", "federation.rounds must be int, got bool True"),
])
def test_types_come_from_the_annotations_list_items_included(override, message):
    with pytest.raises(FedptError, match=message):
        cfg.load(None, [override])
    assert cfg.load(None, ["experiment.alphas=[1, 2]"]).experiment.alphas == [1.0, 2.0]
    assert cfg.from_flat({"experiment.alphas": "0.5,1"}).experiment.alphas == [0.5, 1.0]


def test_one_default_per_key():
    assert cfg.RunConfig().tuning == cfg.TuneConfig()


def test_clients_receive_only_the_sections_they_use():
    run = cfg.load(None, ["experiment.alpha=2", "distill.every=1", "tuning.lora_r=4"])
    sent = run.flat(cfg.CLIENT_SECTIONS)
    assert not any(k.startswith(("experiment.", "distill.")) for k in sent)
    received = cfg.from_flat(sent)
    assert all(getattr(received, name) == getattr(run, name) for name in (*cfg.CLIENT_SECTIONS, "seed"))


@pytest.mark.parametrize("section, values, words", [
    ("federation", {"timeout": 0.0}, "federation.timeout"), ("federation", {"timeout": float("nan")}, "timeout"),
    ("federation", {"timeout": -1.0}, "timeout"), ("federation", {"eval_examples": -100}, "eval_examples"),
    ("federation", {"client_cpus": 0}, "client_cpus"), ("federation", {"fraction": 0.01}, "rounds to no client"),
    ("tuning", {"lora_dropout": 1.5}, "lora_dropout"), ("tuning", {"learning_rate": float("nan")}, "learning_rate"),
    ("data", {"test_percent": 0}, "test_percent"), ("data", {"test_percent": -5}, "test_percent"),
    ("data", {"test_percent": 100}, "test_percent"),
    ("experiment", {"choose_on": "gsm"}, "choose_on must be 'nll' or one of experiment.tasks"),
    ("experiment", {"choose_problems": 0}, "choose_problems"),
])
def test_settings_outside_their_domain_are_one_line_errors_before_anything_runs(section, values, words):
    from fedpt import config as cfg
    from fedpt.errors import FedptError

    with pytest.raises(FedptError, match=words) as error:  # before: accepted, or a traceback after Ray started
        cfg.replace(cfg.load(None, []), **{section: values})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("seed", [2**70, -1, True])
def test_a_seed_must_be_a_whole_number_in_range(seed):
    from fedpt import config as cfg
    from fedpt.errors import FedptError

    with pytest.raises(FedptError, match="seed must be a whole number"):
        cfg.replace(cfg.load(None, []), seed=seed)
