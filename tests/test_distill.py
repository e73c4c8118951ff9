import torch

from fedpt.distill import DistillConfig, distill, teacher_targets, wikipedia_prompts
from fedpt.evaluate import response_logprobs
from fedpt.lm import HFCausalLM, load_model
from fedpt.proxy import AdapterPair, ProxyTunedLM
from fedpt.train import TuneConfig, make_trainable

PROMPTS = ["what is your name", "tell me a joke", "hello world", "what is a computer"]


def test_distillation_moves_the_student_towards_the_teacher(tiny):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    model, tokenizer, _ = load_model(tiny["small"], dtype="float32")
    model = make_trainable(model, TuneConfig(), seed=0)
    teacher = ProxyTunedLM(large, AdapterPair(model, tokenizer))
    config = DistillConfig(every=1, max_new_tokens=6, top_k=16, steps=25, batch_size=4, learning_rate=5e-3)
    targets = teacher_targets(teacher, PROMPTS, config, max_length=64)
    assert targets and all(values.shape == indices.shape and values.shape[-1] == 16 for _, values, indices in targets)
    examples = [example for example, _, _ in targets]

    def student_score():  # mean log-prob the student gives the teacher's own answers
        scores = response_logprobs(HFCausalLM(model, tokenizer), examples)
        return float(torch.cat(scores).mean())

    before = student_score()
    stats = distill(model, tokenizer, targets, config, max_length=64, seed=0)
    assert stats["distill_loss_last"] < stats["distill_loss_first"]
    assert student_score() > before


def test_wikipedia_passages():
    prompts = wikipedia_prompts(3, seed=0)
    assert len(prompts) == 3 and all(p.startswith("Continue this text: ") and len(p.split()) > 30 for p in prompts)
    assert prompts == wikipedia_prompts(3, seed=0) != wikipedia_prompts(3, seed=1)
