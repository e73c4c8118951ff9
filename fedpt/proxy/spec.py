"""One way to say which model to run: the large model, proxy-tuned when a small pair is given.

The command line (`generate`, `serve`), the experiment, the demo, distillation's teacher and the library
(`fedpt.load`) all describe a model with a ModelSpec and open it with `spec.open()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedpt.config import BACKENDS, ModelConfig
from fedpt.errors import FedptError
from fedpt.models import LanguageModel
from fedpt.models.base_record import check_base
from fedpt.models.remote import is_url
from fedpt.proxy.fusion import ALPHA_RANGE, Fusion
from fedpt.proxy.pair import ExpertPair, load_expert


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    large: str  # a registered name, a local HF folder, a GGUF file or gguf:NAME, or a server URL
    small: str | None = None  # the small base model; with `adapter`, it proxy-tunes the large
    adapter: str | Path | None = None  # the tuned small: a LoRA adapter folder or a fully fine-tuned model folder;
    # without `small`, the large model's own tuning, run alone (a federated model judged without a proxy)
    fusion: Fusion | None = None  # how the three combine (default: alpha 1)
    dtype: str = "auto"
    device: str = "auto"
    large_device_map: str = ""  # "auto": the large model spread over every GPU
    small_int8: bool = False  # the small pair's frozen weights in int8
    tokenizer: str | None = None  # a URL's or GGUF's tokenizer (default: the small model's)
    served_name: str = ""  # a URL's model name ("" takes the server's first)
    api_key_env: str = ""  # a URL's API key: the NAME of the environment variable that holds it
    top_k: int = 20  # a URL's log-probabilities per position
    backend: str = "transformers"  # or "llama.cpp": local models from their GGUF files, the adapter converted
    force: bool = False  # an adapter on another base than its own, or alpha outside ALPHA_RANGE: allowed

    def __post_init__(self) -> None:
        if not self.large:
            raise FedptError("a model spec needs a large model")
        if self.backend not in BACKENDS:
            raise FedptError(f"backend must be one of {', '.join(BACKENDS)}, got '{self.backend}'")
        if self.small is not None and self.adapter is None:
            raise FedptError("a small model proxy-tunes the large with its tuned version: give adapter too")
        if self.small is None and self.adapter is not None and is_url(self.large):
            raise FedptError(f"an adapter alone tunes a local model, and {self.large} is a server: give small (the "
                             "adapter's base) to proxy-tune it")
        if self.small is None and self.fusion is not None:
            raise FedptError("a fusion steers the large model with a small pair: give small and adapter")
        low, high = ALPHA_RANGE
        if self.fusion and not self.fusion.dynamic and not low <= self.fusion.alpha <= high and not self.force:
            raise FedptError(f"alpha {self.fusion.alpha:g} is outside [{low:g}, {high:g}], where proxy-tuning steers "
                             "(1 as published); pass --force to use it anyway")

    @classmethod
    def from_config(cls, model: ModelConfig, *, adapter: str | Path | None = None, fusion: Fusion | None = None,
                    dtype: str = "auto") -> ModelSpec:
        """A run's models (its [model] section), proxy-tuned by `adapter` when one is given."""
        return cls(large=model.large, small=model.small if adapter is not None else None, adapter=adapter,
                   fusion=fusion, dtype=dtype, device=model.device, large_device_map=model.large_device_map,
                   tokenizer=model.small, served_name=model.large_served_name, api_key_env=model.large_api_key_env,
                   top_k=model.large_top_k, backend=model.backend)

    def open_large(self) -> LanguageModel:
        from fedpt.models.loading import gguf_of, open_lm

        large = gguf_of(self.large) if self.backend == "llama.cpp" else self.large
        return open_lm(large, tokenizer=self.tokenizer or self.small or self.large, served_name=self.served_name,
                       api_key_env=self.api_key_env, top_k=self.top_k, dtype=self.dtype, device=self.device,
                       device_map=self.large_device_map)

    def open_expert(self) -> ExpertPair:
        if self.small is None or self.adapter is None:
            raise FedptError(f"{self.large} has no small pair to open: give small and adapter")
        if self.backend == "llama.cpp":
            return _llama_cpp_pair(self.small, self.adapter, self.tokenizer, self.force)
        return load_expert(self.small, self.adapter, dtype=self.dtype, device=self.device, int8=self.small_int8,
                           force=self.force)

    def open_tuned(self, base: str, folder: str | Path, spread: bool = False) -> LanguageModel:
        """`base` tuned into `folder` (a LoRA adapter or a fully tuned model), alone, on this spec's backend and
        device; `spread` puts it over the GPUs as the large model is (large_device_map)."""
        from fedpt.proxy.pair import is_adapter, load_tuned

        if self.backend == "llama.cpp" and is_adapter(folder):
            return _llama_cpp_pair(base, folder, self.tokenizer or base, self.force).tuned
        return load_tuned(base, folder, dtype=self.dtype, device=self.device,
                          device_map=self.large_device_map if spread else "", force=self.force)

    def open(self, say: Callable[[str], None] | None = None) -> LanguageModel:
        """The large model alone, or proxy-tuned by the small pair with the spec's fusion; `say` (the command
        line's stderr) is told what loads, from where and how big, and how long it took."""
        from fedpt.proxy.tuned_lm import ProxyTunedLM

        say = say or (lambda message: None)
        start = time.monotonic()
        own = self.adapter if self.small is None else None  # the large model's own tuning, run alone
        say(f"loading the large model {_described(self.large, self.backend)}"
            + (f" tuned by {own}" if own is not None else "") + " ...")
        if self.small is None:
            lm = self.open_large() if own is None else self.open_tuned(self.large, own, spread=True)
            say(f"loaded in {time.monotonic() - start:.0f} s")
            return lm
        large = self.open_large()
        say(f"loading the small pair {_described(self.small, self.backend)} with {self.adapter} ...")
        lm = ProxyTunedLM(large, self.open_expert(), fusion=self.fusion or Fusion(alpha=1.0))
        say(f"loaded in {time.monotonic() - start:.0f} s")
        return lm


