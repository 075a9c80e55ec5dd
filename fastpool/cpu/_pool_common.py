"""What the CPU pooling kernels share: compile options, the max ordering, row splitting,
and the separable box-spreading of the average and stochastic-inference backwards.

Channels-first kernels see every input as ``(planes, D, H, W)`` (``planes = N * C``;
1-D and 2-D ops have ``D = 1``, and ``H = 1`` for 1-D, with kernel, stride and dilation
1 on those axes as compile-time constants, so the extra loops fold away). Forward
kernels parallelise over output rows ``(plane, od, oh)``; the last axis is the inner,
vectorised loop.

Indexing uses ``uint64`` casts on offsets already known to be in range: Numba adds a
negative-index wraparound select to every signed index, which blocks vectorisation.

Helpers are module-level (not closures) so that the kernels inlining them stay
cacheable on disk; callers pass their compile-time constants, which inlining folds in.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fastpool import _stochastic_sums
from fastpool.cpu import _half_bits as hb

JIT = dict(parallel=True, cache=True, boundscheck=False, error_model="numpy", nogil=True)
U = np.uint64
INF = np.inf
JUST_BELOW_ONE = 1.0 - 2.0**-53


# Stochastic inference's range-safe sums (``fastpool._stochastic_sums``).
plain_sums_serve = njit(inline="always")(_stochastic_sums.plain_sums_serve)
sums_scale = njit(inline="always")(_stochastic_sums.sums_scale)
weighted_average = njit(inline="always")(_stochastic_sums.weighted_average)
inference_shares = njit(inline="always")(_stochastic_sums.inference_shares)


@njit(inline="always")
def channel_results(gf, af, bf, o, s1, s2, scales, C, SHARES, RESCALED):
    """A window's stochastic inference results for channels ``0..C-1`` at flat offset
    ``o`` (channels-last and adaptive kernels): ``S2 / S1`` into ``af``, or with
    ``SHARES`` the gradient ``gf``'s shares ``A``, ``B`` into ``af``, ``bf``. From the
    plain sums, returning whether any does not serve; or (``RESCALED``) only for the
    channels with ``scales[c] != 1.0``, from their scaled sums, returning whether any
    sum is not finite."""
    flag = False
    for c in range(C):
        if RESCALED:
            flag |= not (s1[c] < INF and s2[c] < INF)
            scale = scales[c]
            if scale == 1.0:
                continue
        else:
            flag |= not plain_sums_serve(s1[c], s2[c])
            scale = 1.0
        if SHARES:
            af[U(o + c)], bf[U(o + c)] = inference_shares(
                np.float64(hb.wide(gf[U(o + c)])), s1[c], s2[c], scale)
        else:
            af[U(o + c)] = hb.narrow(weighted_average(s1[c], s2[c], scale), af)
    return flag


@njit(inline="always")
def replaces(value, best):
    """Max-pool ordering: larger wins; the first NaN wins and then sticks."""
    return (value > best) | ((value != value) & (best == best))


@njit(inline="always")
def output_row(row, OD, OH, D, H, W, pd, ph, KD, KH, SD, SH, DD, DH):
    """For flat output row ``row = (p * OD + od) * OH + oh``: the plane ``p``, ``od``,
    ``oh``, the window's first input depth ``d0`` and row ``h0``, the plane's offset,
    and whether every window tap along D and H lies inside the input."""
    if OD == 1:  # 1-D and 2-D: one division per row, as a 2-D kernel would do
        p = row // OH
        od = 0
        oh = row - p * OH
    else:
        p = row // (OD * OH)
        r = row - p * (OD * OH)
        od = r // OH
        oh = r - od * OH
    d0 = od * SD - pd
    h0 = oh * SH - ph
    inside = (d0 >= 0 and d0 + (KD - 1) * DD < D and h0 >= 0 and h0 + (KH - 1) * DH < H)
    return p, od, oh, d0, h0, p * D * H * W, inside


@njit(inline="always")
def spread_flat(shares, spread, lead, KW, zero):
    """The whole-plane spread along W of the flat backward kernels: ``spread[k] = zero
    + shares[k + lead] + shares[k + lead - 1] + ...`` over ``KW`` taps, in tap order,
    for every ``k`` whose taps lie in the bordered plane ``shares``."""
    for k in range(shares.size - lead):
        acc = zero
        for j in range(KW):
            acc += shares[U(k + lead - j)]
        spread[U(k)] = acc


@njit(inline="always")
def gather_flat(spread, top, w, width, KH):
    """The whole-plane gather along H: ``spread[top + w]`` plus the ``KH - 1`` rows of
    ``width`` above it, in tap order (the first row copied, as ``gather_rows``)."""
    acc = spread[U(top + w)]
    for i in range(1, KH):
        acc += spread[U(top - i * width + w)]
    return acc


@njit(inline="always")
def edge_columns(inside, ow_lo, ow_hi, OW):
    """``(count, split, skip)``: the output columns a row's edge loop visits, edge
    ``e < count`` being column ``e`` if ``e < split`` else ``e + skip`` -- every
    column of a row whose windows leave the input along D or H, else those outside
    the interior ``[ow_lo, ow_hi)``. Looping over all ``OW`` columns and skipping the
    interior ones let LLVM vectorise that loop with masked gathers that did the edge
    arithmetic for every column: 2x2 s2 stochastic inference on (32, 128, 56, 56),
    one thread, 16.3 ms, 4.5 without the edge loop."""
    if inside:
        return ow_lo + OW - ow_hi, ow_lo, ow_hi - ow_lo
    return OW, OW, 0


def interior_columns(window):
    """Output columns ``[lo, hi)`` whose window lies wholly inside the last axis."""
    W, OW = window.in3[2], window.out3[2]
    K, S, P, Dl = window.kernel3[2], window.stride3[2], window.pad_lo3[2], window.dilation3[2]
    lo = min((P + S - 1) // S, OW)
    hi = min((W - 1 - (K - 1) * Dl + P) // S + 1, OW)
    return lo, max(hi, lo)


# Column strides up to this many read column phases (``phases``); larger ones (windows
# far apart: few outputs per row) read the input directly, so that the phase buffer,
# ``SW`` phases per row, stays small.
PHASE_STRIDE_LIMIT = 8


@njit(inline="always")
def phases(xf, start, W, L, SW, buffer, slot):
    """Split the input row at ``xf[start:start + W]`` into its ``SW`` column phases:
    ``buffer[(slot * SW + r) * L + q] = row[q * SW + r]`` (whole groups first, so the
    copy vectorises as one interleaved load), widened to the dtype computed in."""
    whole = W // SW
    for q in range(whole):
        for r in range(SW):
            buffer[U((slot * SW + r) * L + q)] = hb.wide(xf[U(start + q * SW + r)])
    for w in range(whole * SW, W):
        buffer[U((slot * SW + w - whole * SW) * L + whole)] = hb.wide(xf[U(start + w)])


@njit(inline="always")
def window_divisor(divisor_override, count_include_pad, d0, d1, ds, de, h0, h1, hs, he,
                   w0, w1, ws, we):
    """Average pooling's divisor of a window ``[x0, x1)`` per axis (``x1`` clipped to the
    padding) and ``[xs, xe)`` its part inside the input: ``divisor_override``, else the
    product of the ``x1 - x0`` (``count_include_pad``), else of the ``xe - xs``."""
    if divisor_override != 0:
        return divisor_override
    if count_include_pad:
        return (d1 - d0) * (h1 - h0) * (w1 - w0)
    return (de - ds) * (he - hs) * (we - ws)


@njit(inline="always")
def worker_planes(worker, workers, planes):
    """Planes ``[lo, hi)`` of one worker: backward kernels give each of ``workers``
    threads a fixed run of whole planes and its own scratch, allocated once per
    thread rather than once per plane (which dominated small planes)."""
    return worker * planes // workers, (worker + 1) * planes // workers


def ring_rows(K, S, Dl):
    """Spread rows (or planes) a backward kernel keeps at once: the most output
    positions whose windows cover one input position along an axis. Positions are
    visited in order and each spread row is made just before the first input row that
    needs it, so ``R`` rows are the whole per-thread scratch, however tall the plane."""
    return (K - 1) * Dl // S + 1


# ----------------------------------------------------------------------------- spreading

def _spread_along_w_py(srow, share, zero, pw, KW, SW, DW):
    """Write ``srow[w] = sum of share[ow]`` over the taps ``(ow, j)`` of every window
    with ``ow*SW - pw + j*DW == w`` (0 where none), each cell written once.

    Gather form, one residue class ``r = (w + pw) % SW`` at a time: the taps landing on
    that class are the ``j`` with ``j*DW % SW == r``, each reading ``share`` at a fixed
    offset ``q - c_j`` for ``w = q*SW + r - pw``. The sum runs over ``j`` in order, so
    it is deterministic; interior ``q`` need no bounds checks and vectorise.
    """
    W = srow.shape[0]
    OW = share.shape[0]
    for r in range(SW):
        q_lo = -((r - pw) // SW)  # ceil((pw - r) / SW): first q with w >= 0
        q_hi = (W - 1 + pw - r) // SW + 1
        if q_lo >= q_hi:
            continue
        c_min = OW + W  # offsets c_j = (j*DW - r) // SW of this class's taps
        c_max = -1
        for j in range(KW):
            if (j * DW) % SW == r:
                c = (j * DW - r) // SW
                c_min = min(c_min, c)
                c_max = max(c_max, c)
        if c_max < 0:  # no tap lands on this class
            for q in range(q_lo, q_hi):
                srow[U(q * SW + r - pw)] = 0
            continue
        inner_lo = min(max(q_lo, c_max), q_hi)
        inner_hi = max(min(q_hi, OW + c_min), inner_lo)
        for q in range(inner_lo, inner_hi):
            acc = zero
            for j in range(KW):
                if (j * DW) % SW == r:
                    acc += share[U(q - (j * DW - r) // SW)]
            srow[U(q * SW + r - pw)] = acc
        for q in range(q_lo, q_hi):
            if inner_lo <= q < inner_hi:
                continue
            acc = zero
            for j in range(KW):
                if (j * DW) % SW == r:
                    o = q - (j * DW - r) // SW
                    if 0 <= o < OW:
                        acc += share[U(o)]
            srow[U(q * SW + r - pw)] = acc


def _gather_rows_py(dst, ring, OH, h, ph, KH, SH, DH):
    """``dst = sum of spread row oh`` over the output positions ``oh < OH`` whose window
    covers input position ``h`` (in tap order, so the result is deterministic); zeros
    if none does. Spread row ``oh`` lives in ``ring[oh % R]`` (``R = ring.shape[0]``);
    a row may be a flattened plane (the depth gather of 3-D pooling)."""
    R = ring.shape[0]
    empty = True
    for i in range(KH):
        t = h + ph - i * DH
        if t < 0 or t % SH != 0 or t // SH >= OH:
            continue
        src = ring[(t // SH) % R]
        if empty:
            for w in range(dst.shape[0]):
                dst[w] = src[w]
            empty = False
        else:
            for w in range(dst.shape[0]):
                dst[w] += src[w]
    if empty:
        dst[:] = 0



# Inlined where speed matters (the constants fold in); called, and so compiled once for
# all geometries, where compile time matters more (stochastic inference backward).
spread_along_w = njit(inline="always")(_spread_along_w_py)
gather_rows = njit(inline="always")(_gather_rows_py)
spread_along_w_called = njit(cache=True)(_spread_along_w_py)
gather_rows_called = njit(cache=True)(_gather_rows_py)
