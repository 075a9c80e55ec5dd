"""Stochastic pooling on the CPU, channels-first, whole-plane kernels: inference
forward and backward and training forward over each ``(n, c)`` plane copied once into a
bordered float64 buffer (with its squares), for planes of at most ``FLAT_PLANE_LIMIT``,
``FLAT_TRAIN_PLANE_LIMIT`` and ``FLAT_BACKWARD_LIMIT`` elements. Same windows, sums,
order and draws as the row kernels of ``pool_stochastic``, so the same bits.
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
    gather_flat,
    inference_shares,
    plain_sums_serve,
    spread_flat,
    sums_scale,
    weighted_average,
    worker_planes,
)


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
