"""CPU kernels of the reproducible weight and bias gradients (``fastpool._reproducible``
says why the sums do not depend on the split; ``fastpool.cuda.conv_reproducible``
mirrors these names).

Work: one task per (input channel, kernel tap), each summing its products over the
batch and the output positions into ``FOLDS`` float64 accumulators per output channel
of its group (and a plain sum of the non-finite ones), the innermost loop running
along the output channels of a channels-last
copy of ``grad_output`` (vectorised; the folds' additions are exact, so their order is
free). A task's result is the same on any worker, so no thread count changes a bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fastpool._reproducible import FOLDS, SUMS
from fastpool._threading import thread_count
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel

_U = np.uint64



_BIG = np.finfo(np.float64).max
# The sums a block of tasks keeps in cache while the rows of grad_output pass (L2).
_BLOCK_BYTES = 256 * 1024


@njit(inline="always", **BODY_JIT)
def _pieces(sums, k, r, sigma):
    """Add the pieces of the finite product ``r`` to ``sums[:FOLDS, k]``: on grid
    ``i``, ``q = (sigma[i] + r) - sigma[i]``, then ``r -= q``."""
    for i in range(FOLDS):
        t = sigma[i] + r
        q = t - sigma[i]
        r = r - q
        sums[i, k] += q


@njit(inline="always", **BODY_JIT)
def _deposit(sums, k, r, sigma):
    """Add product ``r`` to the sums ``sums[:, k]``: its pieces, or to ``E``
    (``sums[FOLDS, k]``) if it is not finite."""
    f = r if abs(r) <= _BIG else 0.0
    sums[FOLDS, k] += r - f
    _pieces(sums, k, f, sigma)


@parallel_kernel
@njit(**BODY_JIT)
def _weight_body(x, dyt, acc, sigma, scale, geometry, finite, block, worker, workers):
    """Worker ``worker``'s share of the tasks (input channel, tap), in blocks of
    ``block`` whose sums ``acc[task]`` (``(SUMS, Og)``) stay in cache while every row
    of ``grad_output`` passes them once."""
    N, C, D, H, W = x.shape
    OD, OH, OW, O = dyt.shape[1], dyt.shape[2], dyt.shape[3], dyt.shape[4]
    groups = geometry[0]
    KD, KH, KW = geometry[1], geometry[2], geometry[3]
    SD, SH, SW = geometry[4], geometry[5], geometry[6]
    PD, PH, PW = geometry[7], geometry[8], geometry[9]
    DD, DH, DW = geometry[10], geometry[11], geometry[12]
    Cg = C // groups
    Og = O // groups
    taps = KD * KH * KW
    tasks = C * taps
    s0, s1, s2, s3 = sigma[0], sigma[1], sigma[2], sigma[3]  # FOLDS == 4
    first = worker * tasks // workers
    last = (worker + 1) * tasks // workers
    for b0 in range(first, last, block):
        b1 = min(b0 + block, last)
        for n in range(N):
            for od in range(OD):
                for oh in range(OH):
                    for task in range(b0, b1):
                        c = task // taps
                        tap = task % taps
                        a = tap // (KH * KW)
                        i = (tap // KW) % KH
                        j = tap % KW
                        d = od * SD - PD + a * DD
                        h = oh * SH - PH + i * DH
                        if d < 0 or d >= D or h < 0 or h >= H:
                            continue
                        off = j * DW - PW
                        ow_lo = 0 if off >= 0 else (SW - 1 - off) // SW  # iw >= 0
                        ow_hi = min(OW, (W - 1 - off) // SW + 1)          # iw < W
                        o0 = (c // Cg) * Og
                        sums = acc[task]
                        for ow in range(ow_lo, ow_hi):
                            xv = np.float64(x[n, c, d, h, ow * SW + off])
                            if xv == 0.0:
                                continue  # a zero factor adds nothing (_reproducible)
                            xs = xv * scale
                            row = dyt[n, od, oh, ow]
                            if finite:  # no select, no E: the same bits, faster
                                # _pieces spelt out on 1-D views, unsigned
                                # indices (no wraparound tests): twice as fast
                                a0, a1, a2, a3 = sums[0], sums[1], sums[2], sums[3]
                                grads = row[o0:o0 + Og]
                                for o in range(Og):
                                    u = _U(o)
                                    r = xs * grads[u]
                                    t = s0 + r
                                    q = t - s0
                                    r = r - q
                                    a0[u] += q
                                    t = s1 + r
                                    q = t - s1
                                    r = r - q
                                    a1[u] += q
                                    t = s2 + r
                                    q = t - s2
                                    r = r - q
                                    a2[u] += q
                                    t = s3 + r
                                    a3[u] += t - s3
                            else:
                                for o in range(Og):
                                    dv = np.float64(row[o0 + o])
                                    _deposit(sums, o, xs * dv if dv != 0.0 else 0.0,
                                             sigma)


@parallel_kernel
@njit(**BODY_JIT)
def _bias_body(dyt, folds, sigma, scale, worker, workers):
    N, OD, OH, OW, O = dyt.shape
    lo = worker * O // workers
    hi = (worker + 1) * O // workers
    acc = np.zeros((SUMS, hi - lo))
    for n in range(N):
        for od in range(OD):
            for oh in range(OH):
                for ow in range(OW):
                    row = dyt[n, od, oh, ow]
                    for o in range(lo, hi):
                        _deposit(acc, o - lo, np.float64(row[o]) * scale, sigma)
    for k in range(SUMS):
        for o in range(lo, hi):
            folds[k, o] = acc[k, o - lo]


def _volume(a, batched):
    """``a`` (``(N, C, *spatial)``, or ``(C, *spatial)`` when not ``batched``) as the
    batched ``(N, C, D, H, W)`` view (unit axes inserted, no copy)."""
    a = a if batched else a[None]
    return a.reshape(a.shape[:2] + (1,) * (5 - a.ndim) + a.shape[2:])


def _channels_last(a, batched):
    """``a`` as a C-contiguous ``(N, D, H, W, C)`` array (a view of channels-last
    input)."""
    return np.ascontiguousarray(np.moveaxis(_volume(a, batched), 1, -1))


def max_abs(a):
    """``(largest finite |a|, whether every value is finite)`` (0 for none)."""
    a = np.abs(a)
    finite = np.isfinite(a)
    return float(np.max(a, where=finite, initial=0.0)), bool(finite.all())


def conv_weight_folds(grad_output, x, window, grids):
    """The folds ``(SUMS, *weight.shape)`` of the weight gradient of the convolution
    ``window`` over these arrays (``fastpool._reproducible``)."""
    w = window
    Cg, Og = w.channels // w.groups, w.out_channels // w.groups
    taps = int(np.prod(w.kernel3))
    acc = np.zeros((w.channels * taps, SUMS, Og))   # task-major, one row per task
    # arrays, not tuples: the parallel launch (_parallel._run) takes no nested tuples
    geometry = np.array((w.groups,) + w.kernel3 + w.stride3 + w.pad_lo3 + w.dilation3,
                        dtype=np.int64)
    block = max(1, _BLOCK_BYTES // (SUMS * Og * 8))
    _weight_body(_volume(x, w.batched), _channels_last(grad_output, w.batched), acc,
                 np.array(grids.sigma), grids.scale, geometry, grids.finite, block,
                 max(1, min(thread_count(), acc.shape[0])))
    folds = acc.reshape(w.groups, Cg, taps, SUMS, Og).transpose(3, 0, 4, 1, 2)
    return np.ascontiguousarray(folds).reshape((SUMS, w.out_channels, Cg) + w.kernel)


def channel_sum_folds(a, batched, grids):
    """The folds ``(SUMS, C)`` of ``a`` summed over every axis but the channels."""
    at = _channels_last(a, batched)
    folds = np.zeros((SUMS, at.shape[-1]))
    _bias_body(at, folds, np.array(grids.sigma), grids.scale,
               max(1, min(thread_count(), at.shape[-1])))
    return folds


def finish_folds(folds, unscale, dtype):
    """``(((S_0 + S_1) + ...) + E) * unscale`` rounded to ``dtype`` (a name)."""
    total = folds[0]
    for k in range(1, SUMS):
        total = total + folds[k]
    return (total * unscale).astype(dtype)
