"""Running the API: `serve` blocks (the `fedpt serve` command); `running` serves from a background thread and
yields the base URL (tests, benchmarks, and a fedpt server used as another one's black box)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fedpt.decoding import Engine
from fedpt.errors import FedptError
from fedpt.models import LanguageModel
from fedpt.runtime import LOOPBACK, bounded_http, check_free, limit_head
from fedpt.serving.api import API
from fedpt.serving.protocol import Limits


def _server(lm: LanguageModel, host: str, port: int, *, name: str, limits: Limits, api_key_env: str,
            max_batch: int, max_queue: int) -> tuple[object, Engine]:
    import uvicorn

    if max_batch < 1 or max_queue < 1:
        raise FedptError(f"max_batch and max_queue must be at least 1, got {max_batch} and {max_queue}")
    engine = Engine(lm, max_batch=max_batch, max_queue=max_queue,
                    max_length=limits.max_prompt_tokens + limits.max_tokens)
    app = API(engine, name, limits, api_key_env).app()
    config = uvicorn.Config(limit_head(app), host=host, port=port, log_level="warning", access_log=False, ws="none",
                            timeout_graceful_shutdown=5, **bounded_http())
    return uvicorn.Server(config), engine


def serve(lm: LanguageModel, host: str = "127.0.0.1", port: int = 8000, *, name: str = "fedpt",
          limits: Limits | None = None, api_key_env: str = "", max_batch: int = 8, max_queue: int = 64) -> None:
    """Serve `lm` until interrupted."""
    if host not in LOOPBACK and not api_key_env:
        logging.getLogger("fedpt.serve").warning("serving on %s without an API key: anyone who reaches the port "
                                                 "can use the model", host)
    server, engine = _server(lm, host, port, name=name, limits=limits or Limits(), api_key_env=api_key_env,
                             max_batch=max_batch, max_queue=max_queue)
    check_free(host, port)
    engine.start()
    try:
        server.run()
    finally:
        engine.close()


@contextmanager
def running(lm: LanguageModel, *, name: str = "fedpt", limits: Limits | None = None, api_key_env: str = "",
            max_batch: int = 8, max_queue: int = 64, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `lm` from a background thread; yields its base URL, http://HOST:PORT/v1."""
    server, engine = _server(lm, host, port, name=name, limits=limits or Limits(), api_key_env=api_key_env,
                             max_batch=max_batch, max_queue=max_queue)
    engine.start()
    thread = threading.Thread(target=server.run, name="fedpt-http", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise FedptError(f"the server could not start on {host}:{port}")
            time.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
