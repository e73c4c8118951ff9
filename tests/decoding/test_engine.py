"""Continuous batching: rows that join and leave a running batch decode exactly as they would alone."""

import threading
import time
from collections.abc import Callable

import pytest
import torch

from fedpt.data import encode_prompt
from fedpt.decoding import Engine, QueueFull, Report, Request, Sampling, generate_tokens
from fedpt.models import HFCausalLM, pad_left
from fedpt.proxy import AdapterPair, Fusion, ProxyTunedLM

PROMPTS = ["what is your name", "tell me a joke about a computer and a road", "hello", "write a python function",
           "good morning to you my friend", "a machine", "why did the chicken cross the road", "def add(a, b)"]


def run_all(engine: Engine, prompts: list[list[int]], sampling: Sampling) -> list[str]:
    """Decode prompts through a running engine and wait for all of them."""
    texts, done = [""] * len(prompts), threading.Semaphore(0)

    def reporter(i: int) -> Callable[[Report], None]:
        def report(r: Report) -> None:
            texts[i] += r.text
            if r.finish_reason:
                done.release()
        return report

    for i, prompt in enumerate(prompts):
        engine.submit(Request(list(prompt), sampling, reporter(i)))
    for _ in prompts:
        done.acquire()
    return texts


@pytest.fixture(scope="module")
def proxy(tiny, lora):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    return ProxyTunedLM(large, AdapterPair(*lora()), fusion=Fusion(alpha=1.0))


def alone(lm, prompt: list[int], tokens: int) -> list[int]:
    return generate_tokens(lm, [prompt], Sampling(max_tokens=tokens))[0]


@pytest.mark.parametrize("which", ["large", "proxy"])
def test_rows_joining_and_leaving_a_batch_decode_as_alone(tiny, proxy, which):
    lm = proxy if which == "proxy" else proxy.large
    prompts = [encode_prompt(lm.tokenizer, p) for p in PROMPTS[:3]]
    expected = [alone(lm, p, 6) for p in prompts]
    # row 0 starts alone; row 1 (longer prompt) joins after 2 steps; row 0 leaves after 4; row 2 joins then
    logprobs, state = lm.start(*pad_left([prompts[0]], lm.tokenizer.pad_token_id))
    got: list[list[int]] = [[], [], []]
    rows = [0]
    for step in range(20):
        if step == 2:
            lp, st = lm.start(*pad_left([prompts[1]], lm.tokenizer.pad_token_id))
            state, logprobs, rows = lm.join(state, st), torch.cat([logprobs, lp]), rows + [1]
        if step == 5:
            lp, st = lm.start(*pad_left([prompts[2]], lm.tokenizer.pad_token_id))
            state, logprobs, rows = lm.join(state, st), torch.cat([logprobs, lp]), rows + [2]
        tokens = logprobs.argmax(-1)
        for r, t in zip(rows, tokens.tolist()):
            got[r].append(t)
        keep = [i for i, r in enumerate(rows) if len(got[r]) < 6]
        if not keep:
            break
        if len(keep) < len(rows):
            state, rows = lm.select(state, keep), [rows[i] for i in keep]
        logprobs = lm.step(state, tokens[keep])
    # generate_tokens drops an end token and stops there: compare up to it
    assert [g[: len(e)] for g, e in zip(got, expected)] == expected


def test_concurrent_requests_equal_one_at_a_time(proxy):
    prompts = [encode_prompt(proxy.tokenizer, p) for p in PROMPTS]
    sampling = Sampling(max_tokens=8, temperature=0.0)
    one = Engine(proxy, max_batch=1).start()
    try:
        sequential = [run_all(one, [p], sampling)[0] for p in prompts]
    finally:
        one.close()
    batched = Engine(proxy, max_batch=8).start()
    try:
        together = run_all(batched, prompts, sampling)
    finally:
        batched.close()
    assert together == sequential
    assert any(sequential)
    assert batched.rows_decoded / batched.steps > 2  # the requests really shared steps


def test_a_stop_string_ends_the_text_before_it(proxy):
    prompt = encode_prompt(proxy.tokenizer, PROMPTS[1])
    engine = Engine(proxy).start()
    try:
        [full] = run_all(engine, [prompt], Sampling(max_tokens=12))
        stop = full[3:5]
        [cut] = run_all(engine, [prompt], Sampling(max_tokens=12, stop=(stop,)))
    finally:
        engine.close()
    assert stop and cut == full[: full.find(stop)]


