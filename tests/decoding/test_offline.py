"""Decoding: the sampling rule itself (greedy, temperature, top-p, seeds), stop strings and stop tokens, and offline
generation through the engine."""

import pytest
import torch

from fedpt.data import encode_prompt
from fedpt.decoding import Sampling, choose, generate, generate_tokens
from fedpt.errors import FedptError
from fedpt.models import HFCausalLM

PROMPTS = ["what is your name", "tell me a joke about a computer and a road", "hello"]
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def frequencies(temperature, top_p, seed=0, rows=20000):
    logprobs = PROBS.log().expand(rows, -1)
    picked = choose(logprobs, temperature, top_p, torch.Generator().manual_seed(seed))
    return torch.bincount(picked, minlength=len(PROBS)).float() / rows


def test_greedy_takes_the_argmax():
    assert choose(torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]]), 0.0, 1.0, torch.Generator()).tolist() == [1, 0]


def test_temperature_one_samples_the_distribution():
    torch.testing.assert_close(frequencies(1.0, 1.0), PROBS, atol=0.015, rtol=0)


def test_temperature_sharpens_by_the_power_of_its_inverse():
    sharpened = PROBS**2 / (PROBS**2).sum()  # temperature 0.5: p^(1/0.5), renormalised
    torch.testing.assert_close(frequencies(0.5, 1.0), sharpened, atol=0.015, rtol=0)


def test_top_p_keeps_the_smallest_nucleus():
    # 0.5 + 0.3 = 0.8 >= 0.7: the nucleus is the first two tokens, renormalised to 0.625 / 0.375
    torch.testing.assert_close(frequencies(1.0, 0.7), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    assert frequencies(1.0, 0.4)[0] == 1.0  # the top token alone holds more than 0.4


def test_seeds_decide_the_samples():
    logprobs = PROBS.log().expand(64, -1)
    same = [choose(logprobs, 1.0, 1.0, torch.Generator().manual_seed(3)) for _ in range(2)]
    other = choose(logprobs, 1.0, 1.0, torch.Generator().manual_seed(4))
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], other)


def test_generation_is_reproducible_from_its_seed(tiny):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    sampled = Sampling(max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert generate(large, PROMPTS, sampled) == generate(large, PROMPTS, sampled)
    assert generate(large, PROMPTS, sampled) != generate(large, PROMPTS, Sampling(
        max_tokens=8, temperature=1.0, top_p=0.9, seed=4))


def test_generation_stops_at_stop_strings_and_stop_tokens(tiny):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    tokens = generate_tokens(large, [encode_prompt(large.tokenizer, "hello")], Sampling(max_tokens=8))
    text = large.tokenizer.decode(tokens[0])
    assert len(text) > 2
    stopped = generate(large, ["hello"], Sampling(max_tokens=8, stop=(text[1:3],)))
    assert stopped == [text[: text.find(text[1:3])]]
    # several stop strings: the text ends before the first one to appear, whatever their order
    either = generate(large, ["hello"], Sampling(max_tokens=8, stop=(text[2:4], text[1:3])))
    assert either == stopped
    large.eos_token_ids = set(range(len(large.tokenizer)))  # every token ends the answer
    assert generate(large, ["hello"], Sampling(max_tokens=8)) == [""]


@pytest.mark.parametrize("field, value", [("max_tokens", -1), ("temperature", -1.0), ("temperature", float("inf")),
                                          ("top_p", 0.0)])
def test_bad_settings(field, value):
    with pytest.raises(FedptError, match=field):
        Sampling(**{field: value})


def test_bad_generation_settings(tiny):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    with pytest.raises(FedptError, match="max_tokens"):
        generate(large, ["hello"], Sampling(max_tokens=0))
    with pytest.raises(FedptError, match="max_batch"):
        generate(large, ["hello"], Sampling(max_tokens=2), max_batch=0)
    with pytest.raises(FedptError, match="prompt 2 is empty"):
        generate(large, ["hello", ""], Sampling(max_tokens=2), chat=False)


def test_progress_moves_per_token_and_ends_at_the_whole_budget(tiny):
    class Progress:  # the part of rich's Progress that generation uses
        def __init__(self):
            self.advances, self.total = [], None

        def add_task(self, description, total):
            self.total = total
            return 0

        def advance(self, task_id, n):
            self.advances.append(n)

        def remove_task(self, task_id):
            pass

    lm, progress = HFCausalLM.load(tiny["large"], dtype="float32"), Progress()
    generate(lm, ["hello"], Sampling(max_tokens=12, ignore_eos=True), progress=progress)
    assert progress.total == 12 and sum(progress.advances) == 12
    assert len(progress.advances) >= 10  # before: one step, when the answer was done
