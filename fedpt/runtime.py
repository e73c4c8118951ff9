"""Process set-up for fedpt's entry points (the CLI, the Flower apps, the benchmarks), progress display, and
the check every listener (`fedpt serve`, `fedpt gate`) makes before it loads anything.

Nothing here runs on import: each entry point calls `setup_process()` once, in its own process (Flower runs
client and server apps in separate worker processes).
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_done = False
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def setup_process() -> None:
    """Offline model loading and a bounded heap; safe to call more than once."""
    global _done
    if _done:
        return
    _done = True
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fedpt loads local folders only; a hub lookup would just hang
    # peft reads transformers' deprecated `is_gradient_checkpointing` on every model it wraps: harmless, and not
    # the user's to fix
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    bound_the_heap()


def bound_the_heap() -> None:
    # Scoring makes (positions x 150k vocabulary) tensors of ever-changing sizes. glibc raises its mmap
    # threshold after each big free, so such blocks land in the heap, fragment it and are never returned:
    # RSS grew from 5 to 24 GB (and the OOM killer) over one evaluation. A fixed 1 MB threshold keeps every
    # big tensor in its own mapping, returned to the system when freed.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc (e.g. musl): its allocator has no such threshold
            pass


def cpu_info() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("model name", "flags", ...); empty where there is none."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if not key.strip():  # the blank line after the first processor
                    break
                found[key.strip()] = value.strip()
    except OSError:  # not Linux: no cheap way to know
        pass
    return found


def machine() -> dict[str, Any]:
    """What a measurement ran on: greedy answers through llama.cpp differ by a few in a hundred between CPUs with
    other vector units (its kernels are compiled for the machine), so results say where they were made."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = cpu_info()
    found: dict[str, Any] = {"cpu": cpu.get("model name", ""), "cores": os.cpu_count(),
                             "vector": sorted(set(cpu.get("flags", "").split())
                                              & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})}
    for package in ("torch", "llama_cpp_python"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@contextmanager
def task(progress: Any, description: str, total: float | None) -> Iterator[Callable[[float], None]]:
    """A task on a rich Progress (or nothing when `progress` is None); yields `advance(n)`, removed on exit."""
    if progress is None:
        yield lambda n=1: None
        return
    task_id = progress.add_task(description, total=total)
    try:
        yield lambda n=1: progress.advance(task_id, n)
    finally:
        progress.remove_task(task_id)


def check_free(host: str, port: int) -> None:
    """Fail now, in one line, rather than after loading the models, if the address cannot be listened on."""
    from fedpt.errors import FedptError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as e:
        raise FedptError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


MAX_HEADER_BYTES = 64 * 1024  # a request's line and headers, at most
HEADER_TIMEOUT_S = 10.0  # from a connection's opening (or its previous answer) to its request's last header


def bounded_http() -> dict[str, Any]:
    """uvicorn options for fedpt's listeners (`serve`, `gate`): h11 with a cap on the request head's size (a bigger
    head is a 400) and a deadline for it (a client that sends headers slowly is cut off), which uvicorn's
    default httptools protocol has neither of."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11(H11Protocol):
        _deadline: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._head_too_slow)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._deadline is not None and self.cycle is not None and not self.cycle.response_complete:
                self._deadline.cancel()  # the head is complete: the request's own timeout takes over
                self._deadline = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._deadline is None and not self.transport.is_closing():  # the next request's head
                self._deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._head_too_slow)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _head_too_slow(self) -> None:
            self._deadline = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return {"http": BoundedH11, "h11_max_incomplete_event_size": MAX_HEADER_BYTES}


def limit_head(app: Any) -> Any:
    """An ASGI app that answers 431 to a request whose line and headers exceed MAX_HEADER_BYTES (h11's own cap
    acts only on a head still incomplete, so a big head that arrives in one read would pass it)."""

    async def limited(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            size = len(scope["raw_path"]) + len(scope["query_string"]) + sum(len(k) + len(v) + 4
                                                                             for k, v in scope["headers"])
            if size > MAX_HEADER_BYTES:
                body = b'{"error": {"message": "the request headers exceed %d bytes", "type": ' \
                       b'"invalid_request_error", "param": null, "code": "headers_too_large"}}' % MAX_HEADER_BYTES
                await send({"type": "http.response.start", "status": 431,
                            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return limited
