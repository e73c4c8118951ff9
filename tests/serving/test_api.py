"""The OpenAI-compatible server, driven by the real `openai` client: what it answers equals what fedpt computes
in process, and bad requests get OpenAI-style errors with their status codes."""

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from fedpt.data import Example, encode_example
from fedpt.decoding import Sampling, generate
from fedpt.models import HFCausalLM, LanguageModel
from fedpt.models.remote import Endpoint, RemoteLM
from fedpt.proxy import AdapterPair, Fusion, ProxyTunedLM
from fedpt.scoring import response_logprobs
from fedpt.serving import Limits, running

PROMPTS = ["what is your name", "tell me a joke about a computer and a road", "hello", "write a python function",
           "good morning to you my friend", "a machine", "why did the chicken cross the road", "def add(a, b)"]
KEY_ENV = "FEDPT_TEST_SERVER_KEY"


@pytest.fixture(scope="module")
def proxy(tiny, lora):
    return ProxyTunedLM(HFCausalLM.load(tiny["large"], dtype="float32"), AdapterPair(*lora()), fusion=Fusion(alpha=1.0))


@pytest.fixture(scope="module")
def served(proxy):
    """(client, url) of the proxy served with an API key."""
    os.environ[KEY_ENV] = "s3cret-key"
    try:
        with running(proxy, name="tiny-proxy", api_key_env=KEY_ENV,
                     limits=Limits(max_prompt_tokens=64, max_tokens=64, max_body_bytes=20_000)) as url:
            yield openai.OpenAI(base_url=url, api_key="s3cret-key", max_retries=0), url
    finally:
        del os.environ[KEY_ENV]


def local(lm, prompt: str, tokens: int, chat: bool) -> str:
    return generate(lm, [prompt], Sampling(max_tokens=tokens), chat=chat)[0]


def test_models_lists_the_served_name(served):
    client, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny-proxy"]


def test_completion_and_chat_equal_fedpt_generate(served, proxy):
    client, _ = served
    completion = client.completions.create(model="tiny-proxy", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert completion.choices[0].text == local(proxy, PROMPTS[1], 8, chat=False)
    assert completion.usage.completion_tokens <= 8 and completion.usage.prompt_tokens > 0
    chat = client.chat.completions.create(model="tiny-proxy", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == local(proxy, PROMPTS[0], 8, chat=True)
    assert chat.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("sampling", [Sampling(max_tokens=10), Sampling(max_tokens=10, temperature=1.0, top_p=0.9,
                                                                            seed=7)])
def test_generate_and_serve_give_the_same_tokens(served, proxy, sampling):
    """One engine under both: a batch of prompts generated offline equals each prompt served, greedy or seeded."""
    client, _ = served
    offline = generate(proxy, PROMPTS, sampling, chat=False, max_batch=3)
    for prompt, expected in zip(PROMPTS, offline):
        reply = client.completions.create(model="tiny-proxy", prompt=prompt, max_tokens=sampling.max_tokens,
                                          temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)
        assert reply.choices[0].text == expected
    assert len(set(offline)) > 1


def test_ignore_eos_decodes_exactly_max_tokens(served):
    client, _ = served
    for prompt in PROMPTS[:4]:
        reply = client.completions.create(model="tiny-proxy", prompt=prompt, max_tokens=20, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 20 and reply.choices[0].finish_reason == "length"


def test_streams_add_up_to_the_whole_answer(served):
    client, _ = served
    whole = client.chat.completions.create(model="tiny-proxy", messages=[{"role": "user", "content": PROMPTS[2]}],
                                           max_tokens=10, temperature=0).choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny-proxy", max_tokens=10, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": PROMPTS[2]}],
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-proxy", prompt=PROMPTS[3], max_tokens=10, temperature=0, stream=True))
    assert text == client.completions.create(model="tiny-proxy", prompt=PROMPTS[3], max_tokens=10,
                                             temperature=0).choices[0].text


def test_logprobs_are_the_models_own(served, proxy):
    client, _ = served
    reply = client.completions.create(model="tiny-proxy", prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=3)
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text
    ids = proxy.tokenizer(PROMPTS[0])["input_ids"]
    expected, _ = proxy.start(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    assert lp.token_logprobs[0] == pytest.approx(float(expected[0].max()), abs=1e-4)
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0], abs=1e-6)  # greedy: the best
    assert len(lp.top_logprobs[0]) <= 3
    chat = client.chat.completions.create(model="tiny-proxy", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6
                           for t in content)


