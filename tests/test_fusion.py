import pytest
import torch

from fedpt.data import Example
from fedpt.evaluate import choice_accuracy, fusion_logprobs, option_examples, response_logprobs
from fedpt.fusion import DYNAMIC_ALPHAS, Fusion, kl
from fedpt.lm import HFCausalLM
from fedpt.proxy import ProxyTunedLM, load_expert

torch.manual_seed(0)
L, B, T = (torch.randn(2, 3, 11) * 2 for _ in range(3))


def test_fixed_fusions_by_hand():
    torch.testing.assert_close(Fusion(alpha=0.5)(L, B, T), torch.log_softmax(L + 0.5 * (T - B), -1))
    torch.testing.assert_close(Fusion(weight=1.0)(L, B, T), torch.log_softmax(T, -1))
    proxy = torch.log_softmax(L + (T - B), -1)
    torch.testing.assert_close(Fusion(weight=0.25)(L, B, T), torch.log_softmax(0.75 * proxy + 0.25 * T, -1))
    assert Fusion(alpha=1.5, weight=0.5).label == "alpha=1.5, w=0.5" and Fusion(dynamic=True).label == "dynamic alpha"


def test_dynamic_alpha_matches_the_small_models_shift():
    got = Fusion(dynamic=True)(L, B, T)
    large = torch.log_softmax(L, -1)
    target = kl(torch.log_softmax(T, -1), torch.log_softmax(B, -1))
    for pos in range(2):
        for t in range(3):
            gaps = [abs(kl(torch.log_softmax(L[pos, t] + a * (T[pos, t] - B[pos, t]), -1), large[pos, t])
                        - target[pos, t]) for a in DYNAMIC_ALPHAS]
            best = DYNAMIC_ALPHAS[min(range(len(gaps)), key=gaps.__getitem__)]
            torch.testing.assert_close(got[pos, t], torch.log_softmax(L[pos, t] + best * (T[pos, t] - B[pos, t]), -1))
    # no shift in the small pair: no shift in the large model
    torch.testing.assert_close(Fusion(dynamic=True)(L, B, B), torch.log_softmax(L, -1))


def test_fusion_scores_equal_scoring_each_model(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    from fedpt.lm import load_model

    model, tokenizer, _ = load_model(tiny["small"], dtype="float32")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    expert = load_expert(tiny["small"], tmp_path / "adapter", dtype="float32")
    examples = [Example("what is your name", "my name is fedpt"), Example("hello", "good morning to you")]
    fusions = [Fusion(alpha=0.5), Fusion(weight=0.5), Fusion(dynamic=True)]
    scores = fusion_logprobs(large, expert, examples, fusions, batch_size=2)
    for fusion in fusions:
        expected = response_logprobs(ProxyTunedLM(large, expert, fusion=fusion), examples)
        for got, want in zip(scores[fusion.label], expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for got, want in zip(scores["large"], response_logprobs(large, examples)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_choice_accuracy_by_hand():
    examples = [Example("a", "positive"), Example("b", "negative"), Example("c", "negative")]
    options = ["negative", "positive"]
    assert [e.response for e in option_examples(examples, options)] == options * 3
    # option scores: example a prefers positive (right), b prefers positive (wrong), c prefers negative (right)
    scores = [torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-0.5]),
              torch.tensor([-0.1]), torch.tensor([-4.0])]
    assert choice_accuracy(scores, examples, options) == pytest.approx(2 / 3)
