"""Stochastic pooling on channels-last ``(N, D, H, W, C)`` buffers read in place: training
forward, inference forward and backward (training backward is
``pool_channels_last.scatter_to_indices``).

Each window is the channels-first kernels' window (``pool_stochastic``) with the channel
as the inner loop: the same taps in the same order, the same float64 sums, the same
draw ``u`` keyed by ``(seed, n, c)`` and the counter ``(od * OH + oh, ow)``, and the
same two paths (windows wholly inside the input cap the threshold just below the sum;
edge windows fall back to the last positive element), so every pick, output and
gradient is bitwise the channels-first one. Forward kernels parallelise over output
rows ``(n, od, oh)``; the inference backward computes each window's ``A`` and ``B``
shares (``pool_stochastic_backward.infer_backward``) per output row, then gathers them per input
row (``gather_shares``), so nothing races.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from fastpool import _rng
from fastpool.cpu import _half_bits as hb
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu._pool_common import (
    INF,
    JUST_BELOW_ONE,
    U,
    channel_results,
    sums_scale,
)
from fastpool.cpu.pool_channels_last import _row, gather_shares
from fastpool.cpu.pool_stochastic import tap


@njit(inline="always")
def _window_sums(xf, base, d0, h0, w0, D, H, W, C, KD, KH, KW, DD, DH, DW, s1, s2):
    """``s1[c]``, ``s2[c]`` = the float64 sums (of squares) of window channel ``c``, in
    row-major tap order; returns the first in-input tap (-1 if none) and whether an
    element is negative, NaN or infinite (callers add the overflow checks of their
    sums)."""
    for c in range(C):
        s1[c] = 0.0
        s2[c] = 0.0
    first = -1
    invalid = False
    for e in range(KD * KH * KW):
        k = tap(e, d0, h0, w0, D, H, W, KH, KW, DD, DH, DW)
        if k >= 0:
            if first < 0:
                first = k
            src = (base + k) * C
            for c in range(C):
                v = np.float64(hb.wide(xf[U(src + c)]))
                invalid |= not (0.0 <= v < INF)
                s1[c] += v
                s2[c] += v * v
    return first, invalid


@njit(cache=True)
def _settle(xf, base, d0, h0, w0, D, H, W, C, KD, KH, KW, DD, DH, DW, s1, s2, scales):
    """``scales[c] = sums_scale(s1[c], s2[c])``; where that is not 1.0, channel
    ``c``'s sums again, of its elements times the scale (rare: called, not inlined)."""
    for c in range(C):
        scale = sums_scale(s1[c], s2[c])
        scales[c] = scale
        if scale != 1.0:
            t1 = 0.0
            t2 = 0.0
            for e in range(KD * KH * KW):
                k = tap(e, d0, h0, w0, D, H, W, KH, KW, DD, DH, DW)
                if k >= 0:
                    v = np.float64(hb.wide(xf[U((base + k) * C + c)])) * scale
                    t1 += v
                    t2 += v * v
            s1[c] = t1
            s2[c] = t2


