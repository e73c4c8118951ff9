"""Distilling the proxy-tuned large model back into the small model, on unlabeled server-side text.

The server has the large model (as a black box: next-token log-probs only) and the global small model. It
lets the proxy answer the unlabeled prompts, keeps the proxy's top-k next-token distribution at every
answer token, and trains the small model's trainable weights to match them (cross-entropy to the teacher's
renormalised top-k, i.e. KL up to the teacher's entropy). Federated tuning then continues from the distilled
model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedpt.config import DistillConfig, RunConfig
from fedpt.data import Example, encode_example, training_prompts, wikipedia_prompts
from fedpt.decoding import Sampling, generate
from fedpt.models import HFCausalLM, LanguageModel
from fedpt.proxy import AdapterPair, ExpertPair, Fusion, ProxyTunedLM, SeparatePair
from fedpt.proxy.spec import ModelSpec
from fedpt.scoring import answer_batches
from fedpt.tuning.costs import Stopwatch
from fedpt.tuning.local import answer_logits, trainable_state

AfterRound = Callable[[int, Any, Any], dict | None]  # (round, model, tokenizer) -> stats if it changed the model


def teacher_targets(teacher: LanguageModel, prompts: Sequence[str], config: DistillConfig, max_length: int,
                    progress: Any = None) -> list[tuple[Example, torch.Tensor, torch.Tensor]]:
    """The teacher's answers, and its top-k log-probs and token ids at every answer token."""
    answers = generate(teacher, prompts, Sampling(max_tokens=config.max_new_tokens), progress=progress)
    examples = [Example(p, a) for p, a in zip(prompts, answers) if a.strip()]
    targets: list = [None] * len(examples)
    for rows, ids, mask, lengths in answer_batches(teacher.tokenizer, examples, 4, max_length, True, progress,
                                                    "teacher distributions"):
        logprobs = teacher.logprobs(ids, mask, last=max(lengths) + 1)[:, :-1]
        top = logprobs.topk(config.top_k, dim=-1)
        for r, i in enumerate(rows):
            keep = slice(logprobs.shape[1] - lengths[r], None)
            targets[i] = (examples[i], top.values[r, keep].clone(), top.indices[r, keep].clone())
    return targets


def distill(student: torch.nn.Module, tokenizer: Any, targets: list, config: DistillConfig, max_length: int,
            seed: int) -> dict[str, float]:
    """Train the student's trainable weights towards the teacher's top-k distributions."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    rng = random.Random(seed)
    before = trainable_state(student)
    losses = []
    student.train()
    with Stopwatch() as clock:
        for _ in range(config.steps):
            batch = rng.sample(targets, min(config.batch_size, len(targets)))
            loss = torch.stack([_example_loss(student, tokenizer, item, max_length) for item in batch]).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    student.eval()
    after = trainable_state(student)
    moved = float(np.sqrt(sum(((after[k] - before[k]).astype(np.float64) ** 2).sum() for k in after)))
    return {"distill_loss_first": losses[0], "distill_loss_last": float(np.mean(losses[-3:])),
            "distill_seconds": clock.seconds, "distill_texts": len(targets), "distill_update_norm": moved}


def _example_loss(student: torch.nn.Module, tokenizer: Any, item: tuple, max_length: int) -> torch.Tensor:
    example, values, indices = item
    ids, labels = encode_example(tokenizer, example, max_length)
    device = next(p for p in student.parameters() if p.requires_grad).device
    ids_t = torch.tensor([ids], device=device)
    logits, _ = answer_logits(student, ids_t, torch.ones_like(ids_t), torch.tensor([labels], device=device))
    values, indices = values.to(device), indices.to(device)
    n = min(len(logits), len(values))  # re-tokenised answers can differ in length by a token
    log_student = torch.log_softmax(logits[:n], -1).gather(-1, indices[:n])
    teacher = torch.softmax(values[:n], -1)  # the teacher's top-k, renormalised
    return -(teacher * log_student).sum(-1).mean()


def make_distiller(config: RunConfig) -> AfterRound | None:
    """The server's after-round step for `config.distill`, or None when distillation is off."""
    settings = config.distill
    if not settings.every:
        return None
    if settings.texts == "wikipedia":
        prompts = wikipedia_prompts(settings.n_texts, config.seed)
    else:
        prompts = training_prompts(config.data, settings.n_texts, config.seed)
    large = ModelSpec.from_config(config.model, dtype=config.tuning.dtype).open_large()
    # full fine-tuning keeps no base inside the trained model: the teacher reads a frozen copy beside it
    base = (HFCausalLM.load(config.model.small, dtype=config.tuning.dtype, device=config.model.device)
            if config.tuning.mode == "full" else None)
    teachers: dict[int, ProxyTunedLM] = {}

    def after_round(server_round: int, model: Any, tokenizer: Any) -> dict | None:
        if server_round % settings.every:
            return None
        if id(model) not in teachers:  # one pair per model: an adapter pair's hooks stay on the model
            pair: ExpertPair = (AdapterPair(model, tokenizer) if base is None
                                else SeparatePair(base, HFCausalLM(model, tokenizer, name="small (tuned)")))
            fusion = Fusion(alpha=settings.alpha, weight=settings.weight)
            teachers[id(model)] = ProxyTunedLM(large, pair, fusion=fusion)
        targets = teacher_targets(teachers[id(model)], prompts, settings, config.score_max_length)
        return distill(model, tokenizer, targets, settings, config.score_max_length,
                       seed=config.seed * 1000 + server_round)

    return after_round
