"""Depthwise convolution (``groups == C_in == C_out``) on channels-last buffers, in place.

In an ``(N, H, W, C)`` buffer the ``C`` values of one pixel are contiguous and every
channel has its own one-channel kernel, so each kernel here runs its innermost loop
across channels (unit stride, vectorised) and needs no copy of the input, where the
channels-first kernels (``_direct``) would need one copy in and one out.

The sums are added in the order of the channels-first direct kernels, so the output and
the input gradient are bitwise those of a channels-first call: the bias first, then the
taps in row-major order, four at a time as ``(a + b) + (c + d)`` with cells outside the
input as zeros where the channels-first call uses its plane kernels
(``_Problem.plane_args``), one at a time skipping outside cells otherwise. The
strided input gradient gathers, per input cell, the terms the channels-first kernel
scatters, in its order (output rows ascending, kernel columns ascending). The weight
gradient sums fixed chunks of output rows (the chunking depends on the shapes only)
added in chunk order: identical at any thread count, equal to the channels-first one
within rounding. The bias gradient adds every pixel in order in float64, as the
channels-first kernel does, per block of channels.

A 3x3 forward in the plane kernels' order (``_nine_taps_grouped``) runs whole blocks of
16 channels through ``_row3x3``, written in LLVM IR: one vector of 16 lanes per tap,
the block's nine weight vectors loaded once per run of columns, runs of columns short
enough that their three input rows stay in L1 while the blocks go by. Numba's loop
over the channels of a pixel (``_nine_taps``) reloaded the weights for every pair of
pixels and checked its arrays for aliasing on every entry. Measured 2026-12-07 (Intel
Xeon, float32, batch 1, 2 threads, old build against new in one process as the layer
suite times a call, ``docs/measure_layer_rows_interleaved.py``): 32@112 0.271-0.281 ->
0.201-0.239 ms, 144@56 0.330 -> 0.286, 192@28 0.130 -> 0.110, 576@14 0.117-0.132 ->
0.109-0.116, stride 2 144@56 0.148-0.168 -> 0.111-0.136; 384@14, 960@7 and stride 2
96@112 and 192@28 within 1.07x either way; stride 2 576@14 0.81x-0.89x in three runs,
also with its rows (too short for the blocks, ``_MIN_STRIDED_RUN``) on the old loop:
not explained. The lanes add what the scalar loops add, so the bits do not change.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastpool._malloc import kept_empty
from fastpool._threading import loop_on_one_thread
from fastpool.cpu.conv._gemm import _sum_partials
from fastpool.cpu.conv._planner import _JIT, _MAX_CHUNKS, _PARTIAL_BYTES, _U


# Kernels index flat views by element offsets: a view per pixel or tap (``x[n, h, w]``)
# would take and drop a reference to the buffer each time, atomic operations on one
# shared counter that cost more than a pixel's arithmetic.


@njit(inline="always")
def _add_taps(yf, yo, src, o0, o1, o2, o3, wtf, w0, length, C, four):
    """``yf[yo + q] += wtf[w0 + q % C] * src[o0 + q]`` for ``q < length`` (``length`` a
    multiple of ``C``); with ``four``, taps ``w0 + C``... read ``o1``, ``o2``, ``o3`` too,
    added as ``(a + b) + (c + d)``."""
    if four:
        w1, w2, w3 = w0 + C, w0 + 2 * C, w0 + 3 * C
        for p in range(0, length, C):
            for c in range(C):
                q = p + c
                yf[_U(yo + q)] += ((wtf[_U(w0 + c)] * src[_U(o0 + q)]
                                    + wtf[_U(w1 + c)] * src[_U(o1 + q)])
                                   + (wtf[_U(w2 + c)] * src[_U(o2 + q)]
                                      + wtf[_U(w3 + c)] * src[_U(o3 + q)]))
    else:
        for p in range(0, length, C):
            for c in range(C):
                yf[_U(yo + p + c)] += wtf[_U(w0 + c)] * src[_U(o0 + p + c)]


@njit(inline="always")
def _columns(xf, yf, wtf, bias, has_bias, stage, o, n, oh, ow_a, ow_b, H, W, C, OH, OW,
             KH, KW, SH, SW, DH, DW, PT, PL, col_lo, col_hi, grouped):
    """Output columns ``[ow_a, ow_b)`` of row ``oh``: the bias, then each group of taps
    over the columns where it lies inside the input, then, with ``grouped``, the other
    columns with zeros staged for the missing cells (``stage``: ``4 * C`` scratch;
    ``o``: four offsets of scratch)."""
    row = (n * OH + oh) * OW * C
    for ow in range(ow_a, ow_b):
        for c in range(C):
            yf[_U(row + ow * C + c)] = bias[_U(c)] if has_bias else 0.0
    taps = KH * KW
    k = 0
    while k < taps:
        g = 4 if grouped and k + 4 <= taps else 1
        lo, hi = ow_a, ow_b
        for kk in range(k, k + g):
            h = oh * SH - PT + (kk // KW) * DH
            if h < 0 or h >= H:
                hi = ow_a
            lo = max(lo, col_lo[kk % KW])
            hi = min(hi, col_hi[kk % KW])
        hi = max(hi, lo)
        o[:] = 0  # the group's source cells at output column 0
        for kk in range(g):
            h = oh * SH - PT + ((k + kk) // KW) * DH
            o[kk] = ((n * H + h) * W + ((k + kk) % KW) * DW - PL) * C
        if SW == 1:
            _add_taps(yf, row + lo * C, xf, o[0] + lo * C, o[1] + lo * C, o[2] + lo * C,
                      o[3] + lo * C, wtf, k * C, (hi - lo) * C, C, g == 4)
        else:
            for ow in range(lo, hi):
                s = ow * SW * C
                if g == 4:
                    _add_taps(yf, row + ow * C, xf, o[0] + s, o[1] + s, o[2] + s,
                              o[3] + s, wtf, k * C, C, C, True)
                else:
                    _add_taps(yf, row + ow * C, xf, o[0] + s, 0, 0, 0, wtf, k * C, C, C,
                              False)
        if grouped:
            for ow in range(ow_a, ow_b):
                if lo <= ow < hi:
                    continue
                for kk in range(g):
                    h = oh * SH - PT + ((k + kk) // KW) * DH
                    wc = ow * SW - PL + ((k + kk) % KW) * DW
                    inside = 0 <= h < H and 0 <= wc < W
                    src = ((n * H + h) * W + wc) * C
                    for c in range(C):
                        stage[_U(kk * C + c)] = xf[_U(src + c)] if inside else 0.0
                _add_taps(yf, row + ow * C, stage, 0, C, 2 * C, 3 * C, wtf, k * C, C, C,
                          g == 4)
        k += g


# Channels of one ``_row3x3`` vector.
_BLOCK = 16
# Input bytes (three rows of a chunk of columns) ``_nine_taps_grouped`` keeps in L1.
_CHUNK_BYTES = 24 << 10
# Strided rows take ``_nine_taps_grouped`` from this many inner columns: on shorter
# ones its chunks of a few columns each loaded the weights again (layer suite,
# channels-last, 2 threads: 3x3 s2 192@28 0.080 -> 0.091 ms, 576@14 0.074 -> 0.080,
# where 144@56 went 0.168 -> 0.136).
_MIN_STRIDED_RUN = 16


@intrinsic
def _row3x3(typingctx, xs, src, step, r1, c1, wt, w0, wstep, bias, b0, ys, dst,
            ystep, count):
    """``count`` outputs of ``_BLOCK`` channels of a 3x3 kernel:
    ``ys[dst + p*ystep + c] = bias[b0 + c] + sum over taps k = (i, j) of
    wt[w0 + k*wstep + c] * xs[src + p*step + i*r1 + j*c1 + c]``, added as ``_columns`` and
    ``_nine_taps`` add them with outside cells as zeros: the bias, then
    ``(t0 + t1) + (t2 + t3)``, ``(t4 + t5) + (t6 + t7)``, ``t8``.

    In LLVM IR, one vector of ``_BLOCK`` lanes per tap, the weights loaded once:
    written as loops, LLVM versioned every row for aliasing between the scratch arrays
    and kept a dozen pointers on the stack (the taps ran at a third of this speed).
    Lane-wise vector multiplies and adds are the scalar IEEE operations, so the bits
    are those of the scalar loops. Arrays: 1-D, C-contiguous, one float dtype."""
    arrays = (xs, wt, bias, ys)
    if not (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                and isinstance(a.dtype, types.Float) for a in arrays)
            and len({a.dtype for a in arrays}) == 1 and ys.mutable
            and all(isinstance(v, types.Integer)
                    for v in (src, step, r1, c1, w0, wstep, b0, dst, ystep, count))):
        return None
    signature = types.void(xs, src, step, r1, c1, wt, w0, wstep, bias, b0, ys, dst, ystep,
                           count)

    def codegen(context, builder, sig, args):
        tys = sig.args
        intp = context.get_value_type(types.intp)
        element = context.get_data_type(xs.dtype)
        vector = ir.VectorType(element, _BLOCK)
        align = context.get_abi_sizeof(element)

        def value(index):
            return context.cast(builder, args[index], tys[index], types.intp)

        def data(index):
            return context.make_array(tys[index])(context, builder, args[index]).data

        def load(pointer, offset):
            at = builder.gep(pointer, [offset])
            return builder.load(builder.bitcast(at, vector.as_pointer()), align=align)

        x_data, w_data, y_data = data(0), data(5), data(10)
        w0_v, wstep_v = value(6), value(7)
        weights = [load(w_data, builder.add(w0_v, builder.mul(wstep_v, ir.Constant(intp, k))))
                   for k in range(9)]
        start = load(data(8), value(9))
        src_v, step_v, r1_v, c1_v = value(1), value(2), value(3), value(4)
        dst_v, ystep_v, count_v = value(11), value(12), value(13)
        offsets = [builder.add(builder.mul(r1_v, ir.Constant(intp, i)),
                               builder.mul(c1_v, ir.Constant(intp, j)))
                   for i in range(3) for j in range(3)]
        with cgutils.for_range(builder, count_v) as loop:
            s = builder.add(src_v, builder.mul(loop.index, step_v))
            t = [builder.fmul(weights[k], load(x_data, builder.add(s, offsets[k])))
                 for k in range(9)]
            acc = builder.fadd(start, builder.fadd(builder.fadd(t[0], t[1]),
                                                   builder.fadd(t[2], t[3])))
            acc = builder.fadd(acc, builder.fadd(builder.fadd(t[4], t[5]),
                                                 builder.fadd(t[6], t[7])))
            acc = builder.fadd(acc, t[8])
            at = builder.gep(y_data, [builder.add(dst_v, builder.mul(loop.index, ystep_v))])
            builder.store(acc, builder.bitcast(at, vector.as_pointer())).align = align
        return context.get_dummy_value()

    return signature, codegen



@njit(inline="always")
def _sum9(a, w0, w1, w2, w3, w4, w5, w6, w7, w8, x0, x1, x2, x3, x4, x5, x6, x7, x8,
          grouped):
    """``a`` plus the nine products in ``_columns``'s order."""
    if grouped:
        a += (w0 * x0 + w1 * x1) + (w2 * x2 + w3 * x3)
        a += (w4 * x4 + w5 * x5) + (w6 * x6 + w7 * x7)
        a += w8 * x8
    else:
        a += w0 * x0
        a += w1 * x1
        a += w2 * x2
        a += w3 * x3
        a += w4 * x4
        a += w5 * x5
        a += w6 * x6
        a += w7 * x7
        a += w8 * x8
    return a


