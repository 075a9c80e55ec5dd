"""``fastpool.cpu._parallel``: serial kernel bodies run on Numba's threads through one
compiled parallel loop (``Kernel``)."""

import json

import numpy as np
import pytest
from numba import njit

import reference
from fastpool.cpu import _parallel
from fastpool.cpu.pool_avg import avg_forward
from fastpool.cpu.pool_max import max_forward


def _max_pool(kernel, x, workers):
    """3x3 stride-2 padding-1 max pooling of ``(planes, 1, H, W)`` through ``kernel``."""
    planes, _, H, W = x.shape
    OH, OW = (H - 1) // 2 + 1, (W - 1) // 2 + 1
    out = np.full((planes, 1, OH, OW), np.nan)
    indices = np.full((planes, 1, OH, OW), -7, dtype=np.int64)
    lo, hi = 1, min((W - 2) // 2 + 1, OW)  # columns whose window is inside the row
    kernel(x, out, indices, 0, 1, 1, lo, hi, workers)
    return out, indices


@pytest.mark.parametrize("workers", [2, 3, 5, 16, 64])
def test_any_worker_count_gives_the_one_worker_result_bitwise(rng, workers):
    """More workers than rows (64 > 5 * 6), uneven shares, more workers than threads."""
    kernel = max_forward(1, 3, 3, 1, 2, 2, 1, 1, 1, True)
    x = rng.standard_normal((5, 1, 11, 13))
    one, one_indices = _max_pool(kernel, x, 1)
    many, many_indices = _max_pool(kernel, x, workers)
    np.testing.assert_array_equal(many, one)
    np.testing.assert_array_equal(many_indices, one_indices)
    expected, expected_indices = reference.max_pool(x, 3, 2, 1)  # (N, C) = (5, 1)
    np.testing.assert_array_equal(many, expected)
    np.testing.assert_array_equal(many_indices, expected_indices)


def test_argument_types_pick_their_own_compiled_body(rng):
    """float32 and float64, writeable and read-only inputs: each a separate overload of
    the body, each launched at its own address."""
    kernel = avg_forward(1, 2, 2, 1, 2, 2)
    for dtype in (np.float64, np.float32):
        x = rng.standard_normal((3, 1, 8, 8)).astype(dtype)
        for writeable in (True, False):
            x.flags.writeable = writeable
            out = np.empty((3, 1, 4, 4), dtype)
            kernel(x, out, 0, 0, 0, True, 0, 0, 4, dtype(0), dtype(4), 2)  # no override
            expected = x.reshape(3, 4, 2, 4, 2).mean(axis=(2, 4), dtype=np.float64)
            np.testing.assert_allclose(out[:, 0], expected, rtol=1e-6)
    # (other tests may have compiled this geometry for other types too: half precision)
    compiled = {(str(sig[0].dtype), sig[0].mutable) for sig in kernel.body.overloads}
    assert {(d, w) for d in ("float32", "float64") for w in (True, False)} <= compiled


@njit
def _allocating_body(out, size, worker, workers):
    scratch = np.empty(size if worker == workers - 1 else 1)
    scratch[0] = worker
    out[worker] = scratch[0] + 1


def test_a_failed_allocation_in_a_worker_raises_memory_error():
    kernel = _parallel.Kernel(_allocating_body)
    out = np.zeros(3)
    with pytest.raises(MemoryError, match="_allocating_body"):
        kernel(out, 1 << 50, 3)  # 8 PiB in the last worker
    kernel(out, 1, 3)  # the process and the kernel are fine afterwards
    np.testing.assert_array_equal(out, [1, 2, 3])


@njit
def _returning_body(out, worker, workers):
    out[worker] = 1
    return worker


def test_a_body_that_returns_a_value_is_refused():
    kernel = _parallel.Kernel(_returning_body)
    with pytest.raises(TypeError, match="must return None"):
        kernel(np.zeros(2), 2)


_CACHED_FILL = """
import json, sys
import json

import numpy as np
import parallel_factory
out = np.zeros(64)
kernels = [parallel_factory.fill(float(v)) for v in sys.argv[1:]]
for k in kernels:
    k(out, 1)  # one worker: the body's own dispatcher loads it
addresses, filled = [], []
for k in kernels:
    k(out, 2)  # two workers: the body is called through the address its name finds
    addresses.append(k._addresses[next(iter(k._addresses))])
    filled.append(sorted(set(out.tolist())))
print(json.dumps([addresses, filled]))
"""


def test_bodies_of_one_factory_loaded_from_the_disk_cache_stay_apart(tmp_path):
    """Two geometries' bodies, each compiled in its own process (where Numba's
    per-process counter in compiled names starts again), then both loaded from the disk
    cache into a third: each launch runs its own body. They shared one symbol name
    before the bodies were named after their constants, and the second lookup found
    the first body (a crash, or the other geometry's result)."""
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([tests, os.path.dirname(tests)]))

    def run(*values):
        done = subprocess.run([sys.executable, "-c", _CACHED_FILL, *values], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    run("1.5")
    run("2.5")  # compiled in a fresh process: the same counter value as 1.5's
    addresses, filled = json.loads(run("1.5", "2.5"))  # both from the cache
    assert filled == [[1.5], [2.5]]
    assert addresses[0] != addresses[1]
