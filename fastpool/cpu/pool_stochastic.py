"""Stochastic pooling on the CPU, channels-first: training forward, inference forward
and backward (training backward is ``pool_max.scatter_to_indices``).

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
    gather_flat,
    gather_rows_called,
    inference_shares,
    output_row,
    plain_sums_serve,
    ring_rows,
    spread_along_w_called,
    spread_flat,
    sums_scale,
    weighted_average,
    worker_planes,
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


@njit(inline="always")
def _bordered_copy(plane, values, squares, top, left, width):
    """Copy the ``(H, W)`` ``plane`` (float64) and its squares into the flat bordered
    planes ``values`` and ``squares`` of ``width`` columns, element ``(0, 0)`` at row
    ``top`` and column ``left``; whether any element is outside ``[0, inf)``."""
    invalid = False
    H, W = plane.shape
    for h in range(H):
        row = (h + top) * width + left
        for w in range(W):
            v = np.float64(hb.wide(plane[h, w]))
            invalid |= not (0.0 <= v < INF)
            values[U(row + w)] = v
            squares[U(row + w)] = v * v
    return invalid


@njit(inline="always")
def _flat_sums(values, squares, k, width, KH, KW):
    """``(S1, S2)`` of the window whose first tap is at ``k`` of the bordered planes,
    taps in ``window_sums``' order."""
    s1 = 0.0
    s2 = 0.0
    for i in range(KH):
        for j in range(KW):
            s1 += values[U(k + i * width + j)]
            s2 += squares[U(k + i * width + j)]
    return s1, s2


@njit(cache=True)
def _scaled_flat_sums(values, k, width, KH, KW, scale):
    """``_flat_sums`` of the elements times ``scale``, squared here (called: rare)."""
    s1 = 0.0
    s2 = 0.0
    for i in range(KH):
        for j in range(KW):
            v = values[U(k + i * width + j)] * scale
            s1 += v
            s2 += v * v
    return s1, s2


@njit(inline="always")
def _settled_flat_sums(values, squares, k, width, KH, KW):
    """``(S1, S2, scale)``: ``_flat_sums``, or the scaled sums where those do not serve."""
    s1, s2 = _flat_sums(values, squares, k, width, KH, KW)
    scale = sums_scale(s1, s2)
    if scale != 1.0:
        s1, s2 = _scaled_flat_sums(values, k, width, KH, KW, scale)
    return s1, s2, scale


# A plane whose zero-bordered copy has more elements than this takes the row kernel
# (three such float64 planes per thread: 768 KiB).
FLAT_PLANE_LIMIT = 32768


