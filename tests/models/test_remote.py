"""The large model as a black box behind an OpenAI-compatible server (a fake one in this process, backed by the
tiny large model): top-k and the tail, the start-up checks, retries, timeouts, keys, overlap."""

import math
import threading
import time

import pytest
import torch
from fake_openai_server import FakeServer

from fedpt.decoding import Sampling, generate
from fedpt.errors import FedptError
from fedpt.models import HFCausalLM
from fedpt.models.loading import open_lm
from fedpt.models.remote import Endpoint, RemoteLM
from fedpt.proxy import AdapterPair, Fusion, ProxyTunedLM
from fedpt.proxy.fusion import fill_tail

PROMPTS = ["what is your name", "tell me a joke about a computer and a road", "hello"]


@pytest.fixture(scope="module")
def large(tiny):
    return HFCausalLM.load(tiny["large"], dtype="float32")


def remote(server, tiny, **endpoint):
    return open_lm(server.url, tokenizer=str(tiny["small"]), **endpoint)


def test_full_vocabulary_through_the_server_equals_the_local_proxy(tiny, large, lora, encode):
    peft_model, tokenizer = lora()
    with FakeServer(large, ids_as_keys=True) as server:
        black_box = remote(server, tiny, top_k=len(tokenizer))
        assert black_box.token_prompts
        ids, mask = encode(tokenizer)
        torch.testing.assert_close(black_box.logprobs(ids, mask, 3), large.logprobs(ids, mask, 3), atol=1e-5, rtol=0)
        pair = AdapterPair(peft_model, tokenizer)
        steer = Fusion(alpha=0.8)
        torch.testing.assert_close(ProxyTunedLM(black_box, pair, fusion=steer).logprobs(ids, mask, 3),
                                   ProxyTunedLM(large, pair, fusion=steer).logprobs(ids, mask, 3), atol=1e-5, rtol=0)
        config = Sampling(max_tokens=6)
        assert generate(ProxyTunedLM(black_box, pair), PROMPTS, config) == generate(ProxyTunedLM(large, pair), PROMPTS,
                                                                                    config)


@pytest.mark.parametrize("k", [1, 5])
def test_alpha_zero_with_any_k_decodes_like_the_large_model(tiny, large, lora, k):
    peft_model, tokenizer = lora()
    # token ids as keys: with token strings, a top token whose text several ids share (a partial UTF-8 byte, which
    # this random model likes) cannot be attributed and goes to the tail
    with FakeServer(large, ids_as_keys=True) as server:
        proxy = ProxyTunedLM(remote(server, tiny, top_k=k), AdapterPair(peft_model, tokenizer),
                             fusion=Fusion(alpha=0.0))
        config = Sampling(max_tokens=6)
        assert generate(proxy, PROMPTS, config) == generate(large, PROMPTS, config)


def test_echo_scoring_equals_one_request_per_position(tiny, large, encode):
    with FakeServer(large, ids_as_keys=True) as server:
        tokenizer = large.tokenizer
        per_position = RemoteLM(Endpoint(server.url, top_k=len(tokenizer)), tokenizer)
        echoed = RemoteLM(Endpoint(server.url, top_k=len(tokenizer), echo_scoring=True), tokenizer)
        ids, mask = encode(tokenizer)
        before = len(server.knobs.requests)
        torch.testing.assert_close(echoed.logprobs(ids, mask, 4), per_position.logprobs(ids, mask, 4), atol=1e-5,
                                   rtol=0)
        assert len(server.knobs.requests) - before == 3 + 3 * 4  # one per row against one per row and position


def test_token_strings_map_back_to_ids_and_shared_strings_go_to_the_tail(tiny, large, encode):
    with FakeServer(large, max_top_k=12) as server:  # token strings as keys, as llama.cpp's server
        black_box = remote(server, tiny, top_k=12)
        ids, mask = encode(black_box.tokenizer)
        got, _ = black_box.start(ids, mask)
        exact = large.logprobs(ids, mask, 1)[:, -1]
        top = exact.topk(12).indices
        for row in range(len(ids)):
            for token in top[row].tolist():
                shared = len(black_box._ids_of[black_box.tokenizer.decode([token])]) > 1
                assert torch.isneginf(got[row, token]) if shared else torch.isclose(got[row, token], exact[row, token])


