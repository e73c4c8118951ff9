"""What a device pays: peak memory while it works, bytes it sends, and an estimate of training FLOPs."""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def rss_bytes() -> int:
    """Resident memory of this process now (Linux), or its peak so far elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Samples resident memory (or what `measure` returns) in a background thread; `peak` is the highest seen
    inside the `with` block. On a CUDA device, `gpu_peak` is the most memory torch allocated on it inside the block.

    The process-wide ru_maxrss cannot be reset, so a long-lived worker that already loaded a bigger model
    would report that model's peak; sampling measures this piece of work alone.
    """

    def __init__(self, device: Any = "cpu", interval: float = 0.02, measure: Callable[[], int] = rss_bytes):
        self.interval, self.peak, self.gpu_peak = interval, 0, None
        self.device, self.measure = device, measure
        self._stop = threading.Event()

    def _cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    def __enter__(self) -> PeakMemory:
        if self._cuda():
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak = self.measure()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.measure())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.measure())
        if self._cuda():
            import torch

            self.gpu_peak = torch.cuda.max_memory_allocated(self.device)


def training_flops(n_params: int, n_trainable: int, tokens: int) -> float:
    """Forward 2*N per token, backward about 2*N for activation gradients plus 2*trainable for weight gradients.

    With LoRA the frozen weights need no weight gradients, so a step costs about 4N + 2T per token instead
    of the 6N of full fine-tuning (Kaplan et al. 2020's 6N rule, split by what is trained).
    """
    return float(tokens) * (4.0 * n_params + 2.0 * n_trainable)


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
