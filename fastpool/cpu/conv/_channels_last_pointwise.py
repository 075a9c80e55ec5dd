"""Pointwise (1x1, stride 1, no padding) forward on channels-last buffers by fastpool's
own GEMM (``fastpool.cpu._microkernel``), in place.

A channels-last ``(N, H, W, C)`` buffer is an ``(M, C)`` matrix of ``M = N * H * W``
pixels, so per group ``g`` the forward is ``Y_g (M x O_g) = X_g (M x C_g) @ W_g^T``:
the micro-kernel broadcasts ``X``'s values read in place and multiplies rows of
``W_g^T`` (its vectors run along the output channels, which are contiguous in ``Y``),
writing ``Y``'s rows in place. Only the weight is copied, transposed.

The work is cut into (group, block of pixels, block of output channels) tasks; each
worker transposes the weight rows of its block of channels into its own scratch (at
most about 512 KiB a block, ``_BLOCK_BYTES``; no barrier between the transpose and
the products) and runs its pixels over them. Every output value is one chain of fused
multiply-adds over the input channels in order from its bias, whatever the blocks and
the thread count: results are identical at any thread count and to the channels-first
pointwise kernels' (which run the same chains).

It replaced (2026-12-07) three routes: single-threaded BLAS calls per block of rows or
columns (each packing its operands again, BLAS's thread count switched off and on
around them, 5 us), and for few pixels or small weights the channels-last im2col
kernel's pointwise variants (one task per band, the whole weight transposed by one
thread). The layer suite's 31 channels-last 1x1 rows at batch 1, interleaved against
the build before (``docs/measure_layer_rows_interleaved.py``, 2 threads): 0.96x-1.61x
the speed, 27 of them at least 1.13x; against PyTorch ``channels_last`` from 0.44x-1.79x
to 0.71x-1.72x.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from fastpool.cpu._microkernel import (FROM_COLUMN_INIT, aligned_empty, gemm_batch, padded,
                                      padded_host)
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu._transpose import block, side_of
from fastpool.cpu.conv._planner import _U

# Bytes of transposed weight a task works from: its block of channels stays in L2
# while its pixels run over it (batch 1 of 1x1 2048->512 on 7x7, 2 threads: the
# weight in 2 blocks 0.72 ms, 4 or 8 blocks 0.49-0.50, 16 blocks 0.52).
_BLOCK_BYTES = 512 << 10
# Pixels per thread from which the threads split the pixels rather than the channels
# (each then reads only its pixels and writes whole rows of the output: batch 1 of 1x1
# 16->96 on 112x112, 2 threads, 0.26 ms by pixels against 0.53 by channels; on 14x14
# planes the split by channels is as fast or faster).
_SPLIT_PIXELS = 256
# Narrowest block of channels (one vector of float32).
_MIN_CHANNELS = 16


# At most this many pixels in all (a 7x7 plane at batch 1), a weight of more than
# ``_NARROW_WEIGHT_BYTES`` a group is not transposed: the channels-last im2col's
# channels-first product reads it in place (batch 1, 2 threads, ms, this kernel
# against that one: 1x1 2048->512 on 7x7 0.56 / 0.54, 512->2048 0.54 / 0.52, 1x1 s2
# 1024->2048 on 14x14 1.06 / 0.92; weights to 1.6 MB a group were faster here:
# 320->1280 on 7x7 0.215 / 0.223, 160->960 0.097 / 0.120).
_NARROW_PIXELS = 64
_NARROW_WEIGHT_BYTES = 2 << 20


# Output pixels (all images) up to which a 1x1 convolution with a stride runs here on
# a copy of the pixels it reads; beyond, the copy (a pass through memory of its own)
# cost more than the channels-last im2col's gather in cache-sized bands (2 threads,
# against that route: batch 1 of 1x1 s2 128->256 on 28x28 1.24x-1.43x, 512->1024 on
# 28x28 1.15x-1.20x, 64->128 on 56x56 1.08x-1.10x; batch 32 of the same 0.93x-0.97x).
STRIDED_PIXELS = 1024


def applies(pixels, weight_bytes_per_group):
    """Whether a channels-last pointwise convolution of ``pixels`` pixels in all runs
    here (else on ``_channels_last_gemm``'s im2col)."""
    return pixels > _NARROW_PIXELS or weight_bytes_per_group <= _NARROW_WEIGHT_BYTES


@functools.lru_cache(maxsize=4096)
def blocks(pixels, outputs_per_group, channels_per_group, groups, itemsize, workers):
    """``(pixel blocks, channel blocks, workers)`` of the forward. Shapes and the
    thread count decide them; results never depend on them."""
    weight_bytes = outputs_per_group * channels_per_group * itemsize
    chunks = max(1, -(-weight_bytes // _BLOCK_BYTES))
    most = max(1, -(-outputs_per_group // _MIN_CHANNELS))
    if workers <= 1 or groups >= workers:
        return 1, min(chunks, most), max(1, min(workers, groups))
    if pixels >= _SPLIT_PIXELS * workers:
        return workers, min(chunks, most), workers
    cb = min(most, -(-max(chunks, workers) // workers) * workers)
    return 1, cb, min(workers, cb)


@njit(inline="always")
def _transpose_rows(wf, start, rows, Cg, wt, ldb):
    """``wt[c*ldb + o] = wf[start + o*Cg + c]`` for ``o < rows``, ``c < Cg``: blocks
    transposed in vector registers, the edges one value at a time."""
    side = side_of(wt)
    o_end = rows - rows % side
    c_end = Cg - Cg % side
    for o0 in range(0, o_end, side):
        for c0 in range(0, c_end, side):
            block(wf, start + o0 * Cg + c0, Cg, wt, c0 * ldb + o0, ldb)
        for o in range(o0, o0 + side):
            for c in range(c_end, Cg):
                wt[_U(c * ldb + o)] = wf[_U(start + o * Cg + c)]
    for o in range(o_end, rows):
        for c in range(Cg):
            wt[_U(c * ldb + o)] = wf[_U(start + o * Cg + c)]


@parallel_kernel
@njit(**BODY_JIT)
def _forward(x, w, bias, y, G, pixel_blocks, channel_blocks, worker, workers):
    """``y[m, g*Og + o] = bias[g*Og + o] + sum_c x[m, g*Cg + c] * w[g*Og + o, c]`` for
    this worker's share of the (group, channel block, pixel block) tasks; ``x`` is
    ``(M, C)``, ``w`` ``(O, Cg)``, ``y`` ``(M, O)``, all C-contiguous."""
    M, C = x.shape
    O = y.shape[1]
    Cg, Og = C // G, O // G
    xf, wf, yf = x.reshape(-1), w.reshape(-1), y.reshape(-1)
    widest = (Og + channel_blocks - 1) // channel_blocks
    ldb = padded(widest, yf)
    wt = aligned_empty(Cg * ldb, yf)
    tasks = G * channel_blocks * pixel_blocks
    held = -1  # the (group, channel block) whose transposed rows ``wt`` holds
    for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
        g = t // (pixel_blocks * channel_blocks)
        b = t // channel_blocks % pixel_blocks
        k = t % channel_blocks
        gk = g * channel_blocks + k
        o0 = k * Og // channel_blocks
        o1 = (k + 1) * Og // channel_blocks
        m0, m1 = b * M // pixel_blocks, (b + 1) * M // pixel_blocks
        if o1 <= o0 or m1 <= m0:
            continue
        if gk != held:
            _transpose_rows(wf, (g * Og + o0) * Cg, o1 - o0, Cg, wt, ldb)
            held = gk
        gemm_batch(m1 - m0, o1 - o0, Cg, xf, m0 * C + g * Cg, C, 1, wt, 0, ldb, yf,
                   m0 * O + g * Og + o0, O, bias, g * Og + o0, 1, 0, 0, FROM_COLUMN_INIT)


# Pixels from which the input gradient reads the weight from a copy whose rows start
# ``padded_host`` apart (cache lines, not a power of two: rows of 1024 values fell in
# a few sets of L1; batch 32 of 1x1 1024->256 on 14x14, 2 threads, 18.3 ms in place
# against 11.7 on BLAS).
_PADDED_PIXELS = 1024


@parallel_kernel
@njit(**BODY_JIT)
def _input_grad(gy, w, gx, zeros, G, pixel_blocks, channel_blocks, worker, workers):
    """``gx[m, g*Cg + c] = sum_o gy[m, g*Og + o] * w[g*Og + o, c]`` for this worker's
    share of the (group, pixel block, input channel block) tasks: ``W_g``'s rows are
    already the vectors the product needs (``w`` is ``(O, ldw)``, ``ldw >= Cg``)."""
    M, O = gy.shape
    C = gx.shape[1]
    Cg, Og = C // G, O // G
    ldw = w.shape[1]
    gyf, wf, gxf = gy.reshape(-1), w.reshape(-1), gx.reshape(-1)
    tasks = G * channel_blocks * pixel_blocks
    for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
        g = t // (pixel_blocks * channel_blocks)
        b = t // channel_blocks % pixel_blocks
        k = t % channel_blocks
        c0 = k * Cg // channel_blocks
        c1 = (k + 1) * Cg // channel_blocks
        m0, m1 = b * M // pixel_blocks, (b + 1) * M // pixel_blocks
        if c1 <= c0 or m1 <= m0:
            continue
        gemm_batch(m1 - m0, c1 - c0, Og, gyf, m0 * O + g * Og, O, 1, wf,
                   g * Og * ldw + c0, ldw, gxf, m0 * C + g * Cg + c0, C, zeros, 0, 1, 0,
                   0, FROM_COLUMN_INIT)


def input_grad_applies(pixels, weight_bytes):
    """Whether ``input_grad`` runs a pointwise convolution's input gradient (else
    BLAS, ``_channels_last``): few pixels (batch 1, 2 threads, against BLAS: 1x1
    1024->256 on 14x14 1.72x, 160->960 on 7x7 2.6x, 256->64 on 56x56 1.14x), or a
    weight of at most ``_BLOCK_BYTES`` (batch 32: 256->64 on 56x56 1.25x, 96->576 on
    14x14 1.17x, 64->256 on 56x56 0.98x; larger weights there 0.89x)."""
    return pixels < _PADDED_PIXELS or weight_bytes <= _BLOCK_BYTES


def input_grad(gy2d, weight, in_shape, groups, workers):
    """``grad_input``, channels-last ``(N, C, H, W)`` (``in_shape``), of the pointwise
    convolution from the pixel matrix ``gy2d`` of its output gradient."""
    n, c, h, w = in_shape
    buffer = np.empty((n, h, w, c), gy2d.dtype)
    o = gy2d.shape[1]
    w2d = np.ascontiguousarray(weight).reshape(o, -1)
    cg = w2d.shape[1]
    ld = padded_host(cg, w2d.dtype)
    if gy2d.shape[0] >= _PADDED_PIXELS and ld != cg:
        padded_weight = np.empty((o, ld), w2d.dtype)
        padded_weight[:, :cg] = w2d
        w2d = padded_weight
    rb, cb, used = blocks(gy2d.shape[0], cg, o // groups, groups, 0, workers)
    _input_grad(gy2d, w2d, buffer.reshape(-1, c), np.zeros(c, gy2d.dtype), groups, rb,
                cb, used)
    return buffer.transpose(0, 3, 1, 2)


def forward(x2d, weight, bias, out_shape, groups, workers):
    """``y``, channels-last ``(N, C_out, OH, OW)`` (``out_shape``), of the pointwise
    convolution of the pixel matrix ``x2d``."""
    n, o, oh, ow = out_shape
    buffer = np.empty((n, oh, ow, o), x2d.dtype)
    y2d = buffer.reshape(-1, o)
    w2d = np.ascontiguousarray(weight).reshape(o, -1)
    b = (np.ascontiguousarray(bias) if bias is not None else np.zeros(o, x2d.dtype))
    rb, cb, used = blocks(x2d.shape[0], o // groups, w2d.shape[1], groups,
                          x2d.itemsize, workers)
    _forward(x2d, w2d, b, y2d, groups, rb, cb, used)
    return buffer.transpose(0, 3, 1, 2)


@parallel_kernel
@njit(**BODY_JIT)
def _sample(x, out, SH, SW, worker, workers):
    """``out[n, oh, ow, :] = x[n, oh*SH, ow*SW, :]`` (``(N, H, W, C)`` buffers), this
    worker's share of the output rows."""
    N, OH, OW = out.shape[0], out.shape[1], out.shape[2]
    rows = N * OH
    for r in range(worker * rows // workers, (worker + 1) * rows // workers):
        n, oh = r // OH, r % OH
        for ow in range(OW):
            out[n, oh, ow, :] = x[n, oh * SH, ow * SW, :]


def sampled_pixels(pixels4, stride, out_size, workers):
    """The ``(M_out, C)`` pixel matrix of the pixels a 1x1 convolution with ``stride``
    and no padding reads from the ``(N, H, W, C)`` buffer ``pixels4`` (a copy, on
    ``workers`` threads: 0.8 MB took 40 us on one)."""
    n, c = pixels4.shape[0], pixels4.shape[3]
    out = np.empty((n,) + tuple(out_size) + (c,), pixels4.dtype)
    _sample(pixels4, out, stride[0], stride[1],
            max(1, min(workers, n * out_size[0], out.size // 16384)))
    return out.reshape(-1, c)
