"""fedpt: federated proxy-tuning of large language models."""

import ctypes as _ctypes
import sys as _sys

__version__ = "0.1.0"


def _bound_the_heap() -> None:
    # Scoring makes (positions x 150k vocabulary) tensors of ever-changing sizes. glibc raises its mmap
    # threshold after each big free, so such blocks land in the heap, fragment it and are never returned:
    # RSS grew from 5 to 24 GB (and the OOM killer) over one evaluation. A fixed 1 MB threshold keeps every
    # big tensor in its own mapping, returned to the system when freed.
    if _sys.platform.startswith("linux"):
        try:
            _ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc (e.g. musl): its allocator has no such threshold
            pass


_bound_the_heap()
