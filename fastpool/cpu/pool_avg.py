"""Average pooling on the CPU, channels-first, forward and backward.

Sums and divisions run in the input's dtype, row-major over the window, as PyTorch
does. The divisor of window ``[x0, x1)`` per axis (``x0 = o*s - p``,
``x1 = min(x0 + k, X + p)``) is ``divisor_override``, else the product of the
``x1 - x0`` (``count_include_pad``), else of the extents clipped to the input.
"""

from __future__ import annotations

import functools

from numba import njit

from fastpool.cpu import _half_bits as hb
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu._pool_common import (
    PHASE_STRIDE_LIMIT,
    U,
    gather_flat,
    gather_rows,
    output_row,
    phases,
    window_divisor,
    ring_rows,
    spread_along_w,
    spread_flat,
    worker_planes,
)


@functools.lru_cache(maxsize=None)
def avg_forward(KD, KH, KW, SD, SH, SW):
    """``kernel(x, out, pd, ph, pw, count_include_pad, divisor_override, ow_lo, ow_hi,
    zero, interior_divisor, workers)`` on ``(planes, D, H, W)`` views.

    Interior columns (every tap inside the row) add their taps in row-major order; with
    a column stride ``1 < SW <= PHASE_STRIDE_LIMIT`` (except 2x2 windows of stride 2, below)
    they read each input row's column phases (``phases``:
    overlapping strided taps compiled to gathers), rows outside the input as zeros,
    which leave every sum as it was (``total`` starts at +0, so no sum is -0). Edge
    columns clip their windows. ``workers`` threads take fixed runs of rows and one
    phase buffer each."""

    # 2x2 stride 2 reads the input directly: its two taps per row are
    # one interleaved pair, which LLVM loads as vectors and shuffles, and the
    # phase copies cost more than that (measured: (1, 512, 14, 14) 0.11 -> 0.07 ms).
    PHASES = 1 < SW <= PHASE_STRIDE_LIMIT and not (KW == SW == 2)

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, pd, ph, pw, count_include_pad, divisor_override, ow_lo, ow_hi,
               zero, interior_divisor, worker, workers):
        planes, D, H, W = x.shape
        OD, OH, OW = out.shape[1], out.shape[2], out.shape[3]
        L = (W + SW - 1) // SW
        rows = planes * OD * OH
        xf = x.reshape(-1)
        of = out.reshape(-1)
        buffer = hb.wide_empty(KD * KH * SW * L if PHASES else 1, x)
        for row in range(worker * rows // workers, (worker + 1) * rows // workers):
            # PHASES is a constant: one row code per kernel (see max_forward)
            if PHASES:
                _avg_row_phases(xf, of, row, buffer, D, H, W, OD, OH, OW, pd, ph, pw,
                                count_include_pad, divisor_override, ow_lo, ow_hi,
                                zero, interior_divisor, L, KD, KH, KW, SD, SH, SW)
            else:
                _avg_row_direct(xf, of, row, buffer, D, H, W, OD, OH, OW, pd, ph, pw,
                                count_include_pad, divisor_override, ow_lo, ow_hi,
                                zero, interior_divisor, L, KD, KH, KW, SD, SH, SW)

    return kernel


@functools.lru_cache(maxsize=None)
def avg_forward_tiled(KD, KH, KW, SD, SH, SW):
    """``kernel(x, out, zero, divisor, workers)`` on flat arrays, for windows that
    tile the input exactly (stride = kernel, no padding, no leftover rows or columns,
    ``KD == 1``): output row ``r`` (over all planes and depths) reads input rows ``r *
    KH`` to ``r * KH + KH - 1``, so the rows need no window arithmetic and no edge
    columns, and the taps sit at constant distances. Taps are added in ``avg_forward``'s
    order (from ``zero``, row by row), so the bits are its bits."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, zero, divisor, worker, workers):
        OW = out.shape[1]
        rows = out.shape[0]
        W = OW * KW
        xf = x.reshape(-1)
        for r in range(worker * rows // workers, (worker + 1) * rows // workers):
            base = r * KH * W
            dst = out[r]
            for ow in range(OW):
                total = zero
                for i in range(KH):
                    for j in range(KW):
                        total += hb.wide(xf[U(base + i * W + ow * KW + j)])
                dst[U(ow)] = hb.narrow(total / divisor, out)

    return kernel


@functools.lru_cache(maxsize=None)
def avg_backward_tiled(KD, KH, KW, SD, SH, SW):
    """``kernel(grad_output, grad_input, zero, divisor, workers)`` on flat ``(rows,
    OW)`` and ``(rows * KH, OW * KW)`` arrays, for windows that tile the input exactly
    (as ``avg_forward_tiled``): each input element takes its one window's share,
    ``zero + g / divisor`` as ``avg_backward``'s spread adds it (the share rounded to
    the dtype computed with first; divisors above 2**24 go to the ring kernel, see
    ``avg_backward_flat``), so the bits are its bits, with no ring of spread
    rows and no per-row window arithmetic: output row ``r``'s shares are written to
    input rows ``r * KH`` to ``r * KH + KH - 1``."""

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(grad_output, grad_input, zero, divisor, worker, workers):
        rows, OW = grad_output.shape
        W = OW * KW
        gf = grad_input.reshape(-1)
        shares = hb.wide_empty(OW, grad_input)
        for r in range(worker * rows // workers, (worker + 1) * rows // workers):
            go = grad_output[r]
            for ow in range(OW):
                shares[ow] = zero + hb.wide(go[ow]) / divisor
            base = r * KH * W
            for i in range(KH):
                row = base + i * W
                for ow in range(OW):
                    value = hb.narrow(shares[ow], gf)
                    for j in range(KW):
                        gf[U(row + ow * KW + j)] = value

    return kernel


@njit(inline="always")
def _row_window(row, D, H, W, OD, OH, pd, ph, KD, KH, SD, SH):
    """Output row ``row``'s window along D and H: start ``d0``/``h0``, end clipped to the
    padding ``d1``/``h1`` and to the input ``[ds, de)``/``[hs, he)``; the plane's
    offset; whether the window lies inside the input along both."""
    _, _, _, d0, h0, base, inside = output_row(row, OD, OH, D, H, W, pd, ph,
                                               KD, KH, SD, SH, 1, 1)
    d1 = min(d0 + KD, D + pd)
    h1 = min(h0 + KH, H + ph)
    return (d0, h0, base, inside, d1, max(d0, 0), min(d1, D), h1, max(h0, 0),
            min(h1, H))


@njit(inline="always")
def _avg_row_phases(xf, of, row, buffer, D, H, W, OD, OH, OW, pd, ph, pw,
                    count_include_pad, divisor_override, ow_lo, ow_hi, zero,
                    interior_divisor, L, KD, KH, KW, SD, SH, SW):
    """One output row of ``avg_forward`` with ``PHASES``: interior columns from the
    column phases (rows outside the input as zeros), then the edges."""
    HW = H * W
    d0, h0, base, inside, d1, ds, de, h1, hs, he = _row_window(row, D, H, W, OD, OH, pd,
                                                               ph, KD, KH, SD, SH)
    orow = row * OW
    for a in range(KD):
        for i in range(KH):
            d = d0 + a
            h = h0 + i
            slot = a * KH + i
            if 0 <= d < D and 0 <= h < H:
                phases(xf, base + d * HW + h * W, W, L, SW, buffer, slot)
            else:
                for e in range(slot * SW * L, (slot + 1) * SW * L):
                    buffer[U(e)] = zero
    if inside:
        _avg_phase_columns(buffer, of, orow, ow_lo, ow_hi, pw, L, zero,
                           interior_divisor, KD, KH, KW, SW)
    else:
        # the row's interior-column divisor, as the edge loop computes it
        divisor = window_divisor(divisor_override, count_include_pad, d0, d1, ds, de,
                                 h0, h1, hs, he, 0, KW, 0, KW)
        _avg_phase_columns(buffer, of, orow, ow_lo, ow_hi, pw, L, zero, divisor,
                           KD, KH, KW, SW)
    for part in range(2):  # the edge columns on either side (one inlined copy)
        _avg_edges(xf, of, base, orow, 0 if part == 0 else ow_hi,
                   ow_lo if part == 0 else OW, W, HW, pw, d0, d1, ds, de, h0, h1, hs, he,
                   count_include_pad, divisor_override, zero, KW, SW)


@njit(inline="always")
def _avg_row_direct(xf, of, row, buffer, D, H, W, OD, OH, OW, pd, ph, pw,
                    count_include_pad, divisor_override, ow_lo, ow_hi, zero,
                    interior_divisor, L, KD, KH, KW, SD, SH, SW):
    """One output row of ``avg_forward`` without ``PHASES``: interior columns read the
    input in place when the window's rows are inside it, then the edges."""
    HW = H * W
    d0, h0, base, inside, d1, ds, de, h1, hs, he = _row_window(row, D, H, W, OD, OH, pd,
                                                               ph, KD, KH, SD, SH)
    orow = row * OW
    if inside:
        for ow in range(ow_lo, ow_hi):
            k0 = d0 * HW + h0 * W + ow * SW - pw
            total = zero
            for a in range(KD):
                for i in range(KH):
                    for j in range(KW):
                        total += hb.wide(xf[U(base + k0 + a * HW + i * W + j)])
            of[U(orow + ow)] = hb.narrow(total / interior_divisor, of)
    # Edge columns: both sides of the interior, or the whole row when its window leaves
    # the input along D or H (one inlined copy of the edge loop).
    first_end = ow_lo if inside else OW
    second_start = ow_hi if inside else OW
    for part in range(2):
        _avg_edges(xf, of, base, orow, 0 if part == 0 else second_start,
                   first_end if part == 0 else OW, W, HW, pw, d0, d1, ds, de, h0, h1, hs,
                   he, count_include_pad, divisor_override, zero, KW, SW)


