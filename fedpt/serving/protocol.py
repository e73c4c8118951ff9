"""The OpenAI protocol as fedpt's server speaks it: request types as pydantic models (the fields fedpt honours;
unknown fields are ignored, known ones are checked), the error object, the server's limits, and the pieces of
responses (usage, finish reasons, log-probs, server-sent events), and the error handlers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from fedpt.decoding import Report, Sampling, TokenInfo
from fedpt.errors import FedptError


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024  # most new tokens one request may ask for
    default_chat_tokens: int = 256  # new tokens of a chat request that names no limit
    max_body_bytes: int = 1 << 20
    timeout: float = 600.0  # seconds a request may take, queueing included

    def __post_init__(self) -> None:
        for key in ("max_prompt_tokens", "max_tokens", "default_chat_tokens", "max_body_bytes", "timeout"):
            value = getattr(self, key)
            if not value > 0:  # NaN fails too
                raise FedptError(f"{key} must be a positive number, got {value}")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# ---- requests: the fields fedpt honours; unknown fields are ignored, known ones are checked ----

MAX_STOPS = 16  # stop strings a request may give (vLLM takes any number; OpenAI 4)
MAX_STOP_CHARS = 256

class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field("answer", max_length=64)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # fedpt always enforces the schema


class ResponseFormat(BaseModel):
    """`text`, `json_object` (any JSON object) or `json_schema` (JSON valid under a schema): enforced by a grammar."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a json_schema response format needs its 'json_schema' object (with 'schema')")
        return self

    def schema_text(self) -> str | None:
        """The JSON schema the answer must satisfy, as JSON text (None: free text)."""
        if self.type == "text":
            return None
        return json.dumps(self.json_schema.schema_ if self.type == "json_schema" and self.json_schema else {})


MAX_BIASED = 300  # tokens one logit_bias may name (OpenAI's limit)


class RequestBase(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stop: str | list[str] | None = Field(None, max_length=MAX_STOPS)  # each checked on every token: bounded
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    return_tokens_as_token_ids: bool = False  # vLLM's extension: "token_id:N" instead of the token's text
    ignore_eos: bool = False  # vLLM's extension: decode through end tokens up to max_tokens (benchmarks)
    response_format: ResponseFormat | None = None
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=MAX_BIASED)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # fields that would change the answer and fedpt does not honour: refused (400), never silently ignored
    tools: list[Any] | None = None
    tool_choice: Any = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> RequestBase:
        unsupported = {"tools": bool(self.tools), "tool_choice": self.tool_choice not in (None, "none"),
                       "best_of": self.best_of not in (None, 1), "suffix": bool(self.suffix)}
        named = [name for name, used in unsupported.items() if used]
        if named:
            raise ValueError(f"{named[0]} is not supported by this server (fedpt would ignore it and answer "
                             "otherwise than asked); leave it out")
        return self

    def sampling(self, max_tokens: int, top_logprobs: int | None, echo: bool, vocab_size: int) -> Sampling:
        """What the engine needs of this request (vLLM's `to_sampling_params`)."""
        if any(not 0 <= token < vocab_size for token in self.logit_bias or {}):
            raise APIError(400, f"logit_bias keys are token ids in [0, {vocab_size})", param="logit_bias")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise APIError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
        schema = self.response_format.schema_text() if self.response_format else None
        try:
            return Sampling(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                            stop=tuple(stop), top_logprobs=top_logprobs, echo_logprobs=echo,
                            ignore_eos=self.ignore_eos, logit_bias=tuple((self.logit_bias or {}).items()),
                            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                            json_schema=schema)
        except FedptError as e:  # the schema cannot be enforced, or it goes with ignore_eos
            raise APIError(400, str(e), param="response_format" if schema else None) from None


class CompletionRequest(RequestBase):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(RequestBase):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"'{where}': {first['msg']}" if where else first["msg"], param=where or None) from None


def prompt_list(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


def message_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
        raise APIError(400, "only text message parts are supported", param="messages")
    return "".join(part["text"] for part in content)


def finish_reason(report: Report) -> str | None:
    return report.finish_reason if report.finish_reason in ("stop", "length") else None


def usage(prompts: list[list[int]], results: list[list[Report]]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(r.new_tokens for reports in results for r in reports)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---- log-probs in OpenAI's two formats ----

def _piece(tokenizer: Any, body: RequestBase, token: int) -> str:
    return f"token_id:{token}" if body.return_tokens_as_token_ids else tokenizer.decode([token])


def completion_logprobs(tokenizer: Any, body: RequestBase, tokens: list[TokenInfo], prompt: list[int] | None = None,
                        prompt_infos: list[TokenInfo | None] | None = None) -> dict:
    """/v1/completions' `logprobs`: the echoed prompt's tokens (the first without a log-prob), then the answer's."""
    pieces, lps, tops = [], [], []
    if prompt is not None and prompt_infos is not None:
        for token, info in zip(prompt, prompt_infos):
            pieces.append(_piece(tokenizer, body, token))
            lps.append(None if info is None else info.logprob)
            tops.append(None if info is None else {_piece(tokenizer, body, t): lp for t, lp in info.top})
    for info in tokens:
        pieces.append(_piece(tokenizer, body, info.id))
        lps.append(info.logprob)
        tops.append({_piece(tokenizer, body, t): lp for t, lp in info.top})
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, body: RequestBase, tokens: list[TokenInfo]) -> dict:
    """/v1/chat/completions' `logprobs`: one entry per answer token, with its bytes and its top alternatives."""
    def entry(token: int, lp: float) -> dict:
        piece = _piece(tokenizer, body, token)
        return {"token": piece, "logprob": lp, "bytes": list(tokenizer.decode([token]).encode("utf-8"))}
    return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in tokens]}


# ---- errors as OpenAI error objects: the server answers every failure, and never dies of one ----

async def _api_error(request: HTTPRequest, exc: Exception) -> Response:
    return exc.response()  # type: ignore[attr-defined]


async def _not_found(request: HTTPRequest, exc: Exception) -> Response:
    return APIError(404, f"no route {request.url.path}", code="not_found").response()


async def _not_allowed(request: HTTPRequest, exc: Exception) -> Response:
    return APIError(405, f"{request.method} is not allowed on {request.url.path}").response()


async def _internal(request: HTTPRequest, exc: Exception) -> Response:
    logging.getLogger("fedpt.serve").exception("internal error on %s", request.url.path)
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()


HANDLERS = {404: _not_found, 405: _not_allowed, APIError: _api_error, Exception: _internal}
