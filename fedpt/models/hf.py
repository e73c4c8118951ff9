"""The transformers backend: a local Hugging Face causal LM (optionally a peft model) as a LanguageModel."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedpt.config import DEVICES, valid_device
from fedpt.errors import FedptError, first_line
from fedpt.models.interface import LanguageModel, end_tokens, positions
from fedpt.runtime import cpu_info

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "auto": None}


def torch_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """The weights' number format; "auto" is bfloat16 where the hardware computes it natively (a recent GPU, a
    CPU with AVX512-BF16 or AMX) and float32 elsewhere: emulated bfloat16 trained 38x slower than float32 on a
    2-core AVX2 machine (200 s against 5.3 s per LoRA step of the 0.5B)."""
    if name not in DTYPES:
        raise FedptError(f"unknown dtype '{name}'; choose one of: {', '.join(DTYPES)}")
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if native_bf16(device) else torch.float32


def pick_device(name: str = "auto") -> str:
    """The torch device a config's `device` names: "auto" is the first CUDA GPU torch sees (in a simulation, the one
    Flower gave this client), else the CPU; a device that is not there is an error, not a silent CPU run."""
    if not valid_device(name):
        raise FedptError(f"unknown device '{name}'; choose {DEVICES}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise FedptError(f"device '{name}' asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s); "
                             "use device 'auto' or 'cpu'")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise FedptError("device 'mps' asked for, but torch sees no Apple GPU; use device 'auto' or 'cpu'")
    return name


def native_bf16(device: str = "cpu") -> bool:
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if str(device) != "cpu":
        return False
    flags = set(cpu_info().get("flags", "").split())  # none known (not Linux): float32 is never slow
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@dataclass
class HFState:
    cache: Any
    attention_mask: Tensor
    next_position: Tensor  # (B, 1)


class HFCausalLM(LanguageModel):
    """A transformers `AutoModelForCausalLM` (optionally a peft model) behind the LanguageModel interface."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str = "model"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        out_rows = model.get_output_embeddings().out_features
        # Qwen-style models pad the output head past the tokenizer: those rows are never real tokens.
        self.vocab_size = min(out_rows, len(tokenizer))
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_token_ids = end_tokens(tokenizer, *eos)
        self.max_context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        head = model.get_output_embeddings()
        if not getattr(head, "_fedpt_strides", False):
            head.register_forward_pre_hook(_standard_strides)
            head._fedpt_strides = True

    @classmethod
    def load(cls, name_or_path: str | Path, *, dtype: str = "auto", device: str = "cpu",
             device_map: str = "") -> HFCausalLM:
        model, tokenizer, _ = load_model(name_or_path, dtype=dtype, device=device, device_map=device_map)
        return cls(model, tokenizer, name=str(name_or_path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def _forward(self, ids: Tensor, mask: Tensor, pos: Tensor, cache: Any, keep: int) -> Tensor:
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=pos.to(self.device),
            cache=cache,
            use_cache=cache is not None,
            logits_to_keep=keep,
        )
        logprobs = out.logits[..., : self.vocab_size].float()
        del out
        logprobs -= logprobs.logsumexp(dim=-1, keepdim=True)  # log_softmax, in place: these tensors are big
        return logprobs  # on the model's device: decoding and fusion stay there, only chosen tokens go to the host

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, HFState]:
        from transformers import DynamicCache

        pos = positions(attention_mask)
        cache = DynamicCache(config=self.model.config)
        lp = self._forward(input_ids, attention_mask, pos, cache, keep=1)[:, -1]
        return lp, HFState(cache, attention_mask, pos[:, -1:] + 1)

    def step(self, state: HFState, tokens: Tensor) -> Tensor:
        tokens = tokens.to(state.attention_mask.device)  # B token ids; the mask stays on the host
        state.attention_mask = torch.cat([state.attention_mask, torch.ones_like(tokens)[:, None]], dim=1)
        lp = self._forward(tokens[:, None], state.attention_mask, state.next_position, state.cache, keep=1)
        state.next_position = state.next_position + 1
        return lp[:, -1]

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> Tensor:
        return self._forward(input_ids, attention_mask, positions(attention_mask), None, keep=last)

    def select(self, state: HFState, rows: Sequence[int]) -> HFState:
        index = torch.tensor(list(rows), dtype=torch.long)
        mask = state.attention_mask[index]
        first = int(mask.any(0).long().argmax())  # columns left of it were padding of rows that left
        on_device = index.to(self.device)
        _edit_cache(state.cache, lambda kv: kv[on_device, :, first:])  # kv: (B, heads, T, head_dim)
        return HFState(state.cache, mask[:, first:], state.next_position[index])

    def join(self, state: HFState, other: HFState) -> HFState:
        width = max(state.attention_mask.shape[1], other.attention_mask.shape[1])
        for mine, theirs in zip(_layers(state.cache), _layers(other.cache)):
            # left-pad the shorter cache with masked-out zeros, then stack the rows: (B1 + B2, heads, width, head_dim)
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        mask = torch.cat([_pad_left(state.attention_mask, width, 1), _pad_left(other.attention_mask, width, 1)])
        return HFState(state.cache, mask, torch.cat([state.next_position, other.next_position]))


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(getattr(layer, "is_sliding", False) or not hasattr(layer, "keys") for layer in layers):
        raise FedptError("this model's cache cannot change rows mid-batch (only full-attention caches can)")
    return layers


def _edit_cache(cache: Any, edit: Callable[[Tensor], Tensor]) -> None:
    for layer in _layers(cache):
        layer.keys, layer.values = edit(layer.keys), edit(layer.values)


def _pad_left(t: Tensor, width: int, dim: int) -> Tensor:
    """`t` with zeros prepended along `dim` up to `width`."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _standard_strides(module: torch.nn.Module, args: tuple) -> tuple:
    # `logits_to_keep` hands the head a (B, k, H) slice whose batch stride still spans the full sequence. With
    # frozen weights, torch's matmul then refuses to fold it into one 2-D matmul and copies the whole
    # (H, vocab) weight into a batched matmul instead: 0.6 s per prefill on the 0.5B. A fresh copy of the
    # slice (k rows) avoids that.
    return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])


def load_tokenizer(name_or_path: str | Path) -> Any:
    """The tokenizer of a registered model name or a local folder."""
    from transformers import AutoTokenizer

    from fedpt.models import store

    folder = store.resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # tokenizers and transformers raise their own types
        raise FedptError(f"cannot load the tokenizer of {folder}: {first_line(e)}") from None


def load_model(
    name_or_path: str | Path, *, dtype: str = "auto", device: str = "cpu", device_map: str = "",
    trust_remote_code: bool = False, **loading: Any
) -> tuple[torch.nn.Module, Any, Path]:
    """Load a registered model name or a local folder as (model, tokenizer, folder), with one-line errors.

    `device_map="auto"` spreads the layers over every GPU (accelerate) for a model that one GPU cannot hold;
    `loading` goes to from_pretrained (e.g. a quantization_config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedpt.models import store

    device = pick_device(device)
    torch_type = torch_dtype(dtype, device)
    folder = store.resolve(name_or_path)
    placement = {"device_map": device_map} if device_map else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_type, trust_remote_code=trust_remote_code, **placement, **loading
        )
        if not placement and not loading.get("quantization_config"):  # those place the weights themselves
            model = model.to(device)
    except Exception as e:  # safetensors, tokenizers and transformers each raise their own types
        raise FedptError(f"cannot load model folder {folder}: {first_line(e)}") from None
    return model.eval(), tokenizer, folder
