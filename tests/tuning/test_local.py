import numpy as np
import pytest

from fedpt.config import TuneConfig
from fedpt.data import Example
from fedpt.errors import FedptError
from fedpt.models import HFCausalLM, load_model
from fedpt.scoring import nll
from fedpt.tuning.local import make_trainable, set_trainable_state, train, trainable_state

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
    for seed in (7, 7, 8):
        model, tokenizer, _ = load_model(tiny["small"], dtype="float32")
        model = make_trainable(model, TuneConfig(lora_dropout=0.1))
        train(model, tokenizer, DATA, TuneConfig(local_steps=3, lora_dropout=0.1), seed=seed)
        results.append(trainable_state(model))
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name])
    # another seed shuffles and drops out differently: other weights
    assert any(not np.array_equal(results[0][name], results[2][name]) for name in results[0])


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
    with pytest.raises(FedptError, match="'lora' or 'full'"):
        TuneConfig(mode="half")


def test_answer_loss_equals_the_full_forward_loss(tiny):
    import random

    import torch

    from fedpt.tuning.local import answer_loss, batches

    model, tokenizer, _ = load_model(tiny["small"], dtype="float32")
    model = make_trainable(model, TuneConfig(), seed=1)
    ids, mask, labels = next(batches(tokenizer, DATA, TuneConfig(batch_size=4), random.Random(0)))
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(answer_loss(model, ids, mask, labels), full, atol=1e-5, rtol=1e-5)


def test_padding_to_a_multiple_keeps_the_loss(tiny):
    import random

    import torch

    from fedpt.tuning.local import answer_loss, batches

    model, tokenizer, _ = load_model(tiny["small"], dtype="float32")
    model = make_trainable(model, TuneConfig(), seed=1)
    tight = next(batches(tokenizer, DATA, TuneConfig(batch_size=4, pad_multiple=1), random.Random(0)))
    padded = next(batches(tokenizer, DATA, TuneConfig(batch_size=4, pad_multiple=16), random.Random(0)))
    assert padded[0].shape[1] % 16 == 0 and padded[0].shape[1] > tight[0].shape[1]
    assert int(padded[1].sum()) == int(tight[1].sum())  # the same real tokens, only more padding
    torch.testing.assert_close(answer_loss(model, *padded), answer_loss(model, *tight), atol=1e-5, rtol=1e-5)


def test_micro_batches_take_the_same_step_as_the_whole_batch(tiny):
    # rows of unequal answer lengths: a mean of per-part means would weigh them wrongly
    data = DATA + [Example("count to three", "one two three four five six seven"), Example("hi", "yo")]
    runs = {}
    for micro in (0, 1, 4):
        model, tokenizer, _ = load_model(tiny["small"], dtype="float32")
        model = make_trainable(model, TuneConfig(), seed=1)
        config = TuneConfig(batch_size=6, micro_batch_size=micro, local_steps=3, learning_rate=1e-2)
        runs[micro] = (train(model, tokenizer, data, config, seed=0)["train_loss"], trainable_state(model))
    for micro in (1, 4):
        assert runs[micro][0] == pytest.approx(runs[0][0], rel=1e-5)
        for name, value in runs[0][1].items():
            np.testing.assert_allclose(runs[micro][1][name], value, rtol=1e-4, atol=1e-6)
    with pytest.raises(FedptError, match="micro_batch_size must lie in"):
        TuneConfig(batch_size=2, micro_batch_size=3)


def test_an_int8_client_trains_through_its_frozen_int8_weights(tiny):
    import torch

    from fedpt.models.int8 import Int8Embedding, Int8Linear
    from fedpt.tuning.local import load_trainable

    config = TuneConfig(local_steps=15, learning_rate=5e-3, batch_size=2, dtype="float32", quantize="int8")
    model, tokenizer = load_trainable(str(tiny["small"]), config, "cpu")
    exact, _ = load_trainable(str(tiny["small"]), TuneConfig(dtype="float32"), "cpu")
    frozen = [m for m in model.modules() if isinstance(m, Int8Linear | Int8Embedding)]
    assert frozen and not any(type(m) is torch.nn.Linear for n, m in model.named_modules() if "lora_" not in n)
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    # the same weights travel as from a float client, so the server (in full precision) takes them as they are
    assert trainable_state(model).keys() == trainable_state(exact).keys()
    before = nll(HFCausalLM(model, tokenizer), DATA)["nll"]
    assert before == pytest.approx(nll(HFCausalLM(exact, tokenizer), DATA)["nll"], abs=0.05)
    train(model, tokenizer, DATA, config, seed=0)
    assert nll(HFCausalLM(model, tokenizer), DATA)["nll"] < before - 0.5


def test_the_int8_matmul_has_the_gradient_of_its_dequantised_weights():
    import torch

    from fedpt.models.int8 import DequantizedMatmul, dequantize, quantize_rows

    qweight, scale = quantize_rows(torch.randn(40, 24))
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: DequantizedMatmul.apply(t, qweight, scale), (x,))
    old, DequantizedMatmul.ROWS = DequantizedMatmul.ROWS, 16  # an output head cut in row slices: the same result
    try:
        sliced = DequantizedMatmul.apply(x, qweight, scale)
        sliced.sum().backward()
    finally:
        DequantizedMatmul.ROWS = old
    torch.testing.assert_close(sliced, x @ dequantize(qweight, scale, torch.float64).T)
    torch.testing.assert_close(x.grad, dequantize(qweight, scale, torch.float64).sum(0).expand(3, 5, 24))


def test_a_tied_output_head_shares_the_int8_embedding():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fedpt.models.int8 import quantize_int8

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    ids = torch.tensor([[1, 5, 9]])
    expected = model(ids).logits
    quantize_int8(model, embeddings=True)
    assert model.get_output_embeddings().qweight is model.get_input_embeddings().qweight
    assert model.get_input_embeddings().qweight.dtype == torch.int8
    torch.testing.assert_close(model.eval()(ids).logits, expected, atol=0.05, rtol=0.05)


def test_qlora_needs_a_gpu_and_says_so(tiny):
    from fedpt.tuning.local import load_trainable

    with pytest.raises(FedptError, match="CUDA GPU"):
        load_trainable(str(tiny["small"]), TuneConfig(quantize="nf4"), "cpu")
    with pytest.raises(FedptError, match="needs tuning.mode = 'lora'"):
        TuneConfig(mode="full", quantize="int8")
