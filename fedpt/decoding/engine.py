"""Continuous batching: the one decoding loop of fedpt, under `generate` (offline.py) and `fedpt serve` alike.

A request joins the running batch at the next step (its prompt is read on its own, then its decoding state is
joined to the batch's: LanguageModel.join) and leaves as soon as it is done - a stop token or text, its token
budget, or its client gone (LanguageModel.select) - so nobody waits for the longest request of a batch.
The engine knows nothing of HTTP: it reports to each request through a callback (fedpt/serving/api.py turns
the reports into OpenAI responses). A server runs it in a thread of its own (`start`); offline generation
drives it from the caller's thread (`run_until_idle`).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedpt.data import pad_id
from fedpt.decoding.constraints import Constraints
from fedpt.decoding.sampling import GREEDY_BELOW, Sampling, choose
from fedpt.errors import FedptError, first_line
from fedpt.models import LanguageModel, pad_left
from fedpt.proxy.fusion import fill_tail

log = logging.getLogger("fedpt.engine")


SCORE_TOKENS = 4096  # padded tokens per scoring pass: bounds its (rows x positions x vocabulary) log-probs


class QueueFull(Exception):
    """More requests wait than the engine's queue holds."""


@dataclass
class TokenInfo:
    id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position, best first


@dataclass
class Report:
    """What a request learns after a step: new text, the tokens behind it, and, at the end, why it stopped."""

    text: str = ""
    new_tokens: int = 0  # tokens generated since the last report
    tokens: list[TokenInfo] = field(default_factory=list)  # their log-probs, when asked for
    prompt: list[TokenInfo | None] | None = None  # with echo_logprobs: one per prompt token, None for the first
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    sampling: Sampling
    report: Callable[[Report], None]  # called from the engine's thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the generated text already reported
    generator: torch.Generator | None = None
    constraints: Constraints | None = None  # logit_bias, penalties, a JSON schema (Sampling.constrained)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Decodes the requests it is given, up to `max_batch` at a time, with at most `max_queue` more waiting
    (0: no limit); `max_length` caps prompt + generated tokens of a request (None: no cap)."""

    def __init__(self, lm: LanguageModel, *, max_batch: int = 8, max_queue: int = 64, max_length: int | None = None):
        if max_batch < 1 or max_queue < 0:
            raise FedptError(f"max_batch must be at least 1 and max_queue at least 0, got {max_batch} and {max_queue}")
        context = getattr(lm, "max_context", None)  # answers end where the model's context does
        self.lm, self.max_batch = lm, max_batch
        self.max_length = min(n for n in (max_length, context) if n) if (max_length or context) else None
        self._waiting: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._running: list[Request] = []
        self._state: Any = None
        self._logprobs: Tensor | None = None  # next-token log-probs of the running rows: (B, V)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedpt-engine", daemon=True)
        self._special = set(getattr(lm.tokenizer, "all_special_ids", ())) | {  # and added special tokens
            i for i, t in getattr(lm.tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        self.steps = 0  # decoding steps run, and rows decoded over them: their ratio is the mean batch width
        self.rows_decoded = 0

    def start(self) -> Engine:
        """Decode in a thread of the engine's own (a server); requests are submitted from any thread."""
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFull when the queue is full (the server answers 429)."""
        if self._stop.is_set():
            raise QueueFull("the server is shutting down")
        try:
            self._waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self._waiting.maxsize} requests are already waiting") from None

    @property
    def capacity(self) -> int:
        """Requests the queue can hold at once (0: no limit)."""
        return self._waiting.maxsize

    @property
    def load(self) -> dict[str, int]:
        return {"running": len(self._running), "waiting": self._waiting.qsize()}

    def run_step(self, block: bool = False) -> None:
        """Admit waiting requests (waiting up to 0.1 s for one if `block` and nothing runs) and decode one step.
        Offline generation calls it in its own thread (never with `start`): a model failure is raised there; a
        prompt that fails to read ends only its own request."""
        self._admit(block=block and not self._running)
        if self._running:
            self._step()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_step(block=True)
            except Exception as e:  # a failing model call ends the requests it served, never the engine
                log.exception("decoding failed")
                for request in self._running:
                    request.report(Report(finish_reason="error", error=first_line(e)))
                self._running, self._state, self._logprobs = [], None, None

    def _admit(self, block: bool) -> None:
        """Read the prompts of waiting requests (waiting up to 0.1 s for one if `block`) and join them to the
        batch. Scoring requests (echo) are read together in one pass that also gives their first token."""
        new: list[Request] = []
        echoes: list[Request] = []
        while len(self._running) + len(new) + len(echoes) < self.max_batch:
            try:
                request = self._waiting.get(timeout=0.1) if block and not (new or echoes) \
                    else self._waiting.get_nowait()
            except queue.Empty:
                break
            if request.cancelled.is_set():
                request.report(Report(finish_reason="cancelled"))
                continue
            try:
                self._open(request)
            except Exception as e:  # this request's prompt failed: the others go on
                request.report(Report(finish_reason="error", error=first_line(e)))
                continue
            if request.sampling.echo_logprobs:
                echoes.append(request)
            elif request.sampling.max_tokens > 0:
                new.append(request)
            else:
                request.report(Report(finish_reason="length"))
        new += self._score(echoes)
        if not new:
            return
        ids, mask = pad_left([r.prompt for r in new], pad_id(self.lm.tokenizer))
        try:
            logprobs, state = self.lm.start(ids, mask)
        except Exception as e:  # the new prompts failed (too long for the model, out of memory): the batch goes on
            log.exception("reading new prompts failed")
            for request in new:
                request.report(Report(finish_reason="error", error=first_line(e)))
            return
        if self._state is None:
            self._state, self._logprobs = state, logprobs
        else:
            self._state = self.lm.join(self._state, state)
            self._logprobs = torch.cat([self._logprobs, logprobs])
        self._running += new

    def _open(self, request: Request) -> None:
        sampling = request.sampling
        if self.max_length is not None and len(request.prompt) >= self.max_length:
            raise FedptError(f"the prompt has {len(request.prompt)} tokens: no room left in the model's context of "
                             f"{self.max_length} tokens; shorten it")
        if sampling.temperature >= GREEDY_BELOW:
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()).item())
            request.generator = torch.Generator().manual_seed(seed)
        if sampling.constrained:
            request.constraints = Constraints(sampling, self.lm.tokenizer, self.lm.vocab_size, self.lm.eos_token_ids)

    def _score(self, requests: list[Request]) -> list[Request]:
        """Scoring requests (echo), read in passes of at most SCORE_TOKENS padded tokens: each gets every prompt
        token's log-prob given the tokens before it (a top-k model's unreported tokens share its leftover mass, as in
        fedpt/scoring.py) and, from the same pass, its first new token. Those that want more tokens are returned,
        to decode in the batch."""
        more: list[Request] = []
        group: list[Request] = []
        for i, request in enumerate(requests):
            group.append(request)
            following = requests[i + 1] if i + 1 < len(requests) else None
            width = max(len(r.prompt) for r in group)
            if following is None or (len(group) + 1) * max(width, len(following.prompt)) > SCORE_TOKENS:
                try:
                    more += self._score_group(group)
                except Exception as e:
                    log.exception("scoring prompts failed")
                    for r in group:
                        r.report(Report(finish_reason="error", error=first_line(e)))
                group = []
        return more

    def _score_group(self, group: list[Request]) -> list[Request]:
        last = max(len(r.prompt) for r in group)
        ids, mask = pad_left([r.prompt for r in group], pad_id(self.lm.tokenizer))
        logprobs = fill_tail(self.lm.logprobs(ids, mask, last=last))  # (B, last, V): row j predicts token j + 1
        more = []
        for request, rows in zip(group, logprobs):
            prompt, top_n = request.prompt, request.sampling.top_logprobs or 0
            rows = rows[last - len(prompt):]  # (T, V): this prompt's own positions; the last predicts a new token
            request.report(Report(prompt=[None, *(_info(lp, token, top_n) for lp, token in zip(rows, prompt[1:]))]))
            if request.sampling.max_tokens == 0:
                request.report(Report(finish_reason="length"))
            elif request.sampling.max_tokens == 1:  # its one token comes from this pass: no second read
                request.report(self._advance(request, self._choose(request, rows[-1]), rows[-1]))
            else:
                more.append(request)
        return more

    def _step(self) -> None:
        rows = self._running
        tokens = [self._choose(r, lp) for r, lp in zip(rows, self._logprobs)]
        keep = []
        for i, (request, token) in enumerate(zip(rows, tokens)):
            report = self._advance(request, token, self._logprobs[i])
            if report.text or report.new_tokens or report.finish_reason:
                request.report(report)
            if report.finish_reason is None:
                keep.append(i)
        self.steps, self.rows_decoded = self.steps + 1, self.rows_decoded + len(rows)
        if not keep:
            self._running, self._state, self._logprobs = [], None, None
            return
        if len(keep) < len(rows):
            self._state = self.lm.select(self._state, keep)
            self._running = [rows[i] for i in keep]
        self._logprobs = self.lm.step(self._state, torch.tensor([tokens[i] for i in keep]))

    @staticmethod
    def _choose(request: Request, logprobs: Tensor) -> int:
        s = request.sampling
        if request.constraints is not None:  # bias, penalties and a grammar's mask act on the fused log-probs
            logprobs = request.constraints.apply(logprobs)
        if s.temperature < GREEDY_BELOW:
            token = int(logprobs.argmax())
        else:
            token = int(choose(logprobs[None], s.temperature, s.top_p, request.generator)[0])
        if request.constraints is not None:
            request.constraints.accept(token)
        return token

    def _advance(self, request: Request, token: int, logprobs: Tensor) -> Report:
        """Take one token into a request: its new text (held back while it may still become a stop string)."""
        if request.cancelled.is_set():
            return Report(finish_reason="cancelled")
        sampling = request.sampling
        if token in self.lm.eos_token_ids and not sampling.ignore_eos:
            # the end token is not text, but a client that asked for log-probs gets its entry (lm-eval's echo
            # scoring reads the last one as the generated token's)
            info = [_info(logprobs, token, sampling.top_logprobs)] if sampling.top_logprobs is not None else []
            return Report(text=self._text(request)[request.sent:], new_tokens=len(info), tokens=info,
                          finish_reason="stop")
        if sampling.stop and token in self._special and self.lm.tokenizer.convert_ids_to_tokens(token) in sampling.stop:
            # a special token as a stop string (lm-eval adds `<|im_end|>`): the answer's text never shows it
            return Report(text=self._text(request)[request.sent:], finish_reason="stop")
        request.generated.append(token)
        info = [_info(logprobs, token, sampling.top_logprobs)] if sampling.top_logprobs is not None else []
        text = self._text(request)
        cut = min((i for i in (text.find(s, max(0, request.sent - len(s))) for s in sampling.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            return self._flush(request, text[:cut], info, "stop")
        if len(request.generated) >= sampling.max_tokens:
            return self._flush(request, text, info, "length")
        if self.max_length is not None and len(request.prompt) + len(request.generated) >= self.max_length:
            return self._flush(request, text, info, "length")
        # hold back a tail that may still grow into a stop string, and an unfinished multi-byte character
        safe = len(text) - max((_overlap(text, s) for s in sampling.stop), default=0)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        return self._flush(request, text[:max(safe, request.sent)], info, None)

    def _text(self, request: Request) -> str:
        return self.lm.tokenizer.decode(request.generated, skip_special_tokens=True)

    @staticmethod
    def _flush(request: Request, text: str, info: list[TokenInfo], reason: str | None) -> Report:
        new = text[request.sent:]
        request.sent = max(request.sent, len(text))
        return Report(text=new, new_tokens=1, tokens=info, finish_reason=reason)


def _info(logprobs: Tensor, token: int, top_n: int | None) -> TokenInfo:
    lp = float(logprobs[token])
    top: list[tuple[int, float]] = []
    if top_n:
        values, ids = logprobs.topk(top_n)
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return TokenInfo(token, lp if math.isfinite(lp) else -9999.0, top)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`: only lengths n whose stop[n - 1] is
    the text's last character are tried, so a long stop string costs little per token."""
    n = min(len(stop) - 1, len(text))
    while n > 0:
        n = stop.rfind(text[-1], 0, n) + 1  # the longest n left with stop[n - 1] == text[-1] (0: none)
        if n and text.endswith(stop[:n]):
            return n
        n -= 1
    return 0
