"""A large model behind an OpenAI-compatible completions server (vLLM, llama.cpp's server, SGLang, TGI, hosted
APIs), used as a true black box: only the next token's top-k log-probabilities cross the wire.

Each call asks `POST {url}/completions` with `max_tokens=1, logprobs=k` for one row's prefix; the server keeps
no state of ours, so a decoding step sends the whole prefix again (servers reuse their own prefix caches).
Tokens the server did not report come back as -inf: their share is the leftover probability mass, which the
proxy spreads over them in the shape of the small base model (fedpt/proxy/fusion.py: fill_tail).

Prompts travel as token ids where the server takes them, otherwise as text, checked to re-tokenize to the same
ids. The server is checked once at start: reachable, the API key accepted, log-probabilities returned, and its
tokens the same as the given tokenizer's. Keys are read from an environment variable whose name is given;
they never appear in arguments, messages or logs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedpt.errors import FedptError, first_line
from fedpt.models.interface import RowByRowLM, end_tokens

log = logging.getLogger("fedpt.remote")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
PROBE = "def reverse(text):\n    return text[::-1]  # Hello, world"


def is_url(name: str) -> bool:
    return str(name).startswith(("http://", "https://"))


@dataclass(frozen=True)
class Endpoint:
    """Where the black box is and how to talk to it."""

    url: str  # e.g. http://127.0.0.1:8080/v1
    model: str = ""  # the served model's name; "" takes the server's first
    api_key_env: str = ""  # the NAME of an environment variable holding the key (never the key itself)
    top_k: int = 20  # log-probabilities asked per position (OpenAI allows 20, vLLM 20 by default)
    timeout: float = 60.0  # seconds per request
    retries: int = 4  # further tries on 429 / 5xx / dropped connections, with exponential backoff
    concurrency: int = 4  # requests in flight at once (rows of a batch)
    echo_scoring: bool = False  # score a row in one request from echoed prompt log-probs (OpenAI's semantics;
    #                             llama-cpp-python 0.3.36 shifts them: keep it off there)

    def __post_init__(self) -> None:
        if not is_url(self.url):
            raise FedptError(f"'{self.url}' is not an http(s) URL")
        if self.top_k < 1:
            raise FedptError(f"top_k must be at least 1, got {self.top_k}")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise FedptError(f"the API key variable {self.api_key_env} is not set in the environment")


class RemoteLM(RowByRowLM):
    """Next-token top-k log-probabilities from a completions server; -inf for tokens it did not report."""

    remote = True  # I/O-bound: a proxy runs the small pair while this model's requests are in flight

    def __init__(self, endpoint: Endpoint, tokenizer: Any, name: str | None = None):
        import httpx

        self.endpoint, self.tokenizer = endpoint, tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_token_ids = end_tokens(tokenizer)
        headers = {"Authorization": f"Bearer {os.environ[endpoint.api_key_env]}"} if endpoint.api_key_env else {}
        self._client = httpx.Client(base_url=endpoint.url.rstrip("/"), headers=headers, timeout=endpoint.timeout)
        self._pool = ThreadPoolExecutor(max_workers=endpoint.concurrency)
        self._ids_of = _string_map(tokenizer)
        self.stats = {"requests": 0, "retries": 0, "text_prompts_retokenized_differently": 0}
        self.token_id_keys = False  # whether the server names reported tokens by id (vLLM's, fedpt's extension)
        self.model = endpoint.model or self._first_model()
        self.name = name or f"{self.model} at {endpoint.url}"
        self.token_prompts = self._check()

    # --- the two questions of a row-by-row model ----------------------------------------------------------------

    def next_logprobs(self, rows: list[list[int]]) -> Tensor:
        return torch.stack(list(self._pool.map(self._next, rows)))

    def last_logprobs(self, rows: list[list[int]], last: int) -> Tensor:
        if self.endpoint.echo_scoring:
            return torch.stack(list(self._pool.map(lambda row: self._echoed(row, last), rows)))
        # the distribution after each of the last `last` positions: one next-token request per prefix
        prefixes = [row[: len(row) - last + 1 + j] for row in rows for j in range(last)]
        return self.next_logprobs(prefixes).view(len(rows), last, -1)

    # --- requests ---------------------------------------------------------------------------------------------

    def _complete(self, prompt: list[int] | str, logprobs: int | None = None, echo: bool = False,
                  retries: int | None = None) -> dict:
        """One greedy token of `prompt`, with the top `logprobs` (default: the endpoint's k) of each position."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                "logprobs": logprobs or self.endpoint.top_k, **({"echo": True} if echo else {}),
                **({"return_tokens_as_token_ids": True} if self.token_id_keys else {})}
        return self._request("POST", "/completions", body, self.endpoint.retries if retries is None else retries)

    def _next(self, ids: list[int]) -> Tensor:
        """The log-probs of the token after `ids`: (V,), -inf where the server reported nothing."""
        return self._row(self._top_logprobs(self._complete(self._prompt(ids))))

    def _echoed(self, ids: list[int], last: int) -> Tensor:
        """(last, V) from one echo request: entry j of `top_logprobs` predicts token j, the final entry the next."""
        reply = self._complete(self._prompt(ids), echo=True)
        self._top_logprobs(reply)  # a one-line error where there are none
        entries = reply["choices"][0]["logprobs"]["top_logprobs"][len(ids) - last + 1: len(ids) + 1]
        return torch.stack([self._row(entry or {}) for entry in entries])

    def _row(self, top: dict[str, float]) -> Tensor:
        row = torch.full((self.vocab_size,), -math.inf)
        for key, value in top.items():
            token = self._token_id(key)
            if token is not None:
                row[token] = value
        return row

    def _prompt(self, ids: list[int]) -> list[int] | str:
        if self.token_prompts:
            return ids
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if self.tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
            if not self.stats["text_prompts_retokenized_differently"]:
                log.warning("%s takes text prompts only, and a prefix re-tokenizes to other ids: the server reads a "
                            "slightly different token sequence", self.endpoint.url)
            self.stats["text_prompts_retokenized_differently"] += 1
        return text

    def _token_id(self, key: str) -> int | None:
        if key.startswith("token_id:"):  # vLLM's --return-tokens-as-token-ids
            return int(key.split(":", 1)[1])
        ids = self._ids_of.get(key)
        return ids[0] if ids is not None and len(ids) == 1 else None  # an ambiguous string is left to the tail

    def _top_logprobs(self, reply: dict) -> dict[str, float]:
        try:
            logprobs = reply["choices"][0]["logprobs"]
            top = logprobs["top_logprobs"][-1]
        except (KeyError, IndexError, TypeError):
            top = None
        if not isinstance(top, dict) or not top:
            if _ended_at_once(reply):
                raise FedptError(f"the server at {self.endpoint.url} reports no log-probabilities where its greedy "
                                 "next token ends the text (llama-cpp-python's server does this); use a server that "
                                 "does (vLLM, SGLang, fedpt serve) or run the GGUF in process (--large FILE.gguf)")
            raise FedptError(f"the server at {self.endpoint.url} returned no log-probabilities; fedpt needs a server "
                             "that answers `logprobs` on /v1/completions")
        return {str(k): float(v) for k, v in top.items()}

    def _request(self, method: str, path: str, body: dict | None, retries: int) -> dict:
        import httpx

        url = f"{self.endpoint.url.rstrip('/')}{path}"
        for attempt in range(retries + 1):
            self.stats["requests"] += 1
            try:
                response = self._client.request(method, path, json=body)
            except httpx.HTTPError as e:  # refused, dropped, timed out
                problem = f"{type(e).__name__}: {first_line(e)}"
            else:
                if response.status_code < 300:
                    try:
                        return response.json()
                    except ValueError:
                        raise FedptError(f"{url} answered with something that is not JSON") from None
                if response.status_code in (401, 403):
                    where = f"the key in {self.endpoint.api_key_env}" if self.endpoint.api_key_env else "no API key"
                    raise FedptError(f"{url} refused {where} (HTTP {response.status_code}); set --api-key-env")
                problem = f"HTTP {response.status_code}: {first_line(Exception(response.text[:300]))}"
                if response.status_code not in RETRY_STATUS:
                    raise FedptError(f"{url} failed: {problem}")
            if attempt < retries:
                self.stats["retries"] += 1
                time.sleep(min(0.25 * 2**attempt, 8.0))
        raise FedptError(f"{url} failed after {retries + 1} tries: {problem}")

    # --- the start-up check -----------------------------------------------------------------------------------

    def _first_model(self) -> str:
        models = self._request("GET", "/models", None, self.endpoint.retries).get("data") or []
        if not models:
            raise FedptError(f"the server at {self.endpoint.url} lists no models; give the model's name")
        return str(models[0]["id"])

    def _check(self) -> bool:
        """Log-probabilities, the same tokens, and whether token-id prompts work; returns the latter."""
        ids = self.tokenizer(PROBE, add_special_tokens=False)["input_ids"]
        reported = self._top_logprobs(self._complete(PROBE))
        known = [k for k in reported if k in self._ids_of or k.startswith("token_id:")]
        if len(known) < max(1, len(reported) // 2):
            raise FedptError(f"the server at {self.endpoint.url} reports tokens the tokenizer of {self.model!r} does "
                             f"not have ({', '.join(map(repr, list(reported)[:5]))}); the large model must share the "
                             "small model's tokenizer")
        self._check_tokenization(ids)
        self.token_id_keys = True  # tokens by id where the server can: no two tokens share a key then
        try:
            self.token_id_keys = all(k.startswith("token_id:") for k in self._top_logprobs(
                self._complete(PROBE, retries=0)))
        except FedptError:
            self.token_id_keys = False
        try:
            return bool(self._top_logprobs(self._complete(ids, retries=0)))
        except FedptError:
            return False

    def _check_tokenization(self, ids: list[int]) -> None:
        """Where the server echoes the prompt's tokens, they must be the tokenizer's own."""
        try:
            reply = self._complete(PROBE, logprobs=1, echo=True, retries=0)
            tokens = reply["choices"][0]["logprobs"]["tokens"][: len(ids)]
        except (FedptError, KeyError, IndexError, TypeError):
            return  # no echo here: the reported tokens were checked above
        ours = [self.tokenizer.decode([i]) for i in ids]
        if [str(t) for t in tokens] != ours:
            raise FedptError(f"the server at {self.endpoint.url} splits text into other tokens than the small "
                             f"model's tokenizer ({tokens[:6]} against {ours[:6]}); proxy-tuning needs one vocabulary")


def _ended_at_once(reply: dict) -> bool:
    try:
        choice = reply["choices"][0]
        return choice.get("finish_reason") == "stop" and not choice.get("text")
    except (KeyError, IndexError, TypeError, AttributeError):
        return False


def _string_map(tokenizer: Any) -> dict[str, list[int]]:
    """Each token's text (as servers report it) -> the ids with that text."""
    out: dict[str, list[int]] = {}
    for token in range(len(tokenizer)):
        out.setdefault(tokenizer.decode([token]), []).append(token)
    return out
