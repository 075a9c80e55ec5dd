"""The one place that sizes CUDA launches, plus the device-side helpers every kernel
uses for its grid-stride loop and for reporting bad input.

Kernels are written as 1-D grid-stride loops over int64 element counts: the grid is
capped at ``max_blocks`` blocks and each thread walks ``start, start + stride, ...``,
so any ``N * C * H * W`` fits the grid limits. Tests shrink ``threads_per_block`` and
``max_blocks`` (``launch_limits``) so that several blocks run and the loop turns more
than once on small shapes, also under Numba's CUDA simulator.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
from numba import cuda

THREADS_PER_BLOCK = 256
# Enough blocks to fill any current GPU several times over; the grid-stride loop does
# the rest. Well under gridDim.x's limit of 2**31 - 1.
MAX_BLOCKS = 1 << 16

_limits = threading.local()


@contextlib.contextmanager
def launch_limits(threads_per_block=None, max_blocks=None):
    """Use at most ``threads_per_block`` threads and ``max_blocks`` blocks per launch
    for calls made by this thread inside the block (tests use it to force several
    blocks and several turns of the grid-stride loop)."""
    saved = getattr(_limits, "value", None)
    _limits.value = (threads_per_block or THREADS_PER_BLOCK, max_blocks or MAX_BLOCKS)
    try:
        yield
    finally:
        _limits.value = saved


def current_limits():
    """``(threads_per_block, max_blocks)`` for launches made by this thread now."""
    value = getattr(_limits, "value", None)
    return value if value is not None else (THREADS_PER_BLOCK, MAX_BLOCKS)


def grid_for(total, threads_per_block=None, fixed_block=False):
    """``(blocks, threads)`` for a grid-stride loop over ``total`` work items, one per
    thread (a tiled kernel passes ``tiles * threads_per_block``: one block per tile).

    ``threads_per_block`` is a kernel's preferred block size; the limit from
    ``launch_limits`` caps it unless ``fixed_block`` (a tiled kernel whose block shape
    is part of its design). The block count is always capped.
    """
    limit_threads, limit_blocks = current_limits()
    threads = threads_per_block or limit_threads
    if not fixed_block:
        threads = min(threads, limit_threads)
    blocks = max(1, min(-(-int(total) // threads), limit_blocks))
    return blocks, threads


def launch(kernel, total, *args, threads_per_block=None, fixed_block=False):
    """Launch ``kernel[blocks, threads](*args)`` sized by ``grid_for``; nothing when
    ``total`` is 0."""
    if total > 0:
        blocks, threads = grid_for(total, threads_per_block, fixed_block)
        kernel[blocks, threads](*args)


@cuda.jit(device=True, inline=True)
def grid_start():
    """This thread's first item of a grid-stride loop, as int64."""
    return np.int64(cuda.blockIdx.x) * np.int64(cuda.blockDim.x) + np.int64(cuda.threadIdx.x)


@cuda.jit(device=True, inline=True)
def grid_stride():
    """The step of a grid-stride loop, as int64."""
    return np.int64(cuda.gridDim.x) * np.int64(cuda.blockDim.x)


@cuda.jit(device=True, inline=True)
def split_nchw(i, C, H, W):
    """Element ``i`` of a C-ordered ``(N, C, H, W)`` array -> ``(n, c, h, w)``."""
    w = i % W
    rest = i // W
    h = rest % H
    rest = rest // H
    return rest // C, rest % C, h, w


@cuda.jit(device=True, inline=True)
def split_ncdhw(i, C, D, H, W):
    """Element ``i`` of a C-ordered ``(N, C, D, H, W)`` array -> ``(n, c, d, h, w)``."""
    w = i % W
    rest = i // W
    h = rest % H
    rest = rest // H
    d = rest % D
    rest = rest // D
    return rest // C, rest % C, d, h, w


def error_flag():
    """A one-element int32 device array, 0; kernels store 1 in it on bad input (the same
    value from every thread that sees some, so the race is harmless)."""
    return cuda.to_device(np.zeros(1, np.int32))


def flag_raised(flag):
    """Read a flag from ``error_flag`` back (waits for the kernels before it)."""
    return bool(flag.copy_to_host()[0])


@cuda.jit
def _copy_3d(source, target):
    _, H, W = source.shape
    total = np.int64(source.shape[0]) * H * W
    i = grid_start()
    while i < total:
        w = i % W
        rest = i // W
        target[rest // H, rest % H, w] = source[rest // H, rest % H, w]
        i += grid_stride()


@cuda.jit
def _copy_4d(source, target):
    _, C, H, W = source.shape
    total = np.int64(source.shape[0]) * C * H * W
    i = grid_start()
    while i < total:
        n, c, h, w = split_nchw(i, C, H, W)
        target[n, c, h, w] = source[n, c, h, w]
        i += grid_stride()


@cuda.jit
def _copy_2d(source, target):
    _, W = source.shape
    total = np.int64(source.shape[0]) * W
    i = grid_start()
    while i < total:
        target[i // W, i % W] = source[i // W, i % W]
        i += grid_stride()


@cuda.jit
def _copy_5d(source, target):
    _, C, D, H, W = source.shape
    total = np.int64(source.shape[0]) * C * D * H * W
    i = grid_start()
    while i < total:
        n, c, d, h, w = split_ncdhw(i, C, D, H, W)
        target[n, c, d, h, w] = source[n, c, d, h, w]
        i += grid_stride()


_COPY_KERNELS = {2: _copy_2d, 3: _copy_3d, 4: _copy_4d, 5: _copy_5d}


def contiguous(array):
    """A 2-D to 5-D device array itself when C-contiguous, else a C-contiguous copy
    made on the device."""
    if array.is_c_contiguous():
        return array
    copy = cuda.device_array(array.shape, array.dtype)
    launch(_COPY_KERNELS[array.ndim], array.size, array, copy)
    return copy


def batched(array, shape):
    """``array`` as the 4-D ``shape`` (kernels index ``(N, C, H, W)``): 4-D arrays as
    they are, whatever their strides; 3-D ones (unbatched calls) get a leading axis,
    after a contiguous copy on the device when their strides cannot be reshaped."""
    if array.ndim == 4:
        return array
    return contiguous(array).reshape(shape)
