"""GGUF models run in this process by llama.cpp (llama-cpp-python's low-level API, the extra `fedpt[llama]`):
4-bit weights, real batches, and LoRA adapters switched on per decode call.

One llama.cpp context holds many sequences, each with its own positions in a KV cache they share: a row of a
batch is a sequence, so a decoding step of B rows is one `llama_decode` of B tokens, rows leave by freeing their
sequence and join by taking a free one (the LanguageModel contract's `select` and `join`). A LoRA adapter in GGUF
form (fedpt/models/gguf_lora.py) is applied per decode call, so the small base and tuned models share one copy
of the weights: base rows and tuned rows are sequences of one context, decoded in two calls per step.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedpt.errors import FedptError
from fedpt.models.interface import LanguageModel, end_tokens, unpadded
from fedpt.models.remote import PROBE


class Context:
    """A loaded GGUF model and one llama.cpp context: up to `n_seq` sequences sharing a KV cache of `n_ctx`
    tokens, fed `n_batch` tokens per llama_decode call."""

    def __init__(self, gguf: str | Path, *, n_ctx: int = 16384, n_seq: int = 32, n_batch: int = 512,
                 threads: int | None = None):
        try:
            import llama_cpp as lib
        except ImportError:
            raise FedptError("GGUF models run through llama.cpp: pip install 'fedpt[llama]'") from None
        self.lib, self.path = lib, Path(gguf).expanduser()
        if not self.path.is_file():
            raise FedptError(f"GGUF file {self.path} does not exist")
        lib.llama_backend_init()
        lib.llama_log_set(_QUIET, ctypes.c_void_p())
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), lib.llama_model_default_params())
        if not self.model:
            raise FedptError(f"llama.cpp cannot load {self.path}: not a GGUF model it knows")
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
        params.kv_unified = True  # the sequences share the whole cache, however long each is
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise FedptError(f"llama.cpp cannot make a context of {n_ctx} tokens for {self.path}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self.model)  # the context the model was trained for
        self.n_ctx, self.n_batch, self.n_seq_max = n_ctx, n_batch, n_seq
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        self.free = list(range(n_seq - 1, -1, -1))
        self.adapters: dict[str, Any] = {}
        self.active: Any = None
        weakref.finalize(self, _close, lib, self.batch, self.ctx, self.model, self.adapters)

    def adapter(self, path: Path) -> Any:
        """A LoRA adapter in GGUF form, loaded once."""
        key = str(path)
        if key not in self.adapters:
            handle = self.lib.llama_adapter_lora_init(self.model, key.encode())
            if not handle:
                raise FedptError(f"llama.cpp cannot load the LoRA adapter {path} onto {self.path.name}")
            self.adapters[key] = handle
        return self.adapters[key]

    def use(self, adapter: Any) -> None:
        """Decode the next calls with this adapter on (None: the base model)."""
        if adapter is self.active:
            return
        if adapter is None:
            self.lib.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            handles = (self.lib.llama_adapter_lora_p_ctypes * 1)(adapter)
            self.lib.llama_set_adapters_lora(self.ctx, handles, 1, (ctypes.c_float * 1)(1.0))
        self.active = adapter

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise FedptError(f"llama.cpp holds {len(self.free)} more sequences, {n} asked: raise n_seq")
        return [self.free.pop() for _ in range(n)]

    def release(self, seqs: list[int]) -> None:
        for seq in seqs:
            self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
            self.free.append(seq)
        seqs.clear()

    def decode(self, feeds: Sequence[tuple[int, int, Sequence[int], int]]) -> list[np.ndarray]:
        """Feed (sequence, first position, tokens, n) for several sequences; the raw logits after each feed's last
        n tokens, (n, V) each. Tokens go n_batch at a time into llama_decode."""
        entries = [(seq, pos + i, token, i >= len(tokens) - n)
                   for seq, pos, tokens, n in feeds for i, token in enumerate(tokens)]
        out: list[np.ndarray] = []
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start: start + self.n_batch]
            batch = self.batch
            for i, (seq, pos, token, wanted) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, wanted
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(chunk)
            code = self.lib.llama_decode(self.ctx, batch)
            if code != 0:
                raise FedptError(f"llama.cpp could not decode (code {code}): the KV cache of {self.n_ctx} tokens "
                                 "is full or the batch is malformed; raise n_ctx or send fewer rows")
            for i, (_, _, _, wanted) in enumerate(chunk):
                if wanted:
                    logits = self.lib.llama_get_logits_ith(self.ctx, i)
                    out.append(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy())
        rows, at = [], 0
        for _, _, _, n in feeds:
            rows.append(np.stack(out[at: at + n]))
            at += n
        return rows

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        buffer = (self.lib.llama_token * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), False, True)
        return list(buffer[:n])

    def end_tokens(self) -> set[int]:
        ids = {self.lib.llama_vocab_eos(self.vocab), self.lib.llama_vocab_eot(self.vocab)}
        return {i for i in ids if i >= 0}


@dataclass
class SeqState:
    """The rows of a batch: each row's llama.cpp sequence and its length. A state gives its sequences back to the
    context when it is dropped, unless `select` or `join` handed them to a new state."""

    seqs: list[int]
    lengths: list[int]
    context: Context = field(repr=False)

    def __post_init__(self) -> None:
        weakref.finalize(self, self.context.release, self.seqs)


class LlamaCppLM(LanguageModel):
    """Next-token log-probabilities of a GGUF model (with a LoRA adapter on, if given) through a llama.cpp
    context that may be shared with other LlamaCppLMs of the same model."""

    def __init__(self, gguf: str | Path | Context, tokenizer: Any, *, adapter: str | Path | None = None,
                 name: str | None = None, **context: Any):
        self.context = gguf if isinstance(gguf, Context) else Context(gguf, **context)
        path = self.context.path
        self.adapter = self.context.adapter(Path(adapter)) if adapter is not None else None
        self.tokenizer, self.name = tokenizer, name or path.name + (f"+{Path(adapter).name}" if adapter else "")
        self.vocab_size = min(self.context.n_vocab, len(tokenizer))
        self.max_context = min(n for n in (self.context.n_ctx_train, self.context.n_ctx) if n > 0)
        self.eos_token_ids = end_tokens(tokenizer, *self.context.end_tokens())
        ours = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
        theirs = self.context.tokenize(PROBE)
        if theirs != list(ours):
            raise FedptError(f"{path.name} splits text into other tokens than the tokenizer given with it "
                             f"({theirs[:8]} against {ours[:8]}); proxy-tuning needs one vocabulary")

    def _decode(self, feeds: list[tuple[int, int, Sequence[int], int]]) -> Tensor:
        self.context.use(self.adapter)
        rows = self.context.decode(feeds)
        return torch.log_softmax(torch.from_numpy(np.stack(rows))[..., : self.vocab_size], -1)  # (B, n, V)

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, SeqState]:
        rows = unpadded(input_ids, attention_mask)
        state = SeqState(self.context.take(len(rows)), [len(r) for r in rows], self.context)
        return self._decode([(seq, 0, row, 1) for seq, row in zip(state.seqs, rows)])[:, 0], state

    def step(self, state: SeqState, tokens: Tensor) -> Tensor:
        feeds = [(seq, n, [t], 1) for seq, n, t in zip(state.seqs, state.lengths, tokens.tolist())]
        state.lengths[:] = [n + 1 for n in state.lengths]
        return self._decode(feeds)[:, 0]

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> Tensor:
        rows = unpadded(input_ids, attention_mask)
        if any(len(row) < last for row in rows):
            raise FedptError(f"asked for the last {last} positions of a row shorter than that")
        state = SeqState(self.context.take(len(rows)), [len(r) for r in rows], self.context)
        try:
            return self._decode([(seq, 0, row, last) for seq, row in zip(state.seqs, rows)])
        finally:
            self.context.release(state.seqs)

    def select(self, state: SeqState, rows: Sequence[int]) -> SeqState:
        kept = set(rows)
        self.context.release([seq for i, seq in enumerate(state.seqs) if i not in kept])
        new = SeqState([state.seqs[i] for i in rows], [state.lengths[i] for i in rows], self.context)
        state.seqs.clear()  # handed over: the old state frees nothing
        return new

    def join(self, state: SeqState, other: SeqState) -> SeqState:
        new = SeqState(state.seqs + other.seqs, state.lengths + other.lengths, self.context)
        state.seqs.clear()
        other.seqs.clear()
        return new


def _close(lib: Any, batch: Any, ctx: Any, model: Any, adapters: dict) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    for handle in adapters.values():
        lib.llama_adapter_lora_free(handle)
    lib.llama_model_free(model)


def _quiet(level: int, text: bytes, data: ctypes.c_void_p) -> None:
    """llama.cpp's log lines are for its developers; fedpt reports failures itself."""


try:
    import llama_cpp as _lib

    _QUIET = _lib.llama_log_callback(_quiet)
except ImportError:  # the extra is not installed: Context says so when used
    _QUIET = None
