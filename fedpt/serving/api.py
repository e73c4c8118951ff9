"""The OpenAI-compatible HTTP API over an Engine: /v1/models, /v1/completions, /v1/chat/completions.

Every answer is either a response in OpenAI's format or an OpenAI-style error object
`{"error": {"message", "type", "param", "code"}}` with its HTTP status: a bad request never takes the server
down and never returns a stack trace. The API key (optional) is read from an environment variable whose name
is given; it is never printed or logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fedpt.decoding import Engine, QueueFull, Report, Request, Sampling
from fedpt.errors import FedptError
from fedpt.serving.protocol import (
    HANDLERS,
    APIError,
    ChatRequest,
    CompletionRequest,
    Limits,
    RequestBase,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    message_text,
    parse,
    prompt_list,
    sse,
    usage,
)

log = logging.getLogger("fedpt.serve")
DISCONNECT_CHECK_S = 0.5  # how often a running request asks whether its client is still there


class API:
    """Turns HTTP requests into engine requests and engine reports into OpenAI responses."""

    def __init__(self, engine: Engine, model_name: str, limits: Limits, api_key_env: str = ""):
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.tokenizer, self.vocab = engine.lm.tokenizer, engine.lm.vocab_size
        self._key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key_env and not self._key:
            raise FedptError(f"the API key variable {api_key_env} is not set in the environment")
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [Route("/health", self.health), Route("/v1/models", self.models),
                  Route("/v1/models/{model:path}", self.model),
                  Route("/tokenize", self.tokenize, methods=["POST"]),
                  Route("/detokenize", self.detokenize, methods=["POST"]),
                  Route("/tokenizer_info", self.tokenizer_info),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"])]
        app = Starlette(routes=routes, exception_handlers=HANDLERS)
        return app

    async def health(self, request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", **self.engine.load})

    async def models(self, request: HTTPRequest) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "fedpt"}]})

    async def model(self, request: HTTPRequest) -> Response:  # openai's `models.retrieve`
        self._authorize(request)
        self._check_model(request.path_params["model"])
        return JSONResponse({"id": self.model_name, "object": "model", "created": self.created, "owned_by": "fedpt"})

    async def tokenize(self, request: HTTPRequest) -> Response:
        """vLLM's /tokenize: a prompt's token ids as this server reads them (`add_special_tokens` as there)."""
        self._authorize(request)
        body = await self._json(request)
        self._check_model(body.get("model"))
        if not isinstance(prompt := body.get("prompt"), str):
            raise APIError(400, "'prompt' must be a string", param="prompt")
        tokens = self.tokenizer(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": self.engine.max_length})

    async def detokenize(self, request: HTTPRequest) -> Response:
        """vLLM's /detokenize: the text of token ids."""
        self._authorize(request)
        body = await self._json(request)
        self._check_model(body.get("model"))
        tokens, vocab = body.get("tokens"), self.vocab
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab for t in tokens):
            raise APIError(400, f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(tokens)})

    async def tokenizer_info(self, request: HTTPRequest) -> Response:
        """vLLM's /tokenizer_info: what a client needs to tokenize as this server does (lm-eval's remote
        tokenizer reads it, so that an offline lm-eval needs no copy of the tokenizer)."""
        self._authorize(request)
        t = self.tokenizer
        return JSONResponse({"tokenizer_class": type(t).__name__, "eos_token": t.eos_token, "bos_token": t.bos_token,
                             "pad_token": t.pad_token, "chat_template": getattr(t, "chat_template", None),
                             "model_max_length": self.engine.max_length, "vocab_size": self.vocab,
                             "end_token_ids": sorted(self.engine.lm.eos_token_ids)})

    async def completions(self, request: HTTPRequest) -> Response:
        self._authorize(request)
        body = parse(CompletionRequest, await self._json(request))
        self._check_common(body)
        prompts = [self._tokens_of(p) for p in prompt_list(body.prompt)]
        max_tokens = self._max_tokens(body.max_tokens if body.max_tokens is not None else 16)
        if body.echo and body.stream:
            raise APIError(400, "echo with stream is not supported", param="echo")
        sampling = body.sampling(max_tokens, body.logprobs, body.echo and body.logprobs is not None, self.vocab)
        ids, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ids, "object": "text_completion", "created": created, "model": self.model_name}
        if body.stream:
            return self._stream(request, prompts, sampling, lambda i, r: {
                **head, "choices": [{"index": i, "text": r.text, "finish_reason": finish_reason(r),
                                     "logprobs": completion_logprobs(self.tokenizer, body, r.tokens)
                                     if r.tokens else None}]},
                head, body)
        results = await self._run(request, prompts, sampling)
        choices = []
        for i, (prompt, reports) in enumerate(zip(prompts, results)):
            text = "".join(r.text for r in reports)
            logprobs = None
            if body.logprobs is not None:
                scored = [t for r in reports for t in r.tokens]
                prompt_infos = next((r.prompt for r in reports if r.prompt is not None), None) if body.echo else None
                logprobs = completion_logprobs(self.tokenizer, body, scored, prompt, prompt_infos)
            if body.echo:
                text = self.tokenizer.decode(prompt) + text
            choices.append({"index": i, "text": text, "logprobs": logprobs,
                            "finish_reason": finish_reason(reports[-1])})
        return JSONResponse({**head, "choices": choices, "usage": usage(prompts, results)})

    async def chat(self, request: HTTPRequest) -> Response:
        self._authorize(request)
        body = parse(ChatRequest, await self._json(request))
        self._check_common(body)
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"{self.model_name} has no chat template: use /v1/completions")
        messages = [{"role": m.role, "content": message_text(m.content)} for m in body.messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = self._check_prompt(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        limit = body.max_completion_tokens or body.max_tokens or self.limits.default_chat_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        sampling = body.sampling(self._max_tokens(limit), top, False, self.vocab)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if body.stream:
            chunk = {**head, "object": "chat.completion.chunk"}
            first = {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]}
            return self._stream(request, [prompt], sampling, lambda i, r: {
                **chunk, "choices": [{"index": 0, "delta": {"content": r.text} if r.text else {},
                                      "logprobs": chat_logprobs(self.tokenizer, body, r.tokens)
                                      if body.logprobs else None,
                                      "finish_reason": finish_reason(r)}]}, chunk, body, first=first)
        [reports] = await self._run(request, [prompt], sampling)
        tokens = [t for r in reports for t in r.tokens]
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(r.text for r in reports)},
                  "logprobs": chat_logprobs(self.tokenizer, body, tokens) if body.logprobs else None,
                  "finish_reason": finish_reason(reports[-1])}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice],
                             "usage": usage([prompt], [reports])})

    # ---- checks ----

    def _authorize(self, request: HTTPRequest) -> None:
        if not self._key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._key}".encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error",
                           "invalid_api_key")

    async def _json(self, request: HTTPRequest) -> Any:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body over {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body over {limit} bytes")
        try:
            parsed = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "the body is nested too deeply") from None
        if not isinstance(parsed, dict):
            raise APIError(400, "the body must be a JSON object")
        return parsed

    def _check_model(self, name: Any) -> None:
        """A request names the served model as `fedpt serve --name` says, or by the model's own name."""
        if name not in (None, self.model_name, self.engine.lm.name, Path(str(self.engine.lm.name)).name):
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           code="model_not_found", param="model")

    def _check_common(self, body: RequestBase) -> None:
        self._check_model(body.model)
        if body.n != 1:
            raise APIError(400, "only n = 1 is supported", param="n")

    def _max_tokens(self, asked: int) -> int:
        if asked > self.limits.max_tokens:
            raise APIError(400, f"max_tokens {asked} is over this server's limit of {self.limits.max_tokens}",
                           param="max_tokens")
        return asked

    def _tokens_of(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self._check_prompt(self.tokenizer(prompt)["input_ids"])
        vocab = self.vocab
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"token ids must lie in [0, {vocab})", param="prompt")
        return self._check_prompt(list(prompt))

    def _check_prompt(self, tokens: list[int]) -> list[int]:
        if not tokens:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(tokens) > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(tokens)} tokens; this server takes at most "
                                f"{self.limits.max_prompt_tokens}", code="context_length_exceeded", param="prompt")
        context = self.engine.lm.max_context
        if context is not None and len(tokens) >= context:
            raise APIError(400, f"the prompt has {len(tokens)} tokens: no room left in the model's context of "
                                f"{context} tokens", code="context_length_exceeded", param="prompt")
        return tokens

    # ---- running requests ----

    def _submit(self, prompts: list[list[int]], sampling: Sampling) -> tuple[list[Request], asyncio.Queue]:
        capacity = self.engine.capacity
        if capacity and len(prompts) > capacity:  # it could never be queued: not a reason to retry
            raise APIError(400, f"{len(prompts)} prompts in one request; this server takes at most {capacity}",
                           param="prompt")
        loop, reports = asyncio.get_running_loop(), asyncio.Queue()
        requests = []
        for i, prompt in enumerate(prompts):
            def report(r: Report, i: int = i) -> None:
                loop.call_soon_threadsafe(reports.put_nowait, (i, r))
            requests.append(Request(prompt, sampling, report))
        try:
            for request in requests:
                self.engine.submit(request)
        except QueueFull as e:
            for request in requests:
                request.cancel()
            raise APIError(429, f"the server is busy ({e}); retry later", "rate_limit_error") from None
        return requests, reports

    async def _reports(self, request: HTTPRequest, requests: list[Request],
                       reports: asyncio.Queue) -> AsyncIterator[tuple[int, Report]]:
        """Reports as they come, until every request finished; cancels them on timeout or a vanished client."""
        deadline = time.monotonic() + self.limits.timeout
        checked = time.monotonic()
        open_ = set(range(len(requests)))
        try:
            while open_:
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    raise APIError(504, f"the request took over {self.limits.timeout:g} s", "timeout_error")
                if now - checked >= DISCONNECT_CHECK_S:  # however fast tokens come: a client that left frees its rows
                    checked = now
                    if await request.is_disconnected():
                        return
                try:
                    i, report = await asyncio.wait_for(reports.get(), timeout=min(left, DISCONNECT_CHECK_S))
                except TimeoutError:
                    continue
                if report.finish_reason == "error":
                    raise APIError(500, f"decoding failed: {report.error}", "server_error")
                if report.finish_reason:
                    open_.discard(i)
                yield i, report
        finally:
            for r in requests:
                r.cancel()  # no-op for finished ones; frees the batch row of the others

    async def _run(self, request: HTTPRequest, prompts: list[list[int]], sampling: Sampling) -> list[list[Report]]:
        requests, queue_ = self._submit(prompts, sampling)
        results: list[list[Report]] = [[] for _ in prompts]
        async for i, report in self._reports(request, requests, queue_):
            results[i].append(report)
        if any(not r or not r[-1].finish_reason for r in results):
            raise APIError(499, "the client went away")
        return results

    def _stream(self, request: HTTPRequest, prompts: list[list[int]], sampling: Sampling, chunk_of: Any,
                head: dict, body: RequestBase, first: dict | None = None) -> StreamingResponse:
        requests, queue_ = self._submit(prompts, sampling)
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            counts = [0] * len(prompts)
            if first is not None:
                yield sse(first)
            try:
                async for i, report in self._reports(request, requests, queue_):
                    counts[i] += report.new_tokens
                    if report.text or report.finish_reason or report.tokens:
                        yield sse(chunk_of(i, report))
            except APIError as e:  # headers are sent: the error travels as an event
                yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
                return
            if include_usage:
                prompt_tokens = sum(len(p) for p in prompts)
                yield sse({**head, "choices": [], "usage": {
                    "prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                    "total_tokens": prompt_tokens + sum(counts)}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