def test_top_k_rows_are_minus_infinity_outside_the_reported_tokens(tiny, large, encode):
    with FakeServer(large, max_top_k=3) as server:
        black_box = remote(server, tiny, top_k=10)  # the server gives 3 whatever is asked
        ids, mask = encode(black_box.tokenizer)
        got, _ = black_box.start(ids, mask)
        assert (torch.isfinite(got).sum(-1) <= 3).all() and (torch.isfinite(got).sum(-1) >= 1).all()
        exact = large.logprobs(ids, mask, 1)[:, -1]
        known = torch.isfinite(got)
        torch.testing.assert_close(got[known], exact[known], atol=1e-5, rtol=0)


def test_the_tail_is_the_leftover_mass_in_the_shape_of_the_base():
    top = torch.tensor([[math.log(0.5), math.log(0.2), -math.inf, -math.inf, -math.inf]])
    base = torch.log(torch.tensor([[0.1, 0.1, 0.1, 0.2, 0.5]]))
    filled = fill_tail(top, base).exp()
    # 0.3 left over, split 0.1 : 0.2 : 0.5 over the three unreported tokens
    expected = torch.tensor([[0.5, 0.2, 0.3 * 0.1 / 0.8, 0.3 * 0.2 / 0.8, 0.3 * 0.5 / 0.8]])
    torch.testing.assert_close(filled, expected, atol=1e-6, rtol=0)
    # 0.45 left over: the shares 0.056, 0.11, 0.28 all exceed the smallest reported 0.05; each is capped below it
    low = torch.tensor([[math.log(0.5), math.log(0.05), -math.inf, -math.inf, -math.inf]])
    capped = fill_tail(low, base).exp()
    torch.testing.assert_close(capped[0, 2:], torch.full((3,), 0.05 * 0.999), atol=1e-6, rtol=0)
    uniform = fill_tail(top).exp()
    torch.testing.assert_close(uniform[0, 2:], torch.full((3,), 0.1), atol=1e-6, rtol=0)
    complete = torch.log_softmax(torch.randn(2, 5), -1)
    assert fill_tail(complete, base) is complete  # nothing missing: unchanged


def test_text_prompts_when_the_server_refuses_token_ids(tiny, large, encode):
    with FakeServer(large, token_prompts=False, ids_as_keys=True) as server:
        black_box = remote(server, tiny, top_k=len(large.tokenizer))
        assert not black_box.token_prompts
        ids, mask = encode(black_box.tokenizer)
        torch.testing.assert_close(black_box.logprobs(ids, mask, 2), large.logprobs(ids, mask, 2), atol=1e-5, rtol=0)
        assert all(isinstance(body["prompt"], str) for _, _, body in server.knobs.requests[-6:])
        assert black_box.stats["text_prompts_retokenized_differently"] == 0


def test_retries_with_backoff_then_a_one_line_error(tiny, large):
    with FakeServer(large) as server:
        black_box = remote(server, tiny, top_k=3)
        server.knobs.fail = 2
        ids = torch.tensor([[5, 6, 7]])
        black_box.start(ids, torch.ones_like(ids))
        assert black_box.stats["retries"] == 2
        server.knobs.fail = 100
        with pytest.raises(FedptError, match=r"/completions failed after 5 tries: HTTP 503") as info:
            black_box.start(ids, torch.ones_like(ids))
        assert "\n" not in str(info.value)
        server.knobs.fail, server.knobs.fail_status = 1, 400  # a client error is not retried
        with pytest.raises(FedptError, match=r"/completions failed: HTTP 400"):
            black_box.start(ids, torch.ones_like(ids))


def test_a_slow_server_times_out(tiny, large):
    with FakeServer(large) as server:
        black_box = RemoteLM(Endpoint(server.url, top_k=2, timeout=0.2, retries=1), large.tokenizer)
        server.knobs.latency = 1.0
        ids = torch.tensor([[5, 6, 7]])
        with pytest.raises(FedptError, match="failed after 2 tries: ReadTimeout"):
            black_box.start(ids, torch.ones_like(ids))