def test_echo_scores_the_prompt_as_fedpt_scoring_does(served, proxy):
    client, _ = served
    example = Example("what is your name", "my name is fedpt")
    ids, labels = encode_example(proxy.tokenizer, example, max_length=64, chat=False)
    reply = client.completions.create(model="tiny-proxy", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    echoed = reply.choices[0].logprobs.token_logprobs
    assert echoed[0] is None and len(echoed) == len(ids)
    [ours] = response_logprobs(proxy, [example], max_length=64, chat=False)
    answer = sum(label != -100 for label in labels)
    torch.testing.assert_close(torch.tensor(echoed[-answer:]), ours.float(), atol=1e-4, rtol=0)
    assert reply.choices[0].text == proxy.tokenizer.decode(ids)


def test_eight_concurrent_streams_equal_one_at_a_time(served):
    client, _ = served

    def stream(prompt: str) -> str:
        chunks = client.chat.completions.create(model="tiny-proxy", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=12, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    alone = [stream(p) for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(stream, PROMPTS))
    assert together == alone and any(alone)


def test_a_fedpt_server_is_the_black_box_of_another(served, proxy):
    _, url = served
    os.environ[KEY_ENV] = "s3cret-key"
    remote = RemoteLM(Endpoint(url, api_key_env=KEY_ENV, top_k=20), proxy.tokenizer)
    assert remote.token_prompts
    assert generate(remote, PROMPTS[:3], Sampling(max_tokens=6)) == \
        generate(proxy, PROMPTS[:3], Sampling(max_tokens=6))


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "hi", "temperature": float("nan")}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "hi", "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "hi", "max_tokens": 10_000}).encode(), 400, "limit"),
    (json.dumps({"prompt": "hi", "n": 2}).encode(), 400, "n = 1"),
    (json.dumps({"prompt": "hello " * 200}).encode(), 400, "at most 64"),
    (json.dumps({"prompt": ""}).encode(), 400, "empty"),
    (json.dumps({"prompt": [10**9]}).encode(), 400, "token ids"),
    (json.dumps({"prompt": "hi", "model": "gpt-4"}).encode(), 404, "does not exist"),
    (json.dumps({"prompt": "x" * 30_000}).encode(), 413, "bytes"),
    # before: 500 for these three, and 200 after 40 s for 10,000 stop strings
    (b'{"prompt": "hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nested too deeply"),
    (json.dumps({"prompt": "hi", "seed": 2**70}).encode(), 400, "seed"),
    (json.dumps({"prompt": "hi", "seed": -2**63 - 1}).encode(), 400, "seed"),
    (json.dumps({"prompt": "hi", "stop": [f"s{i}" for i in range(17)]}).encode(), 400, "stop"),
    (json.dumps({"prompt": "hi", "stop": ["x" * 300]}).encode(), 400, "at most 256 characters"),
    (json.dumps({"prompt": [[5, 6]] * 65}).encode(), 400, "at most 64"),  # before: 429, retry later (never works)
])
def test_bad_requests_get_openai_errors(served, body, status, words):
    _, url = served
    reply = httpx.post(f"{url}/completions", content=body, headers={"Authorization": "Bearer s3cret-key"})
    assert reply.status_code == status
    error = reply.json()["error"]
    assert words in error["message"] and "Traceback" not in reply.text
    assert httpx.get(f"{url.removesuffix('/v1')}/health").json()["status"] == "ok"  # still serving


def test_the_api_key_is_enforced(served):
    _, url = served
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key=key or "-", max_retries=0).models.list()
    assert httpx.get(f"{url}/models").status_code == 401
    assert "s3cret" not in httpx.get(f"{url}/models").text


