"""Decoding any LanguageModel: greedy, temperature and top-p sampling, stop tokens and stop strings."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedpt.data import encode_prompt, pad_id
from fedpt.errors import FedptError
from fedpt.models import LanguageModel, pad_left
from fedpt.runtime import task


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = field(default_factory=tuple)
    chat: bool = True  # wrap each prompt in the tokenizer's chat template, if it has one
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise FedptError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < float("inf"):
            raise FedptError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FedptError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise FedptError(f"batch_size must be at least 1, got {self.batch_size}")


def choose(logprobs: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """Pick one token per row: argmax when temperature is 0, else sample from the top-p nucleus.

    The draw is by inverse CDF from one uniform number per row, taken from `generator` (a CPU generator), so the
    (rows x vocabulary) tensors stay on whatever device the model left them and a seed draws the same way there."""
    if temperature == 0:
        return logprobs.argmax(-1)
    probs = torch.softmax(logprobs.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # drop a token once the tokens ranked above it already hold top_p of the mass
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(len(probs), 1, generator=generator).to(cdf.device) * cdf[:, -1:]  # uniform over the kept mass
    # the first token whose cumulative mass passes u: never a dropped (zero-probability) token
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def generate(
    lm: LanguageModel, prompts: Sequence[str], config: GenerationConfig | None = None, progress: Any = None
) -> list[str]:
    """Continue each prompt, a batch at a time; `progress` (a rich Progress) shows the prompts done."""
    return list(generate_each(lm, prompts, config, progress))


def generate_each(
    lm: LanguageModel, prompts: Sequence[str], config: GenerationConfig | None = None, progress: Any = None
) -> Iterator[str]:
    """`generate`, yielding each completion, in order, as soon as its batch is done (nothing is lost if a later
    batch fails)."""
    config = config or GenerationConfig()
    generator = torch.Generator().manual_seed(config.seed)
    with task(progress, f"generating with {lm.name}", len(prompts)) as advance:
        for start in range(0, len(prompts), config.batch_size):
            chunk = [encode_prompt(lm.tokenizer, p, config.chat) for p in prompts[start : start + config.batch_size]]
            empty = next((start + i for i, ids in enumerate(chunk) if not ids), None)
            if empty is not None:
                raise FedptError(f"prompt {empty + 1} is empty: nothing to continue")
            for tokens in generate_tokens(lm, chunk, config, generator):
                yield truncate_at_stop(lm.tokenizer.decode(tokens, skip_special_tokens=True), config.stop)
            advance(len(chunk))


def generate_tokens(
    lm: LanguageModel,
    prompts: list[list[int]],
    config: GenerationConfig,
    generator: torch.Generator,
) -> list[list[int]]:
    """The new token ids of each prompt, in one left-padded batch, without the stop token itself."""
    tokenizer = lm.tokenizer
    ids, mask = pad_left(prompts, pad_id(tokenizer))
    logprobs, state = lm.start(ids, mask)
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(config.max_new_tokens):
        tokens = choose(logprobs, config.temperature, config.top_p, generator)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if token in lm.eos_token_ids:
                done[row] = True
                continue
            new[row].append(token)
            if config.stop and any(s in tokenizer.decode(new[row][-32:]) for s in config.stop):
                done[row] = True
        if all(done) or step == config.max_new_tokens - 1:
            break
        logprobs = lm.step(state, tokens)
    return new


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
