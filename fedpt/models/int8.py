"""Int8 weights for frozen layers: one int8 per weight and one scale per output row.

Decoding on CPU is bound by reading weights, so halving their bytes makes a model about 1.6x faster, at slightly
different numbers (benchmarks/decode.py measures both). A LoRA client also trains through them
(tuning.quantize = "int8"): its frozen weights take 1 byte each instead of 4 (float32) or 2 (bfloat16); only
LoRA's own weights stay float.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fedpt.errors import FedptError, first_line


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 weights, bfloat16 scale per row): the largest magnitude of each row maps to 127."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale.to(torch.bfloat16)


def dequantize(qweight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return qweight.to(dtype) * scale.to(dtype)[:, None]  # (out, in)


class DequantizedMatmul(torch.autograd.Function):
    """x W^T with W rebuilt from its int8 form at each use, a slice of rows at a time, and never kept: the backward
    pass holds the int8 weights only, and the float copy in flight is at most ROWS rows (a 150k-token output head
    in float32 would be 0.5 GB). On a 2-core AVX2 CPU a float32 matmul after dequantising is as fast as a float32
    one, and twice as fast as torch's int8 x bf16 kernel, on training batches."""

    ROWS = 16384

    @staticmethod
    def forward(ctx: Any, x: Tensor, qweight: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(qweight, scale)
        rows = DequantizedMatmul.ROWS
        parts = [x @ dequantize(qweight[r : r + rows], scale[r : r + rows], x.dtype).T
                 for r in range(0, len(qweight), rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        qweight, scale = ctx.saved_tensors
        rows = DequantizedMatmul.ROWS
        grad_x = None
        for r in range(0, len(qweight), rows):  # dL/dx = sum over row slices of dL/dy[:, slice] W[slice]
            part = grad[..., r : r + rows] @ dequantize(qweight[r : r + rows], scale[r : r + rows], grad.dtype)
            grad_x = part if grad_x is None else grad_x + part
        return grad_x, None, None


class Int8Linear(torch.nn.Module):
    """A frozen linear layer with int8 weights. Evaluated on CPU it runs torch's int8 x bf16 kernel (decoding);
    in training, or on a GPU, it dequantises one layer at a time (DequantizedMatmul)."""

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = bias
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Int8Linear:
        return cls(*quantize_rows(linear.weight), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or x.device.type != "cpu":
            y = DequantizedMatmul.apply(x, self.qweight, self.scale)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class Int8Embedding(torch.nn.Module):
    """A frozen embedding with int8 rows, one scale per row."""

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        qweight, scale = quantize_rows(embedding.weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.dtype = embedding.weight.dtype
        self.num_embeddings, self.embedding_dim = qweight.shape

    def forward(self, ids: Tensor) -> Tensor:
        rows = torch.nn.functional.embedding(ids, self.qweight).to(self.dtype)  # (..., dim)
        return rows * self.scale[ids].to(self.dtype)[..., None]


def quantize_int8(model: torch.nn.Module, embeddings: bool = False) -> int:
    """Swap every frozen nn.Linear (not LoRA's own layers) for an Int8Linear, and with `embeddings` the input
    embedding too (a tied output head then shares its int8 rows); return how many modules were swapped."""
    swapped = 0
    if embeddings:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
        tied = head.weight is base.get_input_embeddings().weight
        embedding = Int8Embedding(base.get_input_embeddings())
        base.set_input_embeddings(embedding)
        swapped += 1
        if tied:  # one int8 copy for both, not two
            base.set_output_embeddings(Int8Linear(embedding.qweight, embedding.scale, head.bias))
            swapped += 1
    for name, parent in list(model.named_modules()):
        if "lora_" in name:
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and not child_name.startswith("lora_"):
                setattr(parent, child_name, Int8Linear.from_linear(child))
                swapped += 1
    try:
        probe = Int8Linear.from_linear(torch.nn.Linear(64, 8)).to(next(model.parameters()).device).eval()
        probe(torch.zeros(1, 64, device=probe.qweight.device))
    except (RuntimeError, NotImplementedError) as e:
        raise FedptError(f"int8 weights are not supported here ({first_line(e)}); drop the int8 option") from None
    return swapped
