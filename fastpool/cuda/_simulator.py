"""A repair to Numba's CUDA simulator, applied when ``fastpool.cuda`` is imported with
``NUMBA_ENABLE_CUDASIM=1``.

The simulator runs a block's CUDA threads as Python threads, and its
``cuda.shared.array`` (``FakeCUDAShared.array``, numba-cuda 0.30) gives them one array
per call site with an unlocked check-then-set on a dict. Two threads that interleave
between the check and the set get different arrays, and each then misses the other's
writes: the tiled conv kernels returned garbage that way in a CI run. The repair keeps
the simulator's keys (the caller's file and line) and its dynamic-shared-memory path, and
makes the check and the set one locked step. ``tests/test_simulator.py`` forces the race
and shows the simulator's allocator losing it and the repaired one not.
"""

import sys
import threading

import numpy as np


def serialise_shared_arrays():
    """Replace the simulator's shared-array allocator with a locked one (once)."""
    from numba.cuda.simulator import kernelapi

    unlocked = kernelapi.FakeCUDAShared.array
    if hasattr(unlocked, "unlocked"):
        return
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:
            # Dynamic shared memory (no allocation) and the simulator's alignment error.
            return unlocked(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        with lock:
            allocation = self._allocations.get(key)
            if allocation is None:
                allocation = self._allocations[key] = np.empty(shape, dtype)
        return allocation

    array.unlocked = unlocked
    kernelapi.FakeCUDAShared.array = array
