"""The Python entry point: `fedpt.load(...)` opens a model (the large alone or proxy-tuned) and returns an LLM
that generates, scores and serves, with the engine and checks that `fedpt generate` and `fedpt serve` use.

    import fedpt
    llm = fedpt.load(large="qwen2.5-coder-1.5b-instruct", small="qwen2.5-coder-0.5b-instruct",
                     adapter="runs/chatterbot/final", fusion=fedpt.Fusion(alpha=1.0))
    print(llm.generate("Who are you?", max_tokens=40))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, overload

from fedpt.decoding import Sampling, generate
from fedpt.models import LanguageModel
from fedpt.proxy import Fusion
from fedpt.proxy.spec import ModelSpec


def spec_from_experiment(folder: str | Path, **overrides: Any) -> ModelSpec:
    """What an experiment recommends: its models, its FedPT adapter and the fusion it chose on validation;
    `overrides` (fields of ModelSpec that are not None) replace what it says."""
    from fedpt.experiment.results import recommended

    chosen = recommended(Path(folder))
    fields = {"large": chosen["large"], "small": chosen["small"], "adapter": chosen["adapter"],
              "fusion": Fusion(**chosen["fusion"])}
    return ModelSpec(**{**fields, **{key: value for key, value in overrides.items() if value is not None}})


class LLM:
    """A LanguageModel with the three things people do with one: generate, score, serve."""

    def __init__(self, lm: LanguageModel, spec: ModelSpec | None = None):
        self.lm, self.spec = lm, spec

    @classmethod
    def load(cls, spec: ModelSpec | None = None, /, *, experiment: str | Path | None = None, **fields: Any) -> LLM:
        """Open the model a ModelSpec (or its fields as keywords, or an experiment folder) describes."""
        if spec is None:
            spec = spec_from_experiment(experiment, **fields) if experiment is not None else ModelSpec(**fields)
        return cls(spec.open(), spec)

    @overload
    def generate(self, prompts: str, sampling: Sampling | None = ..., **options: Any) -> str: ...
    @overload
    def generate(self, prompts: Sequence[str], sampling: Sampling | None = ..., **options: Any) -> list[str]: ...

    def generate(self, prompts, sampling=None, *, chat: bool = True, max_batch: int = 8, progress: Any = None,
                 **options):
        """Continue one prompt (returns a string) or many (a list); `options` are Sampling's fields
        (max_tokens, temperature, top_p, seed, stop), applied over `sampling`."""
        sampling = replace(sampling or Sampling(max_tokens=64), **options)
        texts = generate(self.lm, [prompts] if isinstance(prompts, str) else list(prompts), sampling, chat=chat,
                         max_batch=max_batch, progress=progress)
        return texts[0] if isinstance(prompts, str) else texts

    def score(self, prompts: Sequence[str], answers: Sequence[str], *, chat: bool = True,
              max_length: int = 1024) -> list[float]:
        """Log-probability of each answer given its prompt (end-of-turn token included), summed over its tokens."""
        from fedpt.data import Example
        from fedpt.scoring import response_logprobs

        examples = [Example(prompt, answer) for prompt, answer in zip(prompts, answers, strict=True)]
        return [float(t.sum()) for t in response_logprobs(self.lm, examples, max_length=max_length, chat=chat)]

    def serve(self, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
        """Serve the model over the OpenAI-compatible API until interrupted (options: fedpt.serving.serve's)."""
        from fedpt.serving import serve

        serve(self.lm, host, port, **options)


load = LLM.load