# Channels per block of ``_nine_taps``: a block's input rows and weights stay in L1
# while its columns go by (measured: 960 channels on 7x7, 29 -> 33 GFLOP/s).
_CHANNEL_BLOCK = 128


@njit(inline="always")
def _nine_taps(xf, yf, wtf, bias, has_bias, row, src, lo, hi, C, SW, DW, r1, r2,
               grouped, c_first=0):
    """A 3x3 kernel on columns ``[lo, hi)`` whose windows lie inside the input, every tap
    in one pass (the sums kept in registers, in the order of ``_columns``): ``src`` is
    tap (0, 0)'s cell for column 0, ``r1``/``r2`` the offsets of the kernel's rows. With
    unit stride and dilation along W, two neighbouring columns share their loads."""
    zero = wtf.dtype.type(0)
    c1, c2 = DW * C, 2 * DW * C
    for c0 in range(c_first, C, _CHANNEL_BLOCK):
        c_end = min(C, c0 + _CHANNEL_BLOCK)
        ow = lo
        if SW == 1 and DW == 1:
            while ow + 2 <= hi:
                y0 = row + ow * C
                s = src + ow * C
                for c in range(c0, c_end):
                    b = bias[_U(c)] if has_bias else zero  # not 0.0: a float64 sum
                    w0, w1, w2 = wtf[_U(c)], wtf[_U(C + c)], wtf[_U(2 * C + c)]
                    w3, w4 = wtf[_U(3 * C + c)], wtf[_U(4 * C + c)]
                    w5, w6 = wtf[_U(5 * C + c)], wtf[_U(6 * C + c)]
                    w7, w8 = wtf[_U(7 * C + c)], wtf[_U(8 * C + c)]
                    x0, x1 = xf[_U(s + c)], xf[_U(s + C + c)]
                    x2, x3 = xf[_U(s + 2 * C + c)], xf[_U(s + 3 * C + c)]
                    x4, x5 = xf[_U(s + r1 + c)], xf[_U(s + r1 + C + c)]
                    x6, x7 = xf[_U(s + r1 + 2 * C + c)], xf[_U(s + r1 + 3 * C + c)]
                    x8, x9 = xf[_U(s + r2 + c)], xf[_U(s + r2 + C + c)]
                    x10, x11 = xf[_U(s + r2 + 2 * C + c)], xf[_U(s + r2 + 3 * C + c)]
                    yf[_U(y0 + c)] = _sum9(b, w0, w1, w2, w3, w4, w5, w6, w7, w8, x0,
                                           x1, x2, x4, x5, x6, x8, x9, x10, grouped)
                    yf[_U(y0 + C + c)] = _sum9(b, w0, w1, w2, w3, w4, w5, w6, w7, w8,
                                               x1, x2, x3, x5, x6, x7, x9, x10, x11,
                                               grouped)
                ow += 2
        while ow < hi:
            y0 = row + ow * C
            s = src + ow * SW * C
            for c in range(c0, c_end):
                b = bias[_U(c)] if has_bias else zero
                yf[_U(y0 + c)] = _sum9(
                    b, wtf[_U(c)], wtf[_U(C + c)], wtf[_U(2 * C + c)], wtf[_U(3 * C + c)],
                    wtf[_U(4 * C + c)], wtf[_U(5 * C + c)], wtf[_U(6 * C + c)],
                    wtf[_U(7 * C + c)], wtf[_U(8 * C + c)], xf[_U(s + c)],
                    xf[_U(s + c1 + c)], xf[_U(s + c2 + c)], xf[_U(s + r1 + c)],
                    xf[_U(s + r1 + c1 + c)], xf[_U(s + r1 + c2 + c)], xf[_U(s + r2 + c)],
                    xf[_U(s + r2 + c1 + c)], xf[_U(s + r2 + c2 + c)], grouped)
            ow += 1


