"""The ``"im2col"`` forward on channels-last buffers: columns gathered from the
``(N, H, W, C)`` input, results written straight into an ``(N, OH, OW, C_out)`` output.

The channels-first kernels would need the input copied to ``(N, C, H, W)`` and the
result copied back: for a first layer (3x3 3->64 on 224x224, batch 1) the copy of the
result alone took 5.7 ms on this project's 2-core machine, the convolution 1.3.

Per band of output rows: the band's columns are gathered from the channels-last input
in blocks of pixels x channels transposed in vector registers (each pixel's channels
are contiguous there, each column row's pixels here), the channels-first GEMM of
``"im2col"`` runs into a band-sized buffer (the same products in the same order: both
layouts give the same bits), and the band is stored into the output's pixel rows the
same way, while it is in cache. With at most ``_FEW_CHANNELS`` channels a group and a
kernel larger than 1x1 (first layers) the columns are gathered from a channels-first
copy of the input instead (``_gemm._gather_columns``, compiled into this module's
kernel: Numba's disk cache does not see changes to it or to ``_gemm._S2_MIN_WIDTH``;
clear ``fastpool/cpu/conv/__pycache__`` after changing them).
Computing the transposed product instead (pixels as GEMM rows) read the weight from
memory once per block of 96 pixels: 3x3 512->512 on 14x14 ran 7.2 ms against 5.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fastpool.cpu._arrays import contiguous
from fastpool.cpu._microkernel import (FROM_COLUMN_INIT, aligned_empty, gemm, gemm_batch,
                                      padded, padded_host)
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu._transpose import block, side_of
from fastpool.cpu.conv._gemm import _gather_columns, _transpose_groups, band_task
from fastpool.cpu.conv._planner import _U

# A group's weight up to this size runs the product turned over (pixels as its rows,
# written straight into the output): each block of 96 pixels reads all of it, from L2.
_TURNED_WEIGHT_BYTES = 256 << 10
# Channels per group up to which the columns are gathered from a channels-first copy
# of the input: a pixel's few channels are not a vector, so ``_gather`` reads them one
# value at a time, KH * KW times each, where the channels-first gather copies whole
# rows (and, at stride 2, splits each row's phases once).
_FEW_CHANNELS = 8


@njit(inline="always")
def _gather(x, xf, n, c0, channels, oh0, rows, KH, KW, SH, SW, DH, DW, PT, PL, OW,
            col_lo, col_hi, cols, ld):
    """``cols[((c*KH + i)*KW + j)*ld + r*OW + ow] = x[n, h, w, c0 + c]`` with ``h =
    (oh0 + r)*SH + i*DH - PT``, ``w = ow*SW + j*DW - PL``; 0 outside the input.
    ``x`` is the ``(N, H, W, C)`` buffer, C-contiguous, ``xf`` its flat view. Where a
    pixel has more than 8 channels, blocks of pixels x channels are transposed in
    vector registers (``_transpose.block``): read one value at a time at the stride of
    the pixels, LLVM left the copy scalar (the whole call, with the band's store done
    the same way: 3x3 s2 64->128 on 56x56, batch 1, 2 threads, 0.94 -> 0.72 ms)."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    taps = KH * KW
    for r in range(rows):
        for i in range(KH):
            h = (oh0 + r) * SH + i * DH - PT
            for j in range(KW):
                base = (i * KW + j) * ld + r * OW
                lo, hi = col_lo[j], col_hi[j]
                if h < 0 or h >= H:
                    lo, hi = OW, OW
                for c in range(channels):
                    dst = base + c * taps * ld
                    for ow in range(lo):
                        cols[_U(dst + ow)] = 0
                    for ow in range(hi, OW):
                        cols[_U(dst + ow)] = 0
                if hi <= lo:
                    continue
                src = x[n, h]
                offset = j * DW - PL
                if channels <= 8:
                    # a pixel's few channels one after another (3 input channels,
                    # 7x7 s2 on 224x224: the gather 1.23 -> 0.47 ms on one thread;
                    # 6 channels, 5x5 on 14x14: the call 51 -> 48 us)
                    for ow in range(lo, hi):
                        w = ow * SW + offset
                        for c in range(channels):
                            cols[_U(base + c * taps * ld + ow)] = src[_U(w), _U(c0 + c)]
                    continue
                # blocks of ``side`` pixels x ``side`` channels transposed in vector
                # registers; the remainders one value at a time
                side = side_of(cols)
                ow_end = hi - (hi - lo) % side
                c_end = channels - channels % side
                row = (n * H + h) * W * C + c0
                for ow0 in range(lo, ow_end, side):
                    at = row + (ow0 * SW + offset) * C
                    for c in range(0, c_end, side):
                        block(xf, at + c, SW * C, cols, base + c * taps * ld + ow0,
                              taps * ld)
                for c in range(c_end, channels):
                    dst = base + c * taps * ld
                    for ow in range(lo, ow_end):
                        cols[_U(dst + ow)] = src[_U(ow * SW + offset), _U(c0 + c)]
                for c in range(channels):
                    dst = base + c * taps * ld
                    for ow in range(ow_end, hi):
                        cols[_U(dst + ow)] = src[_U(ow * SW + offset), _U(c0 + c)]


