"""The Python entry point: the README's library snippet runs as written (on tiny models), and `fedpt.load` gives
what the pieces it composes give."""

import re
from pathlib import Path

import pytest
import torch

import fedpt
from fedpt.decoding import Sampling, generate
from fedpt.errors import FedptError
from fedpt.models import HFCausalLM
from fedpt.models.interface import pad_left
from fedpt.proxy import Fusion, ProxyTunedLM, load_expert

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    library = README.read_text(encoding="utf-8").split("## Library\n", 1)[1]
    return re.search(r"```python\n(.*?)```", library, re.S).group(1)


def test_the_readme_library_snippet_runs(tiny, tiny_adapter, monkeypatch, capsys):
    served = {}
    monkeypatch.setattr("fedpt.serving.serve", lambda lm, host, port, **options: served.update(lm=lm, port=port))
    code = readme_snippet()
    for name, path in [("qwen2.5-coder-1.5b-instruct", tiny["large"]), ("qwen2.5-coder-0.5b-instruct", tiny["small"]),
                       ("runs/chatterbot/final", tiny_adapter)]:
        assert f'"{name}"' in code
        code = code.replace(f'"{name}"', f'"{path}"')
    exec(compile(code, str(README), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert eval(lines[1]) and len(eval(lines[1])) == 2  # two completions
    [score] = eval(lines[2])
    assert score < 0
    assert isinstance(served["lm"], ProxyTunedLM) and served["port"] == 8000


def test_load_composes_what_the_pieces_give(tiny, tiny_adapter):
    llm = fedpt.load(large=str(tiny["large"]), small=str(tiny["small"]), adapter=tiny_adapter,
                     fusion=fedpt.Fusion(alpha=0.5), dtype="float32", device="cpu")
    by_hand = ProxyTunedLM(HFCausalLM.load(tiny["large"], dtype="float32"),
                           load_expert(tiny["small"], tiny_adapter, dtype="float32"), fusion=Fusion(alpha=0.5))
    prompts = ["hello", "what is your name"]
    assert llm.generate(prompts, max_tokens=6) == generate(by_hand, prompts, Sampling(max_tokens=6))
    assert llm.generate("hello", Sampling(max_tokens=6)) == generate(by_hand, ["hello"], Sampling(max_tokens=6))[0]
    # the answer's log-probability: higher for what the model itself generates than for a random string
    answer = llm.generate("hello", max_tokens=4)
    good, bad = llm.score(["hello", "hello"], [answer, "zq xv"])
    assert good > bad and torch.isfinite(torch.tensor([good, bad])).all()
    alone = fedpt.load(large=str(tiny["large"]), dtype="float32")
    assert isinstance(alone.lm, HFCausalLM)


def test_an_adapter_without_a_small_model_is_that_model_tuned_alone(tiny, tiny_adapter):
    """A federated model judged by itself (the small one, or the large one federated directly), no proxy."""
    tuned = fedpt.load(large=str(tiny["small"]), adapter=tiny_adapter, dtype="float32", device="cpu")
    by_hand = load_expert(tiny["small"], tiny_adapter, dtype="float32").tuned
    base = HFCausalLM.load(tiny["small"], dtype="float32")
    ids, mask = pad_left([[5, 9, 11, 3], [7, 2]], pad_id=0)
    next_token = tuned.lm.start(ids, mask)[0]
    assert torch.allclose(next_token, by_hand.start(ids, mask)[0], atol=1e-5)
    assert not torch.allclose(next_token, base.start(ids, mask)[0], atol=1e-4)  # the adapter is on


@pytest.mark.parametrize("fields, message", [
    ({"large": "x", "small": "y"}, "give adapter too"),
    ({"large": "http://host:8000/v1", "adapter": "a"}, "is a server: give small"),
    ({"large": "x", "fusion": Fusion(alpha=2)}, "a fusion steers"),
    ({"large": ""}, "needs a large model"),
    ({"large": "x", "backend": "onnx"}, "backend must be one of transformers, llama.cpp"),
])
def test_bad_specs_are_one_line_errors(fields, message):
    with pytest.raises(FedptError, match=message):
        fedpt.ModelSpec(**fields)


def test_a_spec_is_keyword_only():
    with pytest.raises(TypeError):
        fedpt.ModelSpec("large", "small")  # five strings in a row could be swapped unnoticed


def test_the_llama_cpp_backend_needs_gguf_files_and_a_lora_adapter(tiny, tiny_adapter, tmp_path):
    spec = fedpt.ModelSpec(large=str(tiny["large"]), backend="llama.cpp")
    with pytest.raises(FedptError, match="has no GGUF file fedpt knows of"):
        spec.open_large()
    full = fedpt.ModelSpec(large=str(tiny["large"]), small=str(tiny["small"]), adapter=tiny["small"],
                           backend="llama.cpp")
    with pytest.raises(FedptError, match="is not a LoRA adapter folder"):
        full.open_expert()
