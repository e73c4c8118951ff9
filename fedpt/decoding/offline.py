"""Offline generation: many prompts through the engine that `fedpt serve` runs, in the caller's thread.

Continuous batching pays here too: a row leaves the batch when its answer is done and the next prompt takes
its place, so short answers never wait for the longest of a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fedpt.data import encode_prompt
from fedpt.decoding.engine import Engine, Report, Request
from fedpt.decoding.sampling import Sampling
from fedpt.errors import FedptError
from fedpt.models import LanguageModel
from fedpt.runtime import task


def generate(lm: LanguageModel, prompts: Sequence[str], sampling: Sampling | None = None, *, chat: bool = True,
             max_batch: int = 8, progress: Any = None) -> list[str]:
    """Continue each prompt (wrapped in the tokenizer's chat template when `chat` and it has one);
    `progress` (a rich Progress) shows the prompts done."""
    return list(generate_each(lm, prompts, sampling, chat=chat, max_batch=max_batch, progress=progress))


def generate_each(lm: LanguageModel, prompts: Sequence[str], sampling: Sampling | None = None, *, chat: bool = True,
                  max_batch: int = 8, progress: Any = None) -> Iterator[str]:
    """`generate`, yielding each completion in the prompts' order as soon as it and those before it are done
    (nothing is lost if a later prompt fails). Progress moves per token: each prompt counts for its token
    budget, the part it did not use added when it ends."""
    encoded = []
    for number, prompt in enumerate(prompts, start=1):
        encoded.append(encode_prompt(lm.tokenizer, prompt, chat))
        if not encoded[-1]:
            raise FedptError(f"prompt {number} is empty: nothing to continue")
    sampling = sampling or Sampling()
    with task(progress, f"generating with {lm.name}", len(prompts) * sampling.max_tokens) as advance:
        for result in _decode(lm, encoded, sampling, max_batch, advance):
            yield result.text


def generate_tokens(lm: LanguageModel, prompts: Sequence[list[int]], sampling: Sampling | None = None, *,
                    max_batch: int = 8) -> list[list[int]]:
    """The new token ids of each prompt, without the end token that stopped it."""
    return [result.tokens for result in _decode(lm, prompts, sampling or Sampling(), max_batch)]


class _Result:
    """One request's reports gathered: its text (stop strings cut off) and its generated token ids."""

    def __init__(self, budget: int, advance: Callable[[float], None]) -> None:
        self.text, self.tokens, self.finish_reason, self.error = "", [], None, None
        self.budget, self.advance = budget, advance  # tokens this request may still take, for progress

    def report(self, report: Report) -> None:
        self.text += report.text
        self.finish_reason, self.error = report.finish_reason or self.finish_reason, report.error
        used = self.budget if report.finish_reason else min(report.new_tokens, self.budget)
        self.budget -= used
        self.advance(used)


def _decode(lm: LanguageModel, prompts: Sequence[list[int]], sampling: Sampling, max_batch: int,
            advance: Callable[[float], None] = lambda n: None) -> Iterator[_Result]:
    if sampling.max_tokens < 1:
        raise FedptError(f"max_tokens must be at least 1 to generate, got {sampling.max_tokens}")
    engine = Engine(lm, max_batch=max_batch, max_queue=0)
    results = [_Result(sampling.max_tokens, advance) for _ in prompts]
    requests = [Request(list(prompt), sampling, result.report) for prompt, result in zip(prompts, results)]
    for request in requests:
        engine.submit(request)
    done = 0
    while done < len(results):
        if not any(engine.load.values()):
            raise FedptError(f"prompt {done + 1} was dropped by the engine unanswered")  # a bug, never a hang
        engine.run_step()
        while done < len(results) and results[done].finish_reason is not None:  # in order, as soon as ready
            if results[done].finish_reason == "error":
                raise FedptError(f"prompt {done + 1} failed: {results[done].error}")
            results[done].tokens = requests[done].generated
            yield results[done]
            done += 1
