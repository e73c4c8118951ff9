"""A peft LoRA adapter written as a GGUF LoRA adapter: llama.cpp's tensor names and shapes, peft's numbers,
converted once; what cannot be converted is a one-line error. (llama.cpp itself reads it in test_llama_cpp.py.)"""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedpt.errors import FedptError
from fedpt.models.gguf_lora import to_gguf


def base_gguf(folder, arch="qwen2", layers=2):
    """A GGUF file that records an architecture and a layer count (all the converter reads of the base)."""
    import gguf

    path = folder / f"base-{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_adapter_becomes_llama_cpps_lora_tensors(tiny_adapter, tmp_path):
    import gguf

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    out = to_gguf(adapter, base_gguf(tmp_path))
    assert out.parent == adapter and to_gguf(adapter, base_gguf(tmp_path)) == out  # cached next to the adapter
    reader = gguf.GGUFReader(out)
    text = {name: bytes(field.parts[-1]).decode() for name, field in reader.fields.items()
            if name in ("general.type", "adapter.type", "general.architecture")}
    assert text == {"general.type": "adapter", "adapter.type": "lora", "general.architecture": "qwen2"}
    assert float(reader.fields["adapter.lora.alpha"].parts[-1][0]) == 8.0
    peft = load_file(adapter / "adapter_model.safetensors")
    tensors = {t.name: np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    assert len(tensors) == len(peft) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for layer in range(2):
        for module, gguf_name in (("q_proj", "attn_q"), ("v_proj", "attn_v")):
            for part, suffix in (("lora_A", "lora_a"), ("lora_B", "lora_b")):
                theirs = peft[f"base_model.model.model.layers.{layer}.self_attn.{module}.{part}.weight"]
                np.testing.assert_array_equal(tensors[f"blk.{layer}.{gguf_name}.weight.{suffix}"], theirs)
    # a changed adapter is converted again, under another name
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16}))
    again = to_gguf(adapter, base_gguf(tmp_path))
    assert again != out and float(gguf.GGUFReader(again).fields["adapter.lora.alpha"].parts[-1][0]) == 16.0


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "cannot hold DoRA"),
    ({"modules_to_save": ["lm_head"]}, "cannot hold modules saved in full"),
    ({"rank_pattern": {"q_proj": 2}}, "cannot be converted"),
])
def test_what_llama_cpp_cannot_hold_is_a_one_line_error(tiny_adapter, tmp_path, change, message):
    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(FedptError, match=message):
        to_gguf(adapter, base_gguf(tmp_path))


def test_bad_folders_and_bases(tiny_adapter, tmp_path):
    with pytest.raises(FedptError, match="is not a LoRA adapter folder"):
        to_gguf(tmp_path, base_gguf(tmp_path))
    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    with pytest.raises(FedptError, match="supports qwen2, qwen3, llama models, not 'gpt2'"):
        to_gguf(adapter, base_gguf(tmp_path, arch="gpt2"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(FedptError, match="is not a GGUF model file"):
        to_gguf(adapter, tmp_path / "junk.gguf")
