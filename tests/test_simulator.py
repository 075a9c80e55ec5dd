"""fastpool's repair of Numba's CUDA simulator (``fastpool.cuda._simulator``, applied
when ``fastpool.cuda`` is imported under the simulator): a block's threads get one
``cuda.shared.array`` per call site even when they race through the allocator.

The race is forced: the allocator's dict pauses after each lookup, releasing the GIL, so
every thread looks before any has stored. The simulator's own allocator then hands out
several arrays (if a numba-cuda release fixes that, the first test says so and the
repair can go); the repaired one hands out one.
"""

import threading
import time

import numpy as np
import pytest
from numba import cuda

import fastpool.cuda  # noqa: F401  (applies the repair)
from conftest import CUDA_SIMULATOR

pytestmark = pytest.mark.skipif(not CUDA_SIMULATOR, reason="tests the CUDA simulator")

THREADS = 8


class _SlowLookups(dict):
    def get(self, key, default=None):
        found = super().get(key, default)
        time.sleep(0.05)   # releases the GIL between the look and what follows it
        return found


def _arrays_from_racing_threads(allocate):
    """What ``allocate(shared)`` returns in each of ``THREADS`` threads started together."""
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    shared = FakeCUDAShared(0)
    shared._allocations = _SlowLookups()
    start = threading.Barrier(THREADS)
    arrays = []

    def thread():
        start.wait()
        arrays.append(allocate(shared))   # one call site: one key for every thread

    threads = [threading.Thread(target=thread) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(arrays) == THREADS
    return arrays


def test_simulators_allocator_races():
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    unlocked = FakeCUDAShared.array.unlocked
    arrays = _arrays_from_racing_threads(lambda shared: unlocked(shared, 4, np.float32))
    assert len({id(a) for a in arrays}) > 1


def test_repaired_allocator_gives_one_array():
    arrays = _arrays_from_racing_threads(lambda shared: shared.array((2, 3), np.float32))
    assert len({id(a) for a in arrays}) == 1
    assert arrays[0].shape == (2, 3) and arrays[0].dtype == np.float32


@cuda.jit
def _rotate_through_shared(values, out):
    staged = cuda.shared.array(THREADS, np.float64)
    other = cuda.shared.array(THREADS, np.float64)
    t = cuda.threadIdx.x
    staged[t] = values[t]
    other[t] = -values[t]
    cuda.syncthreads()
    out[t] = staged[(t + 1) % THREADS] + 10 * other[(t + 2) % THREADS]


def test_kernel_sees_one_array_per_call_site():
    # Two call sites stay two arrays, and every thread reads what the others wrote.
    values = np.arange(1.0, THREADS + 1)
    out = np.zeros(THREADS)
    _rotate_through_shared[1, THREADS](values, out)
    expected = np.roll(values, -1) - 10 * np.roll(values, -2)
    np.testing.assert_array_equal(out, expected)
