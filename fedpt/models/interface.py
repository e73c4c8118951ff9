"""The language-model interface: what fedpt asks of every model, the large black box included.

fedpt asks only one thing of a model: next-token log-probabilities over the vocabulary, for a batch of
left-padded token sequences, either step by step with a cache (decoding) or at many positions in one pass
(scoring). The large model is used through this interface alone: that is the black-box contract.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedpt.errors import FedptError


class LanguageModel(ABC):
    """Next-token log-probabilities over `vocab_size` tokens of `tokenizer`."""

    name: str
    tokenizer: Any
    vocab_size: int
    eos_token_ids: set[int]  # decoding stops a row at any of these
    max_context: int | None = None  # tokens a sequence may hold (prompt + answer); None: not known

    @abstractmethod
    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Any]:
        """Read left-padded prompts (B, T); return log-probs of the next token (B, V) and a decoding state."""

    @abstractmethod
    def step(self, state: Any, tokens: Tensor) -> Tensor:
        """Append one token per row (B,) to `state` (updated in place); return the next log-probs (B, V)."""

    @abstractmethod
    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> Tensor:
        """Next-token log-probs after each of the last `last` positions of left-padded rows: (B, last, V)."""

    def select(self, state: Any, rows: Sequence[int]) -> Any:
        """The decoding state of these rows only, in this order: finished requests leave a running batch."""
        raise FedptError(f"{self.name} cannot change the rows of a running batch")

    def join(self, state: Any, other: Any) -> Any:
        """One decoding state with the rows of `state`, then those of `other`: new requests join a running batch."""
        raise FedptError(f"{self.name} cannot change the rows of a running batch")


DOCUMENT_END = "<|endoftext|>"  # GPT-2-style BPE's end of a document (GPT-2, Qwen, GPT-NeoX)
END_OF_TURN = re.compile(r"eot|end_of_turn|im_end|end_of_text|endoftext")  # Llama 3, Gemma, ChatML, documents


def end_tokens(tokenizer: Any, *ids: int | None) -> set[int]:
    """The tokens that end an answer: those given (the generation config's, the backend's) and the tokenizer's eos,
    plus the end-of-document token where the tokenizer has it as a special token. Qwen's published generation
    configs list both `<|im_end|>` and `<|endoftext|>`; folders made from a GGUF keep only the first, and a raw
    completion that emits the second ran on past the answer."""
    found = {i for i in (*ids, tokenizer.eos_token_id) if i is not None and i >= 0}
    if DOCUMENT_END in getattr(tokenizer, "all_special_tokens", ()) or DOCUMENT_END in getattr(
            tokenizer, "get_added_vocab", dict)():
        found.add(tokenizer.convert_tokens_to_ids(DOCUMENT_END))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):  # the chat template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...)
        for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
            text = getattr(token, "content", str(token))
            if getattr(token, "special", False) and text in template and END_OF_TURN.search(text):
                found.add(i)
    return found


def shortest_context(*models: Any) -> int | None:
    """The context of models that read the same sequence together (a proxy): the shortest one known."""
    known = [m.max_context for m in models if getattr(m, "max_context", None)]
    return min(known) if known else None


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into (ids, attention_mask), so every row's next token sits at the same column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def check_same_vocabulary(a: Any, b: Any) -> None:
    """Proxy-tuning adds scores token by token: both models (or pairs) must mean the same token by each id."""
    va, vb = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    if va != vb:
        raise FedptError(
            f"models '{a.name}' (vocabulary {len(va)}) and '{b.name}' (vocabulary {len(vb)}) have different "
            "tokenizers; proxy-tuning needs a small and a large model with the same tokenizer"
        )


@dataclass
class RowsState:
    rows: list[list[int]]  # each row's tokens so far, without padding


class RowByRowLM(LanguageModel):
    """A model that reads each row's tokens without padding, and keeps no cache fedpt must carry: a server
    (fedpt/models/remote.py) or llama.cpp (fedpt/models/llama_cpp.py). Subclasses answer two questions."""

    @abstractmethod
    def next_logprobs(self, rows: list[list[int]]) -> Tensor:
        """Log-probs of the token after each row: (B, V)."""

    @abstractmethod
    def last_logprobs(self, rows: list[list[int]], last: int) -> Tensor:
        """Log-probs after each of the last `last` tokens of each row: (B, last, V)."""

    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, RowsState]:
        rows = unpadded(input_ids, attention_mask)
        return self.next_logprobs(rows), RowsState(rows)

    def step(self, state: RowsState, tokens: Tensor) -> Tensor:
        for row, token in zip(state.rows, tokens.tolist()):
            row.append(token)
        return self.next_logprobs(state.rows)

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> Tensor:
        return self.last_logprobs(unpadded(input_ids, attention_mask), last)

    def select(self, state: RowsState, rows: Sequence[int]) -> RowsState:
        return RowsState([state.rows[i] for i in rows])

    def join(self, state: RowsState, other: RowsState) -> RowsState:
        return RowsState(state.rows + other.rows)


def unpadded(input_ids: Tensor, attention_mask: Tensor) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