def test_sampling_is_reproducible_from_a_seed(proxy):
    prompt = encode_prompt(proxy.tokenizer, PROMPTS[0])
    engine = Engine(proxy).start()
    try:
        runs = [run_all(engine, [prompt, prompt], Sampling(max_tokens=10, temperature=1.0, seed=s))
                for s in (1, 1, 2)]
    finally:
        engine.close()
    assert runs[0] == runs[1] and runs[0][0] == runs[0][1]
    assert runs[0] != runs[2]


def test_a_cancelled_request_leaves_the_batch(proxy):
    prompt = encode_prompt(proxy.tokenizer, PROMPTS[0])
    seen, finished = [], threading.Event()

    def report(r: Report) -> None:
        seen.append(r)
        if r.finish_reason:
            finished.set()

    engine = Engine(proxy).start()
    try:
        request = Request(prompt, Sampling(max_tokens=400), report)
        engine.submit(request)
        request.cancel()
        assert finished.wait(30)
        assert seen[-1].finish_reason == "cancelled"
        assert sum(r.new_tokens for r in seen) < 400
    finally:
        engine.close()


def test_a_full_queue_refuses(proxy):
    engine = Engine(proxy, max_queue=1)  # not started: nothing leaves the queue
    engine.submit(Request([1, 2], Sampling(), lambda r: None))
    with pytest.raises(QueueFull):
        engine.submit(Request([1, 2], Sampling(), lambda r: None))


def test_a_prompt_that_fails_ends_only_its_own_request(proxy):
    class Picky:
        """The large model, except that it cannot read prompts longer than 20 tokens."""

        def __init__(self, lm):
            self.lm = lm
            self.name, self.tokenizer, self.vocab_size, self.eos_token_ids = (lm.name, lm.tokenizer, lm.vocab_size,
                                                                              lm.eos_token_ids)

        def start(self, ids, mask):
            if ids.shape[1] > 20:
                raise RuntimeError("prompt too long for this model")
            return self.lm.start(ids, mask)

        def __getattr__(self, name):
            return getattr(self.lm, name)

    lm = Picky(proxy.large)
    short, long = lm.tokenizer("hello world")["input_ids"], list(range(5, 40))
    reports: dict[str, list[Report]] = {"short": [], "long": []}
    done = threading.Semaphore(0)

    def reporter(key):
        def report(r):
            reports[key].append(r)
            if r.finish_reason:
                done.release()
        return report

    engine = Engine(lm).start()
    try:
        engine.submit(Request(short, Sampling(max_tokens=30), reporter("short")))
        time.sleep(0.2)  # the short request is running when the long one arrives
        engine.submit(Request(long, Sampling(max_tokens=5), reporter("long")))
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        engine.close()
    assert reports["long"][-1].finish_reason == "error" and "too long" in reports["long"][-1].error
    assert reports["short"][-1].finish_reason in ("stop", "length")


def test_a_prompt_over_the_context_is_refused_and_answers_end_at_the_context(tiny):
    from fedpt.decoding import Sampling, generate_tokens
    from fedpt.errors import FedptError
    from fedpt.models import HFCausalLM

    lm = HFCausalLM.load(tiny["small"], dtype="float32")
    assert lm.max_context == 1024
    with pytest.raises(FedptError, match="the prompt has 1100 tokens: no room left in the model's context of 1024"):
        generate_tokens(lm, [[5] * 1100], Sampling(max_tokens=4))
    with pytest.raises(FedptError, match="stop strings must not be empty"):
        Sampling(stop=("",))
    ids = generate_tokens(lm, [[5] * 1012], Sampling(max_tokens=40, ignore_eos=True))[0]
    assert len(ids) == 12  # 1012 + 12 = the context of 1024: before, decoding ran past it into noise


