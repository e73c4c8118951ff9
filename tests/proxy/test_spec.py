"""What a ModelSpec refuses unless forced: an adapter on another base than its own, alpha outside [0, 4]."""

import re
import shutil

import pytest

from fedpt.errors import FedptError
from fedpt.models.base_record import RECORD, fingerprint, record_base
from fedpt.proxy import Fusion
from fedpt.proxy.pair import load_expert
from fedpt.proxy.spec import ModelSpec


def test_an_adapter_is_refused_on_another_base_of_the_same_shapes_unless_forced(tiny, twin, tiny_adapter, tmp_path):
    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    record_base(adapter, tiny["small"])
    assert fingerprint(twin) != fingerprint(tiny["small"]) == fingerprint(tiny["small"])
    load_expert(tiny["small"], adapter, dtype="float32")  # its own base
    with pytest.raises(FedptError, match="was trained on .*whose weights differ.*--force"):
        load_expert(twin, adapter, dtype="float32")  # before: loaded silently, and gave noise
    load_expert(twin, adapter, dtype="float32", force=True)
    spec = ModelSpec(large=str(tiny["large"]), small=str(twin), adapter=adapter, dtype="float32")
    with pytest.raises(FedptError, match="whose weights differ"):
        spec.open_expert()
    (adapter / RECORD).write_text("{not json")
    with pytest.raises(FedptError, match="is damaged"):
        load_expert(tiny["small"], adapter, dtype="float32")


def test_alpha_outside_its_range_needs_force():
    common = {"large": "L", "small": "S", "adapter": "A"}
    for alpha in (-5.0, 1e30, 4.5):
        with pytest.raises(FedptError, match=re.escape(f"alpha {alpha:g} is outside [0, 4]")):
            ModelSpec(**common, fusion=Fusion(alpha=alpha))
        ModelSpec(**common, fusion=Fusion(alpha=alpha), force=True)
    ModelSpec(**common, fusion=Fusion(alpha=4.0))
    ModelSpec(**common, fusion=Fusion(dynamic=True))


def test_the_cli_says_so_in_one_line(cli, tiny, tiny_adapter):
    code, out, err = cli("generate", "--large", tiny["large"], "--small", tiny["small"], "--adapter", tiny_adapter,
                         "--alpha", -5, "--prompt", "hello", "--dtype", "float32")
    assert code == 2 and "alpha -5 is outside [0, 4]" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("generate", "--large", tiny["large"], "--prompt", "hello", "--stop", "", "--dtype", "float32")
    assert code == 2 and "stop strings must not be empty" in err


def test_an_adapter_is_refused_on_the_same_weights_with_another_tokenizer(tiny, tiny_adapter, tmp_path):
    import json

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    record_base(adapter, tiny["small"])
    other = shutil.copytree(tiny["small"], tmp_path / "other-words")
    words = json.loads((other / "tokenizer.json").read_text())
    vocab = words["model"]["vocab"]
    a, b = sorted(vocab)[10], sorted(vocab)[11]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids: same weights, other words
    (other / "tokenizer.json").write_text(json.dumps(words))
    assert fingerprint(other) == fingerprint(tiny["small"])
    with pytest.raises(FedptError, match="whose tokenizer differs"):
        load_expert(other, adapter, dtype="float32")
    load_expert(other, adapter, dtype="float32", force=True)