def test_a_server_without_log_probabilities(tiny, large):
    with FakeServer(large, logprobs=False) as server:
        with pytest.raises(FedptError, match=f"the server at {server.url} returned no log-probabilities"):
            remote(server, tiny)


def test_a_server_silent_at_an_end_token_is_named(tiny, large, encode):
    with FakeServer(large, silent_after=0) as server:
        server.knobs.silent_after = None
        black_box = remote(server, tiny)
        server.knobs.silent_after = len(server.knobs.requests)
        with pytest.raises(FedptError, match="reports no log-probabilities where its greedy next token ends the text"):
            black_box.start(*encode(black_box.tokenizer))


def test_a_server_with_another_tokenizer(tiny):
    other = HFCausalLM.load(tiny["other"], dtype="float32")
    with FakeServer(other) as server:
        with pytest.raises(FedptError, match=f"the server at {server.url} (reports tokens|splits text into other)"):
            remote(server, tiny)


def test_the_api_key_comes_from_the_environment_and_is_never_shown(tiny, large, monkeypatch, cli):
    secret = "sk-test-very-secret-123"
    with FakeServer(large, api_key=secret) as server:
        with pytest.raises(FedptError, match="refused no API key") as info:
            remote(server, tiny)
        monkeypatch.setenv("WRONG_KEY", "sk-wrong-456")
        with pytest.raises(FedptError, match="refused the key in WRONG_KEY") as wrong:
            remote(server, tiny, api_key_env="WRONG_KEY")
        assert "sk-wrong-456" not in str(wrong.value) and secret not in str(info.value)
        with pytest.raises(FedptError, match="MISSING_KEY is not set"):
            remote(server, tiny, api_key_env="MISSING_KEY")
        monkeypatch.setenv("FEDPT_TEST_KEY", secret)
        code, out, err = cli("generate", "--large", server.url, "--tokenizer", tiny["small"], "--api-key-env",
                             "FEDPT_TEST_KEY", "--top-k", 3, "--prompt", "hello", "--max-new-tokens", 3)
        assert code == 0, err
        assert secret not in out + err


def test_answers_are_written_as_they_complete(tiny, large, tmp_path, cli):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nwhat is your name\ntell me a joke\n")
    args = ["generate", "--large", "URL", "--tokenizer", tiny["small"], "--top-k", 3, "--prompts-file", prompts,
            "--max-new-tokens", 2, "--batch-size", 1]
    with FakeServer(large) as server:
        args[2] = server.url
        code, out, err = cli(*args)
        assert code == 0 and len(out.splitlines()) == 3, err

        def down_at_the_second_prompt(body, original=server.complete):
            prompt = body["prompt"]
            text = prompt if isinstance(prompt, str) else large.tokenizer.decode(prompt)
            return (500, {"error": {"message": "down"}}) if "name" in text else original(body)

        server.complete = down_at_the_second_prompt
        code, out, err = cli(*args)
        *loading, error = err.splitlines()  # what loaded, then the error alone
        assert code == 2 and error.startswith("fedpt: error: ") and all(line.startswith("load") for line in loading)
        assert len(out.splitlines()) == 1 and '"prompt": "hello"' in out  # the first answer was kept


def test_the_small_pair_runs_while_the_large_request_is_in_flight(tiny, large, lora):
    peft_model, tokenizer = lora()
    with FakeServer(large, latency=0.3) as server:
        pair = AdapterPair(peft_model, tokenizer)
        seen = {}
        original = pair.step

        def timed_step(state, tokens):
            seen["pair_started"] = time.perf_counter()
            seen["thread"] = threading.current_thread().name
            result = original(state, tokens)
            seen["pair_done"] = time.perf_counter()
            return result

        pair.step = timed_step
        proxy = ProxyTunedLM(remote(server, tiny, top_k=3), pair)
        ids = torch.tensor([[5, 6, 7]])
        _, state = proxy.start(ids, torch.ones_like(ids))
        proxy.step(state, torch.tensor([8]))
        _, ended, _ = server.knobs.requests[-1]
        # one after the other, the pair would start once the request ended; here it was done before that
        assert seen["pair_started"] < seen["pair_done"] < ended
        assert seen["thread"] == threading.main_thread().name
