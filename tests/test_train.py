import numpy as np
import pytest

from fedpt.data import Example
from fedpt.errors import FedptError
from fedpt.evaluate import exact_match, gap_closed, nll, rouge_l
from fedpt.lm import HFCausalLM, load_model
from fedpt.train import TuneConfig, make_trainable, set_trainable_state, train, trainable_state

DATA = [Example("what is your name", "my name is fedpt"), Example("how are you today", "i am fine thank you"),
        Example("tell me a joke", "why did the chicken cross the road"), Example("hello world", "good morning to you")]


def test_lora_training_lowers_the_loss_and_only_the_adapter_travels(tiny):
    model, tokenizer, _ = load_model(tiny["small"], dtype="float32")
    model = make_trainable(model, TuneConfig())
    state = trainable_state(model)
    assert state and all("lora_" in name for name in state)
    before = nll(HFCausalLM(model, tokenizer), DATA)["nll"]
    stats = train(model, tokenizer, DATA, TuneConfig(local_steps=15, learning_rate=5e-3, batch_size=2), seed=0)
    after = nll(HFCausalLM(model, tokenizer), DATA)["nll"]
    assert after < before - 0.5
    assert stats["steps"] == 15 and stats["examples"] == 4 and stats["peak_memory_bytes"] > 0 and stats["flops"] > 0


def test_training_is_reproducible_from_the_seed(tiny):
    results = []
    for _ in range(2):
        model, tokenizer, _ = load_model(tiny["small"], dtype="float32")
        model = make_trainable(model, TuneConfig(lora_dropout=0.1))
        train(model, tokenizer, DATA, TuneConfig(local_steps=3, lora_dropout=0.1), seed=7)
        results.append(trainable_state(model))
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name])


def test_proximal_term_pulls_towards_the_start(tiny):
    moved = {}
    for mu in (0.0, 50.0):
        model, tokenizer, _ = load_model(tiny["small"], dtype="float32")
        model = make_trainable(model, TuneConfig(mode="full"))
        start = trainable_state(model)
        config = TuneConfig(mode="full", local_steps=5, learning_rate=1e-3, proximal_mu=mu)
        train(model, tokenizer, DATA, config, seed=0)
        end = trainable_state(model)
        moved[mu] = sum(float(((end[k] - start[k]) ** 2).sum()) for k in start)
    assert moved[50.0] < moved[0.0]


def test_state_mismatch_and_bad_config(tiny):
    model, _, _ = load_model(tiny["small"], dtype="float32")
    model = make_trainable(model, TuneConfig())
    state = trainable_state(model)
    name = next(iter(state))
    with pytest.raises(FedptError, match="shape"):
        set_trainable_state(model, {**state, name: np.zeros((1, 1), np.float32)})
    with pytest.raises(FedptError, match="1 unknown"):
        set_trainable_state(model, {**state, "extra": np.zeros(1, np.float32)})
    with pytest.raises(FedptError, match="not in the model"):
        make_trainable(load_model(tiny["small"])[0], TuneConfig(target_modules=["c_attn"]))
    with pytest.raises(FedptError, match="unknown tuning option"):
        TuneConfig.from_dict({"lora_rank": 8})
    with pytest.raises(FedptError, match="'lora' or 'full'"):
        TuneConfig(mode="half")


def test_metrics_on_hand_made_examples():
    assert exact_match("The answer: Paris!", "the answer paris") == 1.0
    assert exact_match("Paris", "London") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # LCS "the cat the mat" = all 4 predicted words of the 6 reference ones: P = 1, R = 2/3, F = 0.8
    assert rouge_l("the cat the mat", "the cat sat on the mat") == pytest.approx(0.8)
    # LCS "cat mat" = 2 of 3 predicted, 2 of 6 reference words: P = 2/3, R = 1/3, F = 4/9
    assert rouge_l("cat dog mat", "the cat sat on the mat") == pytest.approx(4 / 9)
    assert rouge_l("dogs", "the cat") == 0.0
    assert gap_closed(proxy=1.9, large_base=2.15, large_tuned=1.48) == pytest.approx(0.25 / 0.67)
    assert np.isnan(gap_closed(1.0, 2.0, 2.0))


def test_nll_by_hand(tiny):
    import torch

    lm = HFCausalLM.load(tiny["large"], dtype="float32")
    example = DATA[0]
    from fedpt.data import encode_example

    ids, labels = encode_example(lm.tokenizer, example, 256)
    logits = lm.model(input_ids=torch.tensor([ids])).logits[0, :, : lm.vocab_size]
    logprobs = torch.log_softmax(logits.float(), -1)
    expected = -np.mean([logprobs[i - 1, ids[i]].item() for i in range(len(ids)) if labels[i] != -100])
    assert nll(lm, [example])["nll"] == pytest.approx(expected, abs=1e-4)
    both = nll(lm, DATA[:2], batch_size=2)
    one_by_one = [nll(lm, [e]) for e in DATA[:2]]
    weighted = sum(r["nll"] * r["tokens"] for r in one_by_one) / sum(r["tokens"] for r in one_by_one)
    assert both["nll"] == pytest.approx(weighted, abs=1e-4)


def test_answer_loss_equals_the_full_forward_loss(tiny):
    import random

    import torch

    from fedpt.train import answer_loss, batches

    model, tokenizer, _ = load_model(tiny["small"], dtype="float32")
    model = make_trainable(model, TuneConfig(), seed=1)
    ids, mask, labels = next(batches(tokenizer, DATA, TuneConfig(batch_size=4), random.Random(0)))
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(answer_loss(model, ids, mask, labels), full, atol=1e-5, rtol=1e-5)


def test_padding_to_a_multiple_keeps_the_loss(tiny):
    import random

    import torch

    from fedpt.train import answer_loss, batches

    model, tokenizer, _ = load_model(tiny["small"], dtype="float32")
    model = make_trainable(model, TuneConfig(), seed=1)
    tight = next(batches(tokenizer, DATA, TuneConfig(batch_size=4, pad_multiple=1), random.Random(0)))
    padded = next(batches(tokenizer, DATA, TuneConfig(batch_size=4, pad_multiple=16), random.Random(0)))
    assert padded[0].shape[1] % 16 == 0 and padded[0].shape[1] > tight[0].shape[1]
    assert int(padded[1].sum()) == int(tight[1].sum())  # the same real tokens, only more padding
    torch.testing.assert_close(answer_loss(model, *padded), answer_loss(model, *tight), atol=1e-5, rtol=1e-5)
