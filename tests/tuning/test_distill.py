import numpy as np
import torch

from fedpt.config import DistillConfig, TuneConfig
from fedpt.models import HFCausalLM, load_model
from fedpt.proxy import AdapterPair, ProxyTunedLM
from fedpt.scoring import response_logprobs
from fedpt.tuning.distill import distill, teacher_targets
from fedpt.tuning.local import make_trainable, trainable_state

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

    before, weights = student_score(), trainable_state(model)
    stats = distill(model, tokenizer, targets, config, max_length=64, seed=0)
    assert stats["distill_loss_last"] < stats["distill_loss_first"]
    assert student_score() > before
    # the adapter moved, by the norm the stats report
    after = trainable_state(model)
    moved = np.sqrt(sum(((after[k] - weights[k]).astype(np.float64) ** 2).sum() for k in after))
    assert moved > 0 and np.isclose(stats["distill_update_norm"], moved)
