"""Adaptive stochastic pooling on the CPU, either memory format: stochastic pooling's
sampling inside PyTorch's adaptive windows (``fastpool._geometry.adaptive_bounds``).

Buffers are those of ``pool_adaptive`` (``(B, D, H, W, C)``: channels-last in place,
channels-first as ``(planes, D, H, W, 1)``). Window elements are visited in row-major
order with float64 sums; window ``(n, c, od, oh, ow)`` draws ``u`` from
``fastpool._rng`` keyed by ``(seed, n, c)`` and the counter ``(od * OH + oh, ow)``, as
stochastic pooling does, and picks the first element whose running sum exceeds
``u * S1`` (the last positive one when rounding lets none; a zero-sum window outputs 0
and records its first element). Inference outputs ``S2 / S1``; its backward spreads
``A = 2 g / S1`` and ``B = -g S2 / S1**2`` over each window's elements, gathered in
output order. ``fastpool.cuda.pool_adaptive_stochastic`` makes the same picks.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from fastpool import _rng
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu._pool_common import (
    INF,
    U,
    channel_results,
    sums_scale,
)
from fastpool.cpu.pool_channels_last import _row


@njit(inline="always")
def _sums(xf, b, d0, d1, h0, h1, w0, w1, D, H, W, C, s1, s2):
    """Float64 sums (of squares) of one window per channel, row-major; returns whether
    an element is negative, NaN or infinite (callers add the checks of their sums)."""
    for c in range(C):
        s1[c] = 0.0
        s2[c] = 0.0
    bad = False
    for d in range(d0, d1):
        for h in range(h0, h1):
            for w in range(w0, w1):
                src = (((b * D + d) * H + h) * W + w) * C
                for c in range(C):
                    v = np.float64(xf[U(src + c)])
                    bad |= not (0.0 <= v < INF)
                    s1[c] += v
                    s2[c] += v * v
    return bad


@njit(cache=True)
def _settle(xf, b, d0, d1, h0, h1, w0, w1, D, H, W, C, s1, s2, scales):
    """``scales[c] = sums_scale(s1[c], s2[c])``; where that is not 1.0, channel
    ``c``'s sums again, of its elements times the scale
    (``pool_stochastic_channels_last._settle``)."""
    for c in range(C):
        scale = sums_scale(s1[c], s2[c])
        scales[c] = scale
        if scale != 1.0:
            t1 = 0.0
            t2 = 0.0
            for d in range(d0, d1):
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        k = (((b * D + d) * H + h) * W + w) * C + c
                        v = np.float64(xf[U(k)]) * scale
                        t1 += v
                        t2 += v * v
            s1[c] = t1
            s2[c] = t2


@njit(inline="always")
def _plane(b, c, channels, CHANNELS_LAST):
    """``(n, c)`` of buffer row ``b`` and channel lane ``c``."""
    if CHANNELS_LAST:
        return b, c
    return b // channels, b - (b // channels) * channels


@functools.lru_cache(maxsize=None)
def train_forward(CHANNELS_LAST, WITH_INDICES):
    """``kernel(x, out, indices, sd, ed, sh, eh, sw, ew, key, channels, invalid_rows, workers)``;
    ``key`` is ``_rng.kernel_key_array``."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, indices, sd, ed, sh, eh, sw, ew, key, channels, invalid_rows,
               worker, workers):
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
            s1 = np.empty(C)
            s2 = np.empty(C)
            threshold = np.empty(C)
            running = np.empty(C)
            chosen = np.empty(C, np.int64)
            last_positive = np.empty(C, np.int64)
            invalid = False
            for ow in range(OW):
                w0, w1 = sw[ow], ew[ow]
                invalid |= _sums(xf, b, d0, d1, h0, h1, w0, w1, D, H, W, C, s1, s2)
                for c in range(C):  # training needs the sums only, not the squares
                    invalid |= not (s1[c] < INF)
                first = (d0 * H + h0) * W + w0
                for c in range(C):
                    chosen[c] = first
                    if s1[c] > 0.0:
                        n, pc = _plane(b, c, channels, CHANNELS_LAST)
                        threshold[c] = _rng.keyed_uniform(_rng.keyed_plane(key, n, pc),
                                                          key, od, oh, ow) * s1[c]
                        running[c] = 0.0
                        last_positive[c] = first
                        chosen[c] = -1
                for d in range(d0, d1):
                    for h in range(h0, h1):
                        for w in range(w0, w1):
                            k = (d * H + h) * W + w
                            src = (b * D * H * W + k) * C
                            for c in range(C):
                                if s1[c] > 0.0 and chosen[c] < 0:
                                    v = np.float64(xf[U(src + c)])
                                    running[c] += v
                                    if v > 0.0:
                                        last_positive[c] = k
                                    if running[c] > threshold[c]:
                                        chosen[c] = k
                o = (row * OW + ow) * C
                for c in range(C):
                    if s1[c] > 0.0:
                        if chosen[c] < 0:
                            chosen[c] = last_positive[c]
                        of[U(o + c)] = xf[U((b * D * H * W + chosen[c]) * C + c)]
                    else:
                        of[U(o + c)] = 0
                    if WITH_INDICES:
                        jf[U(o + c)] = chosen[c]
            invalid_rows[row] = invalid

    return kernel


