"""The language-model interface, and its backend for local Hugging Face causal LMs.

fedpt asks only one thing of a model: next-token log-probabilities over the vocabulary, for a batch of
left-padded token sequences, either step by step with a cache (decoding) or at many positions in one pass
(scoring). The large model is used through this interface alone: that is the black-box contract.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedpt.errors import FedptError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


class LanguageModel(ABC):
    """Next-token log-probabilities over `vocab_size` tokens of `tokenizer`."""

    name: str
    tokenizer: Any
    vocab_size: int
    eos_token_ids: set[int]  # decoding stops a row at any of these

    @abstractmethod
    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Any]:
        """Read left-padded prompts (B, T); return log-probs of the next token (B, V) and a decoding state."""

    @abstractmethod
    def step(self, state: Any, tokens: Tensor) -> Tensor:
        """Append one token per row (B,) to `state` (updated in place); return the next log-probs (B, V)."""

    @abstractmethod
    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> Tensor:
        """Next-token log-probs after each of the last `last` positions of left-padded rows: (B, last, V)."""


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into (ids, attention_mask), so every row's next token sits at the same column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


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
        self.eos_token_ids = {i for i in [*eos, tokenizer.eos_token_id] if i is not None}
        head = model.get_output_embeddings()
        if not getattr(head, "_fedpt_strides", False):
            head.register_forward_pre_hook(_standard_strides)
            head._fedpt_strides = True

    @classmethod
    def load(cls, name_or_path: str | Path, *, dtype: str = "bfloat16", device: str = "cpu") -> HFCausalLM:
        model, tokenizer, _ = load_model(name_or_path, dtype=dtype, device=device)
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
        return logprobs.cpu()

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, HFState]:
        from transformers import DynamicCache

        pos = positions(attention_mask)
        cache = DynamicCache(config=self.model.config)
        lp = self._forward(input_ids, attention_mask, pos, cache, keep=1)[:, -1]
        return lp, HFState(cache, attention_mask, pos[:, -1:] + 1)

    def step(self, state: HFState, tokens: Tensor) -> Tensor:
        state.attention_mask = torch.cat([state.attention_mask, torch.ones_like(tokens)[:, None]], dim=1)
        lp = self._forward(tokens[:, None], state.attention_mask, state.next_position, state.cache, keep=1)
        state.next_position = state.next_position + 1
        return lp[:, -1]

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> Tensor:
        return self._forward(input_ids, attention_mask, positions(attention_mask), None, keep=last)


def _standard_strides(module: torch.nn.Module, args: tuple) -> tuple:
    # `logits_to_keep` hands the head a (B, k, H) slice whose batch stride still spans the full sequence. With
    # frozen weights, torch's matmul then refuses to fold it into one 2-D matmul and copies the whole
    # (H, vocab) weight into a batched matmul instead: 0.6 s per prefill on the 0.5B. A fresh copy of the
    # slice (k rows) avoids that.
    return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])


class Int8Linear(torch.nn.Module):
    """A frozen linear layer with int8 weights, one scale per output row, run by torch's int8 x bf16 kernel.

    Decoding on CPU is bound by reading weights, so halving their bytes makes a model about 1.6x faster.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # the largest weight of each row maps to 127
        self.register_buffer("qweight", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def quantize_int8(model: torch.nn.Module) -> int:
    """Swap every frozen nn.Linear (not LoRA's own layers) for an Int8Linear; return how many were swapped."""
    swapped = 0
    for name, parent in list(model.named_modules()):
        if "lora_" in name:
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and not child_name.startswith("lora_"):
                setattr(parent, child_name, Int8Linear(child))
                swapped += 1
    try:
        probe = Int8Linear(torch.nn.Linear(64, 8)).to(next(model.parameters()).device)
        probe(torch.zeros(1, 64, device=probe.qweight.device))
    except (RuntimeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0]
        raise FedptError(f"int8 weights are not supported here ({first}); drop the int8 option") from None
    return swapped


def load_model(
    name_or_path: str | Path, *, dtype: str = "bfloat16", device: str = "cpu", trust_remote_code: bool = False
) -> tuple[torch.nn.Module, Any, Path]:
    """Load a registered model name or a local folder as (model, tokenizer, folder), with one-line errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedpt import store

    if dtype not in DTYPES:
        raise FedptError(f"unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    folder = store.resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        ).to(device)
    except Exception as e:  # safetensors, tokenizers and transformers each raise their own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedptError(f"cannot load model folder {folder}: {first}") from None
    return model.eval(), tokenizer, folder