def test_routes_clients_call_and_the_models_own_name(served, proxy):
    client, url = served
    auth = {"Authorization": "Bearer s3cret-key"}
    assert client.models.retrieve("tiny-proxy").id == "tiny-proxy"  # openai's models.retrieve
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    root = url.removesuffix("/v1")
    tokens = httpx.post(f"{root}/tokenize", json={"prompt": "hello world"}, headers=auth).json()
    assert tokens["tokens"] == proxy.tokenizer("hello world")["input_ids"] and tokens["count"] == len(tokens["tokens"])
    text = httpx.post(f"{root}/detokenize", json={"tokens": tokens["tokens"]}, headers=auth).json()["prompt"]
    assert text == proxy.tokenizer.decode(tokens["tokens"])
    assert httpx.post(f"{root}/detokenize", json={"tokens": [-1]}, headers=auth).status_code == 400
    # lm-eval's remote tokenizer: /tokenizer_info, then /tokenize of the eos text gives its id
    info = httpx.get(f"{root}/tokenizer_info", headers=auth).json()
    assert info["eos_token"] == proxy.tokenizer.eos_token and info["chat_template"] == proxy.tokenizer.chat_template
    eos = httpx.post(f"{root}/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False},
                     headers=auth).json()["tokens"]
    assert eos == [proxy.tokenizer.eos_token_id] and eos[0] in info["end_token_ids"]
    assert httpx.get(f"{root}/tokenizer_info").status_code == 401
    # the model may be named by its own name too, not only the served one
    reply = client.completions.create(model=proxy.name, prompt="hello", max_tokens=2)
    assert reply.choices[0].text is not None


def test_unknown_routes_and_methods(served):
    _, url = served
    assert httpx.get(f"{url}/nothing").json()["error"]["code"] == "not_found"
    assert httpx.get(f"{url}/completions").status_code == 405


class SlowLM(LanguageModel):
    """A model that never ends a row by itself and takes a while per step: requests that stay running."""

    def __init__(self, lm: LanguageModel, delay: float):
        self.lm, self.delay = lm, delay
        self.name, self.tokenizer, self.vocab_size, self.eos_token_ids = lm.name, lm.tokenizer, lm.vocab_size, set()

    def start(self, ids, mask):
        return self.lm.start(ids, mask)

    def step(self, state, tokens):
        time.sleep(self.delay)
        return self.lm.step(state, tokens)

    def logprobs(self, ids, mask, last):
        return self.lm.logprobs(ids, mask, last)

    def select(self, state, rows):
        return self.lm.select(state, rows)

    def join(self, state, other):
        return self.lm.join(state, other)


def test_a_full_queue_answers_429_a_slow_request_504_and_a_gone_client_frees_its_row(proxy):
    slow = SlowLM(proxy.large, delay=0.05)
    with running(slow, max_batch=1, max_queue=1, limits=Limits(max_tokens=1000, timeout=2.0)) as url:
        health = f"{url.removesuffix('/v1')}/health"

        def wait_for(key, value):
            for _ in range(200):
                if httpx.get(health).json()[key] == value:
                    return
                time.sleep(0.05)
            raise AssertionError(f"{key} never reached {value}")

        body = {"prompt": "hello", "max_tokens": 1000}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}/completions", json=body, timeout=30)
            wait_for("running", 1)
            second = pool.submit(httpx.post, f"{url}/completions", json=body, timeout=30)
            wait_for("waiting", 1)
            refused = httpx.post(f"{url}/completions", json=body)
            assert refused.status_code == 429 and "busy" in refused.json()["error"]["message"]
            assert first.result().status_code == 504  # 1000 tokens take over the 2 s limit
            assert second.result().status_code == 504
        wait_for("running", 0)  # the timed-out rows left the batch

        # a streaming client that goes away: its row leaves the batch
        with httpx.stream("POST", f"{url}/completions", json={**body, "stream": True}) as reply:
            next(reply.iter_lines())
        wait_for("running", 0)

        # a non-streaming client that gives up while tokens keep coming (before: its row decoded to max_tokens)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/completions", json={**body, "max_tokens": 600}, timeout=0.5)
        gone = time.monotonic()
        wait_for("running", 0)
        assert time.monotonic() - gone < 1.0  # within a check (0.5 s); the 2 s request timeout would take 1.5 s


