"""Tiny random Qwen2 models with a tokenizer trained here: every unit test runs offline in well under a second."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "what is your name", "my name is fedpt", "how are you today", "i am fine thank you",
    "tell me a joke", "why did the chicken cross the road", "what is a computer", "a machine that computes",
    "hello world", "good morning to you", "write a python function", "def add(a, b): return a + b",
]


def make_tokenizer(folder: Path, vocab_size: int = 320, corpus: list[str] = CORPUS) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def make_model(folder: Path, tokenizer_folder: Path, *, layers: int, hidden: int, extra_rows: int = 0,
               seed: int = 0) -> Path:
    """A random Qwen2 causal LM saved with the tokenizer; `extra_rows` pads the output head past the tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer) + extra_rows, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # larger random weights give peaked, more varied distributions than the tiny default init
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders: `small` and `large` share a tokenizer (large has a padded head); `other` has its own tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer(root / "tokenizer")
    other_tok = make_tokenizer(root / "other-tokenizer", vocab_size=290, corpus=[c.upper() for c in CORPUS])
    return {
        "small": make_model(root / "small", tok, layers=2, hidden=32, seed=1),
        "large": make_model(root / "large", tok, layers=3, hidden=48, extra_rows=13, seed=2),
        "other": make_model(root / "other", other_tok, layers=2, hidden=32, seed=3),
    }


@pytest.fixture()
def fedpt_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDPT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"
