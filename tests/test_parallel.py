"""``fastpool.cpu._parallel``: serial kernel bodies run on Numba's threads through one
compiled parallel loop (``Kernel``)."""

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