@njit(inline="always")
def _avg_phase_columns(buffer, of, orow, ow_lo, ow_hi, pw, L, zero, divisor,
                       KD, KH, KW, SW):
    """Interior columns ``[ow_lo, ow_hi)`` of one row from its rows' column phases."""
    for ow in range(ow_lo, ow_hi):
        total = zero
        for a in range(KD):
            for i in range(KH):
                for j in range(KW):
                    c = j - pw
                    q = c // SW
                    total += buffer[U(((a * KH + i) * SW + c - q * SW) * L + ow + q)]
        of[U(orow + ow)] = hb.narrow(total / divisor, of)


@njit(inline="always")
def _avg_edges(xf, of, base, orow, ow_from, ow_to, W, HW, pw, d0, d1, ds, de, h0, h1,
               hs, he, count_include_pad, divisor_override, zero, KW, SW):
    """Columns ``[ow_from, ow_to)`` of one row, windows clipped to the input."""
    for ow in range(ow_from, ow_to):
        w0 = ow * SW - pw
        w1 = min(w0 + KW, W + pw)
        ws, we = max(w0, 0), min(w1, W)
        total = zero
        for d in range(ds, de):
            for h in range(hs, he):
                for w in range(ws, we):
                    total += hb.wide(xf[base + d * HW + h * W + w])
        divisor = window_divisor(divisor_override, count_include_pad, d0, d1, ds, de, h0,
                                 h1, hs, he, w0, w1, ws, we)
        of[orow + ow] = hb.narrow(total / divisor, of)