def _described(model: str, backend: str) -> str:
    """`model` as a person reads it: a server, or a local model with its backend and size on disk."""
    from fedpt.models.loading import gguf_of
    from fedpt.models.store import REGISTRY, is_prepared, resolve

    if is_url(model):
        return f"at {model} (a server)"
    if model in REGISTRY and not is_prepared(model):
        return f"{model} ({backend}; unpacked from its wheels first)"
    try:
        path = Path(gguf_of(model) if backend == "llama.cpp" else resolve(model))
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    except (FedptError, OSError):  # a missing model fails in one line when it is opened, just after
        return f"{model} ({backend})"
    return f"{path} ({backend}, {size / 1e9:.1f} GB on disk)"


def _llama_cpp_pair(small: str, adapter: str | Path, tokenizer: str | None, force: bool = False) -> ExpertPair:
    """The small pair in llama.cpp: one copy of the small model's GGUF weights, read by two LanguageModels, the
    tuned one with the federated LoRA adapter (converted to GGUF once) switched on."""
    from fedpt.models.gguf_lora import to_gguf
    from fedpt.models.hf import load_tokenizer
    from fedpt.models.llama_cpp import Context, LlamaCppLM
    from fedpt.models.loading import gguf_of
    from fedpt.proxy.pair import SeparatePair, is_adapter

    check_base(adapter, small, force)
    if not is_adapter(adapter):
        raise FedptError(f"{adapter} is not a LoRA adapter folder: the llama.cpp backend runs a small model tuned "
                         "with LoRA (a fully tuned one runs with the transformers backend)")
    gguf = Path(gguf_of(small))
    context = Context(gguf)
    words = load_tokenizer(tokenizer or small)
    return SeparatePair(LlamaCppLM(context, words, name=f"{Path(small).name} (llama.cpp)"),
                        LlamaCppLM(context, words, adapter=to_gguf(adapter, gguf),
                                   name=f"{Path(small).name}+{Path(adapter).name} (llama.cpp)"))
