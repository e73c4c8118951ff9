import torch

from fedpt.models.int8 import Int8Linear, quantize_int8
from fedpt.proxy import load_expert


def test_int8_linear_is_close_and_quantize_swaps_frozen_layers_only(lora):
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(Int8Linear.from_linear(linear).eval()(x), linear(x), atol=0.05, rtol=0.05)
    peft_model, _ = lora()
    linears = sum(type(m) is torch.nn.Linear for n, m in peft_model.named_modules() if "lora_" not in n)
    assert quantize_int8(peft_model) == linears > 0
    assert any("lora_A" in n for n, m in peft_model.named_modules() if type(m) is torch.nn.Linear)


def test_int8_small_pair_stays_close_to_the_exact_one(tiny, tiny_adapter, encode):
    exact = load_expert(tiny["small"], tiny_adapter, dtype="float32")
    int8 = load_expert(tiny["small"], tiny_adapter, dtype="float32", int8=True)
    assert any(isinstance(m, Int8Linear) for m in int8.tuned.model.modules())
    assert not any(isinstance(m, Int8Linear) for m in exact.tuned.model.modules())
    ids, mask = encode(exact.tokenizer)
    for e, q in zip(exact.logprobs(ids, mask, 2), int8.logprobs(ids, mask, 2)):
        assert (e.exp() - q.exp()).abs().sum(-1).max() < 0.2  # total variation distance per position