@njit(inline="always")
def _rows_into(target, go, rows, share, depth_padded, depth_in, H, W, OH, OW, ph, pw,
               count_include_pad, divisor_override, zero, KH, KW, SH, SW, RH):
    """The (H, W) plane of one output depth: ``target[h]`` = the spread rows covering
    input row ``h``, in tap order; ``depth_padded`` and ``depth_in`` are the depth
    factors of the divisors (1 in 1-D and 2-D)."""
    next_oh = 0
    for h in range(H):
        while next_oh <= min((h + ph) // SH, OH - 1):
            oh = next_oh
            h0 = oh * SH - ph
            h1 = min(h0 + KH, H + ph)
            rows_in = min(h1, H) - max(h0, 0)
            for ow in range(OW):
                w0 = ow * SW - pw
                w1 = min(w0 + KW, W + pw)
                if divisor_override != 0:
                    divisor = divisor_override
                elif count_include_pad:
                    divisor = depth_padded * (h1 - h0) * (w1 - w0)
                else:
                    divisor = depth_in * rows_in * (min(w1, W) - max(w0, 0))
                share[ow] = hb.wide(go[oh, ow]) / divisor
            spread_along_w(rows[oh % RH], share, zero, pw, KW, SW, 1)
            next_oh += 1
        gather_rows(target[h], rows, OH, h, ph, KH, SH, 1)


@functools.lru_cache(maxsize=None)
def avg_backward(KD, KH, KW, SD, SH, SW):
    """``kernel(grad_output, grad_input, pd, ph, pw, count_include_pad,
    divisor_override, zero, workers)``.

    Separable gather, so every ``grad_input`` element is written once with
    vector-friendly row additions: each window's share ``g / divisor`` is spread along
    W into one row per ``(od, oh)``; each input row ``h`` adds the rows covering it (in
    tap order) into the plane of ``od``; each input depth ``d`` adds the planes
    covering it (in tap order). Spread rows and planes are made as the input reaches
    them and kept in rings of ``RH`` rows and ``RD`` planes per thread (allocated once
    per thread: ``worker_planes``). With a depth
    kernel and stride of 1 (every 1-D and 2-D pooling) the plane of ``od`` is the
    input plane ``d = od`` itself, written in place.
    """
    RH = ring_rows(KH, SH, 1)
    RD = ring_rows(KD, SD, 1)
    DIRECT = KD == 1 and SD == 1

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(grad_output, grad_input, pd, ph, pw, count_include_pad, divisor_override,
               zero, worker, workers):
        planes, D, H, W = grad_input.shape
        OD, OH, OW = grad_output.shape[1], grad_output.shape[2], grad_output.shape[3]
        share = hb.wide_empty(OW, grad_input)
        rows = hb.wide_empty(RH * W, grad_input).reshape(RH, W)
        depth = hb.wide_empty(1 if DIRECT else RD * H * W, grad_input).reshape(
            (1, 1, 1) if DIRECT else (RD, H, W))
        # half precision: each (H, W) slice is summed in float32 here and rounded once
        buffer = hb.scratch(grad_input, H * W)
        first, last = worker_planes(worker, workers, planes)
        for p in range(first, last):
            go = grad_output[p]
            gi = grad_input[p]
            if DIRECT:  # 1-D and 2-D: each input depth slice is its output slice
                for d in range(D):
                    target = hb.target(gi[d], buffer)
                    _rows_into(target, go[d], rows, share, 1, 1, H, W, OH, OW, ph,
                               pw, count_include_pad, divisor_override, zero, KH, KW,
                               SH, SW, RH)
                    hb.flush(gi[d], target)
            else:
                next_od = 0
                for d in range(D):
                    while next_od <= min((d + pd) // SD, OD - 1):
                        od = next_od
                        d0 = od * SD - pd
                        d1 = min(d0 + KD, D + pd)
                        _rows_into(depth[od % RD], go[od], rows, share, d1 - d0,
                                   min(d1, D) - max(d0, 0), H, W, OH, OW, ph, pw,
                                   count_include_pad, divisor_override, zero, KH, KW,
                                   SH, SW, RH)
                        next_od += 1
                    target = hb.target(gi[d].reshape(-1), buffer)
                    gather_rows(target, depth.reshape(RD, H * W), OD, d, pd, KD, SD, 1)
                    hb.flush(gi[d].reshape(-1), target)

    return kernel


# A plane whose zero-bordered share plane has more elements than this takes the ring
# of spread rows instead (two such planes per thread; 256 KiB each in float64).
FLAT_PLANE_LIMIT = 32768


@functools.lru_cache(maxsize=None)
def avg_backward_flat(KD, KH, KW, SD, SH, SW):
    """``kernel(grad_output, grad_input, pd, ph, pw, count_include_pad,
    divisor_override, zero, workers)`` for stride 1 along H and W and a depth kernel
    and stride of 1, on planes of at most ``FLAT_PLANE_LIMIT`` padded elements.

    The same sums as ``avg_backward``, in the same order, bit for bit, with loops that
    run over whole planes instead of rows (a 14-column row left its loops too short to
    vectorise: 3x3 s1 on (8,512,14,14), one thread, 2.8 -> 0.6 ms in float32). Each
    plane's shares ``g / divisor`` go into a plane with ``K - 1`` zero rows and
    columns on every side, so the spread along W is one flat loop of ``KW`` taps and
    the gather along H one loop of ``KH`` rows, with no bounds to test. Adding the
    border's zeros changes no bits: every partial sum starts from ``+0.0``, so none is
    ``-0.0``, and ``s + 0.0 == s`` for every other ``s`` (NaN and infinities
    included). The divisors (exact integers) are a plane computed once per thread;
    dividing in the dtype computed with equals the float64 division rounded to it
    (float32: 53 >= 2 * 24 + 2 bits, so the double rounding is innocuous) for divisors
    that float32 holds exactly: the launcher sends a ``divisor_override`` above 2**24
    to the ring kernel.
    """
    if (KD, SD, SH, SW) != (1, 1, 1, 1):
        raise ValueError("the flat average backward takes stride 1 and depth kernel 1")

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(grad_output, grad_input, pd, ph, pw, count_include_pad, divisor_override,
               zero, worker, workers):
        planes, D, H, W = grad_input.shape
        OH, OW = grad_output.shape[2], grad_output.shape[3]
        Hp = OH + 2 * (KH - 1)
        Wp = OW + 2 * (KW - 1)
        divisors = hb.wide_empty(OH * OW, grad_input)
        for oh in range(OH):
            h0 = oh - ph
            h1 = min(h0 + KH, H + ph)
            for ow in range(OW):
                w0 = ow - pw
                w1 = min(w0 + KW, W + pw)
                divisors[oh * OW + ow] = window_divisor(
                    divisor_override, count_include_pad, 0, 1, 0, 1, h0, h1, max(h0, 0),
                    min(h1, H), w0, w1, max(w0, 0), min(w1, W))
        shares = hb.wide_empty(Hp * Wp, grad_input)
        for k in range(Hp * Wp):
            shares[k] = 0
        spread = hb.wide_empty(Hp * Wp, grad_input)
        buffer = hb.scratch(grad_input, H * W)
        lead = pw + KW - 1  # spread[k] reads shares[k + lead - j]
        first, last = worker_planes(worker, workers, planes)
        for p in range(first, last):
            for d in range(D):
                go = grad_output[p, d].reshape(-1)
                for oh in range(OH):
                    row = (oh + KH - 1) * Wp + KW - 1
                    src = oh * OW
                    for ow in range(OW):
                        shares[U(row + ow)] = (hb.wide(go[U(src + ow)])
                                               / divisors[U(src + ow)])
                spread_flat(shares, spread, lead, KW, zero)
                target = hb.target(grad_input[p, d], buffer)
                for h in range(H):
                    top = (h + ph + KH - 1) * Wp
                    for w in range(W):
                        target[h, w] = gather_flat(spread, top, w, Wp, KH)
                hb.flush(grad_input[p, d], target)

    return kernel
