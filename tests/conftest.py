"""Tiny random Qwen2 models with a tokenizer trained here, a tiny adapter, and a tiny question/answer file:
every unit test runs offline in well under a second."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fedpt.runtime import setup_process

os.environ["HF_HUB_OFFLINE"] = "1"
setup_process()

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
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
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


@pytest.fixture(scope="session")
def twin(tiny, tmp_path_factory) -> Path:
    """A model of the tiny small model's shapes and tokenizer with other weights: what an adapter must not go on."""
    return make_model(tmp_path_factory.mktemp("twin"), tiny["small"], layers=2, hidden=32, seed=9)


@pytest.fixture()
def fedpt_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDPT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="session")
def lora(tiny):
    """lora(random=True) -> (peft model, tokenizer): the tiny small model in float32 with a LoRA adapter on q and v,
    random (so that tuned differs from base) or as peft initialises it (B = 0: tuned equals base)."""
    from peft import LoraConfig, get_peft_model

    from fedpt.models import load_model

    def make(random: bool = True, seed: int = 0):
        model, tokenizer, _ = load_model(tiny["small"], dtype="float32")
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=not random)
        return get_peft_model(model, config).eval(), tokenizer

    return make


@pytest.fixture(scope="session")
def tiny_adapter(lora, tmp_path_factory) -> Path:
    """A saved random LoRA adapter for the tiny small model (what `fedpt generate --adapter` takes)."""
    folder = tmp_path_factory.mktemp("adapter")
    lora()[0].save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def qa_file(tmp_path_factory) -> Path:
    """Three groups of question/answer pairs in the tiny tokenizer's words."""
    rows = []
    topics = {"names": ["what is your name", "my name is fedpt"], "jokes": ["tell me a joke", "why did the chicken"],
              "hello": ["hello world", "good morning to you"]}
    for group, (q, a) in topics.items():
        for i in range(12):
            rows.append({"prompt": f"{q} {i}", "response": f"{a} {i}", "topic": group})
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_run(tiny, qa_file):
    """tiny_run(out, **sections) -> a RunConfig of 3 clients x 2 rounds on the tiny models and qa_file."""
    from fedpt import config as cfg

    def make(out: Path, **sections) -> cfg.RunConfig:
        base = cfg.load(None, [], out=str(out))
        run = cfg.replace(
            base,
            model={"small": str(tiny["small"]), "large": str(tiny["large"])},
            data={"source": str(qa_file), "group_field": "topic", "test_percent": 20, "validation_percent": 0},
            federation={"clients": 3, "rounds": 2, "eval_examples": 8, "client_cpus": 1},
            tuning={"dtype": "float32", "local_steps": 2, "batch_size": 2, "max_length": 32, "learning_rate": 5e-3},
        )
        return cfg.replace(run, **sections) if sections else run

    return make


PROMPTS = ["what is your name", "tell me a joke about a computer and a road", "hello"]


@pytest.fixture(scope="session")
def encode():
    """encode(tokenizer, prompts=PROMPTS) -> left-padded (ids, mask) of chat-formatted prompts."""
    from fedpt.data import encode_prompt
    from fedpt.models import pad_left

    def make(tokenizer, prompts=PROMPTS):
        return pad_left([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)

    return make


@pytest.fixture()
def cli(monkeypatch, capsys):
    """cli(*args) -> (exit code, stdout, stderr) of `fedpt ARGS`, run in this process."""
    import sys

    from fedpt.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["fedpt", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
