"""Channels-last pooling kernels on the CPU: max and average, forward and backward, and
the scatter of max / stochastic training, on ``(N, D, H, W, C)`` buffers read in place.

The channel axis is the inner, vectorised loop; windows are visited and sums taken in
the channels-first kernels' order, so every result is bitwise the channels-first one.
Forward kernels parallelise over output rows ``(n, od, oh)``; backward kernels over
``(n, channel block)``, each thread owning whole ``(n, c)`` planes, so nothing races.
1-D and 2-D inputs have ``D = 1`` (and ``H = 1``) with neutral compile-time constants.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from fastpool.cpu import _half_bits as hb
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool._threading import thread_count
from fastpool.cpu._pool_common import JIT, U, replaces, window_divisor
from fastpool.cpu._vector_width import narrow_vectors

# Fewest channels per task of the channels-last scatters (``scatter_blocks``).
CHANNEL_BLOCK = 16


def scatter_blocks(batch, channels):
    """Channel blocks per image of the channels-last scatters: one (whole pixel rows)
    when the batch alone gives every thread work, else enough for the threads, of at
    least ``CHANNEL_BLOCK`` channels. Narrow blocks make each task fetch cache lines
    that its neighbours fetch again: 16-channel blocks of 64 channels ran 5x slower
    than whole rows ((8, 64, 112, 112) 3x3 s2 max backward: 12.6 ms against PyTorch's
    3.2). Every ``(n, c)`` belongs to one task either way, so results do not change."""
    threads = thread_count()
    if batch >= threads:
        return 1
    return max(1, min(-(-threads // max(batch, 1)), channels // CHANNEL_BLOCK))


@njit(inline="always")
def _row(row, OD, OH):
    n = row // (OD * OH)
    r = row - n * (OD * OH)
    od = r // OH
    return n, od, r - od * OH


@functools.lru_cache(maxsize=None)
def max_forward(KD, KH, KW, SD, SH, SW, DD, DH, DW, WITH_INDICES):
    """``kernel(x, out, indices, pd, ph, pw, workers)`` on ``(N, D, H, W, C)`` buffers."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, indices, pd, ph, pw, worker, workers):
        N, D, H, W, C = x.shape
        OD, OH, OW = out.shape[1], out.shape[2], out.shape[3]
        xf = x.reshape(-1)
        of = out.reshape(-1)
        jf = indices.reshape(-1)
        total_rows = N * OD * OH
        for row in range(worker * total_rows // workers,
                         (worker + 1) * total_rows // workers):
            n, od, oh = _row(row, OD, OH)
            d0 = od * SD - pd
            h0 = oh * SH - ph
            xbase = n * D * H * W
            rows_inside = (d0 >= 0 and d0 + (KD - 1) * DD < D and h0 >= 0
                           and h0 + (KH - 1) * DH < H)
            for ow in range(OW):
                w0 = ow * SW - pw
                o = ((row * OW) + ow) * C
                if rows_inside and w0 >= 0 and w0 + (KW - 1) * DW < W:
                    # The whole window inside: every tap per channel in registers (the
                    # tap loops have constant trip counts and unroll). Starting from
                    # the first tap and comparing it with itself changes nothing.
                    k0 = (d0 * H + h0) * W + w0
                    for c in range(C):
                        best = xf[U((xbase + k0) * C + c)]
                        at = k0
                        for a in range(KD):
                            for i in range(KH):
                                for j in range(KW):
                                    k = k0 + (a * DD * H + i * DH) * W + j * DW
                                    value = xf[U((xbase + k) * C + c)]
                                    take = replaces(hb.wide(value), hb.wide(best))
                                    best = value if take else best
                                    at = k if take else at
                        of[U(o + c)] = best
                        if WITH_INDICES:
                            jf[U(o + c)] = at
                    continue
                first = True
                for a in range(KD):
                    d = d0 + a * DD
                    if 0 <= d < D:
                        for i in range(KH):
                            h = h0 + i * DH
                            if 0 <= h < H:
                                for j in range(KW):
                                    w = w0 + j * DW
                                    if 0 <= w < W:
                                        k = (d * H + h) * W + w
                                        src = (xbase + k) * C
                                        if first:
                                            for c in range(C):
                                                of[U(o + c)] = xf[U(src + c)]
                                                if WITH_INDICES:
                                                    jf[U(o + c)] = k
                                            first = False
                                        else:
                                            for c in range(C):
                                                take = replaces(hb.wide(xf[U(src + c)]),
                                                                hb.wide(of[U(o + c)]))
                                                # the stored element, not the widened
                                                # value: no rounding for half precision
                                                of[U(o + c)] = (xf[U(src + c)] if take
                                                                else of[U(o + c)])
                                                if WITH_INDICES:
                                                    jf[U(o + c)] = k if take else jf[U(o + c)]

    return kernel


@functools.lru_cache(maxsize=None)
def avg_forward(KD, KH, KW, SD, SH, SW):
    """``kernel(x, out, pd, ph, pw, count_include_pad, divisor_override, zero, workers)``: sums
    accumulate in the output row, in the input's dtype."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, pd, ph, pw, count_include_pad, divisor_override, zero, worker,
               workers):
        narrow_vectors()  # float64 divisions: 512-bit vdivpd otherwise (_vector_width)
        N, D, H, W, C = x.shape
        OD, OH, OW = out.shape[1], out.shape[2], out.shape[3]
        xf = x.reshape(-1)
        of = out.reshape(-1)
        total_rows = N * OD * OH
        for row in range(worker * total_rows // workers,
                         (worker + 1) * total_rows // workers):
            n, od, oh = _row(row, OD, OH)
            acc = hb.wide_empty(C, x)
            d0 = od * SD - pd
            h0 = oh * SH - ph
            d1 = min(d0 + KD, D + pd)
            h1 = min(h0 + KH, H + ph)
            ds, de = max(d0, 0), min(d1, D)
            hs, he = max(h0, 0), min(h1, H)
            xbase = n * D * H * W
            rows_inside = d0 >= 0 and d0 + KD <= D and h0 >= 0 and h0 + KH <= H
            for ow in range(OW):
                w0 = ow * SW - pw
                w1 = min(w0 + KW, W + pw)
                ws, we = max(w0, 0), min(w1, W)
                divisor = window_divisor(divisor_override, count_include_pad, d0, d1, ds,
                                         de, h0, h1, hs, he, w0, w1, ws, we)
                o = ((row * OW) + ow) * C
                if rows_inside and w0 >= 0 and w0 + KW <= W:
                    # The whole window inside: each channel's sum in a register, taps
                    # in the same order (the tap loops have constant trip counts).
                    k0 = xbase + (d0 * H + h0) * W + w0
                    for c in range(C):
                        total = hb.wide(zero)
                        for a in range(KD):
                            for i in range(KH):
                                for j in range(KW):
                                    total += hb.wide(xf[U((k0 + (a * H + i) * W + j) * C
                                                          + c)])
                        of[U(o + c)] = hb.narrow(total / divisor, of)
                    continue
                for c in range(C):
                    acc[U(c)] = zero
                # Sum in the channels-first kernels' order: d, then h, then w.
                for d in range(ds, de):
                    for h in range(hs, he):
                        for w in range(ws, we):
                            src = (xbase + (d * H + h) * W + w) * C
                            for c in range(C):
                                acc[U(c)] += hb.wide(xf[U(src + c)])
                for c in range(C):
                    of[U(o + c)] = hb.narrow(acc[U(c)] / divisor, of)

    return kernel


@njit(**JIT)
def scatter_to_indices(grad_output, indices, grad_input, blocks):
    """``grad_input[n, ..., c].flat[indices[n, ..., c]] += grad_output[n, ..., c]`` on
    ``(N, S_out, C)`` / ``(N, S_in, C)`` views, outputs in order; one task per
    ``(n, channel block)``. Returns the number of indices outside the volume."""
    N, S, C = grad_input.shape
    outputs = grad_output.shape[1]
    bad = 0
    for task in prange(N * blocks):
        n = task // blocks
        block = task - n * blocks
        c0 = block * C // blocks
        c1 = (block + 1) * C // blocks
        block_in = grad_input[n, :, c0:c1]
        # half precision: sums in float32, rounded once (float arrays: in place)
        gi = hb.accumulator(block_in)
        for s in range(S):
            for c in range(c1 - c0):
                gi[s, c] = 0
        buffer = hb.scratch(grad_output, c1 - c0)
        for k in range(outputs):
            values = hb.widen_into(grad_output[n, k, c0:c1], buffer)
            for c in range(c1 - c0):
                target = U(indices[n, k, c0 + c])  # one compare (pool_max's scatter)
                if target < U(S):
                    gi[target, c] += values[c]
                else:
                    bad += 1
        hb.flush(block_in, gi)
    return bad


@njit(inline="always")
def gather_shares(sf, dst, g, n, d, h, w, OD, OH, OW, C, pd, ph, pw, KD, KH, KW, SD, SH,
                  SW, DD, DH, DW, row, plane, total, zero):
    """``dst[g:g + C]`` = the sum of the per-window shares ``sf`` (an ``(N, OD, OH, OW,
    C)`` buffer, flat) of the windows whose taps land on input ``(n, d, h, w)``: along
    W first (from ``zero``, taps in order), then over H in tap order, then over D in tap
    order, as the channels-first spreading adds them (``_pool_common``). ``row``,
    ``plane`` and ``total`` are ``C``-long scratch of the dtype computed in; ``dst``
    receives ``total`` rounded once (half precision)."""
    any_depth = False
    for a in range(KD):
        t = d + pd - a * DD
        if t >= 0 and t % SD == 0 and t // SD < OD:
            od = t // SD
            any_row = False
            for i in range(KH):
                u = h + ph - i * DH
                if u >= 0 and u % SH == 0 and u // SH < OH:
                    oh = u // SH
                    for c in range(C):
                        row[c] = zero
                    for j in range(KW):
                        v = w + pw - j * DW
                        if v >= 0 and v % SW == 0 and v // SW < OW:
                            s = (((n * OD + od) * OH + oh) * OW + v // SW) * C
                            for c in range(C):
                                row[c] += sf[U(s + c)]
                    if any_row:
                        for c in range(C):
                            plane[c] += row[c]
                    else:
                        for c in range(C):
                            plane[c] = row[c]
                        any_row = True
            if any_row:
                if any_depth:
                    for c in range(C):
                        total[c] += plane[c]
                else:
                    for c in range(C):
                        total[c] = plane[c]
                    any_depth = True
    if not any_depth:
        for c in range(C):
            total[c] = zero
    for c in range(C):
        dst[U(g + c)] = hb.narrow(total[c], dst)


@functools.lru_cache(maxsize=None)
def avg_backward(KD, KH, KW, SD, SH, SW):
    """``kernel(shares, grad_input, pd, ph, pw, zero, workers)``: ``shares`` holds each window's
    ``grad / divisor`` (rounded to the dtype, as the channels-first kernel rounds it);
    each input element gathers the shares of its windows (``gather_shares``)."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(shares, grad_input, pd, ph, pw, zero, worker, workers):
        N, D, H, W, C = grad_input.shape
        OD, OH, OW = shares.shape[1], shares.shape[2], shares.shape[3]
        sf = shares.reshape(-1)
        gf = grad_input.reshape(-1)
        total_in_rows = N * D * H
        for in_row in range(worker * total_in_rows // workers,
                            (worker + 1) * total_in_rows // workers):
            n, d, h = _row(in_row, D, H)
            row = hb.wide_empty(C, grad_input)
            plane = hb.wide_empty(C, grad_input)
            total = hb.wide_empty(C, grad_input)
            for w in range(W):
                gather_shares(sf, gf, ((in_row * W) + w) * C, n, d, h, w, OD, OH, OW, C,
                              pd, ph, pw, KD, KH, KW, SD, SH, SW, 1, 1, 1, row, plane,
                              total, zero)

    return kernel


@functools.lru_cache(maxsize=None)
def avg_backward_tiled(KD, KH, KW, SD, SH, SW):
    """``kernel(shares, grad_input, zero, workers)``: ``avg_backward`` for windows that
    tile the input (stride = kernel, no padding, every window inside the input): each
    input element takes its one window's share, ``zero + share`` as ``gather_shares``
    adds it, or ``zero`` past the last window; same bits, without the per-tap index
    arithmetic and the three scratch passes per element (a 6-channel LeNet-5 layer
    spent most of its time there)."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(shares, grad_input, zero, worker, workers):
        N, D, H, W, C = grad_input.shape
        OD, OH, OW = shares.shape[1], shares.shape[2], shares.shape[3]
        sf = shares.reshape(-1)
        gf = grad_input.reshape(-1)
        total_in_rows = N * D * H
        for in_row in range(worker * total_in_rows // workers,
                            (worker + 1) * total_in_rows // workers):
            n, d, h = _row(in_row, D, H)
            g = in_row * W * C
            od = d // KD
            oh = h // KH
            start = 0
            if od < OD and oh < OH:
                s = ((n * OD + od) * OH + oh) * OW * C
                for ow in range(OW):
                    for j in range(KW):
                        base = g + (ow * KW + j) * C
                        for c in range(C):
                            gf[U(base + c)] = hb.narrow(zero + sf[U(s + ow * C + c)], gf)
                start = OW * KW * C
            for e in range(g + start, g + W * C):
                gf[U(e)] = hb.narrow(zero, gf)

    return kernel


@parallel_kernel
@njit(**BODY_JIT)
def avg_shares(grad_output, shares, pd, ph, pw, KD, KH, KW, SD, SH, SW, D, H, W,
               count_include_pad, divisor_override, exact, worker, workers):
    """``shares = grad_output / divisor`` per window, rounded to the dtype (worker
    ``worker``'s share of the output rows; a serial body, so a small call's one worker
    runs without a parallel region). ``exact`` (every divisor an integer exact in the
    dtype computed in): divided in that dtype, else in float64 and rounded. The same
    bits: float64 has more than twice float32's 24 bits, so rounding a float64
    quotient to float32 gives the correctly rounded float32 quotient. (LeNet-5's 2x2
    average backward of (32, 16, 10, 10), channels-last, one thread: 7.9 of 19 us of
    kernel time in this pass, dividing in float64.)"""
    narrow_vectors()  # float64 divisions: 512-bit vdivpd otherwise (_vector_width)
    N, OD, OH, OW, C = grad_output.shape
    gf = grad_output.reshape(-1)
    sf = shares.reshape(-1)
    typed = np.empty(1, shares.dtype)  # the divisor in the dtype computed in
    rows = N * OD * OH
    for row in range(worker * rows // workers, (worker + 1) * rows // workers):
        n, od, oh = _row(row, OD, OH)
        d0 = od * SD - pd
        h0 = oh * SH - ph
        d1 = min(d0 + KD, D + pd)
        h1 = min(h0 + KH, H + ph)
        for ow in range(OW):
            w0 = ow * SW - pw
            w1 = min(w0 + KW, W + pw)
            divisor = window_divisor(divisor_override, count_include_pad, d0, d1,
                                     max(d0, 0), min(d1, D), h0, h1, max(h0, 0),
                                     min(h1, H), w0, w1, max(w0, 0), min(w1, W))
            o = ((row * OW) + ow) * C
            if exact:
                typed[0] = divisor
                d = typed[0]
                for c in range(C):
                    sf[U(o + c)] = hb.wide(gf[U(o + c)]) / d
            else:
                for c in range(C):
                    sf[U(o + c)] = hb.wide(gf[U(o + c)]) / divisor
