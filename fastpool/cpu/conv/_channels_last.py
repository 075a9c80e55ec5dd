"""Pointwise (1x1, stride 1, no padding) convolution's backward on channels-last
buffers, in place, on BLAS (the forward, and the input gradient where it is faster:
``_channels_last_pointwise``).

A channels-last ``(N, H, W, C)`` buffer is an ``(M, C)`` matrix with ``M = N * H * W``
pixels, so per group ``g`` the backward is two GEMMs on such matrices, written straight
into ``(M, C)`` buffers (no copy in or out, where the channels-first kernels would need
one each way): ``grad_X_g = grad_Y_g @ W_g`` and ``grad_W_g = grad_Y_g^T @ X_g``, the
latter over fixed chunks of pixels (the chunking depends on the shapes only) summed in
chunk order; the former runs over blocks of rows fixed by the pixel count, so every
result is identical at any thread count. The blocks are shared among the Numba
threads, one single-threaded BLAS call each (``fastpool.cpu._blas``). The
sums run in BLAS's order for this orientation, so they equal the channels-first
kernels' within rounding, not bit for bit.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from fastpool._malloc import kept_empty
from fastpool._threading import loop_on_one_thread
from fastpool.cpu._arrays import moved_axes
from fastpool.cpu._blas import gemm
from fastpool.cpu.conv._gemm import _sum_partials
from fastpool.cpu.conv._planner import _JIT, _MAX_CHUNKS, _PARTIAL_BYTES


@njit(**_JIT)
def _input_grad(grad_y, w, grad_x, groups, blocks, status):
    """``grad_x[m, g*Cg + c] = sum_o grad_y[m, g*Og + o] * w[g*Og + o, c]``, over
    ``blocks`` blocks of rows."""
    M, O = grad_y.shape
    C = grad_x.shape[1]
    Cg, Og = C // groups, O // groups
    gyf, wf, gxf = grad_y.reshape(-1), w.reshape(-1), grad_x.reshape(-1)
    for t in prange(blocks):
        m0, m1 = t * M // blocks, (t + 1) * M // blocks
        if m1 > m0:
            s = 0
            for g in range(groups):
                s |= gemm(False, False, m1 - m0, Cg, Og, gyf, m0 * O + g * Og, O, wf,
                          g * Og * Cg, Cg, 0.0, gxf, m0 * C + g * Cg, C)
            if s != 0:
                status[0] = s


@njit(**_JIT)
def _weight_grad(grad_y, x, partial, groups, status):
    """``partial[k]`` = chunk ``k``'s ``grad_Y_g^T @ X_g`` for every group, as the
    ``(O, C_g)`` weight; chunks are fixed runs of pixels."""
    M, O = grad_y.shape
    C = x.shape[1]
    Cg, Og = C // groups, O // groups
    chunks = partial.shape[0]
    gyf, xf = grad_y.reshape(-1), x.reshape(-1)
    for k in prange(chunks):
        m0, m1 = k * M // chunks, (k + 1) * M // chunks
        pf = partial[k]
        s = 0
        for g in range(groups):
            if m1 > m0:
                s |= gemm(True, False, Og, Cg, m1 - m0, gyf, m0 * O + g * Og, O, xf,
                          m0 * C + g * Cg, C, 0.0, pf, g * Og * Cg, Cg)
            else:
                for i in range(g * Og * Cg, (g + 1) * Og * Cg):
                    pf[i] = 0
        if s != 0:
            status[0] = s


# Blocks of rows of the forward and input-gradient GEMMs: fixed by the number of
# pixels, never by the threads (BLAS rounds a product computed in row blocks of
# another size differently: the results changed with the thread count, found by the
# review of 2026-12-05). At most 4: each call packs the weight again (2-core machine,
# against the former one block per thread: 4 blocks 0-15% slower, 8 up to 1.5x, 32
# up to 2.8x), so at most 4 threads share this path.
_MAX_ROW_BLOCKS = 4
_MIN_BLOCK_ROWS = 16


def row_blocks(M):
    """Blocks of rows for ``M`` pixels."""
    return max(1, min(_MAX_ROW_BLOCKS, M // _MIN_BLOCK_ROWS))


def pixels(a, channel_axis=1):
    """The ``(M, C)`` matrix behind a channels-last ``(N, C, H, W)`` array (a view), or
    None when its buffer is not exactly that."""
    moved = a.transpose(moved_axes(a.ndim, channel_axis, -1))
    if not moved.flags.c_contiguous:
        return None
    return moved.reshape(-1, moved.shape[-1])


def _channels_last_empty(shape, dtype):
    """A new channels-last ``(N, C, H, W)`` array and its ``(M, C)`` matrix."""
    n, c, h, w = shape
    buffer = np.empty((n, h, w, c), dtype)
    return buffer.transpose(0, 3, 1, 2), buffer.reshape(-1, c)


def backward(grad_y2d, x2d, weight, w, output_mask, workers, check):
    """``(grad_input, grad_weight, grad_bias)`` from pixel matrices; None where
    ``output_mask`` is False."""
    want_input, want_weight, want_bias = output_mask
    w2d = np.ascontiguousarray(weight).reshape(w.out_channels, -1)
    status = np.zeros(1, np.int32)
    grad_input = grad_weight = grad_bias = None
    if want_input:
        grad_input, gx2d = _channels_last_empty((w.batch, w.channels) + w.in_size,
                                                grad_y2d.dtype)
        loop_on_one_thread(_input_grad, grad_y2d, w2d, gx2d, w.groups,
                           row_blocks(grad_y2d.shape[0]), status)
    if want_weight:
        chunks = max(1, min(grad_y2d.shape[0], _MAX_CHUNKS,
                            _PARTIAL_BYTES // max(1, w2d.nbytes)))
        partial = kept_empty((chunks, w2d.size), grad_y2d.dtype)
        loop_on_one_thread(_weight_grad, grad_y2d, x2d, partial, w.groups, status)
        grad_weight = np.empty(w2d.size, grad_y2d.dtype)
        loop_on_one_thread(_sum_partials, partial, grad_weight)
        grad_weight = grad_weight.reshape(weight.shape)
    if want_bias:
        grad_bias = grad_y2d.sum(axis=0, dtype=np.float64).astype(grad_y2d.dtype)
    check(status)
    return grad_input, grad_weight, grad_bias
