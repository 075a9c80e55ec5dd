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
from numba import config, cuda

from fastpool.cuda import _stream

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
    """Launch ``kernel[blocks, threads, stream](*args)`` sized by ``grid_for``, on the
    call's stream (``_stream.current``); nothing when ``total`` is 0."""
    if total > 0:
        blocks, threads = grid_for(total, threads_per_block, fixed_block)
        kernel[blocks, threads, _stream.current()](*args)


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


@cuda.jit(device=True, inline=True)
def split_position(i, C, D, H, W, channels_last):
    """Item ``i`` of a walk over an ``(N, C, D, H, W)`` array -> ``(n, c, d, h, w)``: in
    C order, or with the channel fastest for channels-last arrays, so that consecutive
    threads touch consecutive addresses in either layout."""
    if channels_last:  # the C-order split of an (N, D, H, W, C) array
        n, d, h, w, c = split_ncdhw(i, D, H, W, C)
        return n, c, d, h, w
    return split_ncdhw(i, C, D, H, W)


def error_flag():
    """A one-element int32 device array, 0; kernels store 1 in it on bad input (the same
    value from every thread that sees some, so the race is harmless)."""
    return _stream.zeros(1, np.int32)


def flag_raised(flag):
    """Read a flag from ``error_flag`` back (waits for the kernels before it)."""
    return bool(_stream.download(flag)[0])


def raise_if(flag, error):
    """Raise ``error`` when the kernels before raised ``flag``: now (one wait for the
    call's stream), or, inside ``fastpool.deferred_checks()``, when that block ends.
    Every kernel that raises a flag stays in bounds whatever it read, so the results
    in between are only wrong, never unsafe."""
    from fastpool._dispatch import deferred_checks_pending
    pending = deferred_checks_pending()
    if pending is not None:
        pending.append((flag, _stream.current(), error))
    elif flag_raised(flag):
        raise error


def check_deferred(pending):
    """Read back the flags that ``raise_if`` deferred, in call order, and raise the
    first raised one's error: every copy queued first, then one wait per stream."""
    copies, streams = [], {}
    for flag, stream, error in pending:
        copies.append((flag.copy_to_host(stream=stream), error))
        streams[id(stream)] = stream
    for stream in streams.values():
        if stream != 0:
            stream.synchronize()
    for host, error in copies:
        if host[0]:
            raise error


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
    copy = _stream.empty(array.shape, array.dtype)
    launch(_COPY_KERNELS[array.ndim], array.size, array, copy)
    return copy


def batched(array, shape):
    """``array`` as the 4-D ``shape`` (kernels index ``(N, C, H, W)``): 4-D arrays as
    they are, whatever their strides; 3-D ones (unbatched calls) get a leading axis,
    after a contiguous copy on the device when their strides cannot be reshaped."""
    if array.ndim == 4:
        return array
    return contiguous(array).reshape(shape)


# ----------------------------------------------------------------------------- views

def strided_view(array, shape, strides):
    """A view of ``array``'s memory with ``shape`` and byte ``strides``, no copy (Numba
    device arrays only transpose in 2-D and reshape only contiguous arrays)."""
    shape, strides = tuple(int(s) for s in shape), tuple(int(s) for s in strides)
    if config.ENABLE_CUDASIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return FakeCUDAArray(np.lib.stride_tricks.as_strided(array._ary, shape, strides))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    return DeviceNDArray(shape, strides, array.dtype, stream=array.stream,
                         gpu_data=array.gpu_data)


def volume(array, batched, rank):
    """``array`` (``(N, C, *spatial)``, or ``(C, *spatial)`` when not ``batched``) as the
    5-D ``(N, C, D, H, W)`` view the pooling kernels index: unit axes inserted, whatever
    the strides, so no layout ever needs a copy. An inserted axis gets the stride a
    C-contiguous array would give it, so contiguous arrays stay contiguous views."""
    shape, strides = list(array.shape), list(array.strides)
    if not batched:
        shape.insert(0, 1)
        strides.insert(0, strides[0] * shape[1])
    for _ in range(3 - rank):
        shape.insert(2, 1)
        strides.insert(2, strides[2] * shape[3])
    if len(shape) == array.ndim:
        return array
    return strided_view(array, shape, strides)


def empty(shape, dtype, channels_last, channel_axis):
    """An uninitialised device array of ``shape`` with C-contiguous strides, or with
    channels-last ones (``channel_axis`` varies fastest: one ``(N, *spatial, C)``
    allocation viewed in the caller's axis order)."""
    if not channels_last:
        return _stream.empty(shape, dtype)
    order = [a for a in range(len(shape)) if a != channel_axis] + [channel_axis]
    return unpermuted(_stream.empty(tuple(shape[a] for a in order), dtype), order)


def unpermuted(memory, order):
    """A C-contiguous ``memory`` whose axes are the caller's axes ``order`` (slowest
    first), viewed in the caller's axis order."""
    shape, strides = [0] * len(order), [0] * len(order)
    for axis, size, stride in zip(order, memory.shape, memory.strides):
        shape[axis], strides[axis] = size, stride
    return strided_view(memory, shape, strides)


def dense_order(shape, strides, itemsize):
    """Axes from slowest to fastest when an array of ``shape`` with these byte
    ``strides`` is a dense permutation of a C-contiguous buffer (channels-last arrays
    are), else None."""
    order = sorted(range(len(shape)), key=lambda a: -strides[a])
    expected = itemsize
    for axis in reversed(order):
        if shape[axis] == 1:
            continue
        if strides[axis] != expected:
            return None
        expected *= shape[axis]
    return order


def in_layout(array, channels_last, channel_axis):
    """``array`` itself, or, for ``channels_last``, a channels-last copy made on the
    device (for launchers that compute channels-first: convolution)."""
    if not channels_last:
        return array
    copy = empty(array.shape, array.dtype, True, channel_axis)
    launch(_COPY_KERNELS[array.ndim], array.size, array, copy)
    return copy