@njit(inline="always")
def _nine_taps_grouped(xf, yf, wtf, bias, has_bias, zeros, row, src, lo, hi, C, SW, DW,
                       r1, r2):
    """``_nine_taps(..., grouped=True)``: the same sums, with whole blocks of
    ``_BLOCK`` channels as vectors of ``_row3x3`` (the module's docstring has the
    figures) and the channels past the last block by ``_nine_taps``."""
    if hi <= lo:
        return
    blocks = C // _BLOCK
    taps_bias = bias if has_bias else zeros
    # columns per pass over the blocks: their three input rows stay in L1 meanwhile
    chunk = max(4, _CHUNK_BYTES // (3 * SW * C * xf.itemsize))
    for a in range(lo, hi, chunk):
        count = min(chunk, hi - a)
        for b in range(blocks):
            c = b * _BLOCK
            _row3x3(xf, src + a * SW * C + c, SW * C, r1, DW * C, wtf, c, C, taps_bias, c,
                    yf, row + a * C + c, C, count)
    if blocks * _BLOCK < C:
        _nine_taps(xf, yf, wtf, bias, has_bias, row, src, lo, hi, C, SW, DW, r1, r2, True,
                   blocks * _BLOCK)


@njit(inline="always")
def _fill_band(xf, band, n, h0, DH, w0, width, H, W, C):
    """``band[i, q, c] = x[n, h0 + i*DH, w0 + q, c]`` for ``i < 3``, ``q < width``;
    zeros outside the input."""
    for i in range(3):
        h = h0 + i * DH
        for q in range(width):
            wc = w0 + q
            dst = (i * width + q) * C
            if 0 <= h < H and 0 <= wc < W:
                src = ((n * H + h) * W + wc) * C
                for c in range(C):
                    band[_U(dst + c)] = xf[_U(src + c)]
            else:
                for c in range(C):
                    band[_U(dst + c)] = 0.0


@njit(**_JIT)
def _forward(x, wt, bias, has_bias, y, KH, KW, SH, SW, DH, DW, PT, PL, col_lo, col_hi,
             grouped, workers):
    """``y[n, oh, ow, c] = bias[c] + sum over taps k = (i, j) of wt[k, c] *
    x[n, oh*SH - PT + i*DH, ow*SW - PL + j*DW, c]``, one task per output row
    (``col_lo``/``col_hi``: per kernel column, the output columns whose tap lies inside
    the input row). With ``grouped`` at stride 1 a 3x3 kernel reads the columns whose
    window leaves the input from a zero-padded copy of them (``_fill_band``)."""
    N, H, W, C = x.shape
    OH, OW = y.shape[1], y.shape[2]
    rows = N * OH
    xf, yf, wtf = x.reshape(-1), y.reshape(-1), wt.reshape(-1)
    lo, hi = 0, OW  # columns whose whole window lies inside the input row
    for j in range(KW):
        lo = max(lo, col_lo[j])
        hi = min(hi, col_hi[j])
    hi = max(hi, lo)
    nine = KH == 3 and KW == 3
    for worker in prange(workers):
        stage = np.empty(4 * C, x.dtype)
        o = np.empty(4, np.int64)
        band = np.empty(3 * (OW + 2 * DW) * C if nine and grouped else 1, x.dtype)
        zeros = np.zeros(C, x.dtype)  # the bias where there is none
        for t in range(worker * rows // workers, (worker + 1) * rows // workers):
            n = t // OH
            oh = t - n * OH
            h0 = oh * SH - PT
            row = (n * OH + oh) * OW * C
            inside = h0 >= 0 and h0 + 2 * DH < H
            if nine and grouped and SH == SW == 1:
                a, b = (lo, hi) if inside else (0, 0)
                _nine_taps_grouped(xf, yf, wtf, bias, has_bias, zeros, row,
                                   ((n * H + h0) * W - PL) * C, a, b, C, 1, DW,
                                   DH * W * C, 2 * DH * W * C)
                if b == a:  # the whole row from the band
                    a = b = OW
                width = a + 2 * DW
                _fill_band(xf, band, n, h0, DH, -PL, width, H, W, C)
                _nine_taps_grouped(band, yf, wtf, bias, has_bias, zeros, row, 0, 0, a, C,
                                   1, DW, width * C, 2 * width * C)
                if b < OW:
                    width = OW - b + 2 * DW
                    _fill_band(xf, band, n, h0, DH, b - PL, width, H, W, C)
                    _nine_taps_grouped(band, yf, wtf, bias, has_bias, zeros, row, -b * C,
                                       b, OW, C, 1, DW, width * C, 2 * width * C)
            elif nine and inside and hi > lo:
                if grouped and hi - lo >= _MIN_STRIDED_RUN:
                    _nine_taps_grouped(xf, yf, wtf, bias, has_bias, zeros, row,
                                       ((n * H + h0) * W - PL) * C, lo, hi, C, SW, DW,
                                       DH * W * C, 2 * DH * W * C)
                else:
                    _nine_taps(xf, yf, wtf, bias, has_bias, row,
                               ((n * H + h0) * W - PL) * C, lo, hi, C, SW, DW, DH * W * C,
                               2 * DH * W * C, grouped)
                _columns(xf, yf, wtf, bias, has_bias, stage, o, n, oh, 0, lo, H, W, C, OH,
                         OW, KH, KW, SH, SW, DH, DW, PT, PL, col_lo, col_hi, grouped)
                _columns(xf, yf, wtf, bias, has_bias, stage, o, n, oh, hi, OW, H, W, C, OH,
                         OW, KH, KW, SH, SW, DH, DW, PT, PL, col_lo, col_hi, grouped)
            else:
                _columns(xf, yf, wtf, bias, has_bias, stage, o, n, oh, 0, OW, H, W, C, OH,
                         OW, KH, KW, SH, SW, DH, DW, PT, PL, col_lo, col_hi, grouped)


@njit(**_JIT)
def _input_grad_strided(gy, wt, gx, KH, KW, SH, SW, DH, DW, PT, PL, workers):
    """``gx[n, h, wc, c]``: every output cell whose window read ``(h, wc)``, in the
    channels-first scatter's order (output rows ascending, then kernel columns)."""
    N, OH, OW, C = gy.shape
    H, W = gx.shape[1], gx.shape[2]
    rows = N * H
    gyf, gxf, wtf = gy.reshape(-1), gx.reshape(-1), wt.reshape(-1)
    for worker in prange(workers):
        for t in range(worker * rows // workers, (worker + 1) * rows // workers):
            n = t // H
            h = t - n * H
            for wc in range(W):
                xo = ((n * H + h) * W + wc) * C
                for c in range(C):
                    gxf[_U(xo + c)] = 0.0
                for i in range(KH - 1, -1, -1):  # output rows ascending
                    rh = h + PT - i * DH
                    if rh < 0 or rh % SH != 0 or rh // SH >= OH:
                        continue
                    oh = rh // SH
                    for j in range(KW):
                        rw = wc + PL - j * DW
                        if rw < 0 or rw % SW != 0 or rw // SW >= OW:
                            continue
                        yo = ((n * OH + oh) * OW + rw // SW) * C
                        wo = (i * KW + j) * C
                        for c in range(C):
                            gxf[_U(xo + c)] += wtf[_U(wo + c)] * gyf[_U(yo + c)]


@njit(**_JIT)
def _weight_grad(x, gy, partial, KH, KW, SH, SW, DH, DW, PT, PL):
    """``partial[k, tap, c]``: chunk ``k``'s sum over its output rows of
    ``gy[n, oh, ow, c] * x[n, h, wc, c]`` for each tap."""
    N, H, W, C = x.shape
    OH, OW = gy.shape[1], gy.shape[2]
    rows = N * OH
    chunks = partial.shape[0]
    xf, gyf = x.reshape(-1), gy.reshape(-1)
    for k in prange(chunks):
        lanes = partial[k].reshape(-1)
        lanes[:] = 0
        for t in range(k * rows // chunks, (k + 1) * rows // chunks):
            n = t // OH
            oh = t - n * OH
            for i in range(KH):
                h = oh * SH - PT + i * DH
                if h < 0 or h >= H:
                    continue
                for ow in range(OW):
                    yo = ((n * OH + oh) * OW + ow) * C
                    for j in range(KW):
                        wc = ow * SW - PL + j * DW
                        if wc < 0 or wc >= W:
                            continue
                        xo = ((n * H + h) * W + wc) * C
                        lo = (i * KW + j) * C
                        for c in range(C):
                            lanes[_U(lo + c)] += gyf[_U(yo + c)] * xf[_U(xo + c)]


@njit(**_JIT)
def _bias_grad(gy, out):
    """``out[c] = sum of gy[m, c]`` over pixels ``m`` in order, in float64, one block of
    channels per task."""
    M, C = gy.shape
    gyf = gy.reshape(-1)
    block = 16
    for b in prange((C + block - 1) // block):
        c0 = b * block
        c1 = min(c0 + block, C)
        totals = np.zeros(block, np.float64)
        for m in range(M):
            for c in range(c0, c1):
                totals[c - c0] += gyf[_U(m * C + c)]
        for c in range(c0, c1):
            out[c] = totals[c - c0]


def pixels(a, batched):
    """The ``(N, H, W, C)`` buffer behind a channels-last ``(N, C, H, W)`` array (or
    unbatched ``(C, H, W)``) as a view, or None when its buffer is not exactly that."""
    moved = (a if batched else a[None]).transpose(0, 2, 3, 1)  # np.moveaxis: 2.5 us
    if not (moved.flags.c_contiguous and moved.flags.writeable and moved.dtype.isnative):
        return None
    return moved


def _taps(weight):
    """``(C, 1, KH, KW)`` -> ``(KH * KW, C)``."""
    return np.ascontiguousarray(weight.reshape(weight.shape[0], -1).T)


def _empty_like_last(batch, size, channels, dtype):
    """A new ``(N, *size, C)`` buffer and its ``(N, C, *size)`` view."""
    buffer = np.empty((batch,) + size + (channels,), dtype)
    return buffer, buffer.transpose(0, 3, 1, 2)


def _run_forward(problem, x4, wt, bias, y4, workers):
    p = problem
    has_bias = bias is not None
    loop_on_one_thread(
        _forward, x4, wt, np.ascontiguousarray(bias) if has_bias else np.zeros(1, x4.dtype),
        has_bias, y4, p.kernel_h, p.kernel_w, p.stride_h, p.stride_w, p.dilation_h,
        p.dilation_w, p.pad_top, p.pad_left, *p.column_range(), p.plane_args is not None,
        workers)


def forward(x4, weight, bias, problem, workers):
    """The channels-last ``(N, C, OH, OW)`` output of the depthwise convolution of the
    ``(N, H, W, C)`` buffer ``x4``."""
    y4, y = _empty_like_last(problem.batch, (problem.out_h, problem.out_w),
                             problem.out_channels, x4.dtype)
    _run_forward(problem, x4, _taps(weight), bias, y4, workers)
    return y


def backward(gy4, x4, weight, problem, transposed, output_mask, workers):
    """``(grad_input, grad_weight, grad_bias)`` from ``(N, OH, OW, C)`` / ``(N, H, W, C)``
    buffers, None where ``output_mask`` is False; ``transposed`` is the stride-1 input
    gradient's problem (``_Problem.input_grad``)."""
    want_input, want_weight, want_bias = output_mask
    p = problem
    wt = _taps(weight)
    grad_input = grad_weight = grad_bias = None
    if want_input:
        gx4, grad_input = _empty_like_last(p.batch, (p.in_h, p.in_w), p.in_channels,
                                           gy4.dtype)
        if p.stride_h == p.stride_w == 1 and p.unit_stride_planes():
            _run_forward(transposed, gy4, np.ascontiguousarray(wt[::-1]), None, gx4,
                         workers)
        else:
            loop_on_one_thread(_input_grad_strided, gy4, wt, gx4, p.kernel_h,
                               p.kernel_w, p.stride_h, p.stride_w, p.dilation_h,
                               p.dilation_w, p.pad_top, p.pad_left, workers)
    if want_weight:
        rows = p.batch * p.out_h
        chunks = max(1, min(rows, _MAX_CHUNKS, _PARTIAL_BYTES // max(1, wt.nbytes)))
        partial = kept_empty((chunks,) + wt.shape, gy4.dtype)
        loop_on_one_thread(_weight_grad, x4, gy4, partial, p.kernel_h, p.kernel_w,
                           p.stride_h, p.stride_w, p.dilation_h, p.dilation_w, p.pad_top,
                           p.pad_left)
        summed = np.empty(wt.shape, gy4.dtype)
        loop_on_one_thread(_sum_partials, partial.reshape(chunks, -1), summed)
        grad_weight = np.ascontiguousarray(summed.T).reshape(weight.shape)
    if want_bias:
        grad_bias = np.empty(p.out_channels, gy4.dtype)
        loop_on_one_thread(_bias_grad, gy4.reshape(-1, p.out_channels), grad_bias)
    return grad_input, grad_weight, grad_bias

