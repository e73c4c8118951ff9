"""Scoring any LanguageModel on held-out pairs: teacher-forced NLL of the reference answers (for one model, or
for many fusions of a large model and a small pair at once), choice accuracy, and text metrics."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from fedpt.data import Example, encode_example, pad_id
from fedpt.models import LanguageModel, pad_left
from fedpt.proxy import ExpertPair, Fusion
from fedpt.proxy.fusion import fill_tail
from fedpt.runtime import task

ANSWER_TOKENS_PER_BATCH = 384  # rows x scored positions: each (positions x 150k vocabulary) float tensor ~ 230 MB
FUSION_POSITIONS = 128  # positions combined at once when scoring fusions


def answer_batches(tokenizer: Any, examples: Sequence[Example], batch_size: int, max_length: int, chat: bool,
                   progress: Any, label: str) -> Iterator[tuple[list[int], Tensor, Tensor, list[int]]]:
    """Left-padded batches of prompt + answer: (example indices, ids, mask, answer lengths).

    A batch holds at most `batch_size` rows and about ANSWER_TOKENS_PER_BATCH scored positions, so long
    answers come in smaller batches: memory stays bounded whatever the data.
    """
    encoded = [encode_example(tokenizer, e, max_length, chat) for e in examples]
    answers = [sum(label != -100 for label in labels) for _, labels in encoded]
    order = sorted(range(len(encoded)), key=lambda i: (answers[i], len(encoded[i][0])))  # less padding
    with task(progress, label, len(encoded)) as advance:
        start = 0
        while start < len(order):
            end = start + 1
            while (end < len(order) and end - start < batch_size
                   and (end - start + 1) * (answers[order[end]] + 1) <= ANSWER_TOKENS_PER_BATCH):
                end += 1
            rows = order[start:end]
            ids, mask = pad_left([encoded[i][0] for i in rows], pad_id(tokenizer))
            yield rows, ids, mask, [answers[i] for i in rows]
            advance(len(rows))
            start = end


def _picked(logprobs: Tensor, ids: Tensor, answers: list[int]) -> list[Tensor]:
    """Log-prob of each answer token, from next-token distributions at the last max(answers) + 1 columns."""
    longest = max(answers)
    # left padding puts every answer at the end of its row; its j-th token is predicted one column earlier
    picked = logprobs[:, :-1].gather(-1, ids[:, -longest:, None].to(logprobs.device)).squeeze(-1).cpu()
    return [picked[r, longest - a:].clone() for r, a in enumerate(answers)]


def response_logprobs(lm: LanguageModel, examples: Sequence[Example], *, max_length: int = 256, batch_size: int = 8,
                      chat: bool = True, progress: Any = None) -> list[Tensor]:
    """Log-probability of every reference-answer token (end-of-turn included), one tensor per example."""
    out: list[Tensor] = [torch.empty(0)] * len(examples)
    for rows, ids, mask, answers in answer_batches(lm.tokenizer, examples, batch_size, max_length, chat, progress,
                                                    f"scoring {lm.name}"):
        # a top-k model's unreported tokens share its leftover mass evenly (fill_tail): every answer token is scored
        for i, scores in zip(rows, _picked(fill_tail(lm.logprobs(ids, mask, last=max(answers) + 1)), ids, answers)):
            out[i] = scores
    return out


def fusion_logprobs(large: LanguageModel, expert: ExpertPair, examples: Sequence[Example], fusions: Sequence[Fusion],
                    *, max_length: int = 256, batch_size: int = 8, chat: bool = True,
                    progress: Any = None) -> dict[str, list[Tensor]]:
    """Answer-token log-probs under many combinations of one large model and one small pair, each model run once.

    Keys: "large", "small_base", "small_tuned", and each fusion's label (a fusion given twice is scored once).
    """
    fusions = list({f.label: f for f in fusions}.values())  # the chosen fusion may be the published one
    keys = ["large", "small_base", "small_tuned", *(f.label for f in fusions)]
    out = {k: [torch.empty(0)] * len(examples) for k in keys}
    for rows, ids, mask, answers in answer_batches(large.tokenizer, examples, batch_size, max_length, chat, progress,
                                                    f"scoring {len(fusions)} fusions"):
        longest = max(answers)
        # only the positions that predict an answer token: (N, V) instead of (B, longest + 1, V)
        wanted = torch.arange(longest)[None, :] >= (longest - torch.tensor(answers))[:, None]
        targets = ids[:, -longest:][wanted]
        models = {"large": large.logprobs(ids, mask, longest + 1)}
        models["small_base"], models["small_tuned"] = expert.logprobs(ids, mask, longest + 1)
        device = models["small_tuned"].device  # everything is combined where the small pair runs
        wanted, targets = wanted.to(device), targets.to(device)
        models = {k: v.to(device)[:, :-1][wanted] for k, v in models.items()}
        picked = {k: fill_tail(v).gather(-1, targets[:, None]).squeeze(-1) for k, v in models.items()}
        chunks: dict[str, list[Tensor]] = {f.label: [] for f in fusions}
        for s in range(0, len(targets), FUSION_POSITIONS):  # a fusion makes several (positions x vocab) temporaries
            large_s, base_s, tuned_s = (models[m][s : s + FUSION_POSITIONS] for m in ("large", "small_base",
                                                                                      "small_tuned"))
            steered: dict[tuple, Tensor] = {}  # the proxy part is shared by every mixture weight
            for fusion in fusions:
                key = (fusion.dynamic, None if fusion.dynamic else fusion.alpha)
                if key not in steered:
                    steered[key] = fusion.steer(large_s, base_s, tuned_s)
                mixed = fusion.mix(steered[key], tuned_s)
                chunks[fusion.label].append(mixed.gather(-1, targets[s : s + FUSION_POSITIONS, None]).squeeze(-1))
        picked.update({label: torch.cat(values) for label, values in chunks.items()})
        picked = {k: v.cpu() for k, v in picked.items()}  # answer tokens only
        for key in keys:
            for i, scores in zip(rows, picked[key].split(answers)):
                out[key][i] = scores.clone()
    return out


def summarize(scores: Sequence[Tensor]) -> dict[str, float]:
    """Mean negative log-likelihood per answer token, its perplexity, and the token count."""
    tokens = sum(len(s) for s in scores)
    mean = -float(sum(s.sum() for s in scores)) / max(tokens, 1)
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": tokens}


def nll(lm: LanguageModel, examples: Sequence[Example], **kwargs: Any) -> dict[str, float]:
    return summarize(response_logprobs(lm, examples, **kwargs))


def choice_accuracy(option_scores: Sequence[Tensor], examples: Sequence[Example], options: Sequence[str]) -> float:
    """Share of examples whose reference is the option with the highest total log-prob.

    `option_scores` are the answer scores of `option_examples(examples, options)`, in that order.
    """
    totals = torch.tensor([float(s.sum()) for s in option_scores]).view(len(examples), len(options))
    chosen = totals.argmax(-1).tolist()
    return sum(options[c] == e.response for c, e in zip(chosen, examples)) / len(examples)


def option_examples(examples: Sequence[Example], options: Sequence[str]) -> list[Example]:
    return [Example(e.prompt, o, e.group) for e in examples for o in options]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words), as rouge-score computes it, with stemming."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the words of both texts are the same, ignoring case and punctuation."""
    return float(_words(prediction) == _words(reference))
