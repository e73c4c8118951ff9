"""Prompt/response data: sources (chatterbot, polarity, JSONL, CSV, HF datasets), fixed splits, server-side
unlabeled text, and how prompts and examples become token ids.

Every source becomes a list of `Example(prompt, response, group)`; `group` is what natural partitions split
on (the chatterbot category by default). Splits are fixed by a hash of the prompt, so the held-out questions
never change with the seed, the client count or the order of the file.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpt.config import DataConfig
from fedpt.errors import FedptError, first_line

__all__ = ["DataConfig", "Example", "load_examples", "load_splits", "encode_prompt", "encode_example", "pad_id"]
GENSIM_EXTRA = "pip install 'fedpt[gensim]'"


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    group: str = ""


def load_examples(config: DataConfig) -> list[Example]:
    """All examples of a source, before splitting."""
    source = config.source
    if source in TASK_SOURCES:
        return [e for part in task_splits(config).values() for e in part]
    if source == "chatterbot":
        examples = load_chatterbot(config.categories)
    elif source == "polarity":
        examples = load_polarity()
    elif source.startswith("hf:"):
        examples = load_hf(source[3:], config)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FedptError(f"data file {path} does not exist (give 'chatterbot', a .jsonl or .csv file, or hf:NAME)")
        try:
            if path.suffix == ".jsonl":
                examples = load_jsonl(path, config)
            elif path.suffix == ".csv":
                examples = load_csv(path, config)
            else:
                raise FedptError(f"data file {path}: unknown format '{path.suffix}'; use .jsonl or .csv")
        except UnicodeDecodeError as e:
            raise FedptError(f"data file {path} is not UTF-8 text (byte {e.start}): is it the right file?") from None
    if not examples:
        raise FedptError(f"data source '{source}' has no examples")
    return examples


def load_splits(config: DataConfig) -> dict[str, list[Example]]:
    """The source's examples, split into "train", "validation" and "test"."""
    if config.source in TASK_SOURCES:
        return task_splits(config)
    return splits(load_examples(config), config)


TASK_SOURCES = ("codeio", "gsm")


def task_splits(config: DataConfig) -> dict[str, list[Example]]:
    """The real tasks' splits, made by the task (math splits by template); each test example is one of the
    problems `fedpt evaluate` judges. Group: the CodeI/O topic, or the math template."""
    from fedpt.tasks import codeio, gsm

    if config.source == "codeio":
        return {name: [Example(codeio.prompt(p), codeio.answer(p), p.topic)
                       for p in codeio.split(name, config.test_percent, config.validation_percent)]
                for name in ("train", "validation", "test")}
    return {name: [Example(gsm.prompt(p, chat=True), p.solution, f"template-{p.template:02d}")
                   for p in gsm.split(name, config.test_percent, config.validation_percent)]
            for name in ("train", "validation", "test")}