@functools.lru_cache(maxsize=None)
def train_forward(KD, KH, KW, SD, SH, SW, DD, DH, DW, WITH_INDICES):
    """``kernel(x, out, indices, pd, ph, pw, key, invalid_rows, ow_lo, ow_hi, workers)``;
    ``[ow_lo, ow_hi)`` are the output columns whose windows lie inside the last axis."""
    taps = KD * KH * KW

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, indices, pd, ph, pw, key, invalid_rows, ow_lo, ow_hi, worker, workers):
        N, D, H, W, C = x.shape
        OD, OH, OW = out.shape[1], out.shape[2], out.shape[3]
        HW = H * W
        xf = x.reshape(-1)
        of = out.reshape(-1)
        jf = indices.reshape(-1)
        total_rows = N * OD * OH
        for row in range(worker * total_rows // workers,
                         (worker + 1) * total_rows // workers):
            n, od, oh = _row(row, OD, OH)
            d0 = od * SD - pd
            h0 = oh * SH - ph
            inside = d0 >= 0 and d0 + (KD - 1) * DD < D and h0 >= 0 and h0 + (KH - 1) * DH < H
            base = n * D * HW
            keys = np.empty(C, np.uint64)
            for c in range(C):
                keys[c] = _rng.keyed_plane(key, n, c)
            total = np.empty(C)
            squares = np.empty(C)
            threshold = np.empty(C)
            running = np.empty(C)
            found = np.empty(C, np.bool_)
            chosen = np.empty(C, np.int64)
            last_positive = np.empty(C, np.int64)
            invalid = False
            for ow in range(OW):
                w0 = ow * SW - pw
                o = (row * OW + ow) * C
                first, bad = _window_sums(xf, base, d0, h0, w0, D, H, W, C, KD, KH, KW,
                                          DD, DH, DW, total, squares)
                for c in range(C):  # training needs the sums only, not the squares
                    bad |= not (total[c] < INF)
                invalid |= bad
                if inside and ow_lo <= ow < ow_hi:
                    # The interior path of pool_stochastic.train_forward.
                    for c in range(C):
                        u = _rng.keyed_uniform(keys[c], key, od, oh, ow)
                        threshold[c] = min(u * total[c], total[c] * JUST_BELOW_ONE)
                        running[c] = 0.0
                        found[c] = False
                        chosen[c] = first
                        of[U(o + c)] = xf[U((base + first) * C + c)]
                    for e in range(taps):
                        k = tap(e, d0, h0, w0, D, H, W, KH, KW, DD, DH, DW)
                        src = (base + k) * C
                        for c in range(C):
                            v = xf[U(src + c)]
                            running[c] += np.float64(hb.wide(v))
                            if running[c] > threshold[c] and not found[c]:
                                chosen[c] = k
                                of[U(o + c)] = v
                                found[c] = True
                else:
                    # The edge path: the last positive element when rounding lets no
                    # running sum exceed the threshold; a zero-sum window outputs 0.
                    for c in range(C):
                        chosen[c] = first
                        if total[c] > 0.0:
                            threshold[c] = _rng.keyed_uniform(keys[c], key, od, oh, ow) * total[c]
                            running[c] = 0.0
                            last_positive[c] = first
                            chosen[c] = -1
                    for e in range(taps):
                        k = tap(e, d0, h0, w0, D, H, W, KH, KW, DD, DH, DW)
                        if k >= 0:
                            src = (base + k) * C
                            for c in range(C):
                                if total[c] > 0.0 and chosen[c] < 0:
                                    v = np.float64(hb.wide(xf[U(src + c)]))
                                    running[c] += v
                                    if v > 0.0:
                                        last_positive[c] = k
                                    if running[c] > threshold[c]:
                                        chosen[c] = k
                    for c in range(C):
                        if total[c] > 0.0:
                            if chosen[c] < 0:
                                chosen[c] = last_positive[c]
                            of[U(o + c)] = xf[U((base + chosen[c]) * C + c)]
                        else:
                            of[U(o + c)] = 0
                if WITH_INDICES:
                    for c in range(C):
                        jf[U(o + c)] = chosen[c]
            invalid_rows[row] = invalid

    return kernel


@functools.lru_cache(maxsize=None)
def infer(KD, KH, KW, SD, SH, SW, DD, DH, DW, SHARES):
    """``kernel(x, grad_output, out_a, out_b, pd, ph, pw, invalid_rows, workers)``. Forward
    (``SHARES=False``): ``out_a = S2 / S1`` per window and channel (``grad_output`` and
    ``out_b`` are not read). Backward: ``out_a = A = 2 g / S1`` and ``out_b = B = -g S2
    / S1**2`` (float64). Both 0 where ``S1 == 0``."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, grad_output, out_a, out_b, pd, ph, pw, invalid_rows, worker, workers):
        N, D, H, W, C = x.shape
        OD, OH, OW = out_a.shape[1], out_a.shape[2], out_a.shape[3]
        xf = x.reshape(-1)
        gf = grad_output.reshape(-1)
        af = out_a.reshape(-1)
        bf = out_b.reshape(-1)
        total_rows = N * OD * OH
        for row in range(worker * total_rows // workers,
                         (worker + 1) * total_rows // workers):
            n, od, oh = _row(row, OD, OH)
            s1 = np.empty(C)
            s2 = np.empty(C)
            scales = np.empty(C)
            invalid = False
            for ow in range(OW):
                base = n * D * H * W
                d0, h0, w0 = od * SD - pd, oh * SH - ph, ow * SW - pw
                _, bad = _window_sums(xf, base, d0, h0, w0, D, H, W, C, KD, KH, KW, DD,
                                      DH, DW, s1, s2)
                o = (row * OW + ow) * C
                if channel_results(gf, af, bf, o, s1, s2, scales, C, SHARES, False) \
                        or bad:  # rare: the channels whose sums do not serve, again
                    _settle(xf, base, d0, h0, w0, D, H, W, C, KD, KH, KW, DD, DH, DW, s1,
                            s2, scales)
                    bad |= channel_results(gf, af, bf, o, s1, s2, scales, C, SHARES,
                                           True)
                invalid |= bad
            invalid_rows[row] = invalid

    return kernel


@functools.lru_cache(maxsize=None)
def infer_backward(KD, KH, KW, SD, SH, SW, DD, DH, DW):
    """``kernel(x, share_a, share_b, grad_input, pd, ph, pw, workers)``: ``grad = x * sum(A) +
    sum(B)`` over the windows covering each element, gathered as the channels-first
    kernel spreads them."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, share_a, share_b, grad_input, pd, ph, pw, worker, workers):
        N, D, H, W, C = x.shape
        OD, OH, OW = share_a.shape[1], share_a.shape[2], share_a.shape[3]
        xf = x.reshape(-1)
        af = share_a.reshape(-1)
        bf = share_b.reshape(-1)
        gif = grad_input.reshape(-1)
        total_in_rows = N * D * H
        for in_row in range(worker * total_in_rows // workers,
                            (worker + 1) * total_in_rows // workers):
            n, d, h = _row(in_row, D, H)
            row = np.empty(C)
            plane = np.empty(C)
            sum_a = np.empty(C)
            sum_b = np.empty(C)
            total = np.empty(C)
            for w in range(W):
                gather_shares(af, sum_a, 0, n, d, h, w, OD, OH, OW, C, pd, ph, pw, KD,
                              KH, KW, SD, SH, SW, DD, DH, DW, row, plane, total, 0.0)
                gather_shares(bf, sum_b, 0, n, d, h, w, OD, OH, OW, C, pd, ph, pw, KD,
                              KH, KW, SD, SH, SW, DD, DH, DW, row, plane, total, 0.0)
                g = ((in_row * W) + w) * C
                for c in range(C):
                    gif[U(g + c)] = hb.narrow(np.float64(hb.wide(xf[U(g + c)])) * sum_a[c]
                                              + sum_b[c], gif)

    return kernel