@functools.lru_cache(maxsize=None)
def infer_forward_flat(KD, KH, KW, SD, SH, SW, DD, DH, DW):
    """``infer_forward``'s kernel for stride 1 and no dilation along H and W and a
    depth kernel of 1, on planes of at most ``FLAT_PLANE_LIMIT`` padded elements:
    threads take whole planes and every row of a plane's ``invalid_rows`` gets the
    plane's flag (the launcher only asks whether any is set).

    Same sums in the same order as ``infer_forward``, bit for bit, with loops over
    whole planes instead of rows (14-column rows left too few interior windows to
    vectorise): each plane and its squares are copied, in float64, into planes with
    ``ph`` / ``pw`` zero rows and columns around them, so every window reads
    ``KH x KW`` taps at fixed offsets from one flat index with no bounds to test. A
    skipped tap and an added ``+0.0`` give the same sum: every sum starts from
    ``+0.0``, so none is ``-0.0``. With stride 1 every input element lies in some
    window, so the input check is the elements' own (``0 <= v < inf``) plus the sums'.
    """
    if (KD, SD, SH, SW, DD, DH, DW) != (1, 1, 1, 1, 1, 1, 1):
        raise ValueError("the flat stochastic inference forward takes stride 1, no "
                         "dilation and depth kernel 1")

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, pd, ph, pw, invalid_rows, ow_lo, ow_hi, worker, workers):
        planes, D, H, W = x.shape
        OH, OW = out.shape[2], out.shape[3]
        Hp = OH + KH - 1  # H + 2 * ph
        Wp = OW + KW - 1
        values = np.zeros(Hp * Wp)
        squares = np.zeros(Hp * Wp)
        results = np.empty(OH * Wp)
        # positions k past a row's last window (columns OW to Wp - 1) sum taps of two
        # rows' edges: their sums are computed but neither kept nor checked
        unserved = np.zeros(OH * Wp, np.bool_)
        first, last = worker_planes(worker, workers, planes)
        for p in range(first, last):
            for d in range(D):
                invalid = _bordered_copy(x[p, d], values, squares, ph, pw, Wp)
                for k in range((OH - 1) * Wp + OW):
                    s1, s2 = _flat_sums(values, squares, k, Wp, KH, KW)
                    unserved[U(k)] = not plain_sums_serve(s1, s2)
                    results[U(k)] = weighted_average(s1, s2, 1.0)
                of = out[p, d].reshape(-1)
                suspect = False
                for oh in range(OH):
                    for ow in range(OW):
                        suspect |= unserved[U(oh * Wp + ow)]
                        of[U(oh * OW + ow)] = hb.narrow(results[U(oh * Wp + ow)], of)
                if suspect:
                    for oh in range(OH):
                        for ow in range(OW):
                            k = oh * Wp + ow
                            if unserved[U(k)]:
                                # _bordered_copy checked the elements, and sums of
                                # finite scaled ones stay under 2**870
                                s1, s2, scale = _settled_flat_sums(values, squares, k, Wp,
                                                                   KH, KW)
                                of[U(oh * OW + ow)] = hb.narrow(
                                    weighted_average(s1, s2, scale), of)
                for oh in range(OH):
                    invalid_rows[(p * D + d) * OH + oh] = invalid

    return kernel


@njit(inline="always")
def _bordered_values(plane, values, top, left, width):
    """``_bordered_copy`` without the squares."""
    invalid = False
    H, W = plane.shape
    for h in range(H):
        row = (h + top) * width + left
        for w in range(W):
            v = np.float64(hb.wide(plane[h, w]))
            invalid |= not (0.0 <= v < INF)
            values[U(row + w)] = v
    return invalid


# The training forward's flat planes: the row kernel is faster from about 80 x 80
# (3x3 s1 p1, 2 threads, float64, ms, flat against rows: 32 x 64 planes of 40 x 40 8.4
# against 12.4, 64 x 64 24.5 / 26.8; 16 x 64 of 80 x 80 19.6 / 19.0, 32 x 64 of
# 112 x 112 72 / 61): five per-window arrays per thread outgrow the caches.
FLAT_TRAIN_PLANE_LIMIT = 4608


