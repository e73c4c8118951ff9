import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedpt.decoding import GenerationConfig, encode_prompt, generate, generate_tokens
from fedpt.errors import FedptError
from fedpt.lm import HFCausalLM, load_model, pad_left
from fedpt.proxy import AdapterPair, ProxyTunedLM, SeparatePair, load_expert

PROMPTS = ["what is your name", "tell me a joke about a computer and a road", "hello"]


def lora_model(folder, random_adapter: bool = True):
    model, tokenizer, _ = load_model(folder, dtype="float32")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=not random_adapter)
    return get_peft_model(model, config).eval(), tokenizer


def batch(tokenizer, prompts=PROMPTS):
    return pad_left([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)


def test_combination_formula_and_shared_weight_pair(tiny):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    peft_model, tokenizer = lora_model(tiny["small"])
    proxy = ProxyTunedLM(large, AdapterPair(peft_model, tokenizer), alpha=0.7)
    ids, mask = batch(tokenizer)
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


def test_head_rows_past_the_tokenizer_are_cut(tiny):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    assert large.model.get_output_embeddings().weight.shape[0] == len(large.tokenizer) + 13
    assert large.vocab_size == len(large.tokenizer)
    ids, mask = batch(large.tokenizer)
    assert large.logprobs(ids, mask, last=1).shape[-1] == len(large.tokenizer)


def test_alpha_zero_equals_large(tiny):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    peft_model, tokenizer = lora_model(tiny["small"])
    proxy = ProxyTunedLM(large, AdapterPair(peft_model, tokenizer), alpha=0.0)
    config = GenerationConfig(max_new_tokens=12)
    assert generate(proxy, PROMPTS, config) == generate(large, PROMPTS, config)
    ids, mask = batch(tokenizer)
    torch.testing.assert_close(proxy.logprobs(ids, mask, 3), large.logprobs(ids, mask, 3), atol=1e-5, rtol=0)


def test_tuned_equal_to_base_equals_large(tiny):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    peft_model, tokenizer = lora_model(tiny["small"], random_adapter=False)  # LoRA B starts at zero
    small = HFCausalLM.load(tiny["small"], dtype="float32")
    ids, mask = batch(tokenizer)
    for expert in (AdapterPair(peft_model, tokenizer), SeparatePair(small, small)):
        proxy = ProxyTunedLM(large, expert, alpha=2.0)
        torch.testing.assert_close(proxy.logprobs(ids, mask, 5), large.logprobs(ids, mask, 5), atol=1e-5, rtol=0)


def test_batched_equals_unbatched(tiny):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    peft_model, tokenizer = lora_model(tiny["small"])
    proxy = ProxyTunedLM(large, AdapterPair(peft_model, tokenizer))
    together = generate(proxy, PROMPTS, GenerationConfig(max_new_tokens=10, batch_size=3))
    alone = generate(proxy, PROMPTS, GenerationConfig(max_new_tokens=10, batch_size=1))
    assert together == alone
    ids, mask = batch(tokenizer)
    rows = proxy.logprobs(ids, mask, last=2)
    for r, prompt in enumerate(PROMPTS):
        one_ids, one_mask = batch(tokenizer, [prompt])
        torch.testing.assert_close(rows[r], proxy.logprobs(one_ids, one_mask, last=2)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["large", "proxy"])
def test_cached_steps_equal_full_recompute(tiny, kind):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    peft_model, tokenizer = lora_model(tiny["small"])
    lm = large if kind == "large" else ProxyTunedLM(large, AdapterPair(peft_model, tokenizer), alpha=1.5)
    ids, mask = batch(tokenizer)
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


def test_full_model_folder_as_tuned_small(tiny):
    expert = load_expert(tiny["small"], tiny["large"], dtype="float32")
    assert isinstance(expert, SeparatePair)


def test_adapter_folder_round_trip(tiny, tmp_path):
    peft_model, tokenizer = lora_model(tiny["small"])
    peft_model.save_pretrained(tmp_path / "adapter")
    expert = load_expert(tiny["small"], tmp_path / "adapter", dtype="float32")
    assert isinstance(expert, AdapterPair)
    ids, mask = batch(tokenizer)
    expected = HFCausalLM(peft_model, tokenizer).logprobs(ids, mask, 2)
    torch.testing.assert_close(expert.logprobs(ids, mask, 2)[1], expected, atol=1e-5, rtol=0)
    with pytest.raises(FedptError, match="neither a LoRA adapter folder"):
        load_expert(tiny["small"], tmp_path)


def test_adapter_outside_the_pair_is_untouched(tiny):
    peft_model, tokenizer = lora_model(tiny["small"])
    ids, mask = batch(tokenizer)
    before = HFCausalLM(peft_model, tokenizer).logprobs(ids, mask, 1)
    pair = AdapterPair(peft_model, tokenizer)
    pair.logprobs(ids, mask, 1)
    torch.testing.assert_close(HFCausalLM(peft_model, tokenizer).logprobs(ids, mask, 1), before)


def test_generation_stops_and_samples_reproducibly(tiny):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    sampled = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert generate(large, PROMPTS, sampled) == generate(large, PROMPTS, sampled)
    tokens = generate_tokens(large, [encode_prompt(large.tokenizer, "hello")], GenerationConfig(max_new_tokens=8),
                             torch.Generator())
    text = large.tokenizer.decode(tokens[0])
    if len(text) > 2:
        stopped = generate(large, ["hello"], GenerationConfig(max_new_tokens=8, stop=(text[1:3],)))
        assert stopped == [text[: text.find(text[1:3])]]
    large.eos_token_ids = set(range(len(large.tokenizer)))  # every token ends the answer
    assert generate(large, ["hello"], GenerationConfig(max_new_tokens=8)) == [""]


def test_int8_small_pair_stays_close_to_the_exact_one(tiny, tmp_path):
    from fedpt.lm import Int8Linear

    linear = torch.nn.Linear(64, 32)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(Int8Linear(linear)(x), linear(x), atol=0.05, rtol=0.05)

    peft_model, tokenizer = lora_model(tiny["small"])
    peft_model.save_pretrained(tmp_path / "adapter")
    exact = load_expert(tiny["small"], tmp_path / "adapter", dtype="float32")
    int8 = load_expert(tiny["small"], tmp_path / "adapter", dtype="float32", int8=True)
    assert any(isinstance(m, Int8Linear) for m in int8.lm.model.modules())
    assert not any(isinstance(m, Int8Linear) for m in exact.lm.model.modules())
    ids, mask = batch(tokenizer)
    for e, q in zip(exact.logprobs(ids, mask, 2), int8.logprobs(ids, mask, 2)):
        assert (e.exp() - q.exp()).abs().sum(-1).max() < 0.2  # total variation distance per position
