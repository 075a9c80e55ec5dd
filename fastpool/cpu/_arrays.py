"""What a Numba CPU kernel is given for an input array."""

from __future__ import annotations

import numpy as np


def contiguous(a):
    """``a`` as a C-contiguous, writeable array in native byte order: ``a`` itself when
    it already is one, else one copy. Kernels never write their inputs, but Numba
    compiles a separate kernel for read-only arrays (a second compile per kernel), so
    read-only inputs are copied like non-contiguous ones."""
    a = np.asarray(a)
    if a.flags.c_contiguous and a.flags.writeable and a.dtype.isnative:
        return a
    return np.array(a, dtype=a.dtype.newbyteorder("="), order="C", copy=True)
