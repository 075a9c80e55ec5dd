"""Stochastic pooling on the CPU, channels-first: the window sums every kernel shares
and the row kernels of the training and inference forwards. The whole-plane kernels
are in ``pool_stochastic_flat``, the inference backwards in ``pool_stochastic_backward``
and ``pool_stochastic_flat``; training backward is ``pool_max.scatter_to_indices``.

Window elements are visited in row-major order (depth, then row, then column); sums,
the threshold and the running sum are float64 in that order, so the choice made for a
window is exactly reproducible and matches the GPU kernel's. Window ``(n, c, od, oh,
ow)`` draws ``u`` from ``fastpool._rng`` keyed by ``(seed, n, c)`` and the counter
``(od * OH + oh, ow)``, so 2-D picks are those of ``(oh, ow)``. Kernels flag invalid
input (negative, NaN, infinite, or a sum that overflows) per output row; the launchers
turn a flag into ``ValueError``.
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
    edge_columns,
    output_row,
    plain_sums_serve,
    sums_scale,
    weighted_average,
)


@njit(inline="always")
def tap(e, d0, h0, w0, D, H, W, KH, KW, DD, DH, DW):
    """Flat in-plane offset of window element ``e`` (row-major), or -1 if padding."""
    a = e // (KH * KW)
    r = e - a * (KH * KW)
    i = r // KW
    d = d0 + a * DD
    h = h0 + i * DH
    w = w0 + (r - i * KW) * DW
    if d < 0 or d >= D or h < 0 or h >= H or w < 0 or w >= W:
        return -1
    return (d * H + h) * W + w


@njit(inline="always")
def window_sums(xf, base, d0, h0, w0, D, H, W, KD, KH, KW, DD, DH, DW, scale):
    """``(S1, S2, first in-input offset, invalid)`` of one window (float64), of its
    elements times ``scale`` (a power of two; callers pass a literal 1.0 but for
    ``settled_window_sums``)."""
    s1 = 0.0
    s2 = 0.0
    first = -1
    invalid = False
    for e in range(KD * KH * KW):
        k = tap(e, d0, h0, w0, D, H, W, KH, KW, DD, DH, DW)
        if k >= 0:
            v = np.float64(hb.wide(xf[U(base + k)]))
            if not (0.0 <= v < INF):  # before scaling: -1e-300 * 2**-600 is -0.0
                invalid = True
            v *= scale
            if first < 0:
                first = k
            s1 += v
            s2 += v * v
    return s1, s2, first, invalid or not (s1 < INF)


@njit(inline="always")
def interior_sums(xf, k0, HW, W, KD, KH, KW, DD, DH, DW, scale):
    """``(S1, S2, all taps >= 0)`` of a window wholly inside the input, from flat offset
    ``k0``: no bounds checks, so loops over ``ow`` vectorise (float64 sums of the
    elements times ``scale``, as in ``window_sums``)."""
    s1 = 0.0
    s2 = 0.0
    nonnegative = True
    for a in range(KD):
        for i in range(KH):
            for j in range(KW):
                v = np.float64(hb.wide(xf[U(k0 + a * DD * HW + i * DH * W + j * DW)]))
                nonnegative &= v >= 0.0  # before scaling, as in window_sums
                v *= scale
                s1 += v
                s2 += v * v
    return s1, s2, nonnegative


@njit(cache=True)
def settled_window_sums(xf, base, d0, h0, w0, D, H, W, KD, KH, KW, DD, DH, DW):
    """``window_sums`` for stochastic inference: ``(S1, S2, invalid, scale)``, summed
    again with the elements scaled where the plain sums do not serve (``sums_scale``);
    invalid also where ``S2`` overflows. For the rare windows the kernels' loops flag:
    called, not inlined, so that it adds no code to those loops."""
    s1, s2, _, bad = window_sums(xf, base, d0, h0, w0, D, H, W, KD, KH, KW, DD, DH, DW,
                                 1.0)
    scale = sums_scale(s1, s2)
    if scale != 1.0:
        s1, s2, _, bad = window_sums(xf, base, d0, h0, w0, D, H, W, KD, KH, KW, DD, DH,
                                     DW, scale)
    return s1, s2, bad or not (s2 < INF), scale


@functools.lru_cache(maxsize=None)
def train_forward(KD, KH, KW, SD, SH, SW, DD, DH, DW, WITH_INDICES):
    """``kernel(x, out, indices, pd, ph, pw, key, channels, invalid_rows, ow_lo,
    ow_hi, workers)``; ``key`` is ``_rng.kernel_key_array``."""
    taps = KD * KH * KW

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, indices, pd, ph, pw, key, channels, invalid_rows, ow_lo, ow_hi, worker, workers):
        planes, D, H, W = x.shape
        OD, OH, OW = out.shape[1], out.shape[2], out.shape[3]
        HW = H * W
        xf = x.reshape(-1)
        of = out.reshape(-1)
        jf = indices.reshape(-1)
        total_rows = planes * OD * OH
        for row in range(worker * total_rows // workers,
                         (worker + 1) * total_rows // workers):
            p, od, oh, d0, h0, base, inside = output_row(row, OD, OH, D, H, W, pd, ph,
                                                         KD, KH, SD, SH, DD, DH)
            n = p // channels
            plane = _rng.keyed_plane(key, n, p - n * channels)
            orow = row * OW
            invalid = False
            if inside:
                # Branch-free form of the edge loop below, so LLVM vectorises across ow.
                for ow in range(ow_lo, ow_hi):
                    k0 = d0 * HW + h0 * W + ow * SW - pw
                    total, _, nonnegative = interior_sums(xf, base + k0, HW, W, KD, KH,
                                                          KW, DD, DH, DW, 1.0)
                    invalid |= not (nonnegative and total < INF)
                    # u * total can round up to total; capping the threshold at the
                    # double just below total (total * (1 - 2**-53) is exactly that for
                    # any normal total) makes the last positive element the fallback
                    # with no extra state, as the edge path does explicitly.
                    threshold = min(_rng.keyed_uniform(plane, key, od, oh, ow) * total,
                                    total * JUST_BELOW_ONE)
                    running = 0.0
                    found = False
                    chosen = k0
                    value = xf[U(base + k0)]  # a zero-sum window: all zeros, keeps first
                    for a in range(KD):
                        for i in range(KH):
                            for j in range(KW):
                                k = k0 + a * DD * HW + i * DH * W + j * DW
                                v = xf[U(base + k)]
                                running += np.float64(hb.wide(v))
                                hit = (running > threshold) & (not found)
                                chosen = k if hit else chosen
                                value = v if hit else value
                                found |= hit
                    of[U(orow + ow)] = value
                    if WITH_INDICES:
                        jf[U(orow + ow)] = chosen
            count, split, skip = edge_columns(inside, ow_lo, ow_hi, OW)
            for edge in range(count):
                ow = edge if edge < split else edge + skip
                w0 = ow * SW - pw
                total, _, first, bad = window_sums(xf, base, d0, h0, w0, D, H, W,
                                                   KD, KH, KW, DD, DH, DW, 1.0)
                invalid |= bad
                chosen = first
                if total > 0.0:
                    threshold = _rng.keyed_uniform(plane, key, od, oh, ow) * total
                    running = 0.0
                    last_positive = first
                    chosen = -1
                    for e in range(taps):
                        k = tap(e, d0, h0, w0, D, H, W, KH, KW, DD, DH, DW)
                        if k >= 0:
                            v = np.float64(hb.wide(xf[U(base + k)]))
                            running += v
                            if v > 0.0:
                                last_positive = k
                            if running > threshold:
                                chosen = k
                                break
                    if chosen < 0:
                        chosen = last_positive
                of[orow + ow] = xf[U(base + chosen)] if total > 0.0 else 0
                if WITH_INDICES:
                    jf[orow + ow] = chosen
            invalid_rows[row] = invalid

    return kernel


@functools.lru_cache(maxsize=None)
def infer_forward(KD, KH, KW, SD, SH, SW, DD, DH, DW):
    """``kernel(x, out, pd, ph, pw, invalid_rows, ow_lo, ow_hi, workers)``: the
    probability-weighted average ``S2 / S1`` (0 when ``S1 == 0``)."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, pd, ph, pw, invalid_rows, ow_lo, ow_hi, worker, workers):
        planes, D, H, W = x.shape
        OD, OH, OW = out.shape[1], out.shape[2], out.shape[3]
        HW = H * W
        xf = x.reshape(-1)
        of = out.reshape(-1)
        total_rows = planes * OD * OH
        for row in range(worker * total_rows // workers,
                         (worker + 1) * total_rows // workers):
            _, _, _, d0, h0, base, inside = output_row(row, OD, OH, D, H, W, pd, ph,
                                                       KD, KH, SD, SH, DD, DH)
            orow = row * OW
            # invalid input, or sums that do not serve: the row again, after the loops
            suspect = False
            if inside:
                for ow in range(ow_lo, ow_hi):
                    s1, s2, nonnegative = interior_sums(
                        xf, base + d0 * HW + h0 * W + ow * SW - pw, HW, W, KD, KH, KW,
                        DD, DH, DW, 1.0)
                    suspect |= not (nonnegative and plain_sums_serve(s1, s2))
                    of[U(orow + ow)] = hb.narrow(weighted_average(s1, s2, 1.0), of)
            count, split, skip = edge_columns(inside, ow_lo, ow_hi, OW)
            for edge in range(count):
                ow = edge if edge < split else edge + skip
                s1, s2, _, bad = window_sums(xf, base, d0, h0, ow * SW - pw, D, H, W,
                                             KD, KH, KW, DD, DH, DW, 1.0)
                suspect |= bad or not plain_sums_serve(s1, s2)
                of[orow + ow] = hb.narrow(weighted_average(s1, s2, 1.0), of)
            invalid = False
            if suspect:
                for ow in range(OW):
                    s1, s2, bad, scale = settled_window_sums(
                        xf, base, d0, h0, ow * SW - pw, D, H, W, KD, KH, KW, DD, DH, DW)
                    invalid |= bad
                    if scale != 1.0:
                        of[orow + ow] = hb.narrow(weighted_average(s1, s2, scale), of)
            invalid_rows[row] = invalid

    return kernel