@parallel_kernel
@njit(**BODY_JIT)
def _im2col_forward(x, xc, w, wt, bias, y, rows_per_band, m_blocks, images, G,
                    KH, KW, SH, SW, DH, DW, PT, PL, col_lo, col_hi, worker, workers):
    """``y[n, oh, ow, o] = bias[o] + conv(x)`` over (image, group, band of output
    rows, block of output channels); ``x`` is the ``(N, H, W, C)`` input, ``w`` the weight (``O x C_g*KH*KW``),
    ``bias`` the bias or zeros, ``y`` the ``(N, OH, OW, O)`` output. With ``wt`` (each
    group's ``W_g^T``, ``C_g*KH*KW x O_g``; empty: not given) the product is turned
    over, pixels as its rows, written straight into ``y``; else it runs into a band
    buffer stored into ``y`` in transposed blocks. ``xc``:
    empty, or ``x`` copied channels-first (``(N, C, H, W)``), gathered from instead
    (``_FEW_CHANNELS``). Tasks take runs of ``images`` images (whole planes:
    ``_Problem.im2col_images``), their columns side by side: the run's
    pixels are consecutive rows of ``y``, so it is one product of their pixels."""
    N, H, W, C = x.shape
    OH, OW, O = y.shape[1], y.shape[2], y.shape[3]
    Cg = C // G
    Og = O // G
    K = Cg * KH * KW
    bands = (OH + rows_per_band - 1) // rows_per_band
    tasks = (N + images - 1) // images * G * bands * m_blocks
    yf = y.reshape(-1)
    ld = padded(images * rows_per_band * OW, yf)
    turned = wt.size > 0
    ldw = wt.size // (G * K) if turned else 0  # rows of each W_g^T
    xf = x.reshape(-1)
    cols = aligned_empty(K * ld, yf)
    band = aligned_empty(0 if turned else Og * ld, yf)
    gathered = -1  # the band whose columns ``cols`` holds
    for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
        mb, b, run, g, oh0, rows = band_task(t, m_blocks, G, bands, rows_per_band, OH)
        n = run * images
        count = min(images, N - n)
        pixels = rows * OW
        o0 = g * Og + mb * Og // m_blocks
        m = g * Og + (mb + 1) * Og // m_blocks - o0
        out = (n * OH + oh0) * OW * O + o0
        if b != gathered:
            for i in range(count):
                if xc.size > 0:
                    _gather_columns(xc, n + i, g * Cg, Cg, oh0 * SH - PT, SH, rows, KH,
                                    DH, KW, SW, DW, PL, OW, col_lo, col_hi,
                                    cols[i * pixels:], ld)
                else:
                    _gather(x, xf, n + i, g * Cg, Cg, oh0, rows, KH, KW, SH, SW, DH, DW,
                            PT, PL, OW, col_lo, col_hi, cols[i * pixels:], ld)
            gathered = b
        pixels *= count
        if turned:
            gemm_batch(pixels, m, K, cols, 0, 1, ld, wt, g * K * ldw + o0 - g * Og, ldw,
                       yf, out, O, bias, o0, 1, 0, 0, FROM_COLUMN_INIT)
            continue
        gemm(m, pixels, K, w, o0 * K, K, cols, 0, ld, band, 0, ld, bias, o0)
        # the band's pixels into the output's pixel rows: blocks of pixels x channels
        # transposed in vector registers, the remainders one value at a time
        side = side_of(band)
        p_end = pixels - pixels % side
        m_end = m - m % side
        for p0 in range(0, p_end, side):
            for o in range(0, m_end, side):
                block(band, o * ld + p0, ld, yf, out + p0 * O + o, O)
            for o in range(m_end, m):
                for p in range(p0, p0 + side):
                    yf[_U(out + p * O + o)] = band[_U(o * ld + p)]
        for o in range(m):
            for p in range(p_end, pixels):
                yf[_U(out + p * O + o)] = band[_U(o * ld + p)]


def forward(x, weight, bias, problem, rows_per_band, m_blocks, workers):
    """``y`` (``(N, C_out, OH, OW)`` with channels-last strides) of the convolution of
    the channels-last ``x`` (``(N, C, H, W)``), by im2col."""
    N = x.shape[0]
    O = weight.shape[0]
    G = problem.groups
    weight = contiguous(weight)
    buffer = np.empty((N, problem.out_h, problem.out_w, O), x.dtype)
    bias = contiguous(bias) if bias is not None else np.zeros(O, x.dtype)
    if weight.nbytes // G <= _TURNED_WEIGHT_BYTES:
        ldw = padded_host(O // G, weight.dtype)
        wt = np.empty(G * (weight.size // O) * ldw, weight.dtype)
        _transpose_groups(weight, wt, G, ldw, 1)
    else:
        wt = np.empty(0, weight.dtype)
    bands = -(-problem.out_h // rows_per_band)
    # (a 1x1 kernel reads each value once: read in place)
    few = (problem.channels_per_group <= _FEW_CHANNELS
           and problem.kernel_h * problem.kernel_w > 1)
    xc = contiguous(x) if few else np.empty((0, 0, 0, 0), x.dtype)
    # runs of images need whole planes: their pixels are then consecutive rows of y
    images = (1 if rows_per_band < problem.out_h
              else problem.im2col_images(x.itemsize, workers))
    # transpose, not np.moveaxis (which normalises its arguments: 2.5 us a call)
    _im2col_forward(x.transpose(0, 2, 3, 1), xc, weight.reshape(-1), wt, bias, buffer,
                    rows_per_band, m_blocks, images, *problem.args,
                    max(1, min(workers, -(-N // images) * G * bands * m_blocks)))
    return buffer.transpose(0, 3, 1, 2)
