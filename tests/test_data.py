import importlib.util

import pytest

from fedpt.data import (
    DataConfig,
    Example,
    encode_example,
    load_examples,
    load_splits,
    splits,
    training_prompts,
    wikipedia_prompts,
)
from fedpt.errors import FedptError

needs_gensim = pytest.mark.skipif(importlib.util.find_spec("gensim") is None,
                                  reason="gensim's test data is an extra: pip install 'fedpt[gensim]'")


def test_chatterbot_categories_and_fixed_splits():
    config = DataConfig(source="chatterbot")
    examples = load_examples(config)
    assert len(examples) > 2000
    assert {"ai", "tech_support", "trivia"} <= {e.group for e in examples}
    parts = splits(examples, config)
    assert sum(len(p) for p in parts.values()) == len(examples)
    assert 0.05 < len(parts["test"]) / len(examples) < 0.15
    # the split depends on the prompt alone: order and other examples do not move it
    again = splits(list(reversed(examples)), config)
    assert {e.prompt for e in again["test"]} == {e.prompt for e in parts["test"]}
    assert not {e.prompt for e in parts["test"]} & {e.prompt for e in parts["train"]}


def test_unknown_category():
    with pytest.raises(FedptError, match="unknown chatterbot categories"):
        load_examples(DataConfig(categories=["nope"]))


def test_jsonl_and_csv_with_custom_fields(tmp_path):
    rows = ['{"q": "hi", "a": "hello", "who": "x"}', "", '{"q": "bye", "a": "ciao", "who": "y"}']
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    config = DataConfig(source=str(tmp_path / "d.jsonl"), prompt_field="q", response_field="a", group_field="who")
    assert load_examples(config) == [Example("hi", "hello", "x"), Example("bye", "ciao", "y")]
    (tmp_path / "d.csv").write_text("q,a\nhi,hello\n")
    assert load_examples(DataConfig(source=str(tmp_path / "d.csv"), prompt_field="q", response_field="a")) == [
        Example("hi", "hello")
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', r"d.jsonl, line 2: not valid JSON"),
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', r"d.jsonl, line 2: missing field\(s\) response"),
        ('{"prompt": "a", "response": ""}\n', r"line 1: 'prompt' and 'response' must be non-empty text"),
        ('[1, 2]\n', r"line 1: expected an object"),
        ("\n\n", r"has no examples"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(FedptError, match=message):
        load_examples(DataConfig(source=str(tmp_path / "d.jsonl")))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FedptError, match="does not exist"):
        load_examples(DataConfig(source=str(tmp_path / "nope.jsonl")))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(FedptError, match="unknown format"):
        load_examples(DataConfig(source=str(tmp_path / "d.txt")))


def test_encoding_scores_the_answer_only(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["small"])
    ids, labels = encode_example(tokenizer, Example("what is your name", "my name is fedpt"), max_length=64)
    answer = [t for t in labels if t != -100]
    assert tokenizer.decode(answer) == "my name is fedpt<|im_end|>"
    assert ids[-len(answer):] == answer and len(ids) == len(labels)
    short_ids, short_labels = encode_example(tokenizer, Example("what is your name " * 20, "my name is fedpt"), 16)
    assert len(short_ids) <= 16 and any(t != -100 for t in short_labels)


@needs_gensim
def test_polarity_task():
    examples = load_examples(DataConfig(source="polarity"))
    assert len(examples) == 200
    assert {e.response for e in examples} == {"negative", "positive"} and all(e.group == e.response for e in examples)
    assert "movie review" in examples[0].prompt


def test_hugging_face_source_maps_fields_and_reports_failures(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, subset=None, split=None):
        calls.append((name, subset, split))
        if name == "missing/set":
            raise ConnectionError("Couldn't reach the Hub\nlong traceback")
        return datasets.Dataset.from_dict({"question": ["hi", "bye"], "answer": ["hello", "ciao"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    config = DataConfig(source="hf:some/set:en", prompt_field="question", response_field="answer", split="train")
    assert load_examples(config) == [Example("hi", "hello"), Example("bye", "ciao")]
    assert calls == [("some/set", "en", "train")]
    with pytest.raises(FedptError, match="cannot load Hugging Face dataset 'missing/set'.*Couldn't reach the Hub$"):
        load_examples(DataConfig(source="hf:missing/set"))
    with pytest.raises(FedptError, match=r"hf:some/set row 0: missing field\(s\) prompt"):
        load_examples(DataConfig(source="hf:some/set", response_field="answer"))


@needs_gensim
def test_wikipedia_passages():
    prompts = wikipedia_prompts(3, seed=0)
    assert len(prompts) == 3 and all(p.startswith("Continue this text: ") and len(p.split()) > 30 for p in prompts)
    assert prompts == wikipedia_prompts(3, seed=0) != wikipedia_prompts(3, seed=1)


def test_training_prompts_are_distinct_training_prompts_without_answers(qa_file):
    config = DataConfig(source=str(qa_file), test_percent=20, validation_percent=0)
    train = {e.prompt for e in load_splits(config)["train"]}
    prompts = training_prompts(config, 5, seed=0)
    assert len(prompts) == len(set(prompts)) == 5 and set(prompts) <= train
    assert sorted(training_prompts(config, 1000, seed=0)) == sorted(train)


def test_a_missing_optional_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(FedptError, match=r"the polarity task needs the package gensim: pip install 'fedpt\[gensim\]'"):
        load_examples(DataConfig(source="polarity"))
    with pytest.raises(FedptError, match=r"needs the package gensim: pip install 'fedpt\[gensim\]'"):
        wikipedia_prompts(3, seed=0)
