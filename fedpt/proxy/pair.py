"""The small pair: the small model before (`base`) and after (`tuned`) fine-tuning, read at the same positions.

With a LoRA adapter, base and tuned are one set of weights run as one doubled batch (`AdapterPair`); a fully
fine-tuned model gives two separate models (`SeparatePair`). `load_expert` picks the right one from a folder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedpt.errors import FedptError, first_line
from fedpt.models import HFCausalLM, LanguageModel, check_same_vocabulary, load_model, shortest_context
from fedpt.models.base_record import check_base
from fedpt.models.int8 import quantize_int8


class ExpertPair(ABC):
    """The small model before (`base`) and after (`tuned`) fine-tuning, read at the same positions."""

    name: str
    tokenizer: Any
    vocab_size: int

    @property
    @abstractmethod
    def tuned(self) -> LanguageModel:
        """The tuned small model alone, as a LanguageModel (to score or decode it by itself)."""

    @abstractmethod
    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Any]:
        """Like LanguageModel.start, returning (base log-probs, tuned log-probs, state)."""

    @abstractmethod
    def step(self, state: Any, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Like LanguageModel.step, returning (base log-probs, tuned log-probs)."""

    @abstractmethod
    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> tuple[Tensor, Tensor]:
        """Like LanguageModel.logprobs, returning (base log-probs, tuned log-probs)."""

    @abstractmethod
    def select(self, state: Any, rows: Sequence[int]) -> Any:
        """Like LanguageModel.select."""

    @abstractmethod
    def join(self, state: Any, other: Any) -> Any:
        """Like LanguageModel.join."""


class AdapterPair(ExpertPair):
    """A small model and its LoRA adapter: base and tuned in one batched forward over shared weights.

    Each batch is doubled; the adapter's contribution is multiplied by 0 on the first half of the rows and by
    1 on the second, so one set of weights and one forward serve both models. Outside the pair's calls the
    adapter is on, so `tuned` is the same model read without doubling.
    """

    def __init__(self, peft_model: torch.nn.Module, tokenizer: Any, name: str = "small+adapter"):
        self._lm = HFCausalLM(peft_model, tokenizer, name=name)
        self.name, self.tokenizer, self.vocab_size = name, tokenizer, self._lm.vocab_size
        self.max_context = self._lm.max_context
        self._row_mask: Tensor | None = None
        self._hook_lora(peft_model)

    @property
    def tuned(self) -> LanguageModel:
        return self._lm

    def _hook_lora(self, model: torch.nn.Module) -> None:
        from peft.tuners.lora import LoraLayer

        hooked = 0
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter, lora_b in module.lora_B.items():
                if adapter in getattr(module, "lora_variant", {}) or not isinstance(lora_b, torch.nn.Linear):
                    raise FedptError(
                        f"{self.name}: only plain LoRA on linear layers can share weights between base and tuned "
                        "(no DoRA, no embedding LoRA); merge the adapter and pass the merged folder instead"
                    )
                lora_b.register_forward_hook(self._mask_rows)
                hooked += 1
        if hooked == 0:
            raise FedptError(f"{self.name}: the adapter has no LoRA layers")

    def _mask_rows(self, module: torch.nn.Module, inputs: Any, output: Tensor) -> Tensor:
        if self._row_mask is None:  # outside this pair's calls the adapter behaves as usual
            return output
        # zero the adapter's output on the rows that play the base model
        return output * self._row_mask.to(output.dtype).view(-1, *([1] * (output.dim() - 1)))

    @contextmanager
    def _base_then_tuned(self, batch: int) -> Iterator[None]:
        self._row_mask = torch.cat([torch.zeros(batch), torch.ones(batch)]).to(self._lm.device)
        try:
            yield
        finally:
            self._row_mask = None

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Any]:
        with self._base_then_tuned(len(input_ids)):
            lp, state = self._lm.start(input_ids.repeat(2, 1), attention_mask.repeat(2, 1))
        base, tuned = lp.chunk(2)
        return base, tuned, state

    def step(self, state: Any, tokens: Tensor) -> tuple[Tensor, Tensor]:
        with self._base_then_tuned(len(tokens)):
            base, tuned = self._lm.step(state, tokens.repeat(2)).chunk(2)
        return base, tuned

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> tuple[Tensor, Tensor]:
        with self._base_then_tuned(len(input_ids)):
            base, tuned = self._lm.logprobs(input_ids.repeat(2, 1), attention_mask.repeat(2, 1), last).chunk(2)
        return base, tuned

    # the state holds 2B rows: the B base rows, then the same B rows tuned
    def select(self, state: Any, rows: Sequence[int]) -> Any:
        batch = len(state.attention_mask) // 2
        return self._lm.select(state, [*rows, *(batch + r for r in rows)])

    def join(self, state: Any, other: Any) -> Any:
        a, b = len(state.attention_mask) // 2, len(other.attention_mask) // 2
        joined = self._lm.join(state, other)  # rows: a base, a tuned, b base, b tuned
        base = [*range(a), *range(2 * a, 2 * a + b)]
        tuned = [*range(a, 2 * a), *range(2 * a + b, 2 * (a + b))]
        return self._lm.select(joined, base + tuned)