def test_scoring_requests_are_read_together_in_one_pass_that_also_gives_their_token(tiny):
    from fedpt.decoding.engine import Engine, Request
    from fedpt.models import HFCausalLM

    lm = HFCausalLM.load(tiny["small"], dtype="float32")
    calls = {"logprobs": 0, "start": 0}
    for name in calls:
        method = getattr(lm, name)

        def counted(*args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        setattr(lm, name, counted)
    prompts = [[5, 6, 7, 8, 9][: 2 + i % 4] for i in range(8)]

    def score(together: bool) -> list[list]:
        engine, reports = Engine(lm, max_batch=8), [[] for _ in prompts]
        for i, prompt in enumerate(prompts):
            engine.submit(Request(prompt, Sampling(max_tokens=i % 2, echo_logprobs=True, top_logprobs=1,
                                                   ignore_eos=True), reports[i].append))
            if not together:
                engine.run_step()
        while engine.load["waiting"] or engine.load["running"]:
            engine.run_step()
        return reports

    apart, together = score(False), score(True)
    assert calls == {"logprobs": 9, "start": 0}  # 8 passes one by one, 1 for all 8; no second read for a token
    for one, batched in zip(apart, together):
        assert [r.finish_reason for r in one] == [r.finish_reason for r in batched] == [None, "length"]
        first = [(t.id, t.logprob) if t else None for t in one[0].prompt]
        second = [(t.id, t.logprob) if t else None for t in batched[0].prompt]
        assert [f and f[0] for f in first] == [s and s[0] for s in second]
        assert all(f is None or abs(f[1] - s[1]) < 1e-5 for f, s in zip(first, second))
        assert [t.id for t in one[1].tokens] == [t.id for t in batched[1].tokens]
    assert [len(r[1].tokens) for r in together] == [i % 2 for i in range(8)]


def test_an_end_token_chosen_after_an_echo_is_reported_with_its_log_prob(tiny):
    from fedpt.decoding.engine import Engine, Request
    from fedpt.models import HFCausalLM

    lm = HFCausalLM.load(tiny["small"], dtype="float32")
    prompt = [5, 6, 7, 8]
    ids, mask = pad_left([prompt], 0)
    greedy = int(lm.logprobs(ids, mask, last=1)[0, -1].argmax())
    lm.eos_token_ids = {greedy}  # the greedy next token is an end token, as `<|im_end|>` after an answer
    reports = []
    engine = Engine(lm)
    engine.submit(Request(prompt, Sampling(max_tokens=1, echo_logprobs=True, top_logprobs=1), reports.append))
    engine.run_step()
    assert len(reports[0].prompt) == 4 and reports[-1].finish_reason == "stop"
    # before: no entry for it, so lm-eval's sum over token_logprobs[ctxlen:-1] dropped the continuation's last token
    assert [t.id for t in reports[-1].tokens] == [greedy] and reports[-1].new_tokens == 1


def test_a_temperature_that_underflows_decodes_greedily(tiny):
    from fedpt.decoding import generate_tokens
    from fedpt.models import HFCausalLM

    lm = HFCausalLM.load(tiny["small"], dtype="float32")
    greedy = generate_tokens(lm, [[5, 6, 7]], Sampling(max_tokens=6, ignore_eos=True))
    # before: logits / 1e-40 overflowed to NaN and the last vocabulary token came out, repeated
    assert generate_tokens(lm, [[5, 6, 7]], Sampling(max_tokens=6, temperature=1e-40, ignore_eos=True, seed=1)) \
        == greedy
    # a nucleus this small holds the most likely token alone
    assert generate_tokens(lm, [[5, 6, 7]], Sampling(max_tokens=6, temperature=1.0, top_p=1e-300, ignore_eos=True,
                                                     seed=1)) == greedy


def test_a_special_token_as_a_stop_string_ends_the_answer(tiny):
    from fedpt.models import HFCausalLM

    lm = HFCausalLM.load(tiny["small"], dtype="float32")
    special = lm.tokenizer.convert_tokens_to_ids("<|im_start|>")
    step = lm.step

    def forced(state, tokens):  # every decoding step after the first chooses the special token
        out = step(state, tokens).clone()
        out[:, special] = 0.0
        return out

    lm.step = forced
    free = generate_tokens(lm, [[5, 6, 7]], Sampling(max_tokens=4, ignore_eos=True))[0]
    assert free[1:] == [special] * 3
    # before: stops were matched on text decoded without special tokens, so this one never matched
    assert generate_tokens(lm, [[5, 6, 7]], Sampling(max_tokens=4, ignore_eos=True, stop=("<|im_start|>",)))[0] \
        == free[:1]


def test_the_held_back_tail_is_the_longest_start_of_a_stop_string():
    import random

    from fedpt.decoding.engine import _overlap

    def every_length(text, stop):  # the definition, trying every length
        return next((n for n in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:n])), 0)

    rng = random.Random(0)
    for _ in range(20000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 8)))
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 8)))
        assert _overlap(text, stop) == every_length(text, stop), (text, stop)
