"""The transformers backend: vocabulary cut to the tokenizer, one-line load errors."""

import shutil

import pytest

from fedpt.errors import FedptError
from fedpt.models import HFCausalLM, load_model


def test_head_rows_past_the_tokenizer_are_cut(tiny, encode):
    large = HFCausalLM.load(tiny["large"], dtype="float32")
    assert large.model.get_output_embeddings().weight.shape[0] == len(large.tokenizer) + 13
    assert large.vocab_size == len(large.tokenizer)
    ids, mask = encode(large.tokenizer)
    assert large.logprobs(ids, mask, last=1).shape[-1] == len(large.tokenizer)


def test_corrupt_weights_are_a_one_line_error(tmp_path, tiny):
    broken = tmp_path / "broken"
    shutil.copytree(tiny["small"], broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(FedptError, match=r"cannot load model folder") as info:
        load_model(broken)
    assert "\n" not in str(info.value)


def test_unknown_dtype(tiny):
    with pytest.raises(FedptError, match="unknown dtype 'int3'"):
        load_model(tiny["small"], dtype="int3")


def test_auto_dtype_is_bfloat16_only_where_computed_natively(monkeypatch):
    import torch

    from fedpt.models import hf

    monkeypatch.setattr(hf, "native_bf16", lambda device="cpu": False)
    assert hf.torch_dtype("auto") == torch.float32
    monkeypatch.setattr(hf, "native_bf16", lambda device="cpu": True)
    assert hf.torch_dtype("auto") == torch.bfloat16
    assert hf.torch_dtype("float16") == torch.float16
    with pytest.raises(FedptError, match="unknown dtype 'int3'"):
        hf.torch_dtype("int3")


def test_the_end_of_document_token_ends_an_answer_too(tiny):
    from fedpt.models import HFCausalLM

    lm = HFCausalLM.load(tiny["small"], dtype="float32")
    ids = lm.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    # before: only <|im_end|> (the generation config's), and a raw completion ran on past <|endoftext|>
    assert set(ids) <= lm.eos_token_ids