def test_the_serve_command_answers_curl_style_requests_and_stops_on_interrupt(tiny, tiny_adapter, tmp_path):
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-c", "from fedpt.cli import main; main()", "serve", "--large", str(tiny["large"]),
               "--small", str(tiny["small"]), "--adapter", str(tiny_adapter), "--weight", "0.5",
               "--port", str(port), "--name", "tiny", "--require-key-env", KEY_ENV, "--dtype", "float32"]
    server = subprocess.Popen(command, env={**os.environ, KEY_ENV: "k3y"}, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                httpx.get(f"{url}/health")
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        reply = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer k3y"},
                           json={"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                                 "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=60)
    assert server.returncode in (0, 130)
    assert "k3y" not in err and "Traceback" not in err
    assert "serving proxy(" in err and "w=0.5" in err


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"), ("best_of", 3),
    ("suffix", "end"),
])
def test_fields_that_would_change_the_answer_are_refused_not_ignored(served, field, value):
    _, url = served
    reply = httpx.post(f"{url}/completions", json={"prompt": "hi", field: value},
                       headers={"Authorization": "Bearer s3cret-key"})
    assert reply.status_code == 400 and f"{field} is not supported" in reply.json()["error"]["message"]
    ok = httpx.post(f"{url}/completions", json={"prompt": "hi", "max_tokens": 1, "response_format": {"type": "text"},
                                                "presence_penalty": 0}, headers={"Authorization": "Bearer s3cret-key"})
    assert ok.status_code == 200


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    legs: int = Field(ge=0, le=4)
    friendly: bool


def test_structured_output_through_the_openai_client(served):
    client, _ = served
    # openai's `parse` sends the model's JSON schema as response_format and reads the answer back into the model
    reply = client.chat.completions.parse(model="tiny-proxy", messages=[{"role": "user", "content": "a pet"}],
                                          response_format=Pet, max_tokens=64, temperature=0)
    pet = reply.choices[0].message.parsed
    assert isinstance(pet, Pet) and reply.choices[0].finish_reason == "stop"
    anything = client.completions.create(model="tiny-proxy", prompt="hello", max_tokens=40, temperature=0,
                                         extra_body={"response_format": {"type": "json_object"}, "logit_bias":
                                                     {str(t): -100 for t in range(5)}})
    assert anything.choices[0].text.startswith("{")  # the random model's free answer does not


def test_logit_bias_and_penalties_through_the_server_equal_fedpt_generate(served, proxy):
    client, _ = served
    options = {"logit_bias": {"42": 5.0, "7": -100.0}, "frequency_penalty": 1.5, "presence_penalty": 0.5}
    reply = client.completions.create(model="tiny-proxy", prompt="hello", max_tokens=12, temperature=0, **options)
    sampling = Sampling(max_tokens=12, logit_bias=((42, 5.0), (7, -100.0)), frequency_penalty=1.5,
                        presence_penalty=0.5)
    assert reply.choices[0].text == generate(proxy, ["hello"], sampling, chat=False)[0]


@pytest.mark.parametrize("field, value, words", [
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
     "nonsense"),
    ("response_format", {"type": "json_schema"}, "needs its 'json_schema'"),
    ("response_format", {"type": "yaml"}, "response_format.type"),
    ("logit_bias", {"10000000": 1}, "logit_bias keys are token ids"),
    ("logit_bias", {"5": 300}, "logit_bias.5"),
    ("presence_penalty", 3, "presence_penalty"),
])
def test_bad_constraints_are_400s_that_name_the_field(served, field, value, words):
    _, url = served
    reply = httpx.post(f"{url}/completions", json={"prompt": "hi", field: value},
                       headers={"Authorization": "Bearer s3cret-key"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["param"].startswith(field)


def test_request_heads_are_bounded_in_size_and_time(served, monkeypatch):
    from fedpt import runtime

    _, url = served
    root = url.removesuffix("/v1")
    monkeypatch.setattr(runtime, "HEADER_TIMEOUT_S", 1.0)
    # before: a 50 MB header was read whole
    big = httpx.get(f"{root}/health", headers={"x-big": "a" * (runtime.MAX_HEADER_BYTES + 1)})
    assert big.status_code == 431 and "exceed" in big.json()["error"]["message"]
    try:  # 50 MB are never read whole: h11 stops at 64 KiB unparsed, answers 400 and closes
        huge = httpx.get(f"{root}/health", headers={"x-big": "a" * 50_000_000}).status_code
    except httpx.HTTPError:  # or the connection breaks while the client still sends
        huge = None
    assert huge in (None, 400)
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as slow:  # before: never cut off
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        assert slow.recv(100) == b""  # closed by the server, without an answer
        assert 0.5 < time.monotonic() - start < 5
    with socket.create_connection((host, int(port)), timeout=10) as kept:  # a kept-alive connection's next head
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in kept.recv(1000)
        kept.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.2)
        assert kept.recv(100) == b""
    assert httpx.get(f"{root}/health").json()["status"] == "ok"
