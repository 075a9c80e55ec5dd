"""GPU kernels of the reproducible weight and bias gradients (``fastpool._reproducible``
says why the sums do not depend on the split; ``fastpool.cpu.conv_reproducible``
mirrors these names and gives the same bits).

One thread per weight element (or bias element) sums its products over the batch and
the output positions into the three folds and ``E`` in registers. The products and
their pieces are the CPU's operation for operation: each product is rounded on its own
(``_product``: no fused multiply-add, which the CPU does not do either), and the sums
of pieces are exact, so the order of the loop is free.
"""

from __future__ import annotations

import numpy as np
from numba import config, cuda
from numba.cuda import libdevice

from fastpool._reproducible import FOLDS, SUMS
from fastpool.cuda import _stream
from fastpool.cuda._launch import (grid_start, grid_stride, launch, split_ncdhw,
                                   volume)

_BIG = np.finfo(np.float64).max


if config.ENABLE_CUDASIM:
    @cuda.jit(device=True, inline=True)
    def _product(a, b):
        return a * b
else:
    @cuda.jit(device=True, inline=True)
    def _product(a, b):
        """``a * b`` rounded on its own: never fused with the addition after it into
        a multiply-add (which the CPU's kernel does not do), so both devices add the
        same pieces."""
        return libdevice.dmul_rn(a, b)


@cuda.jit(device=True, inline=True)
def _deposit(sums, r, sigma):
    """Add product ``r`` to ``sums`` (``cpu.conv_reproducible._deposit``): a branch,
    not ``E += r - f``, so nothing is ever subtracted from a product."""
    if not abs(r) <= _BIG:
        sums[FOLDS] += r
        return
    for i in range(FOLDS):
        t = sigma[i] + r
        q = t - sigma[i]
        r = r - q
        sums[i] += q


@cuda.jit
def _weight_kernel(x, dy, folds, sigma, scale, groups, KD, KH, KW, SD, SH, SW, PD, PH,
                   PW, DD, DH, DW):
    N, C, D, H, W = x.shape
    O, OD, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3], dy.shape[4]
    Cg = C // groups
    Og = O // groups
    total = O * Cg * KD * KH * KW
    sums = cuda.local.array(SUMS, np.float64)
    for item in range(grid_start(), total, grid_stride()):
        o, cl, a, i, j = split_ncdhw(item, Cg, KD, KH, KW)
        c = (o // Og) * Cg + cl
        for k in range(SUMS):
            sums[k] = 0.0
        for n in range(N):
            for od in range(OD):
                d = od * SD - PD + a * DD
                if d < 0 or d >= D:
                    continue
                for oh in range(OH):
                    h = oh * SH - PH + i * DH
                    if h < 0 or h >= H:
                        continue
                    for ow in range(OW):
                        w = ow * SW - PW + j * DW
                        if w < 0 or w >= W:
                            continue
                        xv = np.float64(x[n, c, d, h, w])
                        dv = np.float64(dy[n, o, od, oh, ow])
                        if xv == 0.0 or dv == 0.0:
                            continue  # a zero factor adds nothing (_reproducible)
                        _deposit(sums, _product(xv * scale, dv), sigma)
        for k in range(SUMS):
            folds[k, o, cl, a, i, j] = sums[k]


@cuda.jit
def _bias_kernel(dy, folds, sigma, scale):
    N, O, OD, OH, OW = dy.shape
    sums = cuda.local.array(SUMS, np.float64)
    for o in range(grid_start(), O, grid_stride()):
        for k in range(SUMS):
            sums[k] = 0.0
        for n in range(N):
            for od in range(OD):
                for oh in range(OH):
                    for ow in range(OW):
                        _deposit(sums, _product(np.float64(dy[n, o, od, oh, ow]), scale),
                                 sigma)
        for k in range(SUMS):
            folds[k, o] = sums[k]


@cuda.jit
def _max_kernel(a, out, seen):
    N, C, D, H, W = a.shape
    best = 0.0
    other = 0
    for item in range(grid_start(), N * C * D * H * W, grid_stride()):
        n, c, d, h, w = split_ncdhw(item, C, D, H, W)
        v = abs(np.float64(a[n, c, d, h, w]))
        if v <= _BIG:
            best = max(best, v)
        else:
            other = 1  # an infinity or NaN
    cuda.atomic.max(out, 0, best)
    cuda.atomic.max(seen, 0, other)


@cuda.jit
def _finish_kernel(folds, unscale, out):
    for k in range(grid_start(), out.size, grid_stride()):
        total = folds[0, k]
        for i in range(1, SUMS):
            total = total + folds[i, k]
        out[k] = total * unscale


def max_abs(a):
    """``(largest finite |a|, whether every value is finite)`` (0 for none): one wait
    for the GPU. ``a``: a device array ``(N, C, *spatial)`` or ``(C, *spatial)``."""
    shape = (1,) * (5 - a.ndim) + tuple(a.shape)
    view = volume(a, True, 3) if a.ndim == 5 else _as_5d(a, shape)
    out, seen = _stream.zeros(1, np.float64), _stream.zeros(1, np.int32)
    launch(_max_kernel, view.size, view, out, seen)
    return float(_stream.download(out)[0]), not bool(_stream.download(seen)[0])


def _as_5d(a, shape):
    from fastpool.cuda._launch import strided_view
    strides = (0,) * (5 - a.ndim) + tuple(a.strides)
    return strided_view(a, shape, strides)


def _sigma(grids):
    return _stream.upload(np.array(grids.sigma))


def conv_weight_folds(grad_output, x, window, grids):
    """The folds ``(SUMS, *weight.shape)`` of the weight gradient of the convolution
    ``window`` over these arrays (``fastpool._reproducible``), a float64 device array."""
    w = window
    folds = _stream.zeros((SUMS, w.out_channels, w.channels // w.groups) + w.kernel3,
                          np.float64)
    launch(_weight_kernel, w.out_channels * (w.channels // w.groups)
           * int(np.prod(w.kernel3)), volume(x, w.batched, w.rank),
           volume(grad_output, w.batched, w.rank), folds, _sigma(grids), grids.scale,
           w.groups, *w.kernel3, *w.stride3, *w.pad_lo3, *w.dilation3)
    return folds.reshape((SUMS, w.out_channels, w.channels // w.groups) + w.kernel)


def channel_sum_folds(a, batched, grids):
    """The folds ``(SUMS, C)`` of ``a`` summed over every axis but the channels."""
    a5 = volume(a, batched, a.ndim - (2 if batched else 1))
    folds = _stream.zeros((SUMS, a5.shape[1]), np.float64)
    launch(_bias_kernel, a5.shape[1], a5, folds, _sigma(grids), grids.scale)
    return folds


def finish_folds(folds, unscale, dtype):
    """``(((S_0 + S_1) + ...) + E) * unscale`` rounded to ``dtype`` (a name)."""
    shape = tuple(folds.shape[1:])
    flat = folds.reshape((SUMS, int(np.prod(shape))))
    out = _stream.empty(flat.shape[1], np.dtype(dtype))
    launch(_finish_kernel, out.size, flat, unscale, out)
    return out.reshape(shape)
