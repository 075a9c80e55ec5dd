"""Max pooling on the CPU, channels-first: the forward kernel, and the scatter that is
the backward of every pooling that picks one element per window (max, stochastic
training).

Kernels are built per ``(kernel, stride, dilation)`` of the three axes, which are
compile-time constants (``Window.constants``): LLVM unrolls the window and vectorises
across output columns; with runtime values the same loops ran about 6x slower.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from fastpool._threading import thread_count
from fastpool.cpu import _half_bits as hb
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu._pool_pairs import PAIRS_WIDEST, max2x2_rows
from fastpool.cpu._pool_common import (
    INF,
    PHASE_STRIDE_LIMIT,
    U,
    output_row,
    phases,
    replaces,
)


def shares_rows(KD, KH, SH, SW, DH, DW, WITH_INDICES):
    """Whether ``max_forward`` runs ``_max_rows_shared``: without indices, windows one
    slab deep whose rows overlap (``SH < KH <= 5``), no dilation, column stride at most
    ``PHASE_STRIDE_LIMIT`` (the ResNet stem's 3x3 stride 2: (1, 64, 112, 112) on one
    thread 625 -> 403 us, on two 327 -> 215 us; with each pass's column maxima one loop
    over its column phases, 2026-12-05, on this day's machine 515 -> 266 us on one
    thread, 352 -> 155 on two)."""
    return (not WITH_INDICES and KD == 1 and DH == 1 and DW == 1 and SH < KH <= 5
            and SW <= PHASE_STRIDE_LIMIT)


@functools.lru_cache(maxsize=None)
def max_forward(KD, KH, KW, SD, SH, SW, DD, DH, DW, WITH_INDICES):
    """``kernel(x, out, indices, pd, ph, pw, ow_lo, ow_hi, workers)`` on ``(planes, D,
    H, W)`` views; ``indices`` receives flat positions ``(d * H + h) * W + w`` in the
    plane.

    With a column stride ``1 < SW <= PHASE_STRIDE_LIMIT`` (except 2x2 windows of stride 2,
    below) the taps of neighbouring outputs are ``SW`` apart and
    overlap (3x3 stride 2), which LLVM compiles to gathers, one per tap; so each output
    row's input rows are first split into their ``SW`` column phases (``phases``), and the
    taps read the phases contiguously, still in row-major window order. ``workers``
    threads take fixed runs of rows and one phase buffer each."""

    # 2x2 stride 2 (no dilation) reads the input directly: its two taps per row are
    # one interleaved pair, which LLVM loads as vectors and shuffles, and the
    # phase copies cost more than that (measured: (1, 512, 14, 14) 0.11 -> 0.07 ms).
    PHASES = 1 < SW <= PHASE_STRIDE_LIMIT and not (KW == SW == 2 and DW == 1)
    SHARED = shares_rows(KD, KH, SH, SW, DH, DW, WITH_INDICES)

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, indices, pd, ph, pw, ow_lo, ow_hi, worker, workers):
        planes, D, H, W = x.shape
        OD, OH, OW = out.shape[1], out.shape[2], out.shape[3]
        rows = planes * OD * OH
        L = (W + SW - 1) // SW  # length of one column phase
        xf = x.reshape(-1)
        of = out.reshape(-1)
        jf = indices.reshape(-1)
        if SHARED:
            _max_rows_shared(xf, of, worker * rows // workers,
                             (worker + 1) * rows // workers, D, H, W, OD, OH, OW, ph,
                             pw, ow_lo, ow_hi, KH, KW, SD, SH, SW)
            return
        buffer = hb.wide_empty(KD * KH * SW * L if PHASES else 1, x)
        for row in range(worker * rows // workers, (worker + 1) * rows // workers):
            # PHASES is a constant here: Numba drops the other branch before inlining,
            # so a kernel compiles one row code. (A dispatcher held in the closure
            # instead would keep the kernel out of Numba's disk cache.)
            if PHASES:
                _max_row_phases(xf, of, jf, row, buffer, D, H, W, OD, OH, OW, pd, ph,
                                pw, ow_lo, ow_hi, L, KD, KH, KW, SD, SH, SW, DD, DH,
                                DW, WITH_INDICES)
            else:
                _max_row_direct(xf, of, jf, row, buffer, D, H, W, OD, OH, OW, pd, ph,
                                pw, ow_lo, ow_hi, L, KD, KH, KW, SD, SH, SW, DD, DH,
                                DW, WITH_INDICES)

    return kernel


# Input rows per pass of ``_max_rows_shared`` (their column maxima, and their column
# phases, in buffers of about this many values per worker: L2-sized).
_SHARED_PASS_VALUES = 1 << 15


@njit(inline="always")
def _max_rows_shared(xf, of, row_lo, row_hi, D, H, W, OD, OH, OW, ph, pw, ow_lo, ow_hi,
                     KH, KW, SD, SH, SW):
    """Output rows ``[row_lo, row_hi)`` (``row = (plane * OD + od) * OH + oh``) of a max
    pooling without indices whose windows are one input slab deep (``KD == 1``, so
    output slab ``od`` reads input slab ``od * SD``), separably, in passes over runs of
    output rows of one slab: each input row the run reads gets its maximum over every
    window's columns once, then each output row takes the maximum of its ``KH`` input
    rows' maxima. Both steps keep ``replaces``'s first-wins order (along the row, then
    down the rows), which picks the same element as the row-major walk over the window:
    the first NaN, else the first maximum.

    With a column stride ``SW > 1`` (when the outputs fit the phase length) the rows
    of a pass are first split into their ``SW`` column phases and the column maxima of
    all of them are one loop over the pass (taps at constant offsets in the phases:
    LLVM vectorises it); the windows at either edge of each row are redone with
    checks. Row by row, loops of a few dozen outputs ran 2-3x slower (the stem's 3x3
    stride 2 on (1, 64, 112, 112): docs/site/performance.md)."""
    L = (W + SW - 1) // SW
    flat = SW > 1 and OW <= L
    stride = L if flat else OW  # one input row's column maxima in ``maxima``
    run_rows = max(1, (max(_SHARED_PASS_VALUES // max(W, 1), KH) - KH) // SH + 1)
    most = max(1, min(H, (min(run_rows, row_hi - row_lo) - 1) * SH + KH))
    maxima = hb.wide_empty(most * stride, of)
    lo_margin = (pw + SW - 1) // SW  # phase slots read before a pass's first row
    hi_margin = max((KW - 1 - pw) // SW + 1, 0)  # ... and after its last
    span = lo_margin + most * L + hi_margin
    phase = hb.wide_empty(SW * span if flat else 1, of)
    if flat:
        for e in range(phase.size):  # margins: read by edge windows only, redone
            phase[e] = 0
    row = row_lo
    while row < row_hi:
        q = row // OH
        end = min(row_hi, (q + 1) * OH, row + run_rows)
        p = q // OD
        slab = p * D + (q - p * OD) * SD
        h_start = max((row - q * OH) * SH - ph, 0)
        n = min((end - 1 - q * OH) * SH - ph + KH, H) - h_start
        base = (slab * H + h_start) * W
        if flat:
            _phase_rows(xf, base, n, W, L, SW, phase, span, lo_margin)
            _phase_maxima(phase, maxima, n * L, span, lo_margin, pw, KW, SW)
            for i in range(n):
                _row_edges(xf, base + i * W, W, OW, pw, ow_lo, ow_hi, KW, SW, maxima,
                           i * stride)
        else:
            for i in range(n):
                _row_maxima(xf, base + i * W, W, OW, pw, ow_lo, ow_hi, KW, SW, maxima,
                            i * stride)
        for out_row in range(row, end):
            h0 = (out_row - q * OH) * SH - ph
            first = -1
            for i in range(KH):
                if first < 0 and 0 <= h0 + i < H:
                    first = i
            # Down the rows in one pass. A window row outside the input reads the first
            # row inside it again, which changes nothing (a value never replaces
            # itself, a NaN included), so every output row folds exactly KH rows.
            # The offsets are scalars, not an array read in the loop: that kept LLVM
            # from vectorising it (263 -> 45 us for (64, 56, 56) outputs).
            a0 = (_window_row(h0, 0, first, H, KH) - h_start) * stride
            a1 = (_window_row(h0, 1, first, H, KH) - h_start) * stride
            a2 = (_window_row(h0, 2, first, H, KH) - h_start) * stride
            a3 = (_window_row(h0, 3, first, H, KH) - h_start) * stride
            a4 = (_window_row(h0, 4, first, H, KH) - h_start) * stride
            orow = out_row * OW
            for ow in range(OW):
                best = maxima[U(a0 + ow)]
                if KH > 1:
                    best = _fold(maxima[U(a1 + ow)], best)
                if KH > 2:
                    best = _fold(maxima[U(a2 + ow)], best)
                if KH > 3:
                    best = _fold(maxima[U(a3 + ow)], best)
                if KH > 4:
                    best = _fold(maxima[U(a4 + ow)], best)
                of[U(orow + ow)] = hb.narrow(best, of)
        row = end


@njit(inline="always")
def _fold(value, best):
    return value if replaces(value, best) else best


@njit(inline="always")
def _window_row(h0, i, first, H, KH):
    """The input row of window row ``i`` (rows past ``KH`` or outside the input: the
    first row inside it)."""
    h = h0 + i
    return h if i < KH and 0 <= h < H else h0 + first


@njit(inline="always")
def _phase_rows(xf, base, n, W, L, SW, phase, span, lo_margin):
    """Input rows ``xf[base + i * W:][:W]``, ``i < n``, split into their column phases:
    ``phase[r * span + lo_margin + i * L + q] = row_i[q * SW + r]`` (widened)."""
    whole = W // SW
    for i in range(n):
        start = base + i * W
        at = lo_margin + i * L
        for q in range(whole):
            for r in range(SW):
                phase[U(r * span + at + q)] = hb.wide(xf[U(start + q * SW + r)])
        for w in range(whole * SW, W):
            phase[U((w - whole * SW) * span + at + whole)] = hb.wide(xf[U(start + w)])


@njit(inline="always")
def _phase_maxima(phase, maxima, count, span, lo_margin, pw, KW, SW):
    """``maxima[k]``, ``k < count``: the first-wins maximum over the window columns
    ``j < KW`` of output ``k % L`` of row ``k // L``, read from the phases (column
    ``ow * SW + j - pw`` is phase ``(j - pw) % SW``, slot ``ow + (j - pw) // SW``). Edge
    windows read neighbouring rows or the margins; the caller redoes them."""
    c = -pw
    first = (c % SW) * span + lo_margin + c // SW
    for k in range(count):
        best = phase[U(first + k)]
        for j in range(1, KW):
            c = j - pw
            v = phase[U((c % SW) * span + lo_margin + c // SW + k)]
            best = v if replaces(v, best) else best
        maxima[U(k)] = best


@njit(inline="always")
def _row_maxima(xf, start, W, OW, pw, ow_lo, ow_hi, KW, SW, maxima, at):
    """``maxima[at + ow]`` = the maximum of input row ``xf[start:start + W]`` over the
    columns of window ``ow`` (first-wins, left to right): interior windows read the
    row directly (taps ``SW`` apart at constant offsets: LLVM loads them as
    interleaved vectors, no gathers), edge windows with each column checked."""
    first = start - pw
    for ow in range(ow_lo, ow_hi):
        k0 = first + ow * SW
        best = hb.wide(xf[U(k0)])
        for j in range(1, KW):
            v = hb.wide(xf[U(k0 + j)])
            best = v if replaces(v, best) else best
        maxima[U(at + ow)] = best
    _row_edges(xf, start, W, OW, pw, ow_lo, ow_hi, KW, SW, maxima, at)


@njit(inline="always")
def _row_edges(xf, start, W, OW, pw, ow_lo, ow_hi, KW, SW, maxima, at):
    """``_row_maxima`` of the windows outside ``[ow_lo, ow_hi)``, each column checked."""
    for part in range(2):
        for ow in range(0 if part == 0 else ow_hi, ow_lo if part == 0 else OW):
            w0 = ow * SW - pw
            best = hb.wide(xf[start])  # typed as the taps (-inf would be float64)
            found = False
            for j in range(KW):
                w = w0 + j
                if 0 <= w < W:
                    v = hb.wide(xf[start + w])
                    if not found or replaces(v, best):
                        best = v
                        found = True
            maxima[at + ow] = best


@njit(inline="always")
def _max_row_phases(xf, of, jf, row, buffer, D, H, W, OD, OH, OW, pd, ph, pw, ow_lo,
                    ow_hi, L, KD, KH, KW, SD, SH, SW, DD, DH, DW, WITH_INDICES):
    """One output row ``row = (plane, od, oh)`` of ``max_forward`` with ``PHASES``:
    interior columns from the column phases, then the edges with checks."""
    HW = H * W
    _, _, _, d0, h0, base, inside = output_row(row, OD, OH, D, H, W, pd, ph,
                                               KD, KH, SD, SH, DD, DH)
    orow = row * OW
    # Column phases of every tap row; rows outside the input (top and bottom
    # windows) hold -inf, which never replaces a maximum, so those rows run here
    # too. The running maximum starts at the first row inside the input (every
    # window has one): it and -inf rows before it are then visited without effect.
    first = -1
    for a in range(KD):
        d = d0 + a * DD
        for i in range(KH):
            h = h0 + i * DH
            slot = a * KH + i
            if 0 <= d < D and 0 <= h < H:
                phases(xf, base + d * HW + h * W, W, L, SW, buffer, slot)
                if first < 0:
                    first = slot
            else:
                for e in range(slot * SW * L, (slot + 1) * SW * L):
                    buffer[U(e)] = -INF
    a0 = first // KH
    i0 = first - a0 * KH
    first_row = (d0 + a0 * DD) * HW + (h0 + i0 * DH) * W
    start = d0 * HW + h0 * W - pw
    q0 = (-pw) // SW
    for ow in range(ow_lo, ow_hi):
        best = buffer[U((first * SW - pw - q0 * SW) * L + ow + q0)]
        arg = first_row + ow * SW - pw
        k0 = start + ow * SW
        for a in range(KD):
            for i in range(KH):
                for j in range(KW):
                    # tap (a, i, j) is column ow*SW + j*DW - pw: phase r, index ow + q
                    c = j * DW - pw
                    q = c // SW
                    v = buffer[U(((a * KH + i) * SW + c - q * SW) * L + ow + q)]
                    take = replaces(v, best)
                    best = v if take else best
                    if WITH_INDICES:
                        arg = (k0 + a * DD * HW + i * DH * W + j * DW) if take else arg
        of[U(orow + ow)] = hb.narrow(best, of)
        if WITH_INDICES:
            jf[U(orow + ow)] = arg
    for part in range(2):  # the edge columns on either side (one inlined copy)
        _max_edges(xf, of, jf, base, orow, d0, h0, 0 if part == 0 else ow_hi,
                   ow_lo if part == 0 else OW, D, H, W, pw, KD, KH, KW, SW, DD, DH, DW,
                   WITH_INDICES)


@functools.lru_cache(maxsize=None)
def max_forward_tiled(KD, KH, KW, SD, SH, SW, DD, DH, DW, WITH_INDICES):
    """``kernel(x, out, indices, plane_rows, workers)`` on a flat ``x`` and ``(rows,
    OW)`` views, for windows that tile the input exactly (stride = kernel, no padding,
    no dilation, no leftover rows or columns, ``KD == 1``): output row ``r`` reads input
    rows ``r * KH`` to ``r * KH + KH - 1`` (``plane_rows`` output rows per plane), with
    no window arithmetic and no edge columns. Taps are visited in ``max_forward``'s
    order with its rule (``replaces``), so values and indices are its own. 2x2 windows
    without indices on rows of at most ``PAIRS_WIDEST`` outputs run
    ``_pool_pairs.max2x2_rows`` (vector code for short rows)."""

    PAIRS = KH == KW == 2 and not WITH_INDICES

    @parallel_kernel
    @njit(**BODY_JIT)
    def kernel(x, out, indices, plane_rows, worker, workers):
        rows, OW = out.shape
        W = OW * KW
        xf = x.reshape(-1)
        if PAIRS and OW <= PAIRS_WIDEST:
            max2x2_rows(xf, out.reshape(-1), worker * rows // workers,
                        (worker + 1) * rows // workers, OW)
            return
        for r in range(worker * rows // workers, (worker + 1) * rows // workers):
            base = r * KH * W
            first = (r % plane_rows) * KH * W  # the row's offset inside its plane
            dst = out[r]
            for ow in range(OW):
                k0 = ow * KW
                best = hb.wide(xf[U(base + k0)])
                arg = k0
                for i in range(KH):
                    for j in range(KW):
                        if i + j > 0:
                            k = k0 + i * W + j
                            v = hb.wide(xf[U(base + k)])
                            take = replaces(v, best)
                            best = v if take else best
                            if WITH_INDICES:
                                arg = k if take else arg
                dst[U(ow)] = hb.narrow(best, out)
                if WITH_INDICES:
                    indices[r, ow] = first + arg

    return kernel


@njit(inline="always")
def _max_row_direct(xf, of, jf, row, buffer, D, H, W, OD, OH, OW, pd, ph, pw, ow_lo,
                    ow_hi, L, KD, KH, KW, SD, SH, SW, DD, DH, DW, WITH_INDICES):
    """One output row ``row = (plane, od, oh)`` of ``max_forward``: interior columns
    ``[ow_lo, ow_hi)`` with every tap inside the input, then the edges with checks."""
    HW = H * W
    _, _, _, d0, h0, base, inside = output_row(row, OD, OH, D, H, W, pd, ph,
                                               KD, KH, SD, SH, DD, DH)
    orow = row * OW
    if inside:
        start = d0 * HW + h0 * W - pw  # the row's first window, hoisted
        for ow in range(ow_lo, ow_hi):
            k0 = start + ow * SW
            best = hb.wide(xf[U(base + k0)])
            arg = k0
            for a in range(KD):
                for i in range(KH):
                    for j in range(KW):
                        if a + i + j > 0:
                            k = k0 + a * DD * HW + i * DH * W + j * DW
                            v = hb.wide(xf[U(base + k)])
                            take = replaces(v, best)
                            best = v if take else best
                            if WITH_INDICES:
                                arg = k if take else arg
            of[U(orow + ow)] = hb.narrow(best, of)
            if WITH_INDICES:
                jf[U(orow + ow)] = arg
    # Edge columns (all of them in rows whose window leaves the input along D or H),
    # each tap checked. Only these columns are visited: a loop over every column that
    # skipped the interior cost as much as the interior itself.
    first_end = ow_lo if inside else OW
    second_start = ow_hi if inside else OW
    for part in range(2):
        _max_edges(xf, of, jf, base, orow, d0, h0, 0 if part == 0 else second_start,
                   first_end if part == 0 else OW, D, H, W, pw, KD, KH, KW, SW, DD, DH,
                   DW, WITH_INDICES)


@njit(inline="always")
def _max_edges(xf, of, jf, base, orow, d0, h0, ow_from, ow_to, D, H, W, pw,
               KD, KH, KW, SW, DD, DH, DW, WITH_INDICES):
    """Output columns ``[ow_from, ow_to)`` of one row, every tap bounds-checked."""
    HW = H * W
    for ow in range(ow_from, ow_to):
        w0 = ow * SW - pw
        best = -INF
        arg = -1
        for a in range(KD):
            d = d0 + a * DD
            if d < 0 or d >= D:
                continue
            for i in range(KH):
                h = h0 + i * DH
                if h < 0 or h >= H:
                    continue
                for j in range(KW):
                    w = w0 + j * DW
                    if w < 0 or w >= W:
                        continue
                    k = d * HW + h * W + w
                    v = hb.wide(xf[base + k])
                    if arg < 0 or replaces(v, best):
                        best = v
                        arg = k
        of[orow + ow] = hb.narrow(best, of)
        if WITH_INDICES:
            jf[orow + ow] = arg


@parallel_kernel
@njit(**BODY_JIT)
def _scatter_to_indices(grad_output, indices, grad_input, bad, worker, workers):
    """Worker ``worker``'s share of the planes of ``scatter_to_indices``; it counts the
    indices outside the plane in ``bad[worker]``."""
    planes, plane_size = grad_input.shape
    outputs = grad_output.shape[1]
    count = 0
    # once per worker, not per plane (an allocation per plane of 7x7 or 14x14 cost as
    # much as the scatter)
    scratch = hb.scratch(grad_output, outputs)
    for p in range(worker * planes // workers, (worker + 1) * planes // workers):
        plane = grad_input[p]
        # half precision: sums in a float32 plane, rounded once (for float arrays g
        # is the plane itself)
        g = hb.accumulator(plane)
        for k in range(plane_size):
            g[k] = 0
        values = hb.widen_into(grad_output[p], scratch)
        for k in range(outputs):
            # One unsigned compare (a negative index wraps past the plane): LLVM made
            # ``0 <= target < plane_size`` two compares and flag arithmetic here, a
            # scatter 1.1x-1.3x slower than the same loop before the N-D engine.
            target = U(indices[p, k])
            if target < U(plane_size):
                g[target] += values[k]
            else:
                count += 1
        hb.flush(plane, g)
    bad[worker] = count


def scatter_to_indices(grad_output, indices, grad_input):
    """``grad_input[p].flat[indices[p, k]] += grad_output[p, k]``, in output order, one
    thread per plane (so nothing races); returns the number of indices outside the
    plane, which are skipped. A serial body with explicit workers: a single worker
    (small calls) runs without a parallel region."""
    workers = max(1, min(thread_count(), grad_input.shape[0]))
    bad = np.zeros(workers, np.int64)
    _scatter_to_indices(grad_output, indices, grad_input, bad, workers)
    return sum(bad.tolist())  # not bad.sum(): NumPy's reduction costs 2 us
