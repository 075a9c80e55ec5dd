"""Direct CPU convolution kernels (``"direct"``): plain loops vectorised along output
columns, for one input channel per group (depthwise, channel multipliers) and planes too
big for BLAS's 32-bit sizes, where a GEMM with ``K = KH * KW`` would be all overhead.

Two families: row kernels (any stride; one output or input row at a time, taps clipped
to the input by ``col_lo``/``col_hi``) and plane kernels on zero-padded planes split by
stride phase (below): the forward and the weight gradient, any stride.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu.conv._deinterleave import deinterleave
from fastpool.cpu.conv._planner import _JIT, _U


@njit(**_JIT)
def _direct_forward(x, w, bias, has_bias, y, G, KH, KW, SH, SW, DH, DW, PT, PL, col_lo,
                    col_hi):
    """``y`` one output row at a time, accumulated along the row (vectorised)."""
    N, C, H, W = x.shape
    O, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    Cg = C // G
    Og = O // G
    for t in prange(N * O):
        n = t // O
        o = t % O
        g = o // Og
        b = bias[o] if has_bias else 0.0
        for oh in range(OH):
            acc = y[n, o, oh]
            for ow in range(OW):
                acc[_U(ow)] = b
            for c in range(Cg):
                plane = x[n, g * Cg + c]
                for i in range(KH):
                    h = oh * SH - PT + i * DH
                    if h < 0 or h >= H:
                        continue
                    src = plane[h]
                    for j in range(KW):
                        weight = w[o, c, i, j]
                        offset = j * DW - PL
                        if SW == 1:
                            for ow in range(col_lo[j], col_hi[j]):
                                acc[_U(ow)] += weight * src[_U(ow + offset)]
                        else:
                            for ow in range(col_lo[j], col_hi[j]):
                                acc[_U(ow)] += weight * src[_U(ow * SW + offset)]


@njit(**_JIT)
def _direct_backward_input(grad_output, w, grad_input, G, KH, KW, SH, SW, DH, DW, PT, PL,
                           col_lo, col_hi):
    """Each input plane is owned by one thread, which adds every tap that read it."""
    N, C, H, W = grad_input.shape
    O, OH, OW = grad_output.shape[1], grad_output.shape[2], grad_output.shape[3]
    Cg = C // G
    Og = O // G
    for t in prange(N * C):
        n = t // C
        c = t % C
        g = c // Cg
        cl = c - g * Cg
        plane = grad_input[n, c]
        plane[:] = 0
        for o in range(g * Og, (g + 1) * Og):
            for oh in range(OH):
                src = grad_output[n, o, oh]
                for i in range(KH):
                    h = oh * SH - PT + i * DH
                    if h < 0 or h >= H:
                        continue
                    dst = plane[h]
                    for j in range(KW):
                        weight = w[o, cl, i, j]
                        offset = j * DW - PL
                        if SW == 1:
                            for ow in range(col_lo[j], col_hi[j]):
                                dst[_U(ow + offset)] += weight * src[_U(ow)]
                        else:
                            for ow in range(col_lo[j], col_hi[j]):
                                dst[_U(ow * SW + offset)] += weight * src[_U(ow)]


@njit(**_JIT)
def _direct_backward_weight(x, grad_output, grad_weight, G, KH, KW, SH, SW, DH, DW, PT,
                            PL, col_lo, col_hi):
    """One thread per output channel. Each tap keeps one running sum per output column
    (vectorised, fixed order), added up at the end in float64."""
    N, C, H, W = x.shape
    O, OH, OW = grad_output.shape[1], grad_output.shape[2], grad_output.shape[3]
    Cg = C // G
    Og = O // G
    taps = Cg * KH * KW
    for o in prange(O):
        g = o // Og
        lanes = np.zeros((taps, OW), x.dtype)
        for n in range(N):
            for oh in range(OH):
                dy = grad_output[n, o, oh]
                for c in range(Cg):
                    plane = x[n, g * Cg + c]
                    for i in range(KH):
                        h = oh * SH - PT + i * DH
                        if h < 0 or h >= H:
                            continue
                        src = plane[h]
                        for j in range(KW):
                            lane = lanes[(c * KH + i) * KW + j]
                            offset = j * DW - PL
                            if SW == 1:
                                for ow in range(col_lo[j], col_hi[j]):
                                    lane[_U(ow)] += dy[_U(ow)] * src[_U(ow + offset)]
                            else:
                                for ow in range(col_lo[j], col_hi[j]):
                                    lane[_U(ow)] += dy[_U(ow)] * src[_U(ow * SW + offset)]
        flat = grad_weight[o].reshape(-1)
        for k in range(taps):
            total = 0.0
            for ow in range(OW):
                total += lanes[k, ow]
            flat[k] = total


# The plane kernels work on zero-padded copies of whole planes, split by stride phase:
# phase ``(ph, pw)`` holds the padded cells ``(r*SH + ph, c*SW + pw)`` as a ``Hq x Wq``
# plane (``_phase_shape``), so that output ``(oh, ow)``'s tap ``(i, j)`` is cell
# ``(oh + i*DH // SH, ow + j*DW // SW)`` of phase ``(i*DH % SH, j*DW % SW)``. Every tap
# is then one long unit-stride loop over the flat planes (``OH * Wq`` elements, the
# ``Wq - OW`` extra columns of each row discarded), with no bounds checks, no strided
# loads and no short-row remainders to hold back vectorisation. At stride 1 there is one
# phase, the padded plane itself. Batch 1 depthwise 3x3 s2 96@112: 0.67 -> 0.27 ms
# (the row kernels' strided loads did not vectorise). Planes of more than
# ``_planner._PADDED_PLANE_LIMIT`` elements use the row kernels above.


@njit(inline="always")
def _phase_shape(OH, OW, KH, KW, SH, SW, DH, DW):
    """``(Hq, Wq)``: the rows and columns of each phase plane."""
    return OH + DH * (KH - 1) // SH, OW + DW * (KW - 1) // SW


# Phase planes at least this wide take ``_pad_phase_pair``: shorter rows ran slower
# with its extra loops (batch 1, 2 threads, minimum of 40 calls: depthwise 3x3 s2 576@14,
# 8 columns, 0.086 -> 0.094 ms; 144@56 0.129 -> 0.116; 96@112 0.31 -> 0.25).
_PAIR_MIN_WIDTH = 16


@njit(inline="always")
def _pad_phases(src, dst, used, PT, PL, SH, SW, Hq, Wq):
    """``dst[(ph*SW + pw)*Hq*Wq + r*Wq + c] = src[r*SH + ph - PT, c*SW + pw - PL]``, 0
    outside ``src``, for the phases some tap reads (``used``); the slack after the last
    phase is zeroed too."""
    H, W = src.shape
    for ph in range(SH):
        if SW == 2 and Wq >= _PAIR_MIN_WIDTH and used[ph * 2] and used[ph * 2 + 1]:
            _pad_phase_pair(src, dst, ph, PT, PL, SH, Hq, Wq)
            continue
        for pw in range(SW):
            phase = ph * SW + pw
            if not used[phase]:
                continue
            # the columns whose cell lies inside the input row
            lo = min(max(-((pw - PL) // SW), 0), Wq)
            hi = min(max((W - 1 + PL - pw) // SW + 1, lo), Wq)
            for r in range(Hq):
                h = r * SH + ph - PT
                base = (phase * Hq + r) * Wq
                if h < 0 or h >= H:
                    for c in range(Wq):
                        dst[_U(base + c)] = 0
                    continue
                row = src[h]
                for c in range(lo):
                    dst[_U(base + c)] = 0
                if SW == 1:
                    for c in range(lo, hi):
                        dst[_U(base + c)] = row[_U(c + pw - PL)]
                else:
                    for c in range(lo, hi):
                        dst[_U(base + c)] = row[_U(c * SW + pw - PL)]
                for c in range(hi, Wq):
                    dst[_U(base + c)] = 0
    for e in range(SH * SW * Hq * Wq, dst.shape[0]):
        dst[e] = 0


@njit(inline="always")
def _pad_phase_pair(src, dst, ph, PT, PL, SH, Hq, Wq):
    """``_pad_phases``'s two column phases ``(ph, 0)`` and ``(ph, 1)`` of stride 2 in
    one pass over each input row (``deinterleave``), the few cells where only one phase
    lies inside the row copied alone."""
    H, W = src.shape
    lo0 = min(max(-(-PL // 2), 0), Wq)
    hi0 = min(max((W - 1 + PL) // 2 + 1, lo0), Wq)
    lo1 = min(max(-((1 - PL) // 2), 0), Wq)
    hi1 = min(max((W - 2 + PL) // 2 + 1, lo1), Wq)
    both_lo = max(lo0, lo1)
    both_hi = max(min(hi0, hi1), both_lo)
    for r in range(Hq):
        h = r * SH + ph - PT
        base0 = (ph * 2 * Hq + r) * Wq
        base1 = base0 + Hq * Wq
        if h < 0 or h >= H:
            for c in range(Wq):
                dst[_U(base0 + c)] = 0
                dst[_U(base1 + c)] = 0
            continue
        row = src[h]
        deinterleave(row, -PL, dst, base0, base1, both_lo, both_hi)
        for base, lo, hi, pw in ((base0, lo0, hi0, 0), (base1, lo1, hi1, 1)):
            for c in range(lo):
                dst[_U(base + c)] = 0
            for c in range(lo, min(both_lo, hi)):
                dst[_U(base + c)] = row[_U(c * 2 + pw - PL)]
            for c in range(max(both_hi, lo), hi):
                dst[_U(base + c)] = row[_U(c * 2 + pw - PL)]
            for c in range(hi, Wq):
                dst[_U(base + c)] = 0


@njit(inline="always")
def _accumulate_taps(acc, padded, weights, offsets, Q):
    """``acc[q] += sum over taps k of weights[k] * padded[q + offsets[k]]``, four taps
    per pass over ``acc`` (a pass is bound by its loads and stores, not by the FMAs)."""
    taps = weights.shape[0]
    k = 0
    while k + 4 <= taps:
        w0, w1, w2, w3 = weights[k], weights[k + 1], weights[k + 2], weights[k + 3]
        o0, o1, o2, o3 = offsets[k], offsets[k + 1], offsets[k + 2], offsets[k + 3]
        for q in range(Q):
            acc[_U(q)] += ((w0 * padded[_U(q + o0)] + w1 * padded[_U(q + o1)])
                           + (w2 * padded[_U(q + o2)] + w3 * padded[_U(q + o3)]))
        k += 4
    while k < taps:
        w0 = weights[k]
        o0 = offsets[k]
        for q in range(Q):
            acc[_U(q)] += w0 * padded[_U(q + o0)]
        k += 1


@njit(inline="always")
def _phase_taps(KH, KW, SH, SW, DH, DW, Hq, Wq):
    """Each tap's offset in the phase planes, and which phases the taps read."""
    offsets = np.empty(KH * KW, np.int64)
    used = np.zeros(SH * SW, np.bool_)
    for i in range(KH):
        for j in range(KW):
            phase = (i * DH) % SH * SW + (j * DW) % SW
            used[phase] = True
            offsets[i * KW + j] = ((phase * Hq + i * DH // SH) * Wq + j * DW // SW)
    return offsets, used


@parallel_kernel
@njit(**BODY_JIT)
def _direct_forward_planes(x, w, bias, has_bias, y, G, KH, KW, SH, SW, DH, DW, PT, PL,
                           worker, workers):
    """Worker ``worker``'s share of the (image, output channel) planes (a serial body:
    a single worker runs without a parallel region, which costs more than a small
    convolution)."""
    N, C, H, W = x.shape
    O, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    Cg = C // G
    Og = O // G
    Hq, Wq = _phase_shape(OH, OW, KH, KW, SH, SW, DH, DW)
    Q = OH * Wq
    tasks = N * O
    offsets, used = _phase_taps(KH, KW, SH, SW, DH, DW, Hq, Wq)
    # zeros: ``_pad_phases`` never writes the phases no tap reads, and a tap's run can
    # cross into the next phase (outputs past OW, dropped here)
    padded = np.zeros(SH * SW * Hq * Wq + DW * (KW - 1) // SW, x.dtype)
    acc = np.empty(Q, x.dtype)
    for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
        n = t // O
        o = t % O
        g = o // Og
        b = bias[o] if has_bias else 0.0
        for q in range(Q):
            acc[q] = b
        for c in range(Cg):
            _pad_phases(x[n, g * Cg + c], padded, used, PT, PL, SH, SW, Hq, Wq)
            _accumulate_taps(acc, padded, w[o, c].reshape(-1), offsets, Q)
        out = y[n, o]
        for oh in range(OH):
            row = out[oh]
            for ow in range(OW):
                row[_U(ow)] = acc[_U(oh * Wq + ow)]


@njit(cache=True, boundscheck=False, nogil=True, fastmath={"reassoc"})
def _dot(a, b, b_offset, length):
    """``sum a[q] * b[q + b_offset]`` over ``q < length``. Reassociation lets LLVM keep
    vector partial sums; the order depends only on ``length``, so it is fixed."""
    total = a.dtype.type(0)
    for q in range(length):
        total += a[_U(q)] * b[_U(q + b_offset)]
    return total


@parallel_kernel
@njit(**BODY_JIT)
def _direct_backward_weight_planes(x, grad_output, grad_weight, G, KH, KW, SH, SW, DH,
                                   DW, PT, PL, worker, workers):
    """Worker ``worker``'s share of the output channels: per image, one dot product per
    tap over the flat phase planes, summed over images in float64."""
    N, C, H, W = x.shape
    O, OH, OW = grad_output.shape[1], grad_output.shape[2], grad_output.shape[3]
    Cg = C // G
    Og = O // G
    Hq, Wq = _phase_shape(OH, OW, KH, KW, SH, SW, DH, DW)
    Q = OH * Wq
    offsets, used = _phase_taps(KH, KW, SH, SW, DH, DW, Hq, Wq)
    for o in range(worker * O // workers, (worker + 1) * O // workers):
        g = o // Og
        totals = np.zeros((Cg, KH * KW), np.float64)
        # zeros: ``_pad_phases`` never writes the phases no tap reads, and a tap's run
        # can cross into the next phase, where it meets dy's zeros: garbage there
        # (a NaN) would make the sum NaN
        padded = np.zeros(SH * SW * Hq * Wq + DW * (KW - 1) // SW, x.dtype)
        dy = np.zeros(Q, x.dtype)  # grad_output rows at stride Wq, zero beyond OW
        for n in range(N):
            plane = grad_output[n, o]
            for oh in range(OH):
                row = plane[oh]
                for ow in range(OW):
                    dy[_U(oh * Wq + ow)] = row[_U(ow)]
            for c in range(Cg):
                _pad_phases(x[n, g * Cg + c], padded, used, PT, PL, SH, SW, Hq, Wq)
                for k in range(KH * KW):
                    totals[c, k] += _dot(dy, padded, offsets[k], Q)
        flat = grad_weight[o].reshape(-1)
        for c in range(Cg):
            for k in range(KH * KW):
                flat[c * KH * KW + k] = totals[c, k]
