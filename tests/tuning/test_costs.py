import time

import numpy as np
import pytest

from fedpt.tuning.costs import PeakMemory, Stopwatch, rss_bytes, training_flops


def test_peak_memory_sees_an_allocation_made_and_freed_inside_the_block():
    size = 400 * 2**20
    with PeakMemory(interval=0.005) as memory:
        before = rss_bytes()
        block = np.ones(size, dtype=np.uint8)  # touched pages: resident
        time.sleep(0.05)
        del block
    assert memory.peak >= before + 0.9 * size
    assert rss_bytes() < memory.peak  # freed again: the peak is not today's resident memory


def test_training_flops_split_by_what_is_trained():
    # 4 N + 2 T per token: full fine-tuning (T = N) is the 6 N rule; LoRA (T << N) about 4 N
    assert training_flops(n_params=100, n_trainable=100, tokens=10) == 6 * 100 * 10
    assert training_flops(n_params=100, n_trainable=1, tokens=10) == (4 * 100 + 2) * 10


def test_stopwatch():
    with Stopwatch() as clock:
        time.sleep(0.02)
    assert clock.seconds == pytest.approx(0.02, abs=0.015)
