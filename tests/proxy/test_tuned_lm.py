"""The proxy-tuned LM: the formula, its limits (alpha 0, tuned = base), batching, caching, and the vocabulary."""

import pytest
import torch

from fedpt.decoding import Sampling, generate
from fedpt.errors import FedptError
from fedpt.models import HFCausalLM
from fedpt.proxy import AdapterPair, Fusion, ProxyTunedLM, SeparatePair, load_expert

PROMPTS = ["what is your name", "tell me a joke about a computer and a road", "hello"]


def test_combination_formula_and_shared_weight_pair(tiny, lora, encode):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    peft_model, tokenizer = lora()
    proxy = ProxyTunedLM(large, AdapterPair(peft_model, tokenizer), fusion=Fusion(alpha=0.7))
    ids, mask = encode(tokenizer)
    got = proxy.logprobs(ids, mask, last=4)

    # reference: the three models one by one, the adapter switched off for the base
    tuned = HFCausalLM(peft_model, tokenizer).logprobs(ids, mask, last=4)
    with peft_model.disable_adapter():
        base = HFCausalLM(peft_model, tokenizer).logprobs(ids, mask, last=4)
    assert not torch.allclose(tuned, base, atol=1e-3), "the random adapter must change the small model"
    v = len(tokenizer)
    expected = torch.log_softmax(large.logprobs(ids, mask, last=4)[..., :v] + 0.7 * (tuned - base), dim=-1)
    assert got.shape == (3, 4, v)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_alpha_zero_equals_large(tiny, lora, encode):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    peft_model, tokenizer = lora()
    proxy = ProxyTunedLM(large, AdapterPair(peft_model, tokenizer), fusion=Fusion(alpha=0.0))
    config = Sampling(max_tokens=12)
    assert generate(proxy, PROMPTS, config) == generate(large, PROMPTS, config)
    ids, mask = encode(tokenizer)
    torch.testing.assert_close(proxy.logprobs(ids, mask, 3), large.logprobs(ids, mask, 3), atol=1e-5, rtol=0)


def test_tuned_equal_to_base_equals_large(tiny, lora, encode):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    peft_model, tokenizer = lora(random=False)  # LoRA B starts at zero
    small = HFCausalLM.load(tiny["small"], dtype="float32")
    ids, mask = encode(tokenizer)
    for expert in (AdapterPair(peft_model, tokenizer), SeparatePair(small, small)):
        proxy = ProxyTunedLM(large, expert, fusion=Fusion(alpha=2.0))
        torch.testing.assert_close(proxy.logprobs(ids, mask, 5), large.logprobs(ids, mask, 5), atol=1e-5, rtol=0)


def test_batched_equals_unbatched(tiny, lora, encode):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    peft_model, tokenizer = lora()
    proxy = ProxyTunedLM(large, AdapterPair(peft_model, tokenizer))
    together = generate(proxy, PROMPTS, Sampling(max_tokens=10), max_batch=3)
    alone = generate(proxy, PROMPTS, Sampling(max_tokens=10), max_batch=1)
    assert together == alone
    ids, mask = encode(tokenizer)
    rows = proxy.logprobs(ids, mask, last=2)
    for r, prompt in enumerate(PROMPTS):
        one_ids, one_mask = encode(tokenizer, [prompt])
        torch.testing.assert_close(rows[r], proxy.logprobs(one_ids, one_mask, last=2)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["large", "proxy"])
def test_cached_steps_equal_full_recompute(tiny, lora, encode, kind):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    peft_model, tokenizer = lora()
    lm = large if kind == "large" else ProxyTunedLM(large, AdapterPair(peft_model, tokenizer), fusion=Fusion(alpha=1.5))
    ids, mask = encode(tokenizer)
    continuation = torch.randint(3, len(tokenizer), (3, 6), generator=torch.Generator().manual_seed(0))
    stepped = [lm.start(ids, mask)[0]]
    _, state = lm.start(ids, mask)
    for t in range(continuation.shape[1]):
        stepped.append(lm.step(state, continuation[:, t]))
    full_ids = torch.cat([ids, continuation], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)
    full = lm.logprobs(full_ids, full_mask, last=continuation.shape[1] + 1)
    torch.testing.assert_close(torch.stack(stepped, dim=1), full, atol=1e-4, rtol=0)


def test_vocabulary_mismatch_is_a_clear_error(tiny):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    with pytest.raises(FedptError, match=r"different tokenizers.*") as info:
        ProxyTunedLM(large, load_expert(tiny["other"], tiny["other"], dtype="float32"))
    message = str(info.value)
    assert str(tiny["large"]) in message and "other" in message and "vocabulary" in message
    assert "\n" not in message