@functools.lru_cache(maxsize=None)
def infer(CHANNELS_LAST, SHARES):
    """``kernel(x, grad_output, out_a, out_b, sd, ed, sh, eh, sw, ew, invalid_rows, workers)``.
    Forward (``SHARES=False``): ``out_a = S2 / S1`` (``grad_output`` and ``out_b`` are
    not read). Backward: per window ``out_a = A = 2 g / S1`` and ``out_b = B = -g S2 /
    S1**2`` (float64). Both 0 where ``S1 == 0``."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, grad_output, out_a, out_b, sd, ed, sh, eh, sw, ew, invalid_rows, worker,
               workers):
        B, D, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        C = x.shape[4] if CHANNELS_LAST else 1
        OD, OH, OW = out_a.shape[1], out_a.shape[2], out_a.shape[3]
        xf = x.reshape(-1)
        gf = grad_output.reshape(-1)
        af = out_a.reshape(-1)
        bf = out_b.reshape(-1)
        total_rows = B * OD * OH
        for row in range(worker * total_rows // workers,
                         (worker + 1) * total_rows // workers):
            b, od, oh = _row(row, OD, OH)
            s1 = np.empty(C)
            s2 = np.empty(C)
            scales = np.empty(C)
            invalid = False
            d0, d1, h0, h1 = sd[od], ed[od], sh[oh], eh[oh]
            for ow in range(OW):
                w0, w1 = sw[ow], ew[ow]
                bad = _sums(xf, b, d0, d1, h0, h1, w0, w1, D, H, W, C, s1, s2)
                o = (row * OW + ow) * C
                if channel_results(gf, af, bf, o, s1, s2, scales, C, SHARES, False) \
                        or bad:  # rare: the channels whose sums do not serve, again
                    _settle(xf, b, d0, d1, h0, h1, w0, w1, D, H, W, C, s1, s2, scales)
                    bad |= channel_results(gf, af, bf, o, s1, s2, scales, C, SHARES,
                                           True)
                invalid |= bad
            invalid_rows[row] = invalid

    return kernel


@functools.lru_cache(maxsize=None)
def infer_backward(CHANNELS_LAST):
    """``kernel(x, share_a, share_b, grad_input, fd, ld, fh, lh, fw, lw, workers)``: ``grad = x
    * sum(A) + sum(B)`` over the windows covering each element, in output order."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, share_a, share_b, grad_input, fd, ld, fh, lh, fw, lw, worker, workers):
        B, D, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        C = x.shape[4] if CHANNELS_LAST else 1
        OD, OH, OW = share_a.shape[1], share_a.shape[2], share_a.shape[3]
        xf = x.reshape(-1)
        af = share_a.reshape(-1)
        bf = share_b.reshape(-1)
        gif = grad_input.reshape(-1)
        total_in_rows = B * D * H
        for in_row in range(worker * total_in_rows // workers,
                            (worker + 1) * total_in_rows // workers):
            b, d, h = _row(in_row, D, H)
            sum_a = np.empty(C)
            sum_b = np.empty(C)
            for w in range(W):
                for c in range(C):
                    sum_a[c] = 0.0
                    sum_b[c] = 0.0
                for od in range(fd[d], ld[d]):
                    for oh in range(fh[h], lh[h]):
                        for ow in range(fw[w], lw[w]):
                            s = (((b * OD + od) * OH + oh) * OW + ow) * C
                            for c in range(C):
                                sum_a[c] += af[U(s + c)]
                                sum_b[c] += bf[U(s + c)]
                g = (in_row * W + w) * C
                for c in range(C):
                    gif[U(g + c)] = np.float64(xf[U(g + c)]) * sum_a[c] + sum_b[c]

    return kernel
