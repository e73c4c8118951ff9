"""An OpenAI-compatible completions server in the test process, backed by a tiny local model, with knobs for
the ways real servers differ and fail: a top-k cap, token-id prompts refused, no log-probabilities, failures
before success, latency, an API key, token ids as keys (vLLM) or token strings (llama.cpp)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from fedpt.models import HFCausalLM


@dataclass
class Knobs:
    max_top_k: int | None = None  # the server's cap on logprobs (OpenAI: 20)
    token_prompts: bool = True  # accept a list of token ids as the prompt
    logprobs: bool = True  # answer logprobs at all
    ids_as_keys: bool = False  # "token_id:N" keys, as vLLM's --return-tokens-as-token-ids
    fail: int = 0  # answer this many requests with `fail_status` first
    fail_status: int = 503
    latency: float = 0.0  # seconds before each completion answer
    api_key: str | None = None
    silent_after: int | None = None  # after this many completions, answer as if the greedy token ended the text:
    #                                  no log-probabilities at all (llama-cpp-python's server at an end token)
    requests: list = field(default_factory=list)  # (start, end, body) of each completion request


class FakeServer:
    def __init__(self, lm: HFCausalLM, **knobs: Any):
        self.lm, self.knobs = lm, Knobs(**knobs)
        self.lock = threading.Lock()  # one model, one request at a time (as llama.cpp's server)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if server.knobs.api_key and self.headers.get("Authorization") != f"Bearer {server.knobs.api_key}":
                    self._send(401, {"error": {"message": "invalid API key"}})
                    return False
                return True

            def do_GET(self) -> None:
                if self._authorised():
                    self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorised():
                    return
                if server.knobs.fail > 0:
                    server.knobs.fail -= 1
                    self._send(server.knobs.fail_status, {"error": {"message": "overloaded"}})
                    return
                started = time.perf_counter()
                time.sleep(server.knobs.latency)
                status, payload = server.complete(body)
                server.knobs.requests.append((started, time.perf_counter(), body))
                self._send(status, payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def key(self, token: int) -> str:
        return f"token_id:{token}" if self.knobs.ids_as_keys else self.lm.tokenizer.decode([token])

    def complete(self, body: dict) -> tuple[int, dict]:
        tokenizer, prompt = self.lm.tokenizer, body["prompt"]
        if isinstance(prompt, list):
            if not self.knobs.token_prompts:
                return 500, {"error": {"message": "prompt must be a string"}}
            ids = [int(t) for t in prompt]
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with self.lock:
            lp = self.lm.logprobs(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), last=len(ids))[0]
        k = body.get("logprobs")
        if k is not None and self.knobs.max_top_k is not None:
            k = min(k, self.knobs.max_top_k)
        chosen = int(lp[-1].argmax())
        if self.knobs.silent_after is not None and len(self.knobs.requests) >= self.knobs.silent_after:
            return 200, {"object": "text_completion", "model": "tiny",
                         "choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}]}
        choice: dict = {"index": 0, "text": tokenizer.decode([chosen]), "finish_reason": "length", "logprobs": None}
        if k is not None and self.knobs.logprobs:
            def top(row: torch.Tensor) -> dict[str, float]:
                values, indices = row.topk(k)
                return {self.key(int(i)): float(v) for v, i in zip(values, indices)}

            if body.get("echo"):  # OpenAI's meaning: entry i is the distribution that predicts token i
                tokens = [*ids, chosen]
                choice["logprobs"] = {"tokens": [tokenizer.decode([t]) for t in tokens],
                                      "top_logprobs": [None] + [top(lp[i]) for i in range(len(ids))]}
            else:
                choice["logprobs"] = {"tokens": [tokenizer.decode([chosen])], "top_logprobs": [top(lp[-1])]}
        return 200, {"object": "text_completion", "model": "tiny", "choices": [choice]}
