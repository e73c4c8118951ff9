"""Distilling the proxy-tuned large model back into the small model, on unlabeled server-side text.

The server has the large model (as a black box: next-token log-probs only) and the global small model. It
lets the proxy answer the unlabeled prompts, keeps the proxy's top-k next-token distribution at every
answer token, and trains the small model's adapter to match them (cross-entropy to the teacher's renormalised
top-k, i.e. KL up to the teacher's entropy). Federated tuning then continues from the distilled model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpt.costs import Stopwatch
from fedpt.data import Example, encode_example
from fedpt.decoding import GenerationConfig, generate
from fedpt.errors import FedptError
from fedpt.evaluate import answer_batches
from fedpt.fusion import Fusion
from fedpt.lm import LanguageModel


@dataclass
class DistillConfig:
    every: int = 0  # distil after every this many rounds; 0 turns distillation off
    texts: str = "prompts"  # "prompts": the training prompts without answers; "wikipedia": gensim's test dump
    n_texts: int = 48
    max_new_tokens: int = 32  # length of the teacher's answers
    top_k: int = 64
    steps: int = 12
    batch_size: int = 4
    learning_rate: float = 5e-4
    alpha: float = 1.0  # the teacher: the proxy with this alpha,
    weight: float = 0.0  # mixed with the tuned small model by this share (fedpt/fusion.py)

    def __post_init__(self) -> None:
        if self.every < 0 or self.n_texts < 1 or self.top_k < 1 or self.steps < 1:
            raise FedptError("distill.every must be >= 0; n_texts, top_k and steps >= 1")
        if self.texts not in ("prompts", "wikipedia"):
            raise FedptError(f"distill.texts must be 'prompts' or 'wikipedia', got '{self.texts}'")


def wikipedia_prompts(n: int, seed: int, words: int = 40) -> list[str]:
    """Passages of the short Wikipedia dump shipped in gensim's test data, as 'continue this text' prompts."""
    import bz2
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FedptError("distill.texts = 'wikipedia' needs gensim: pip install gensim==4.4.0")
    name = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    dump = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / name
    if not dump.is_file():
        raise FedptError(f"gensim's Wikipedia test dump is missing: {dump}")
    text = bz2.open(dump, "rt", encoding="utf-8", errors="ignore").read()
    paragraphs = [re.sub(r"\[\[|\]\]|\{\{[^}]*\}\}|'''?|<[^>]+>", "", p).strip() for p in text.split("\n\n")]
    paragraphs = [" ".join(p.split()[:words]) for p in paragraphs if len(p.split()) >= words and "|" not in p]
    random.Random(seed).shuffle(paragraphs)
    return [f"Continue this text: {p}" for p in paragraphs[:n]]


def teacher_targets(teacher: LanguageModel, prompts: Sequence[str], config: DistillConfig, max_length: int,
                    progress: Any = None) -> list[tuple[Example, torch.Tensor, torch.Tensor]]:
    """The teacher's answers, and its top-k log-probs and token ids at every answer token."""
    answers = generate(teacher, prompts, GenerationConfig(max_new_tokens=config.max_new_tokens), progress=progress)
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
    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    losses = []
    student.train()
    with Stopwatch() as clock:
        for _ in range(config.steps):
            batch = rng.sample(targets, min(config.batch_size, len(targets)))
            loss = torch.stack([_example_loss(base, tokenizer, item, max_length) for item in batch]).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    student.eval()
    return {"distill_loss_first": losses[0], "distill_loss_last": float(np.mean(losses[-3:])),
            "distill_seconds": clock.seconds, "distill_texts": len(targets)}


def _example_loss(base: torch.nn.Module, tokenizer: Any, item: tuple, max_length: int) -> torch.Tensor:
    example, values, indices = item
    ids, labels = encode_example(tokenizer, example, max_length)
    ids_t = torch.tensor([ids])
    hidden = base.get_decoder()(input_ids=ids_t).last_hidden_state[0, :-1]
    answer = torch.tensor(labels[1:]) != -100
    n = min(int(answer.sum()), len(values))  # re-tokenised answers can differ in length by a token
    logits = base.get_output_embeddings()(hidden[answer][:n]).float()
    student = torch.log_softmax(logits, -1).gather(-1, indices[:n])
    teacher = torch.softmax(values[:n], -1)  # the teacher's top-k, renormalised
    return -(teacher * student).sum(-1).mean()


def make_distiller(config: Any) -> Callable[[int, Any, Any], dict | None] | None:
    """The server's after-round step for `config.distill` (a RunConfig), or None when distillation is off."""
    settings = config.distill
    if not settings.every:
        return None
    if config.tuning.mode != "lora":
        raise FedptError("distillation into the small model needs tuning.mode = 'lora'")
    from fedpt.data import load_examples, splits
    from fedpt.lm import HFCausalLM
    from fedpt.proxy import AdapterPair, ProxyTunedLM

    if settings.texts == "wikipedia":
        prompts = wikipedia_prompts(settings.n_texts, config.seed)
    else:  # the training prompts, without their answers
        train = splits(load_examples(config.data), config.data)["train"]
        unique = sorted({e.prompt for e in train})
        prompts = random.Random(config.seed).sample(unique, min(settings.n_texts, len(unique)))
    large = HFCausalLM.load(config.model.large, dtype=config.tuning.dtype)
    teachers: dict[int, ProxyTunedLM] = {}

    def after_round(server_round: int, model: Any, tokenizer: Any) -> dict | None:
        if server_round % settings.every:
            return None
        if id(model) not in teachers:  # one pair per model: its hooks stay on the model
            fusion = Fusion(alpha=settings.alpha, weight=settings.weight)
            teachers[id(model)] = ProxyTunedLM(large, AdapterPair(model, tokenizer), fusion=fusion)
        targets = teacher_targets(teachers[id(model)], prompts, settings, config.tuning.max_length * 2)
        return distill(model, tokenizer, targets, settings, config.tuning.max_length * 2,
                       seed=config.seed * 1000 + server_round)

    return after_round
