"""What a request may do to the choice besides temperature and top-p: logit_bias, presence and frequency
penalties, and a JSON schema enforced on the fused log-probs (any fusion, any backend)."""

import json

import pytest
import torch

from fedpt.data import encode_prompt
from fedpt.decoding import Engine, Report, Request, Sampling, generate, generate_tokens
from fedpt.decoding.constraints import Constraints
from fedpt.errors import FedptError
from fedpt.models import HFCausalLM
from fedpt.proxy import AdapterPair, Fusion, ProxyTunedLM

PROMPTS = ["hello", "write a python function", "what is your name", "a machine"]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "kind"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9},
                         "kind": {"enum": ["cat", "dog"]}}}


@pytest.fixture(scope="module")
def proxy(tiny, lora):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    return ProxyTunedLM(large, AdapterPair(*lora()), fusion=Fusion(alpha=1.0))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_random_model_answers_valid_json_under_the_schema(proxy, temperature):
    # unconstrained, the tiny random proxy writes no JSON at all
    free = generate(proxy, PROMPTS, Sampling(max_tokens=40, temperature=temperature, seed=1))
    assert not any(text.startswith("{") for text in free)
    answers = generate(proxy, PROMPTS, Sampling(max_tokens=40, temperature=temperature, seed=1,
                                                json_schema=json.dumps(SCHEMA)))
    for answer in answers:
        value = json.loads(answer)
        assert set(value) == {"ok", "n", "kind"}
        assert isinstance(value["ok"], bool) and value["n"] in range(10) and value["kind"] in ("cat", "dog")


def test_constrained_rows_decode_beside_free_rows_without_changing_them(proxy):
    free = generate(proxy, PROMPTS, Sampling(max_tokens=8))
    engine, texts = Engine(proxy, max_batch=8, max_queue=0), [""] * 8
    for i in range(8):  # free and constrained rows alternate in one batch
        sampling = Sampling(max_tokens=8) if i % 2 == 0 else Sampling(max_tokens=40, json_schema=json.dumps(SCHEMA))

        def report(r: Report, i: int = i) -> None:
            texts[i] += r.text
        engine.submit(Request(encode_prompt(proxy.tokenizer, PROMPTS[i // 2]), sampling, report))
    while any(engine.load.values()):
        engine.run_step()
    assert texts[0::2] == free
    assert all(json.loads(text)["kind"] in ("cat", "dog") for text in texts[1::2])


def test_logit_bias_forces_and_forbids_tokens(proxy):
    tokens = generate_tokens(proxy, [[5, 6, 7]], Sampling(max_tokens=6))[0]
    forced = generate_tokens(proxy, [[5, 6, 7]], Sampling(max_tokens=6, logit_bias=((42, 100.0),)))[0]
    assert forced == [42] * 6
    banned = generate_tokens(proxy, [[5, 6, 7]], Sampling(max_tokens=6, logit_bias=((tokens[0], -100.0),)))[0]
    assert banned[0] != tokens[0] and tokens[0] not in banned


def test_penalties_follow_openais_rule():
    class Spec:  # what Constraints reads of a Sampling
        logit_bias, presence_penalty, frequency_penalty, grammar = ((1, 0.5),), 0.25, 1.0, None

    c = Constraints(Spec, tokenizer=None, vocab_size=4, end_tokens=set())
    logprobs = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    for token in (2, 2, 3):
        c.accept(token)
    # score_j = logprob_j + bias_j - count_j * frequency - [count_j > 0] * presence
    expected = logprobs + torch.tensor([0.0, 0.5, -(2 * 1.0 + 0.25), -(1 * 1.0 + 0.25)])
    assert torch.allclose(c.apply(logprobs), expected)


def test_a_frequency_penalty_stops_a_greedy_loop(proxy):
    plain = generate_tokens(proxy, [[5, 6, 7]], Sampling(max_tokens=24))[0]
    penalised = generate_tokens(proxy, [[5, 6, 7]], Sampling(max_tokens=24, frequency_penalty=2.0))[0]
    assert len(set(plain)) < len(plain)  # the random model repeats itself
    assert len(set(penalised)) > len(set(plain))


@pytest.mark.parametrize("options, words", [
    ({"json_schema": '{"type": "nonsense"}'}, "nonsense"),
    ({"json_schema": "[1, 2]"}, "JSON object"),
    ({"json_schema": "{not json"}, "not valid"),
    ({"json_schema": "{}", "ignore_eos": True}, "ignore_eos"),
    ({"logit_bias": ((5, 101.0),)}, "[-100, 100]"),
    ({"logit_bias": ((5, float("nan")),)}, "[-100, 100]"),
    ({"logit_bias": ((-1, 1.0),)}, ">= 0"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
])
def test_bad_constraints_are_one_line_errors(options, words):
    with pytest.raises(FedptError) as e:
        Sampling(**options)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_bias_outside_the_vocabulary_fails_its_own_request_only(proxy):
    with pytest.raises(FedptError, match="outside the vocabulary"):
        generate_tokens(proxy, [[5, 6, 7]], Sampling(max_tokens=2, logit_bias=((10**6, 1.0),)))
