"""Scoring any LanguageModel on held-out pairs: teacher-forced NLL of the reference answers, and text metrics."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedpt.data import Example, encode_example
from fedpt.lm import LanguageModel, pad_left


def response_logprobs(
    lm: LanguageModel,
    examples: Sequence[Example],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    chat: bool = True,
    progress: Any = None,
) -> list[Tensor]:
    """Log-probability of every reference-answer token (end-of-turn included), one tensor per example."""
    encoded = [encode_example(lm.tokenizer, e, max_length, chat) for e in examples]
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths, less padding
    out: list[Tensor] = [torch.empty(0)] * len(encoded)
    task = progress.add_task(f"scoring {lm.name}", total=len(encoded)) if progress is not None else None
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = pad_left([encoded[i][0] for i in rows], pad)
        answer = [sum(label != -100 for label in encoded[i][1]) for i in rows]
        longest = max(answer)
        # left padding puts every answer at the end of its row; its j-th token is predicted one column earlier
        logprobs = lm.logprobs(ids, mask, last=longest + 1)[:, :-1]
        targets = ids[:, -longest:]
        picked = logprobs.gather(-1, targets[..., None]).squeeze(-1)
        for r, i in enumerate(rows):
            out[i] = picked[r, longest - answer[r]:].clone()
        if task is not None:
            progress.advance(task, len(rows))
    if task is not None:
        progress.remove_task(task)
    return out


def nll(lm: LanguageModel, examples: Sequence[Example], **kwargs: Any) -> dict[str, float]:
    """Mean negative log-likelihood per reference token, its perplexity, and the token count."""
    scores = response_logprobs(lm, examples, **kwargs)
    tokens = sum(len(s) for s in scores)
    mean = -float(sum(s.sum() for s in scores)) / max(tokens, 1)
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": tokens}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words), as rouge-score computes it, with stemming."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the words of both texts are the same, ignoring case and punctuation."""
    return float(_words(prediction) == _words(reference))


def gap_closed(proxy: float, large_base: float, large_tuned: float) -> float:
    """Share of the large base -> large tuned improvement that the proxy achieves: (m4 - m3) / (m5 - m3)."""
    gap = large_tuned - large_base
    return float("nan") if gap == 0 else (proxy - large_base) / gap
