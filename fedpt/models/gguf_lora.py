"""A federated LoRA adapter (a peft folder, what `fedpt train` writes) as a GGUF LoRA adapter for llama.cpp, so
the small pair runs from one copy of the 4-bit weights with the adapter switched on per decode call.

The file is what llama.cpp's own `convert_lora_to_gguf.py` writes: `general.type = adapter`, `adapter.type =
lora`, `adapter.lora.alpha`, and for each adapted weight its GGUF name with `.lora_a` (r x in) and `.lora_b`
(out x r). llama.cpp scales the product by alpha / r, as peft does. It is written once, next to the adapter,
named by a checksum of the adapter's weights and config, so a changed adapter is converted again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedpt.errors import FedptError

SUPPORTED = ("qwen2", "qwen3", "llama")  # architectures (as GGUF names them) whose projections fedpt adapts


def to_gguf(adapter: str | Path, base: str | Path) -> Path:
    """The GGUF LoRA file of a peft adapter folder (converted now, or found from an earlier conversion) for the
    base model in the GGUF file `base` (its architecture and layer count name the tensors)."""
    import gguf
    from safetensors.numpy import load_file

    folder = Path(adapter).expanduser()
    weights_file, config_file = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if not weights_file.is_file() or not config_file.is_file():
        raise FedptError(f"{folder} is not a LoRA adapter folder (adapter_config.json, adapter_model.safetensors)")
    digest = hashlib.sha256(weights_file.read_bytes() + config_file.read_bytes()).hexdigest()[:16]
    out = folder / f"adapter-{digest}.gguf"
    if out.is_file():
        return out
    config = json.loads(config_file.read_text())
    alpha = _alpha(config, folder)
    arch, layers = _architecture(Path(base).expanduser())
    names = gguf.get_tensor_name_map(arch, layers)
    pairs = _lora_pairs(load_file(weights_file), folder)
    partial = out.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for base, (a, b) in sorted(pairs.items()):
        name = names.get_name(base, try_suffixes=(".weight",))
        if name is None:
            raise FedptError(f"{folder}: llama.cpp has no tensor for the adapted weight {base}; adapt attention or "
                             "MLP projections (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))  # (r, in)
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))  # (out, r)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, out)
    return out


def _architecture(base: Path) -> tuple[Any, int]:
    """The gguf architecture and layer count a GGUF model file records."""
    import gguf

    try:
        fields = gguf.GGUFReader(base).fields
        name = bytes(fields["general.architecture"].parts[-1]).decode()
        layers = int(fields[f"{name}.block_count"].parts[-1][0])
    except (OSError, KeyError, ValueError) as e:
        raise FedptError(f"{base} is not a GGUF model file with an architecture and a layer count ({e})") from None
    known = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if name not in SUPPORTED:
        raise FedptError(f"converting LoRA adapters for llama.cpp supports {', '.join(SUPPORTED)} models, not "
                         f"'{name}'")
    return known[name], layers


def _alpha(config: dict, folder: Path) -> float:
    """The alpha that gives llama.cpp's scale alpha / r the scale peft applied."""
    for key, what in (("use_dora", "DoRA"), ("modules_to_save", "modules saved in full")):
        if config.get(key):
            raise FedptError(f"{folder}: llama.cpp's LoRA adapters cannot hold {what} ({key} in adapter_config.json)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise FedptError(f"{folder}: per-module ranks or alphas (rank_pattern, alpha_pattern) cannot be converted")
    alpha, r = float(config["lora_alpha"]), int(config["r"])
    return alpha * math.sqrt(r) if config.get("use_rslora") else alpha  # rsLoRA scales by alpha / sqrt(r)


def _lora_pairs(tensors: dict[str, np.ndarray], folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Base weight name ("model.layers.0.self_attn.q_proj.weight") -> (lora_A, lora_B)."""
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            if key.endswith(f".{part}.weight"):
                base = key.removeprefix("base_model.model.").replace(f".{part}.weight", ".weight")
                found.setdefault(base, {})[part] = value
                break
        else:
            raise FedptError(f"{folder}: '{key}' is not a LoRA A or B matrix; llama.cpp adapters hold only those")
    if not found or any(len(pair) != 2 for pair in found.values()):
        raise FedptError(f"{folder}: every adapted weight needs both lora_A and lora_B")
    return {base: (pair["lora_A"], pair["lora_B"]) for base, pair in found.items()}
