"""Where models run: the `device` setting resolved the same way everywhere, and every stage on a CUDA GPU.

The plumbing is tested here on any machine; the tests marked `cuda` run where torch sees a CUDA GPU and are
skipped, with that reason, elsewhere."""

import pytest
import torch

from fedpt import config as cfg
from fedpt.errors import FedptError
from fedpt.models.hf import pick_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")


def test_auto_is_a_gpu_where_there_is_one_and_the_cpu_elsewhere(monkeypatch):
    from fedpt.federation.simulation import client_gpus

    run = cfg.load(None, [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu" and pick_device("cpu") == "cpu"
    assert client_gpus(run) == 0.0  # the same config, no GPU: clients ask Ray for none
    with pytest.raises(FedptError, match="torch sees 0 CUDA GPU"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == "cuda" and pick_device("cuda:1") == "cuda:1"
    assert client_gpus(run) == 0.25  # four simulated clients share each GPU
    with pytest.raises(FedptError, match="cuda:2"):
        pick_device("cuda:2")
    with pytest.raises(FedptError, match="unknown device 'cuda:x'"):
        pick_device("cuda:x")  # --device is free text on the command line
    with pytest.raises(FedptError, match="model.device"):
        cfg.load(None, ["model.device='gpu'"])


def test_batches_follow_the_weights(tiny, monkeypatch):
    """train() moves each batch to where the trained weights are (here the CPU, seen through a recording hook)."""
    from fedpt.config import TuneConfig
    from fedpt.data import Example
    from fedpt.tuning.local import load_trainable, train

    model, tokenizer = load_trainable(str(tiny["small"]), TuneConfig(dtype="float32"), "auto")
    seen = []
    model.get_base_model().get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].device), with_kwargs=True)
    train(model, tokenizer, [Example("hello world", "good morning")], TuneConfig(local_steps=2), seed=0)
    assert seen == [next(model.parameters()).device] * 2


@cuda
def test_a_client_trains_on_the_gpu_and_reports_its_gpu_memory(tiny):
    from fedpt.config import TuneConfig
    from fedpt.data import Example
    from fedpt.tuning.local import load_trainable, train

    model, tokenizer = load_trainable(str(tiny["small"]), TuneConfig(dtype="float32"), "cuda")
    stats = train(model, tokenizer, [Example("hello world", "good morning")] * 4, TuneConfig(local_steps=3), seed=0)
    assert next(model.parameters()).device.type == "cuda" and stats["peak_gpu_memory_bytes"] > 0


@cuda
def test_qlora_client_trains_in_4_bit(tiny):
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'fedpt[gpu]')")
    from fedpt.config import TuneConfig
    from fedpt.data import Example
    from fedpt.tuning.local import load_trainable, train, trainable_state

    config = TuneConfig(quantize="nf4", local_steps=3, learning_rate=5e-3)
    model, tokenizer = load_trainable(str(tiny["small"]), config, "cuda")
    before = trainable_state(model)
    train(model, tokenizer, [Example("hello world", "good morning")] * 4, config, seed=0)
    assert any((before[k] != v).any() for k, v in trainable_state(model).items())


@cuda
def test_decoding_and_scoring_stay_on_the_gpu_with_a_host_large_model(tiny, tiny_adapter, encode):
    """The small pair on the GPU, the large model on the CPU (as a black box would be): fusion happens on the GPU,
    and greedy decoding gives the tokens an all-CPU proxy gives."""
    from fedpt.decoding import Sampling, generate_tokens
    from fedpt.models import HFCausalLM
    from fedpt.proxy import ProxyTunedLM, load_expert

    large = HFCausalLM.load(tiny["large"], dtype="float32", device="cpu")
    on_gpu = ProxyTunedLM(large, load_expert(tiny["small"], tiny_adapter, dtype="float32", device="cuda"))
    on_cpu = ProxyTunedLM(large, load_expert(tiny["small"], tiny_adapter, dtype="float32", device="cpu"))
    ids, mask = encode(large.tokenizer)
    logprobs, _ = on_gpu.start(ids, mask)
    assert logprobs.device.type == "cuda"
    prompts = [[int(t) for t, m in zip(row, keep) if m] for row, keep in zip(ids, mask)]
    config = Sampling(max_tokens=6)
    assert generate_tokens(on_gpu, prompts, config) == \
        generate_tokens(on_cpu, prompts, config)
