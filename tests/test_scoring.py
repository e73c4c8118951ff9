"""Scoring: teacher-forced NLL by hand, fusion scores against scoring each model, choice accuracy, text metrics."""

import numpy as np
import pytest
import torch

from fedpt.data import Example, encode_example
from fedpt.models import HFCausalLM
from fedpt.proxy import Fusion, ProxyTunedLM, load_expert
from fedpt.scoring import (
    choice_accuracy,
    exact_match,
    fusion_logprobs,
    nll,
    option_examples,
    response_logprobs,
    rouge_l,
)

DATA = [Example("what is your name", "my name is fedpt"), Example("how are you today", "i am fine thank you"),
        Example("tell me a joke", "why did the chicken cross the road"), Example("hello world", "good morning to you")]


def test_metrics_on_hand_made_examples():
    assert exact_match("The answer: Paris!", "the answer paris") == 1.0
    assert exact_match("Paris", "London") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # LCS "the cat the mat" = all 4 predicted words of the 6 reference ones: P = 1, R = 2/3, F = 0.8
    assert rouge_l("the cat the mat", "the cat sat on the mat") == pytest.approx(0.8)
    # LCS "cat mat" = 2 of 3 predicted, 2 of 6 reference words: P = 2/3, R = 1/3, F = 4/9
    assert rouge_l("cat dog mat", "the cat sat on the mat") == pytest.approx(4 / 9)
    assert rouge_l("dogs", "the cat") == 0.0


def test_nll_by_hand(tiny):
    lm = HFCausalLM.load(tiny["large"], dtype="float32")
    example = DATA[0]
    ids, labels = encode_example(lm.tokenizer, example, 256)
    logits = lm.model(input_ids=torch.tensor([ids])).logits[0, :, : lm.vocab_size]
    logprobs = torch.log_softmax(logits.float(), -1)
    expected = -np.mean([logprobs[i - 1, ids[i]].item() for i in range(len(ids)) if labels[i] != -100])
    assert nll(lm, [example])["nll"] == pytest.approx(expected, abs=1e-4)
    both = nll(lm, DATA[:2], batch_size=2)
    one_by_one = [nll(lm, [e]) for e in DATA[:2]]
    weighted = sum(r["nll"] * r["tokens"] for r in one_by_one) / sum(r["tokens"] for r in one_by_one)
    assert both["nll"] == pytest.approx(weighted, abs=1e-4)


def test_fusion_scores_equal_scoring_each_model(tiny, tiny_adapter):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    expert = load_expert(tiny["small"], tiny_adapter, dtype="float32")
    examples = [Example("what is your name", "my name is fedpt"), Example("hello", "good morning to you")]
    fusions = [Fusion(alpha=0.5), Fusion(weight=0.5), Fusion(dynamic=True), Fusion(alpha=0.5)]  # one given twice
    scores = fusion_logprobs(large, expert, examples, fusions, batch_size=2)
    assert set(scores) == {"large", "small_base", "small_tuned", *(f.label for f in fusions)}
    for fusion in fusions:
        expected = response_logprobs(ProxyTunedLM(large, expert, fusion=fusion), examples)
        for got, want in zip(scores[fusion.label], expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for got, want in zip(scores["large"], response_logprobs(large, examples)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_choice_accuracy_by_hand():
    examples = [Example("a", "positive"), Example("b", "negative"), Example("c", "negative")]
    options = ["negative", "positive"]
    assert [e.response for e in option_examples(examples, options)] == options * 3
    # option scores: example a prefers positive (right), b prefers positive (wrong), c prefers negative (right)
    scores = [torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-0.5]),
              torch.tensor([-0.1]), torch.tensor([-4.0])]
    assert choice_accuracy(scores, examples, options) == pytest.approx(2 / 3)
