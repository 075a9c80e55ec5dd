"""Channels-first depthwise convolution (``groups == C_in == C_out``) in blocks of
channels turned channels-last inside one kernel.

A depthwise plane kernel runs along the rows of one channel, which are short on the
small planes of the later layers (7x7-28x28) and, with stride 2, read every other
element: LLVM's vectors stay half empty. Across channels the channels-last kernels
(``_channels_last_direct``) fill them; before this module a channels-first call reached
them through a copy of the whole input into channels-last order, the kernel and a copy
of the whole output back: three parallel loops, each waking the threads, and the data
going to memory between them. Here each task takes ``_BLOCK`` channels of one image
(and a band of output rows on large planes): it transposes their input rows into a
zero-bordered channels-last scratch in vector registers (``fastpool.cpu._transpose``),
runs the channels-last loops on it (``_channels_last_direct._row3x3`` for 3x3 kernels)
and transposes the outputs back; one parallel loop, the scratch in L1/L2.

The sums are those of ``_channels_last_direct`` with outside cells as zeros (its
``grouped`` mode, that of the channels-first plane kernels): the same bits as the
channels-first kernels at any block size, band height and thread count, except the
sign and payload of a NaN (x86 keeps the first operand's NaN and the compiled adds
may order their operands differently; both sides are NaN). In a partial last block
of channels the scratch lanes past the channel count keep earlier tasks' values; they
meet zero weights and are never written out.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastpool._threading import loop_on_one_thread
from fastpool.cpu._transpose import block, side_of
from fastpool.cpu.conv._channels_last_direct import _BLOCK, _columns, _row3x3
from fastpool.cpu.conv._planner import _JIT, _U

# Channels per task (``_BLOCK``, one vector of ``_row3x3``): two AVX2 vectors of
# float32 per pixel (four of float64), and 16 * (16 x 16 padded + 14 x 14) float32
# scratch for a 14x14 plane (29 KB, L1).
# Scratch bytes per task (input rows, their zero-bordered copy and the outputs), which
# sets the output rows of a band on large planes.
_BAND_BYTES = 96 << 10


def _pixel_vectors(context, builder, sig, args, copy):
    """Codegen of ``_copy_pixels`` (``copy``) and ``_zero_pixels``."""
    tys = sig.args
    intp = context.get_value_type(types.intp)
    dst = context.make_array(tys[0])(context, builder, args[0]).data
    vector = ir.VectorType(context.get_data_type(tys[0].dtype), _BLOCK)
    align = context.get_abi_sizeof(context.get_data_type(tys[0].dtype))
    d0 = context.cast(builder, args[1], tys[1], types.intp)
    count = context.cast(builder, args[-1], tys[-1], types.intp)
    if copy:
        src = context.make_array(tys[2])(context, builder, args[2]).data
        s0 = context.cast(builder, args[3], tys[3], types.intp)
    width = ir.Constant(intp, _BLOCK)
    with cgutils.for_range(builder, count) as loop:
        step = builder.mul(loop.index, width)
        if copy:
            at = builder.gep(src, [builder.add(s0, step)])
            item = builder.load(builder.bitcast(at, vector.as_pointer()), align=align)
        else:
            item = ir.Constant(vector, [ir.Constant(vector.element, 0.0)] * _BLOCK)
        at = builder.gep(dst, [builder.add(d0, step)])
        builder.store(item, builder.bitcast(at, vector.as_pointer())).align = align
    return context.get_dummy_value()


def _flat_float(a):
    return (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
            and isinstance(a.dtype, types.Float))


@intrinsic
def _copy_pixels(typingctx, dst, d, src, s, count):
    """``dst[d + k] = src[s + k]`` for ``k < count * _BLOCK``, a vector of ``_BLOCK``
    lanes at a time (Numba's loops versioned each short row for aliasing)."""
    if not (_flat_float(dst) and _flat_float(src) and dst.dtype == src.dtype
            and dst.mutable and all(isinstance(v, types.Integer) for v in (d, s, count))):
        return None
    return types.void(dst, d, src, s, count), (
        lambda context, builder, sig, args: _pixel_vectors(context, builder, sig, args,
                                                           True))


@intrinsic
def _zero_pixels(typingctx, dst, d, count):
    """``dst[d + k] = 0`` for ``k < count * _BLOCK``, as ``_copy_pixels``."""
    if not (_flat_float(dst) and dst.mutable
            and all(isinstance(v, types.Integer) for v in (d, count))):
        return None
    return types.void(dst, d, count), (
        lambda context, builder, sig, args: _pixel_vectors(context, builder, sig, args,
                                                           False))


@njit(inline="always")
def _fill(xf, plane, HW, W, h0, rows, xs, xu, C0, cb, Wp, PL, side):
    """``xs[i, q, c] = x[plane + c, h0 + i, q - PL]`` for scratch rows ``i < rows`` and
    columns ``q < Wp``, zeros outside the input: the input rows inside the plane are
    transposed whole (flat, so short rows still fill the blocks) into ``xu``, then
    copied row by row between the borders. ``xs`` starts as zeros and no task writes
    its columns outside ``[qa, qb)`` (the same for every task of a call), so only rows
    outside the input are zeroed, each time: a band's first rows lie above the input
    and another band's inside it."""
    H = HW // W
    ha = min(max(h0, 0), H)
    hb = max(min(h0 + rows, H), ha)
    count = (hb - ha) * W
    start = ha * W
    full = count // side * side
    if cb == C0:
        for c in range(0, C0, side):
            src = (plane + c) * HW + start
            for p in range(0, full, side):
                block(xf, src + p, HW, xu, p * C0 + c, C0)
        for p in range(full, count):
            for c in range(C0):
                xu[_U(p * C0 + c)] = xf[_U((plane + c) * HW + start + p)]
    else:
        for c in range(cb):
            src = (plane + c) * HW + start
            for p in range(count):
                xu[_U(p * C0 + c)] = xf[_U(src + p)]
    qa = min(max(PL, 0), Wp)
    qb = max(min(PL + W, Wp), qa)
    for i in range(rows):
        h = h0 + i
        row = i * Wp * C0
        if h < ha or h >= hb:
            _zero_pixels(xs, row, Wp)
            continue
        _copy_pixels(xs, row + qa * C0, xu, ((h - ha) * W + qa - PL) * C0, qb - qa)


@njit(inline="always")
def _drain(ys, yf, plane, OHW, base, count, C0, cb, side):
    """``y[plane + c, base + p] = ys[p, c]`` for ``p < count``, ``c < cb``."""
    full = count // side * side
    if cb == C0:
        for c in range(0, C0, side):
            dst = (plane + c) * OHW + base
            for p in range(0, full, side):
                block(ys, p * C0 + c, C0, yf, dst + p, OHW)
        for p in range(full, count):
            for c in range(C0):
                yf[_U((plane + c) * OHW + base + p)] = ys[_U(p * C0 + c)]
    else:
        for c in range(cb):
            dst = (plane + c) * OHW + base
            for p in range(count):
                yf[_U(dst + p)] = ys[_U(p * C0 + c)]


@njit(**_JIT)
def _forward(x, wb, bb, has_bias, y, KH, KW, SH, SW, DH, DW, PT, PL, band, workers):
    """``y[n, c, oh, ow] = bias[c] + sum over taps (i, j) of w[c, i, j] *
    x[n, c, oh*SH - PT + i*DH, ow*SW - PL + j*DW]`` (outside cells zeros), one task per
    block of ``_BLOCK`` channels of an image and band of ``band`` output rows; ``wb``:
    ``(blocks, KH * KW, _BLOCK)`` taps, ``bb``: ``(blocks, _BLOCK)`` biases."""
    N, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    C0 = _BLOCK
    blocks = wb.shape[0]
    bands = (OH + band - 1) // band
    tasks = N * blocks * bands
    Wp = (OW - 1) * SW + (KW - 1) * DW + 1
    in_rows = (band - 1) * SH + (KH - 1) * DH + 1
    xf, yf = x.reshape(-1), y.reshape(-1)
    side = side_of(x)
    nine = KH == 3 and KW == 3
    for worker in prange(workers):
        xu = np.zeros(in_rows * W * C0, x.dtype)
        xs = np.zeros(in_rows * Wp * C0, x.dtype)
        ys = np.zeros(band * OW * C0, x.dtype)
        stage = np.empty(4 * C0 if not nine else 1, x.dtype)  # _columns' scratch
        o = np.empty(4, np.int64)
        col_lo = np.zeros(KW, np.int64)
        col_hi = np.full(KW, OW, np.int64)
        for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
            n = t // (blocks * bands)
            r = t - n * (blocks * bands)
            b = r // bands
            oh0 = (r - b * bands) * band
            rows = min(band, OH - oh0)
            cb = min(C0, C - b * C0)
            plane = n * C + b * C0
            _fill(xf, plane, H * W, W, oh0 * SH - PT, (rows - 1) * SH + (KH - 1) * DH + 1,
                  xs, xu, C0, cb, Wp, PL, side)
            wtf = wb[b].reshape(-1)
            bias = bb[b]
            for i in range(rows):
                if nine:
                    _row3x3(xs, i * SH * Wp * C0, SW * C0, DH * Wp * C0, DW * C0, wtf,
                            0, _BLOCK, bias, 0, ys, i * OW * C0, _BLOCK, OW)
                else:
                    _columns(xs, ys, wtf, bias, has_bias, stage, o, 0, i, 0, OW, in_rows,
                             Wp, C0, band, OW, KH, KW, SH, SW, DH, DW, 0, 0, col_lo,
                             col_hi, True)
            _drain(ys, yf, plane, OH * OW, oh0 * OW, rows * OW, C0, cb, side)


def _blocks(weight, bias, dtype):
    """The ``(blocks, KH * KW, _BLOCK)`` taps and ``(blocks, _BLOCK)`` biases of a
    ``(C, 1, KH, KW)`` weight, zeros past ``C``."""
    c = weight.shape[0]
    blocks = -(-c // _BLOCK)
    wb = np.zeros((blocks * _BLOCK, weight.shape[2] * weight.shape[3]), dtype)
    wb[:c] = weight.reshape(c, -1)
    bb = np.zeros(blocks * _BLOCK, dtype)
    if bias is not None:
        bb[:c] = bias
    return (np.ascontiguousarray(wb.reshape(blocks, _BLOCK, -1).transpose(0, 2, 1)),
            bb.reshape(blocks, _BLOCK))


def band_rows(problem, itemsize):
    """Output rows per task: the scratch of ``_BLOCK`` channels within ``_BAND_BYTES``."""
    p = problem
    wp = (p.out_w - 1) * p.stride_w + (p.kernel_w - 1) * p.dilation_w + 1
    # ``rows`` output rows read (rows - 1) * SH + (KH - 1) * DH + 1 input rows.
    per_row = (p.stride_h * (wp + p.in_w) + p.out_w) * _BLOCK * itemsize
    fixed = ((p.kernel_h - 1) * p.dilation_h + 1 - p.stride_h) * (wp + p.in_w) \
        * _BLOCK * itemsize
    return int(min(p.out_h, max(1, (_BAND_BYTES - fixed) // per_row)))


def forward(x, weight, bias, problem, workers):
    """The ``(N, C, OH, OW)`` output of the depthwise convolution of the C-contiguous
    ``(N, C, H, W)`` ``x``."""
    p = problem
    wb, bb = _blocks(weight, bias, x.dtype)
    y = np.empty((p.batch, p.out_channels, p.out_h, p.out_w), x.dtype)
    loop_on_one_thread(_forward, x, wb, bb, bias is not None, y, p.kernel_h, p.kernel_w,
                       p.stride_h, p.stride_w, p.dilation_h, p.dilation_w, p.pad_top,
                       p.pad_left, band_rows(p, x.itemsize), workers)
    return y
