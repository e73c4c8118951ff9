"""A GGUF model run in this process by llama.cpp (llama-cpp-python, the extra `fedpt[llama]`): the large model's
full-vocabulary log-probabilities from 4-bit weights, about 5x faster than transformers in bf16 on a CPU.

llama.cpp keeps one KV cache per context: rows of a batch are read one after another, each continuing from
the longest prefix the cache already holds, so decoding is fastest at batch size 1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedpt.errors import FedptError, first_line
from fedpt.models.interface import RowByRowLM
from fedpt.models.remote import PROBE


class LlamaCppLM(RowByRowLM):
    """Next-token log-probabilities of a GGUF model, through llama.cpp's own context and cache."""

    def __init__(self, gguf: str | Path, tokenizer: Any, *, n_ctx: int = 2048, threads: int | None = None,
                 name: str | None = None):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise FedptError("GGUF models run through llama.cpp: pip install 'fedpt[llama]'") from None
        path = Path(gguf).expanduser()
        if not path.is_file():
            raise FedptError(f"GGUF file {path} does not exist")
        threads = threads or os.cpu_count() or 1
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=threads,
                             n_threads_batch=threads, verbose=False)
        except Exception as e:  # llama.cpp raises ValueError or RuntimeError for a bad file
            raise FedptError(f"llama.cpp cannot load {path}: {first_line(e)}") from None
        self.tokenizer, self.name, self.n_ctx = tokenizer, name or path.name, n_ctx
        self.vocab_size = min(self.llm.n_vocab(), len(tokenizer))
        self.eos_token_ids = {i for i in [tokenizer.eos_token_id, self.llm.token_eos()] if i is not None and i >= 0}
        ours = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
        theirs = self.llm.tokenize(PROBE.encode("utf-8"), add_bos=False, special=True)
        if list(theirs) != list(ours):
            raise FedptError(f"{path.name} splits text into other tokens than the tokenizer given with it "
                             f"({list(theirs)[:8]} against {ours[:8]}); proxy-tuning needs one vocabulary")

    def _scores(self, tokens: list[int], last: int = 1) -> np.ndarray:
        """A copy of the raw scores after each of the last `last` tokens: (last, V), continuing from the cached
        prefix (the next row overwrites llama.cpp's buffer)."""
        if len(tokens) > self.n_ctx:
            raise FedptError(f"{len(tokens)} tokens do not fit llama.cpp's context of {self.n_ctx}; raise n_ctx")
        llm, cached = self.llm, self.llm.n_tokens
        common = 0
        held = llm.input_ids[:cached]
        while common < min(cached, len(tokens)) and held[common] == tokens[common]:
            common += 1
        llm.n_tokens = common  # later positions of the cache are overwritten by eval
        if common < len(tokens):
            llm.eval(tokens[common:])
        return llm.scores[len(tokens) - last: len(tokens), : self.vocab_size].copy()

    def next_logprobs(self, rows: list[list[int]]) -> Tensor:
        return self.last_logprobs(rows, 1)[:, 0]

    def last_logprobs(self, rows: list[list[int]], last: int) -> Tensor:
        return torch.log_softmax(torch.from_numpy(np.stack([self._scores(row, last) for row in rows])), -1)
