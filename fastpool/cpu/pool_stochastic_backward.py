"""Stochastic inference backward on the CPU, channels-first, where the whole-plane
kernel (``pool_stochastic_flat.infer_backward_flat``) does not apply: each window's
shares (``inference_shares``) spread along rows kept in a ring (``infer_backward``), or
written straight to the input where the windows tile it exactly
(``infer_backward_tiled``). Same sums, order and bits as the whole-plane kernel.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from fastpool.cpu import _half_bits as hb
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu._pool_common import (
    U,
    gather_rows_called,
    inference_shares,
    plain_sums_serve,
    ring_rows,
    spread_along_w_called,
    worker_planes,
)
from fastpool.cpu.pool_stochastic import (
    interior_sums,
    settled_window_sums,
    window_sums,
)


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
