"""What a Numba CPU kernel is given for an input array, and the copies between the two
memory formats."""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from fastpool._threading import one_worker
from fastpool.cpu._transpose import block, side_of

# Below this many elements NumPy's copy is as fast as waking the kernel's threads.
_PARALLEL_COPY_ELEMENTS = 1 << 15
# ... and copying channels-last to channels-first, with fewer channels than this
# NumPy's copy is faster (the tiles' 8-wide blocks do not fit, their edges go one value
# at a time): (1, 3, 224, 224) float32, 166 us in tiles on one thread, 90 on two,
# NumPy 42; 8 channels 114 / 60 against 149; 2026-12-06. (The other way, tiles on two
# threads beat NumPy from 3 channels: 118 against 180 us.)
_TILED_MIN_CHANNELS = 8
_TILE = 32


@functools.lru_cache(maxsize=None)
def moved_axes(ndim, source, destination):
    """The ``transpose`` order of ``np.moveaxis(a, source, destination)`` for an
    ``ndim``-D array (``moveaxis`` normalises its arguments on every call: 2.5 us)."""
    order = [i for i in range(ndim) if i != source % ndim]
    order.insert(destination % ndim, source % ndim)
    return tuple(order)


def contiguous(a):
    """``a`` as a C-contiguous, writeable array in native byte order: ``a`` itself when
    it already is one, else one copy (parallel, for large channels-last arrays). Kernels
    never write their inputs, but Numba compiles a separate kernel for read-only arrays
    (a second compile per kernel), so read-only inputs are copied like non-contiguous
    ones."""
    if type(a) is not np.ndarray:
        a = np.asarray(a)
    flags = a.flags
    if flags.c_contiguous and flags.writeable and a.dtype.isnative:
        return a
    if _channels_last_dense(a):
        return channels_first(a)
    return np.array(a, dtype=a.dtype.newbyteorder("="), order="C", copy=True)


def _channels_last_dense(a):
    """Whether ``a`` (``(N, C, *spatial)``) is a large native array whose memory is an
    ``(N, *spatial, C)`` buffer."""
    return (a.ndim >= 3 and a.size >= _PARALLEL_COPY_ELEMENTS and a.dtype.isnative
            and a.shape[1] >= _TILED_MIN_CHANNELS and not one_worker()
            and a.transpose(moved_axes(a.ndim, 1, -1)).flags.c_contiguous)


def channels_first(a):
    """A C-contiguous copy of the channels-last dense ``a`` (``_channels_last_dense``)."""
    n, c = a.shape[0], a.shape[1]
    out = np.empty(a.shape, a.dtype)
    _transpose_planes(a.transpose(moved_axes(a.ndim, 1, -1)).reshape(n, -1, c),
                      out.reshape(n, c, -1))
    return out


def channels_last(a, channel_axis):
    """``a`` with the same shape and values and channels-last strides (one copy into an
    ``(N, *spatial, C)`` buffer, parallel for large C-contiguous arrays), as
    ``fastpool._geometry.channels_last_copy``."""
    if (channel_axis == 1 and a.ndim >= 3 and a.flags.c_contiguous and a.dtype.isnative
            and a.size >= _PARALLEL_COPY_ELEMENTS and not one_worker()):
        n, c = a.shape[0], a.shape[1]
        buffer = np.empty((n,) + a.shape[2:] + (c,), a.dtype)
        _transpose_planes(a.reshape(n, c, -1), buffer.reshape(n, -1, c))
        return buffer.transpose(moved_axes(buffer.ndim, -1, 1))
    moved = np.ascontiguousarray(a.transpose(moved_axes(a.ndim, channel_axis, -1)))
    return moved.transpose(moved_axes(moved.ndim, -1, channel_axis))


@njit(parallel=True, cache=True, boundscheck=False, nogil=True)
def _transpose_planes(src, dst):
    """``dst[n, b, a] = src[n, a, b]`` in 32x32 tiles, one task per tile, each tile in
    blocks transposed in vector registers (``fastpool.cpu._transpose``) and its ragged
    edges item by item: NumPy's one-thread strided copy ran at half the speed of plain
    tiles (96x112x112 float32: 0.84 ms against 0.42 ms on 2 threads), which the blocks
    (one strided read per item before) made several times faster again."""
    N, A, B = src.shape
    ta = (A + _TILE - 1) // _TILE
    tb = (B + _TILE - 1) // _TILE
    side = side_of(src)
    sf = src.reshape(-1)
    df = dst.reshape(-1)
    for t in prange(N * ta * tb):
        n = t // (ta * tb)
        r = t - n * (ta * tb)
        a0 = (r // tb) * _TILE
        b0 = (r - (r // tb) * tb) * _TILE
        a1 = min(A, a0 + _TILE)
        b1 = min(B, b0 + _TILE)
        a_full = a0 + (a1 - a0) // side * side
        b_full = b0 + (b1 - b0) // side * side
        for a in range(a0, a_full, side):
            for b in range(b0, b_full, side):
                block(sf, (n * A + a) * B + b, B, df, (n * B + b) * A + a, A)
        for b in range(b0, b1):
            first = a_full if b < b_full else a0
            for a in range(first, a1):
                dst[n, b, a] = src[n, a, b]
