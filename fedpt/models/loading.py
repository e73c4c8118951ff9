"""One way to open a model from what a user writes: a registered name or a local Hugging Face folder
(transformers), a GGUF file or `gguf:NAME` of a registered name (llama.cpp, in process), or an http(s) URL of a
completions server (a black box)."""

from __future__ import annotations

from fedpt.errors import FedptError
from fedpt.models.hf import HFCausalLM, load_tokenizer
from fedpt.models.interface import LanguageModel
from fedpt.models.remote import Endpoint, RemoteLM, is_url


def open_lm(name: str, *, tokenizer: str | None = None, served_name: str = "", api_key_env: str = "",
            top_k: int = 20, dtype: str = "auto", device: str = "cpu", device_map: str = "") -> LanguageModel:
    """A LanguageModel for `name`. A URL needs `tokenizer`: the model whose tokenizer the server shares (the small
    model); `served_name`, `api_key_env` (the variable's name) and `top_k` apply to URLs only."""
    if is_url(name):
        endpoint = Endpoint(url=name, model=served_name, api_key_env=api_key_env, top_k=top_k)
        return RemoteLM(endpoint, load_tokenizer(_tokenizer_for(name, tokenizer)))
    if name.startswith("gguf:"):
        from fedpt.models import store
        from fedpt.models.llama_cpp import LlamaCppLM

        registered = name.removeprefix("gguf:")
        return LlamaCppLM(store.gguf_file(registered), load_tokenizer(tokenizer or registered), name=name)
    if name.endswith(".gguf"):
        from fedpt.models.llama_cpp import LlamaCppLM

        return LlamaCppLM(name, load_tokenizer(_tokenizer_for(name, tokenizer)))
    return HFCausalLM.load(name, dtype=dtype, device=device, device_map=device_map)


def _tokenizer_for(name: str, tokenizer: str | None) -> str:
    if tokenizer is None:
        raise FedptError(f"{name}: give the small model (or --tokenizer) whose tokenizer it shares")
    return tokenizer


def gguf_of(name: str) -> str:
    """What the llama.cpp backend runs for `name`: a GGUF file as given, the verified GGUF of a registered name, or
    a URL as it is (a server is its own backend)."""
    from fedpt.models import store

    if is_url(name) or name.endswith(".gguf"):
        return name
    name = name.removeprefix("gguf:")
    if name in store.REGISTRY:
        return str(store.gguf_file(name))
    raise FedptError(f"{name} has no GGUF file fedpt knows of: give the llama.cpp backend a .gguf file or a "
                     f"registered name ({', '.join(store.REGISTRY)})")