class SeparatePair(ExpertPair):
    """Base and tuned as two models (full fine-tuning, or two unrelated checkpoints), each with its own cache."""

    def __init__(self, base: LanguageModel, tuned: LanguageModel):
        check_same_vocabulary(base, tuned)
        self.base, self._tuned = base, tuned
        self.name = f"{base.name} -> {tuned.name}"
        self.tokenizer = base.tokenizer
        self.vocab_size = min(base.vocab_size, tuned.vocab_size)
        self.max_context = shortest_context(base, tuned)

    @property
    def tuned(self) -> LanguageModel:
        return self._tuned

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Any]:
        base, base_state = self.base.start(input_ids, attention_mask)
        tuned, tuned_state = self._tuned.start(input_ids, attention_mask)
        return base, tuned, (base_state, tuned_state)

    def step(self, state: Any, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.step(state[0], tokens), self._tuned.step(state[1], tokens)

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> tuple[Tensor, Tensor]:
        return (self.base.logprobs(input_ids, attention_mask, last),
                self._tuned.logprobs(input_ids, attention_mask, last))

    def select(self, state: Any, rows: Sequence[int]) -> Any:
        return self.base.select(state[0], rows), self._tuned.select(state[1], rows)

    def join(self, state: Any, other: Any) -> Any:
        return self.base.join(state[0], other[0]), self._tuned.join(state[1], other[1])


def is_adapter(folder: str | Path) -> bool:
    """A LoRA adapter folder (what LoRA federations write) rather than a whole model folder."""
    return (Path(folder).expanduser() / "adapter_config.json").is_file()


def load_expert(
    small: str | Path, adapter: str | Path, *, dtype: str = "auto", device: str = "cpu", int8: bool = False,
    device_map: str = "", force: bool = False
) -> ExpertPair:
    """The small base model and its tuned version: a LoRA adapter folder, or a fully fine-tuned model folder.

    `int8` stores the frozen weights in int8 (the adapter stays as trained): faster decoding, slightly
    different numbers; benchmarks/decode.py measures both.
    """
    path = Path(adapter).expanduser()
    check_base(path, small, force)
    if is_adapter(path):
        from peft import PeftModel

        model, tokenizer, _ = load_model(small, dtype=dtype, device=device, device_map=device_map)
        try:
            peft_model = PeftModel.from_pretrained(model, path)
        except Exception as e:  # peft raises many types for a foreign or broken adapter
            raise FedptError(f"cannot load adapter {path} onto {small}: {first_line(e)}") from None
        _check_finite(peft_model, path, only="lora_")
        if int8:
            quantize_int8(peft_model)
        return AdapterPair(peft_model.eval(), tokenizer, name=f"{Path(str(small)).name}+{path.name}")
    if (path / "config.json").is_file():
        pair = [HFCausalLM.load(folder, dtype=dtype, device=device, device_map=device_map) for folder in (small, path)]
        _check_finite(pair[1].model, path)
        if int8:
            for lm in pair:
                quantize_int8(lm.model)
        return SeparatePair(*pair)
    raise FedptError(
        f"adapter {path} is neither a LoRA adapter folder (adapter_config.json) nor a model folder (config.json)"
    )


def _check_finite(model: torch.nn.Module, folder: Path, only: str = "") -> None:
    """A diverged training leaves NaN or inf weights, which decode to empty text: refuse them."""
    for name, p in model.named_parameters():
        if only in name and not torch.isfinite(p).all():
            raise FedptError(f"{folder}: weight {name} has NaN or inf values (a diverged training?); use an "
                             "earlier round's folder")


def load_tuned(small: str | Path, tuned: str | Path, *, dtype: str = "auto", device: str = "cpu",
               device_map: str = "", force: bool = False) -> LanguageModel:
    """The tuned small model alone: the base model with a LoRA adapter folder, or a fully fine-tuned folder."""
    if is_adapter(tuned):
        return load_expert(small, tuned, dtype=dtype, device=device, device_map=device_map, force=force).tuned
    return HFCausalLM.load(Path(tuned).expanduser(), dtype=dtype, device=device, device_map=device_map)