def package_data(package: str, relative: str, needed_for: str, install: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FedptError(f"{needed_for} needs the package {package}: {install}")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.exists():
        raise FedptError(f"{needed_for}: {path} is missing from the installed {package}; reinstall: {install}")
    return path


def load_chatterbot(categories: Sequence[str] = ()) -> list[Example]:
    """First question/answer pair of every conversation of the chatterbot English corpus, by category."""
    import yaml

    folder = package_data("chatterbot_corpus", "data/english", "the chatterbot data",
                          "pip install chatterbot-corpus==1.3.3")
    files = sorted(folder.glob("*.yml"))
    known = [f.stem for f in files]
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise FedptError(f"unknown chatterbot categories {unknown}; known: {', '.join(known)}")
    examples = []
    for file in files:
        if categories and file.stem not in categories:
            continue
        for conversation in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", []):
            if isinstance(conversation, list) and len(conversation) >= 2:
                examples.append(Example(str(conversation[0]).strip(), str(conversation[1]).strip(), file.stem))
    return examples


POLARITY_PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n{text}"
POLARITY_LABELS = ("negative", "positive")


def load_polarity() -> list[Example]:
    """The 200 labelled movie-review sentences of gensim's test data (Pang & Lee) as a two-way choice task."""
    path = package_data("gensim", "test/test_data/pang_lee_polarity.cor", "the polarity task", GENSIM_EXTRA)
    examples = []
    for number, line in enumerate(path.read_text(encoding="cp1252").splitlines(), start=1):  # not UTF-8
        label, _, text = line.partition(" ")
        if label not in ("__label__neg", "__label__pos") or not text.strip():
            raise FedptError(f"{path}, line {number}: expected '__label__neg|__label__pos TEXT'")
        answer = POLARITY_LABELS[label == "__label__pos"]
        examples.append(Example(POLARITY_PROMPT.format(text=text.strip()), answer, answer))
    return examples


def _example(row: dict[str, Any], config: DataConfig, where: str) -> Example:
    if not isinstance(row, dict):
        raise FedptError(f"{where}: expected an object with fields, got {type(row).__name__}")
    missing = [f for f in (config.prompt_field, config.response_field) if f not in row]
    if missing:
        raise FedptError(f"{where}: missing field(s) {', '.join(missing)} (fields there: {', '.join(row) or 'none'})")
    prompt, response = row[config.prompt_field], row[config.response_field]
    if not isinstance(prompt, str) or not isinstance(response, str) or not prompt.strip() or not response.strip():
        raise FedptError(f"{where}: '{config.prompt_field}' and '{config.response_field}' must be non-empty text")
    group = str(row.get(config.group_field, "")) if config.group_field else ""
    if config.group_field and config.group_field not in row:
        raise FedptError(f"{where}: missing group field '{config.group_field}'")
    return Example(prompt.strip(), response.strip(), group)


def load_jsonl(path: Path, config: DataConfig) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FedptError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            examples.append(_example(row, config, f"{path}, line {number}"))
    return examples


def load_csv(path: Path, config: DataConfig) -> list[Example]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        # a header row is line 1, so data row i sits on line i + 1
        return [_example(row, config, f"{path}, line {n}") for n, row in enumerate(reader, start=2)]


def load_hf(name: str, config: DataConfig) -> list[Example]:
    import datasets

    dataset_name, _, subset = name.partition(":")
    try:
        table = datasets.load_dataset(dataset_name, subset or None, split=config.split)
    except Exception as e:  # datasets raises many types; the user needs the first line only
        raise FedptError(f"cannot load Hugging Face dataset '{name}' (split {config.split}): {first_line(e)}") from None
    return [_example(row, config, f"hf:{name} row {i}") for i, row in enumerate(table)]


def split_of(example: Example, config: DataConfig) -> str:
    """"test", "validation" or "train", fixed by a hash of the prompt (answers to one prompt stay together)."""
    return hashed_split(example.prompt, config.test_percent, config.validation_percent)


def hashed_split(key: str, test_percent: int, validation_percent: int) -> str:
    """The split a text belongs to, by a hash of it: the same for every seed, client count and file order."""
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 100
    if bucket < test_percent:
        return "test"
    return "validation" if bucket < test_percent + validation_percent else "train"


def splits(examples: Sequence[Example], config: DataConfig) -> dict[str, list[Example]]:
    parts: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    for example in examples:
        parts[split_of(example, config)].append(example)
    return parts


def training_prompts(config: DataConfig, n: int, seed: int) -> list[str]:
    """Up to n distinct prompts of the training split, without their answers: unlabeled server-side text."""
    unique = sorted({e.prompt for e in load_splits(config)["train"]})
    return random.Random(seed).sample(unique, min(n, len(unique)))


def wikipedia_prompts(n: int, seed: int, words: int = 40) -> list[str]:
    """Passages of the short Wikipedia dump shipped in gensim's test data, as 'continue this text' prompts."""
    import bz2

    name = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    dump = package_data("gensim", f"test/test_data/{name}", "distill.texts = 'wikipedia'", GENSIM_EXTRA)
    text = bz2.open(dump, "rt", encoding="utf-8", errors="ignore").read()
    paragraphs = [re.sub(r"\[\[|\]\]|\{\{[^}]*\}\}|'''?|<[^>]+>", "", p).strip() for p in text.split("\n\n")]
    paragraphs = [" ".join(p.split()[:words]) for p in paragraphs if len(p.split()) >= words and "|" not in p]
    random.Random(seed).shuffle(paragraphs)
    return [f"Continue this text: {p}" for p in paragraphs[:n]]


def format_prompt(tokenizer: Any, prompt: str, chat: bool = True) -> str:
    """The text the model reads: the chat template around a user turn, or the raw prompt."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = True) -> list[int]:
    return tokenizer(format_prompt(tokenizer, prompt, chat), add_special_tokens=not chat)["input_ids"]


def pad_id(tokenizer: Any) -> int:
    """The id that fills padded positions (masked out): the pad token, or end-of-text when there is none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_example(tokenizer: Any, example: Example, max_length: int, chat: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + end-of-turn, and labels that score the response part only (-100 elsewhere)."""
    prompt = encode_prompt(tokenizer, example.prompt, chat)
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = prompt[-max(1, max_length // 2):] if len(prompt) + len(response) > max_length else prompt
    response = response[: max_length - len(prompt)]
    return prompt + response, [-100] * len(prompt) + response


def read_prompts(path: Path) -> list[str]:
    """One prompt per line of a text file, or the `prompt` field of each line of a .jsonl file."""
    if not path.is_file():
        raise FedptError(f"prompts file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FedptError(f"prompts file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FedptError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise FedptError(f"{path}, line {number}: needs a text field 'prompt'")
            prompts.append(row["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise FedptError(f"prompts file {path} has no prompts")
    return prompts
