"""Local fine-tuning of a causal LM on prompt/response pairs: LoRA or full, with an optional FedProx term.

This is the work one device does in a round. It knows nothing of federation: it takes a model and data,
trains for some steps, and reports what it cost. `trainable_state` is the part of the model that travels.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedpt.config import TuneConfig
from fedpt.data import Example, encode_example, pad_id
from fedpt.errors import FedptError
from fedpt.runtime import task
from fedpt.tuning.costs import PeakMemory, Stopwatch, training_flops


def make_trainable(model: torch.nn.Module, config: TuneConfig, seed: int = 0) -> torch.nn.Module:
    """Wrap with a fresh LoRA adapter (trainable weights in float32, initialised from `seed`), or unfreeze
    every weight for full tuning."""
    if config.mode == "full":
        model = model.float()
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in config.target_modules if t not in names]
    if missing:
        raise FedptError(f"LoRA target modules {missing} are not in the model (it has e.g. {sorted(names)[:12]})")
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    return get_peft_model(model, lora)


def load_trainable(small: str, config: TuneConfig, device: str = "auto", seed: int = 0) -> tuple[Any, Any]:
    """(model ready to train, tokenizer) for a client: the small model on `device` with a fresh adapter, its frozen
    weights in int8 or in 4-bit NF4 (QLoRA) when `config.quantize` asks."""
    from fedpt.models import load_model
    from fedpt.models.hf import pick_device

    device = pick_device(device)
    if config.quantize != "nf4":
        model, tokenizer, _ = load_model(small, dtype=config.dtype, device=device)
        model = make_trainable(model, config, seed)
        if config.quantize == "int8":
            from fedpt.models.int8 import quantize_int8

            quantize_int8(model, embeddings=True)
        return model, tokenizer
    if not device.startswith("cuda"):
        raise FedptError(f"tuning.quantize = 'nf4' (QLoRA) runs on a CUDA GPU, and the device here is '{device}'; "
                         "use tuning.quantize = 'int8' on a CPU")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise FedptError("tuning.quantize = 'nf4' needs bitsandbytes: pip install 'fedpt[gpu]'") from None
    from peft import prepare_model_for_kbit_training

    from fedpt.models.hf import torch_dtype

    compute = torch_dtype(config.dtype, device)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute)  # QLoRA's recipe (Dettmers et al. 2023)
    model, tokenizer, _ = load_model(small, dtype=config.dtype, device=device, quantization_config=nf4,
                                     device_map=device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return make_trainable(model, config, seed), tokenizer


def trainable_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The weights a client trains and sends, by name, as float32 arrays."""
    return {n: p.detach().float().cpu().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}


def set_trainable_state(model: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise FedptError(
            f"weights do not match the model: {len(set(state) - set(params))} unknown, "
            f"{len(set(params) - set(state))} missing"
        )
    with torch.no_grad():
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise FedptError(f"weight {name} has shape {state[name].shape}, the model expects {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.asarray(state[name])).to(p.dtype))


def batches(
    tokenizer: Any, examples: Sequence[Example], config: TuneConfig, rng: random.Random
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Endless shuffled passes over the examples, as right-padded (input_ids, attention_mask, labels)."""
    if not examples:
        raise FedptError("no training examples")
    encoded = [encode_example(tokenizer, e, config.max_length, config.chat) for e in examples]
    pad = pad_id(tokenizer)
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            rows = [encoded[i] for i in order[start : start + config.batch_size]]
            width = max(len(ids) for ids, _ in rows)
            # oneDNN caches kernels per input shape: every new width held on to more memory, round after round
            width = -(-width // config.pad_multiple) * config.pad_multiple
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            for r, (row_ids, row_labels) in enumerate(rows):
                ids[r, : len(row_ids)] = torch.tensor(row_ids)
                mask[r, : len(row_ids)] = 1
                labels[r, : len(row_labels)] = torch.tensor(row_labels)
            yield ids, mask, labels


def answer_logits(model: torch.nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Float logits at the positions that predict an answer token (N, V), and those tokens (N,).

    Prompts (with the chat template's system turn) are most of each sequence, and the (positions x vocabulary)
    logits are the biggest tensors of a training step on a 150k vocabulary: applying the output head to the
    answer positions only cuts a client's peak memory and time, and changes no result.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    scored = labels[:, 1:] != -100  # position t predicts token t + 1
    return base.get_output_embeddings()(hidden[:, :-1][scored]).float(), labels[:, 1:][scored]


def answer_loss(model: torch.nn.Module, ids: Tensor, mask: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the answer tokens, their mean or sum (the full forward's loss, at a fraction of its memory)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "final_logit_softcapping", None):  # the head is not a plain linear layer there
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        return loss * int((labels[:, 1:] != -100).sum()) if reduction == "sum" else loss
    return torch.nn.functional.cross_entropy(*answer_logits(model, ids, mask, labels), reduction=reduction)


def batch_loss(model: torch.nn.Module, ids: Tensor, mask: Tensor, labels: Tensor, micro_batch_size: int) -> float:
    """Backpropagate the batch's mean answer-token loss, `micro_batch_size` rows at a time (0: all at once), and
    return it: each part's summed loss over the whole batch's answer-token count, so the gradients add up to the
    whole batch's while only one part's activations are alive."""
    size, count = micro_batch_size or len(ids), int((labels[:, 1:] != -100).sum())
    total = 0.0
    for start in range(0, len(ids), size):
        rows = slice(start, start + size)
        part = answer_loss(model, ids[rows], mask[rows], labels[rows], reduction="sum") / count
        part.backward()
        total += part.item()
    return total


def steps_for(config: TuneConfig, n_examples: int) -> int:
    if config.local_epochs > 0:
        return max(1, math.ceil(config.local_epochs * n_examples / config.batch_size))
    return config.local_steps


def train(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    config: TuneConfig,
    seed: int,
    progress: Any = None,
) -> dict[str, float]:
    """Train in place, on the device of the trained weights; return the mean loss, examples seen, wall seconds,
    seconds per step, peak memory (resident, and on a GPU the most torch allocated there), FLOPs."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise FedptError("the model has no trainable weights; call make_trainable first")
    # FedProx pulls the weights towards where this round started
    anchor = [p.detach().clone() for p in params] if config.proximal_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    n_steps = steps_for(config, len(examples))
    n_params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    n_trainable = sum(p.numel() for p in params)
    device = params[0].device
    model.train()
    losses, tokens, seen = [], 0, 0
    stream = batches(tokenizer, examples, config, rng)
    with PeakMemory(device) as memory, Stopwatch() as clock, task(progress, "local steps", n_steps) as advance:
        for _ in range(n_steps):
            ids, mask, labels = (t.to(device) for t in next(stream))
            loss = batch_loss(model, ids, mask, labels, config.micro_batch_size)
            if not math.isfinite(loss):
                raise FedptError(f"training loss became {loss}; lower the learning rate")
            losses.append(loss)
            if anchor is not None:
                (config.proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
            seen += len(ids)
            advance(1)
    model.eval()
    return {
        "train_loss": float(np.mean(losses)),
        "examples": len(examples),
        "examples_seen": seen,
        "steps": n_steps,
        "seconds": clock.seconds,
        "seconds_per_step": clock.seconds / n_steps,
        "peak_memory_bytes": memory.peak,
        **({"peak_gpu_memory_bytes": memory.gpu_peak} if memory.gpu_peak is not None else {}),
        "flops": training_flops(n_params, n_trainable, tokens),
    }
