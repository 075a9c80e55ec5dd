"""A kernel factory for ``test_parallel.py``: one closure body per constant, as the
pooling factories make them."""

import functools

from numba import njit

from fastpool.cpu._parallel import BODY_JIT, parallel_kernel


@functools.lru_cache(maxsize=None)
def fill(value):
    """``kernel(out, workers)``: ``out[:] = value``."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(out, worker, workers):
        for i in range(worker, out.shape[0], workers):
            out[i] = value

    return kernel