@functools.lru_cache(maxsize=None)
def train_forward_flat(KD, KH, KW, SD, SH, SW, DD, DH, DW, WITH_INDICES):
    """``train_forward``'s kernel for stride 1 and no dilation along H and W and a
    depth kernel of 1, on planes of at most ``FLAT_TRAIN_PLANE_LIMIT`` padded elements, with
    ``infer_forward_flat``'s layout (zero-bordered float64 copies; threads take whole
    planes and every row of a plane's ``invalid_rows`` gets the plane's flag).

    The same picks, bit for bit, with the row kernel's two rules kept apart per window
    by a table made once per thread: windows the row kernel takes as interior (rows
    wholly inside, columns ``[ow_lo, ow_hi)``) cap the threshold just below the sum
    and fall back to their first tap; the others do not cap it, fall back to their
    last positive element, and write +0 for a zero sum. Their skipped taps are the
    border's zeros here, which change neither a running sum (it starts from +0.0) nor
    a pick (a sum that does not grow cannot newly pass the threshold), and their
    first real tap comes from the table. Rows of 14 columns left 12 interior windows to
    vectorise and two edge windows on branches per row (8 x 512 planes of 14 x 14,
    3x3 s1 p1, 2 threads: 6.3 -> 2.8 ms in float64 and float32).
    """
    if (KD, SD, SH, SW, DD, DH, DW) != (1, 1, 1, 1, 1, 1, 1):
        raise ValueError("the flat stochastic training forward takes stride 1, no "
                         "dilation and depth kernel 1")

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, indices, pd, ph, pw, key, channels, invalid_rows, ow_lo, ow_hi,
               worker, workers):
        planes, D, H, W = x.shape
        OH, OW = out.shape[2], out.shape[3]
        Hp = OH + KH - 1  # H + 2 * ph
        Wp = OW + KW - 1
        values = np.zeros(Hp * Wp)
        # per window position k = oh * Wp + ow; positions past a row's last window
        # (ow >= OW) are computed and never read
        draws = np.zeros(OH * Wp)
        sums = np.empty(OH * Wp)
        picks = np.empty(OH * Wp, np.int64)
        interior = np.zeros(OH * Wp, np.bool_)
        first_tap = np.zeros(OH * Wp, np.int64)
        for oh in range(OH):
            h0 = oh - ph
            inside = h0 >= 0 and h0 + KH - 1 < H
            for ow in range(OW):
                w0 = ow - pw
                interior[oh * Wp + ow] = inside and ow_lo <= ow < ow_hi
                first_tap[oh * Wp + ow] = max(0, -h0) * KW + max(0, -w0)
        first, last = worker_planes(worker, workers, planes)
        for p in range(first, last):
            n = p // channels
            plane = _rng.keyed_plane(key, n, p - n * channels)
            for d in range(D):
                xp = x[p, d]
                invalid = _bordered_values(xp, values, ph, pw, Wp)
                for oh in range(OH):
                    for ow in range(OW):
                        draws[U(oh * Wp + ow)] = _rng.keyed_uniform(plane, key, d, oh, ow)
                for k in range((OH - 1) * Wp + OW):
                    total = 0.0
                    for i in range(KH):
                        for j in range(KW):
                            total += values[U(k + i * Wp + j)]
                    inner = interior[U(k)]
                    threshold = min(draws[U(k)] * total,
                                    total * JUST_BELOW_ONE if inner else INF)
                    running = 0.0
                    found = False
                    chosen = 0
                    last_positive = first_tap[U(k)]
                    for i in range(KH):
                        for j in range(KW):
                            v = values[U(k + i * Wp + j)]
                            running += v
                            hit = (running > threshold) & (not found)
                            chosen = i * KW + j if hit else chosen
                            found |= hit
                            last_positive = i * KW + j if v > 0.0 else last_positive
                    fallback = (last_positive if total > 0.0 and not inner
                                else first_tap[U(k)])
                    # An edge window whose sum is not positive (invalid input: the call
                    # raises) takes its first real tap, as the row kernel does: a pick
                    # of one of the border's taps would read outside the plane.
                    picks[U(k)] = chosen if found and (inner or total > 0.0) else fallback
                    sums[U(k)] = total
                xf = xp.reshape(-1)
                of = out[p, d].reshape(-1)
                jf = indices[p, d].reshape(-1) if WITH_INDICES else indices.reshape(-1)
                for oh in range(OH):
                    for ow in range(OW):
                        k = oh * Wp + ow
                        total = sums[U(k)]
                        invalid |= not (total < INF)
                        tap = picks[U(k)]
                        i = tap // KW
                        at = (oh + i - ph) * W + ow + tap - i * KW - pw
                        zero = not (total > 0.0) and not interior[U(k)]
                        of[U(oh * OW + ow)] = 0 if zero else xf[U(at)]
                        if WITH_INDICES:
                            jf[U(oh * OW + ow)] = d * H * W + at
                for oh in range(OH):
                    invalid_rows[(p * D + d) * OH + oh] = invalid

    return kernel


# The backward's flat planes: eight per thread (1 MiB at this limit).
FLAT_BACKWARD_LIMIT = 16384


