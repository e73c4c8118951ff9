"""The small pair: an adapter folder gives base and tuned on shared weights, a model folder two models."""

import pytest
import torch

from fedpt.errors import FedptError
from fedpt.models import HFCausalLM
from fedpt.proxy import AdapterPair, SeparatePair, load_expert, load_tuned


def test_adapter_folder_round_trip(tiny, lora, tiny_adapter, encode, tmp_path):
    peft_model, tokenizer = lora()  # the same seed as the saved adapter
    expert = load_expert(tiny["small"], tiny_adapter, dtype="float32")
    assert isinstance(expert, AdapterPair)
    ids, mask = encode(tokenizer)
    expected_tuned = HFCausalLM(peft_model, tokenizer).logprobs(ids, mask, 2)
    expected_base = HFCausalLM.load(tiny["small"], dtype="float32").logprobs(ids, mask, 2)
    base, tuned = expert.logprobs(ids, mask, 2)
    torch.testing.assert_close(tuned, expected_tuned, atol=1e-5, rtol=0)
    torch.testing.assert_close(base, expected_base, atol=1e-5, rtol=0)
    # the pair's tuned model alone, and load_tuned, read the adapter's model
    torch.testing.assert_close(expert.tuned.logprobs(ids, mask, 2), expected_tuned, atol=1e-5, rtol=0)
    torch.testing.assert_close(load_tuned(tiny["small"], tiny_adapter, dtype="float32").logprobs(ids, mask, 2),
                               expected_tuned, atol=1e-5, rtol=0)
    with pytest.raises(FedptError, match="neither a LoRA adapter folder"):
        load_expert(tiny["small"], tmp_path)


def test_adapter_outside_the_pair_is_untouched(lora, encode):
    peft_model, tokenizer = lora()
    ids, mask = encode(tokenizer)
    before = HFCausalLM(peft_model, tokenizer).logprobs(ids, mask, 1)
    pair = AdapterPair(peft_model, tokenizer)
    pair.logprobs(ids, mask, 1)
    torch.testing.assert_close(HFCausalLM(peft_model, tokenizer).logprobs(ids, mask, 1), before)


def test_full_model_folder_as_tuned_small(tiny, encode):
    # any model folder with the small model's tokenizer plays the fully fine-tuned small model
    expert = load_expert(tiny["small"], tiny["large"], dtype="float32")
    assert isinstance(expert, SeparatePair)
    ids, mask = encode(expert.tokenizer)
    base, tuned = expert.logprobs(ids, mask, 3)
    torch.testing.assert_close(base, HFCausalLM.load(tiny["small"], dtype="float32").logprobs(ids, mask, 3))
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    torch.testing.assert_close(tuned, large.logprobs(ids, mask, 3))
    torch.testing.assert_close(load_tuned(tiny["small"], tiny["large"], dtype="float32").logprobs(ids, mask, 3),
                               large.logprobs(ids, mask, 3))


def test_an_adapter_with_nan_weights_is_refused(tiny, lora, tmp_path):
    peft_model, _ = lora()
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    peft_model.save_pretrained(tmp_path / "diverged")
    with pytest.raises(FedptError, match="has NaN or inf values"):
        load_expert(tiny["small"], tmp_path / "diverged", dtype="float32")
