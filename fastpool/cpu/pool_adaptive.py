"""Adaptive pooling on the CPU (average and max), either memory format.

Windows follow PyTorch's rule (``fastpool._geometry.adaptive_bounds``), passed as
per-axis ``starts``/``ends`` tables. Kernels see a ``(B, D, H, W, C)`` buffer: a
channels-last input's ``(N, D, H, W, C)`` buffer in place, or a channels-first one as
``(planes, D, H, W, 1)`` (the factories' ``CHANNELS_LAST=False`` fixes ``C = 1`` at
compile time, so the channel loop folds away). Forward kernels parallelise over output
rows ``(b, od, oh)``; the average backward gathers, per input row ``(b, d, h)``, the
shares of the windows covering each element (``first``/``last`` tables) in output
order, so nothing races and sums run in one fixed order. Sums are in the input's dtype,
row-major, divided by the window's size in float64 and rounded once to the dtype, as on
the GPU; max pooling keeps the first maximum in row-major order and lets the first NaN
win, as the other max kernels do.

Global pooling (``output_size = 1``, every window the whole input) is a plain
reduction in an order of its own (``_lanes``: interleaved partial sums folded
pairwise), the same on every path of both devices: ``global_avg_channels_first`` sums
each contiguous plane in vector registers, ``global_avg_channels_last`` vectorises
across channels; ``global_avg_backward`` broadcasts each share.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from fastpool.cpu._lanes import (COLUMN_BYTES, LANES, WIDE_FROM, interleaved_column_sums,
                                  interleaved_sum, interleaved_sum_wide)
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu._pool_common import U, replaces
from fastpool.cpu._vector_width import narrow_vectors
from fastpool.cpu.pool_channels_last import _row


@functools.lru_cache(maxsize=None)
def avg_forward(CHANNELS_LAST):
    """``kernel(x, out, sd, ed, sh, eh, sw, ew, zero, workers)``."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, sd, ed, sh, eh, sw, ew, zero, worker, workers):
        narrow_vectors()  # float64 divisions: 512-bit vdivpd otherwise (_vector_width)
        B, D, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        C = x.shape[4] if CHANNELS_LAST else 1
        OD, OH, OW = out.shape[1], out.shape[2], out.shape[3]
        xf = x.reshape(-1)
        of = out.reshape(-1)
        total_rows = B * OD * OH
        for row in range(worker * total_rows // workers,
                         (worker + 1) * total_rows // workers):
            b, od, oh = _row(row, OD, OH)
            acc = np.empty(C, dtype=x.dtype)
            d0, d1, h0, h1 = sd[od], ed[od], sh[oh], eh[oh]
            for ow in range(OW):
                w0, w1 = sw[ow], ew[ow]
                count = (d1 - d0) * (h1 - h0) * (w1 - w0)
                for c in range(C):
                    acc[c] = zero
                for d in range(d0, d1):
                    for h in range(h0, h1):
                        src = ((b * D + d) * H + h) * W
                        for w in range(w0, w1):
                            s = (src + w) * C
                            for c in range(C):
                                acc[c] += xf[U(s + c)]
                o = (row * OW + ow) * C
                for c in range(C):
                    of[U(o + c)] = np.float64(acc[c]) / count

    return kernel


@functools.lru_cache(maxsize=None)
def max_forward(CHANNELS_LAST, WITH_INDICES):
    """``kernel(x, out, indices, sd, ed, sh, eh, sw, ew, workers)``; indices are flat positions
    ``(d * H + h) * W + w`` inside each ``(n, c)`` volume."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, indices, sd, ed, sh, eh, sw, ew, worker, workers):
        B, D, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        C = x.shape[4] if CHANNELS_LAST else 1
        OD, OH, OW = out.shape[1], out.shape[2], out.shape[3]
        xf = x.reshape(-1)
        of = out.reshape(-1)
        jf = indices.reshape(-1)
        total_rows = B * OD * OH
        for row in range(worker * total_rows // workers,
                         (worker + 1) * total_rows // workers):
            b, od, oh = _row(row, OD, OH)
            d0, d1, h0, h1 = sd[od], ed[od], sh[oh], eh[oh]
            for ow in range(OW):
                w0, w1 = sw[ow], ew[ow]
                o = (row * OW + ow) * C
                first = (d0 * H + h0) * W + w0
                for c in range(C):
                    of[U(o + c)] = xf[U((b * D * H * W + first) * C + c)]
                    if WITH_INDICES:
                        jf[U(o + c)] = first
                for d in range(d0, d1):
                    for h in range(h0, h1):
                        for w in range(w0, w1):
                            k = (d * H + h) * W + w
                            s = (b * D * H * W + k) * C
                            for c in range(C):
                                v = xf[U(s + c)]
                                take = replaces(v, of[U(o + c)])
                                of[U(o + c)] = v if take else of[U(o + c)]
                                if WITH_INDICES:
                                    jf[U(o + c)] = k if take else jf[U(o + c)]

    return kernel


@functools.lru_cache(maxsize=None)
def avg_backward(CHANNELS_LAST):
    """``kernel(grad_output, grad_input, sd, ed, sh, eh, sw, ew, fd, ld, fh, lh, fw, lw,
    zero, workers)``: each element sums ``grad / window size`` (rounded to the dtype) over the
    windows ``[f, l)`` covering it along each axis, in output order."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(grad_output, grad_input, sd, ed, sh, eh, sw, ew, fd, ld, fh, lh, fw, lw,
               zero, worker, workers):
        narrow_vectors()  # float64 divisions: 512-bit vdivpd otherwise (_vector_width)
        B, D, H, W = (grad_input.shape[0], grad_input.shape[1], grad_input.shape[2],
                      grad_input.shape[3])
        C = grad_input.shape[4] if CHANNELS_LAST else 1
        OD, OH, OW = grad_output.shape[1], grad_output.shape[2], grad_output.shape[3]
        gf = grad_output.reshape(-1)
        gif = grad_input.reshape(-1)
        total_in_rows = B * D * H
        for in_row in range(worker * total_in_rows // workers,
                            (worker + 1) * total_in_rows // workers):
            b, d, h = _row(in_row, D, H)
            acc = np.empty(C, dtype=grad_input.dtype)
            share = np.empty(C, dtype=grad_input.dtype)
            for w in range(W):
                for c in range(C):
                    acc[c] = zero
                for od in range(fd[d], ld[d]):
                    for oh in range(fh[h], lh[h]):
                        for ow in range(fw[w], lw[w]):
                            count = ((ed[od] - sd[od]) * (eh[oh] - sh[oh])
                                     * (ew[ow] - sw[ow]))
                            s = (((b * OD + od) * OH + oh) * OW + ow) * C
                            for c in range(C):
                                share[c] = np.float64(gf[U(s + c)]) / count
                                acc[c] += share[c]
                g = (in_row * W + w) * C
                for c in range(C):
                    gif[U(g + c)] = acc[c]

    return kernel


@functools.lru_cache(maxsize=None)
def global_avg_backward(CHANNELS_LAST):
    """``kernel(grad_output, grad_input, zero, workers)`` for global pooling: every
    element of ``(b, c)`` gets ``grad / size`` (rounded to the dtype, then added to
    ``zero`` as ``avg_backward``'s accumulator does, so results are those of the
    general kernel bit for bit). The general kernel made two scratch arrays per input
    row, which on 7x7 planes cost 25x the stores."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(grad_output, grad_input, zero, worker, workers):
        narrow_vectors()  # float64 divisions: 512-bit vdivpd otherwise (_vector_width)
        B = grad_input.shape[0]
        C = grad_input.shape[4] if CHANNELS_LAST else 1
        size = grad_input.shape[1] * grad_input.shape[2] * grad_input.shape[3]
        gf = grad_output.reshape(-1)
        gif = grad_input.reshape(-1)
        share = np.empty(C, dtype=grad_input.dtype)
        for b in range(worker * B // workers, (worker + 1) * B // workers):
            for c in range(C):
                share[c] = np.float64(gf[U(b * C + c)]) / size
                share[c] = zero + share[c]
            base = b * size * C
            for k in range(size):
                for c in range(C):
                    gif[U(base + k * C + c)] = share[c]

    return kernel


@njit(**BODY_JIT)
def _fold(acc, n):
    """Add the ``LANES`` partials ``acc[:, c]`` of each column ``c < n`` pairwise into
    ``acc[0, c]``, as ``_lanes.interleaved_sum`` does."""
    width = LANES // 2
    while width:
        for j in range(width):
            for c in range(n):
                acc[j, c] += acc[j + width, c]
        width //= 2


@parallel_kernel
@njit(**BODY_JIT)
def global_avg_channels_first(x, out, worker, workers):
    """``kernel(x, out, workers)``: ``out[p] = sum(x[p]) / size`` for ``x`` of shape
    ``(planes, size)``, summed by ``_lanes.interleaved_sum``; each worker takes a fixed
    run of planes. (Serial bodies through the shared loop: one worker calls the body
    directly, without a parallel region's 5 us.)"""
    planes, size = x.shape
    xf = x.reshape(-1)
    wide = planes * size >= WIDE_FROM  # (the same bits either way)
    for p in range(worker * planes // workers, (worker + 1) * planes // workers):
        if wide:
            total = interleaved_sum_wide(xf, p * size, size)
        else:
            total = interleaved_sum(xf, p * size, size)
        out[U(p)] = np.float64(total) / size


@parallel_kernel
@njit(**BODY_JIT)
def global_avg_channels_last(x, out, zero, block, worker, workers):
    """``kernel(x, out, zero, block, workers)``: ``out[b, c] = sum(x[b, :, c]) / size`` for ``x`` of shape ``(B, size, C)``, in
    ``global_avg_channels_first``'s order, vectorised across channels. A task is one
    image's ``block`` channels: whole images (``block = C``) read their memory in
    one sequential stream, which the hardware prefetches (256-channel blocks read
    1 KiB pieces 8 KiB apart and ran at 0.9x PyTorch from DRAM)."""
    narrow_vectors()  # float64 divisions: 512-bit vdivpd otherwise (_vector_width)
    B, size, C = x.shape
    xf = x.reshape(-1)
    W = COLUMN_BYTES // x.itemsize  # channels a vector of partials holds
    blocks = -(-C // block)
    units = B * blocks
    sums = np.empty(block, dtype=x.dtype)
    acc = np.empty((LANES, W), dtype=x.dtype)  # the last channels, fewer than W
    first = min(LANES, size)
    for unit in range(worker * units // workers, (worker + 1) * units // workers):
        b = unit // blocks
        c0 = (unit - b * blocks) * block
        n = min(block, C - c0)
        whole = n - n % W
        # chunks of W channels with their partials in registers (in memory: a load and
        # a store an element, 2.95 us for 512@7 on one thread; registers: below)
        for c in range(0, whole, W):
            interleaved_column_sums(xf, b * size * C + c0 + c, C, size, sums, c)
        tail = n - whole
        if tail:
            # each partial's first element is added to +0 as it is stored, not after
            # a pass that zeroes every partial (8-15% of the time at 49 pixels)
            for k in range(first):
                for c in range(tail):
                    acc[k, c] = zero + x[U(b), U(k), U(c0 + whole + c)]
            for j in range(first, LANES):
                for c in range(tail):
                    acc[j, c] = zero
            for k in range(LANES, size):
                j = k % LANES
                for c in range(tail):
                    acc[j, c] += x[U(b), U(k), U(c0 + whole + c)]
            _fold(acc, tail)
            for c in range(tail):
                sums[whole + c] = acc[0, c]
        for c in range(n):
            out[U(b), U(c0 + c)] = np.float64(sums[c]) / size