@functools.lru_cache(maxsize=None)
def infer_backward_flat(KD, KH, KW, SD, SH, SW, DD, DH, DW):
    """``infer_backward``'s kernel for stride 1 and no dilation along H and W and a
    depth kernel of 1, on planes of at most ``FLAT_BACKWARD_LIMIT`` padded elements.

    Same values in the same order, bit for bit, with loops over whole planes: all
    planes share one layout, ``(OH + 2(KH - 1)) x (OW + 2(KW - 1))`` with window
    ``(oh, ow)`` at ``(oh + KH - 1, ow + KW - 1)`` and element ``(h, w)`` of ``x`` at
    ``(h + ph + KH - 1, w + pw + KW - 1)``, zero elsewhere. A window's ``S1`` and
    ``S2`` are then ``KH x KW`` taps at fixed offsets from its own position (the
    border's zeros add nothing: as in ``infer_forward_flat``), its shares ``A`` and
    ``B`` go to the same position (0 where no window is, by a mask made once per
    thread), and spreading and gathering them is ``avg_backward_flat``'s.
    """
    if (KD, SD, SH, SW, DD, DH, DW) != (1, 1, 1, 1, 1, 1, 1):
        raise ValueError("the flat stochastic inference backward takes stride 1, no "
                         "dilation and depth kernel 1")

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(grad_output, x, grad_input, pd, ph, pw, invalid_planes, ow_lo, ow_hi,
               worker, workers):
        planes, D, H, W = x.shape
        OH, OW = grad_output.shape[2], grad_output.shape[3]
        Hc = OH + 2 * (KH - 1)
        Wc = OW + 2 * (KW - 1)
        size = Hc * Wc
        values = np.zeros(size)
        squares = np.zeros(size)
        grads = np.zeros(size)
        share_a = np.zeros(size)
        share_b = np.zeros(size)
        spread_a = np.empty(size)
        spread_b = np.empty(size)
        windows = np.zeros(size, np.bool_)
        for oh in range(OH):
            for ow in range(OW):
                windows[(oh + KH - 1) * Wc + ow + KW - 1] = True
        first_k = (KH - 1) * Wc + KW - 1  # window (0, 0)
        last_k = (OH + KH - 2) * Wc + OW + KW - 2  # window (OH - 1, OW - 1)
        lead = pw + KW - 1  # spread[k] reads shares[k + lead - j]
        first, last = worker_planes(worker, workers, planes)
        for p in range(first, last):
            invalid = False
            for d in range(D):
                xp = x[p, d]
                go = grad_output[p, d]
                invalid |= _bordered_copy(xp, values, squares, ph + KH - 1, pw + KW - 1,
                                          Wc)
                for oh in range(OH):
                    row = (oh + KH - 1) * Wc + KW - 1
                    for ow in range(OW):
                        grads[U(row + ow)] = np.float64(hb.wide(go[oh, ow]))
                suspect = False
                for k in range(first_k, last_k + 1):
                    s1, s2 = _flat_sums(values, squares, k, Wc, KH, KW)
                    inside = windows[U(k)]
                    suspect |= inside and not plain_sums_serve(s1, s2)
                    a, b = inference_shares(grads[U(k)], s1, s2, 1.0)
                    share_a[U(k)] = a if inside else 0.0
                    share_b[U(k)] = b if inside else 0.0
                if suspect:
                    for k in range(first_k, last_k + 1):
                        if windows[U(k)]:
                            # elements checked by _bordered_copy (as forward)
                            s1, s2, scale = _settled_flat_sums(values, squares, k, Wc,
                                                               KH, KW)
                            share_a[U(k)], share_b[U(k)] = inference_shares(
                                grads[U(k)], s1, s2, scale)
                spread_flat(share_a, spread_a, lead, KW, 0.0)
                spread_flat(share_b, spread_b, lead, KW, 0.0)
                gi = grad_input[p, d]
                for h in range(H):
                    top = (h + ph + KH - 1) * Wc
                    for w in range(W):
                        gi[h, w] = hb.narrow(
                            np.float64(hb.wide(xp[h, w]))
                            * gather_flat(spread_a, top, w, Wc, KH)
                            + gather_flat(spread_b, top, w, Wc, KH), gi)
            invalid_planes[p] = invalid

    return kernel


