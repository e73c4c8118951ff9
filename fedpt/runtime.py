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