@njit(inline="always")
def infer_backward_plane(go, xp, gi, share_a, share_b, rows_a, rows_b, depth_a, depth_b,
                         sum_a, sum_b, invalid_planes, p, pd, ph, pw, ow_lo, ow_hi,
                         KD, KH, KW, SD, SH, SW, DD, DH, DW, RH, RD, DIRECT):
    """One plane of ``infer_backward``'s kernel (inlined: the constants fold in)."""
    D, H, W = xp.shape
    OD, OH, OW = go.shape
    HW = H * W
    xf = xp.reshape(-1)
    invalid = False
    next_od = 0
    for d in range(D):
        while next_od <= min((d + pd) // SD, OD - 1):
            od = next_od
            d0 = od * SD - pd
            inside_d = d0 >= 0 and d0 + (KD - 1) * DD < D
            next_oh = 0
            for h in range(H):
                while next_oh <= min((h + ph) // SH, OH - 1):
                    oh = next_oh
                    h0 = oh * SH - ph
                    inside = inside_d and h0 >= 0 and h0 + (KH - 1) * DH < H
                    for ow in range(OW):
                        if inside and ow_lo <= ow < ow_hi:
                            s1, s2, nonnegative = interior_sums(
                                xf, d0 * HW + h0 * W + ow * SW - pw, HW, W,
                                KD, KH, KW, DD, DH, DW, 1.0)
                            bad = not nonnegative
                        else:
                            s1, s2, _, bad = window_sums(
                                xf, 0, d0, h0, ow * SW - pw, D, H, W, KD, KH, KW,
                                DD, DH, DW, 1.0)
                        scale = 1.0
                        if not plain_sums_serve(s1, s2):  # rare; checks the sums too
                            s1, s2, bad, scale = settled_window_sums(
                                xf, 0, d0, h0, ow * SW - pw, D, H, W, KD, KH, KW,
                                DD, DH, DW)
                        invalid |= bad
                        share_a[ow], share_b[ow] = inference_shares(
                            np.float64(hb.wide(go[od, oh, ow])), s1, s2, scale)
                    spread_along_w_called(rows_a[oh % RH], share_a, 0.0, pw, KW,
                                          SW, DW)
                    spread_along_w_called(rows_b[oh % RH], share_b, 0.0, pw, KW,
                                          SW, DW)
                    next_oh += 1
                if DIRECT:
                    gather_rows_called(sum_a[0], rows_a, OH, h, ph, KH, SH, DH)
                    gather_rows_called(sum_b[0], rows_b, OH, h, ph, KH, SH, DH)
                    xrow = xp[od, h]
                    girow = gi[od, h]
                    for w in range(W):
                        girow[w] = hb.narrow(np.float64(hb.wide(xrow[w])) * sum_a[0, w]
                                             + sum_b[0, w], girow)
                else:
                    gather_rows_called(depth_a[od % RD, h], rows_a, OH, h, ph,
                                       KH, SH, DH)
                    gather_rows_called(depth_b[od % RD, h], rows_b, OH, h, ph,
                                       KH, SH, DH)
            next_od += 1
        if not DIRECT:
            gather_rows_called(sum_a.reshape(-1), depth_a.reshape(RD, H * W), OD, d, pd,
                               KD, SD, DD)
            gather_rows_called(sum_b.reshape(-1), depth_b.reshape(RD, H * W), OD, d, pd,
                               KD, SD, DD)
            for h in range(H):
                xrow = xp[d, h]
                girow = gi[d, h]
                for w in range(W):
                    girow[w] = hb.narrow(np.float64(hb.wide(xrow[w])) * sum_a[h, w]
                                         + sum_b[h, w], girow)
    invalid_planes[p] = invalid


@functools.lru_cache(maxsize=None)
def infer_backward_tiled(KD, KH, KW, SD, SH, SW, DD, DH, DW):
    """``kernel(grad_output, x, grad_input, invalid_rows, workers)`` on flat ``(rows,
    OW)``, ``(rows * KH, OW * KW)`` and ``(rows * KH, OW * KW)`` arrays, for windows that
    tile the input exactly (stride = kernel, no padding, no leftover rows or columns,
    no dilation, ``KD == 1``): each input element lies in one window, so its gradient is
    ``x * A + B`` of that window alone, written as ``infer_backward`` writes it (``A``
    and ``B`` each spread from 0.0 and gathered from one row: ``0.0 + A``), with the
    window sums of ``interior_sums``: the same bits, with no ring of spread rows (the
    small inputs of the asv suite, (8, 16, 32, 32) 2x2 s2, were 1.15x slower with the
    ring than before the N-D engine). ``invalid_rows[r]``: output row ``r`` has a
    negative, infinite or NaN tap or an infinite sum."""
    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(grad_output, x, grad_input, invalid_rows, worker, workers):
        rows, OW = grad_output.shape
        W = OW * KW
        xf = x.reshape(-1)
        gf = grad_input.reshape(-1)
        share_a = np.empty(OW)
        share_b = np.empty(OW)
        for r in range(worker * rows // workers, (worker + 1) * rows // workers):
            base = r * KH * W
            go = grad_output[r]
            suspect = False
            for ow in range(OW):
                s1, s2, nonnegative = interior_sums(xf, base + ow * KW, KH * W, W, 1, KH,
                                                    KW, 1, 1, 1, 1.0)
                suspect |= not (nonnegative and plain_sums_serve(s1, s2))
                a, b = inference_shares(np.float64(hb.wide(go[ow])), s1, s2, 1.0)
                share_a[ow] = 0.0 + a
                share_b[ow] = 0.0 + b
            invalid = False
            if suspect:
                for ow in range(OW):
                    # the row's windows as one row of a (1, KH, W) plane
                    s1, s2, bad, scale = settled_window_sums(
                        xf, base, 0, 0, ow * KW, 1, KH, W, 1, KH, KW, 1, 1, 1)
                    invalid |= bad
                    a, b = inference_shares(np.float64(hb.wide(go[ow])), s1, s2, scale)
                    share_a[ow] = 0.0 + a
                    share_b[ow] = 0.0 + b
            invalid_rows[r] = invalid
            for i in range(KH):
                row = base + i * W
                for ow in range(OW):
                    a = share_a[ow]
                    b = share_b[ow]
                    for j in range(KW):
                        k = row + ow * KW + j
                        gf[U(k)] = hb.narrow(np.float64(hb.wide(xf[U(k)])) * a + b, gf)

    return kernel


@functools.lru_cache(maxsize=None)
def infer_backward(KD, KH, KW, SD, SH, SW, DD, DH, DW):
    """``kernel(grad_output, x, grad_input, pd, ph, pw, invalid_planes, ow_lo, ow_hi,
    workers)``.

    Each window adds ``g * (2 a_i S1 - S2) / S1**2 = a_i * A + B`` to its taps, with
    ``A = 2 g / S1`` and ``B = -g S2 / S1**2``; so the ``A`` and ``B`` of all windows
    are box-spread as in average pooling's backward (rows along W, then rows over H in
    tap order, then planes over D in tap order, all float64), and
    ``grad = x * spread(A) + spread(B)`` writes every element once.
    """
    RH = ring_rows(KH, SH, DH)
    RD = ring_rows(KD, SD, DD)
    DIRECT = KD == 1 and SD == 1

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(grad_output, x, grad_input, pd, ph, pw, invalid_planes, ow_lo, ow_hi,
               worker, workers):
        planes, D, H, W = x.shape
        OW = grad_output.shape[3]
        share_a = np.empty(OW)
        share_b = np.empty(OW)
        rows_a = np.empty((RH, W))
        rows_b = np.empty((RH, W))
        # DIRECT: per input row; else one plane per output depth, then the sums.
        shape = (1, 1, W) if DIRECT else (RD, H, W)
        depth_a = np.empty(shape)
        depth_b = np.empty(shape)
        sum_a = np.empty((1, W) if DIRECT else (H, W))
        sum_b = np.empty((1, W) if DIRECT else (H, W))
        first, last = worker_planes(worker, workers, planes)
        for p in range(first, last):
            infer_backward_plane(
                grad_output[p], x[p], grad_input[p], share_a, share_b, rows_a,
                rows_b, depth_a, depth_b, sum_a, sum_b, invalid_planes, p, pd, ph,
                pw, ow_lo, ow_hi, KD, KH, KW, SD, SH, SW, DD, DH, DW, RH, RD, DIRECT)

    return kernel
