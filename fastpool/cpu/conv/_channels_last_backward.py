"""The backward of channels-last convolutions that are neither pointwise nor depthwise,
on the ``(N, H, W, C)`` buffers in place.

The channels-first backward needs ``x`` and ``grad_output`` copied to ``(N, C, H, W)``
and the input gradient copied back: three passes over memory the size of the layer's
activations before and after the arithmetic.

- **Weight gradient** (``_weight_grad``): for each image, output row ``oh`` and kernel
  row ``i``, the input row ``oh*SH + i*DH - PT``'s taps are gathered as ``OW`` rows of
  ``KW * C_g`` values (a pixel's channels are contiguous in the buffer, so each tap is
  one contiguous run), and one GEMM of fastpool's own (``_microkernel``) adds
  ``grad_output[n, oh]^T`` (read in place by columns: ``O x OW``) times them into that
  kernel row's accumulator. Each weight-gradient element is then one chain of fused
  multiply-adds over ``(n, oh, ow)`` in order, whatever the block of output channels
  or the thread; chunks of images are fixed by the shapes, as on the channels-first
  path, and added in chunk order. The sums are not those of the channels-first path
  (BLAS), so the two layouts agree to rounding.
- **Input gradient**, as the channels-first path (``_input_grad``) would compute it
  and with its bits: where that is a Winograd or im2col forward of ``grad_output``
  (stride 1), the channels-last forwards, in place; where it is col2im (strided, or
  after an im2col forward), ``_col2im`` here: the same columns (each one chain over
  the output channels) from ``grad_output``'s pixels read in place, each input cell
  adding its terms in kernel-tap order. Elsewhere (``rows`` and direct forwards of
  ``grad_output``) ``grad_output`` is copied to channels-first once and the
  channels-first kernels run.
- **Bias gradient**: every pixel in order in float64, as on the channels-first path
  (``_channels_last_direct._bias_grad``): the same bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fastpool._malloc import kept_empty
from fastpool.cpu._microkernel import (FROM_C, FROM_COLUMN_INIT, MR, aligned_empty,
                                      gemm_batch, lanes, padded, padded_host)
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu.conv._planner import _U

# Output channels per task at least: each task gathers the input rows again.
_BLOCK_CHANNELS = 16
# Pixels per GEMM of the weight gradient (its depth), at least, where the gathered rows
# fit in ``_BAND_BYTES``: a GEMM as deep as one row of a 7x7 plane stored its tile of
# the accumulator every 7 steps (3x3 512->512 on 7x7, batch 8: 32 ms, BLAS 23).
_BAND_PIXELS = 256
_BAND_BYTES = 256 << 10
_RESIDENT_BYTES = 512 << 10


@njit(inline="always")
def _gather_row(xf, row, W, C, c0, Cg, KW, SW, DW, PL, OW, cols, at, ld):
    """``cols[at + ow*ld + j*Cg + c] = x[row, ow*SW + j*DW - PL, c0 + c]`` (0 outside
    the row); ``row`` is the flat index of the input row ``n * H + h``."""
    lo, hi = OW, OW  # columns whose taps are one run of the row: all channels, DW 1
    if DW == 1 and Cg == C:
        lo = min(OW, -(-PL // SW))
        hi = max(lo, min(OW, (W - KW + PL) // SW + 1))
    for ow in range(lo, hi):
        src = (row * W + ow * SW - PL) * C
        dst = at + ow * ld
        for e in range(KW * C):  # (first layer, 3 channels: the gather took as long as
            cols[_U(dst + e)] = xf[_U(src + e)]  # the GEMM, tap by tap)
    for ow in range(OW):
        if lo <= ow < hi:
            continue
        for j in range(KW):
            w = ow * SW + j * DW - PL
            dst = at + ow * ld + j * Cg
            if 0 <= w < W:
                src = (row * W + w) * C + c0
                for c in range(Cg):
                    cols[_U(dst + c)] = xf[_U(src + c)]
            else:
                for c in range(Cg):
                    cols[_U(dst + c)] = 0


@parallel_kernel
@njit(**BODY_JIT)
def _weight_grad(x, gy, partial, turned, o_blocks, unit, band_rows, G, KH, KW, SH, SW,
                 DH, DW, PT, PL, worker, workers):
    """``partial[chunk, g, i, o, j*C_g + c] = sum over the chunk's images n, rows oh
    and columns ow of gy[n, oh, ow, g*O_g + o] * x[n, oh*SH + i*DH - PT, ow*SW + j*DW
    - PL, g*C_g + c]`` (0 outside), over (chunk, group, block of output channels);
    ``x`` and ``gy`` are the ``(N, H, W, C)`` and ``(N, OH, OW, O)`` buffers. Each
    GEMM takes a band of ``band_rows`` output rows: their pixels are consecutive in
    ``gy``, read in place. ``turned``: the product is computed transposed,
    ``partial[chunk, g, i, j*C_g + c, o]``, gathered taps as the rows of ``A`` and
    ``gy``'s pixels as the rows of ``B`` (few taps, many output channels: the
    first layer's 3 channels x 7 taps as the columns left most of each tile
    empty); ``fma(a, b, c) == fma(b, a, c)``, so both give the same bits. Blocks
    of output channels are ``unit``s wide (a tile's rows, or one vector's columns: a
    48-column panel of the 64-byte tile split 64 channels 48:16 between two
    threads)."""
    N, H, W, C = x.shape
    OH, OW, O = gy.shape[1], gy.shape[2], gy.shape[3]
    Cg = C // G
    Og = O // G
    KWC = KW * Cg
    chunks = partial.shape[0]
    tasks = chunks * G * o_blocks
    xf = x.reshape(-1)
    gf = gy.reshape(-1)
    pf = partial.reshape(-1)
    ld = padded(KWC, xf)  # gathered rows start on cache lines
    cols = aligned_empty(band_rows * OW * ld, xf)
    per_group = KH * Og * KWC
    size = (-(-Og // o_blocks) + unit - 1) // unit * unit  # whole tiles
    for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
        chunk = t // (G * o_blocks)
        g = (t // o_blocks) % G
        block = t % o_blocks
        o0 = min(Og, block * size)
        o1 = Og if block == o_blocks - 1 else min(Og, o0 + size)
        if o1 <= o0:
            continue
        base = (chunk * G + g) * per_group
        for i in range(KH):
            if turned:
                for e in range(KWC):
                    for o in range(o0, o1):
                        pf[_U(base + (i * KWC + e) * Og + o)] = 0
            else:
                for e in range((i * Og + o0) * KWC, (i * Og + o1) * KWC):
                    pf[_U(base + e)] = 0
        # the chunk's output rows (image by image) in bands: consecutive pixels of gy
        q_end = (chunk + 1) * N // chunks * OH
        for q0 in range(chunk * N // chunks * OH, q_end, band_rows):
            rows = min(band_rows, q_end - q0)
            a_off = q0 * OW * O + g * Og + o0
            for i in range(KH):
                inside = False
                for r in range(rows):
                    n = (q0 + r) // OH
                    h = (q0 + r - n * OH) * SH + i * DH - PT
                    if 0 <= h < H:
                        _gather_row(xf, n * H + h, W, C, g * Cg, Cg, KW, SW, DW, PL, OW,
                                    cols, r * OW * ld, ld)
                        inside = True
                    else:
                        for e in range(r * OW * ld, (r + 1) * OW * ld):
                            cols[_U(e)] = 0
                if not inside:
                    continue
                if turned:
                    gemm_batch(KWC, o1 - o0, rows * OW, cols, 0, 1, ld, gf, a_off, O, pf,
                               base + i * KWC * Og + o0, Og, pf, 0, 1, 0, 0, FROM_C)
                else:
                    gemm_batch(o1 - o0, KWC, rows * OW, gf, a_off, 1, O, cols, 0, ld, pf,
                               base + (i * Og + o0) * KWC, KWC, pf, 0, 1, 0, 0, FROM_C)


def weight_grad(x4, gy4, weight_shape, problem, workers, sum_partials):
    """The ``(O, C_g, KH, KW)`` weight gradient from the ``(N, H, W, C)`` input and
    ``(N, OH, OW, O)`` gradient buffers; ``sum_partials(partial, out)`` adds the
    chunks' partial sums in order."""
    p = problem
    O, Cg, KH, KW = weight_shape
    G = p.groups
    weight_bytes = int(np.prod(weight_shape)) * x4.itemsize
    # One chunk where a group's accumulators outgrow L2: they are streamed through once
    # per GEMM, so the GEMMs run deep across images, and blocks of output channels give
    # the threads their work (3x3 512->512 on 7x7, batch 8, one image per chunk: 29 ms)
    chunks = (1 if weight_bytes // G > _RESIDENT_BYTES
              else p.weight_grad_chunks(weight_bytes))
    Og, KWC = O // G, KW * Cg
    turned = KWC < Og
    partial = kept_empty((chunks, G, KH) + ((KWC, Og) if turned else (Og, KWC)), x4.dtype)
    # Blocks of output channels only where chunks and groups are fewer than the
    # threads: each block gathers the rows again. They change which thread computes
    # an element, never its sum.
    blocks = max(1, min(-(-2 * workers // (chunks * G)),
                        p.outputs_per_group // _BLOCK_CHANNELS))
    row_bytes = p.out_w * padded_host(KW * Cg, x4.dtype) * x4.itemsize
    band = max(1, min(-(-_BAND_PIXELS // p.out_w), _BAND_BYTES // row_bytes))
    _weight_grad(x4, gy4, partial, turned, blocks,
                 lanes(x4.itemsize) if turned else MR, band, G, KH, KW,
                 p.stride_h, p.stride_w,
                 p.dilation_h, p.dilation_w, p.pad_top, p.pad_left,
                 max(1, min(workers, chunks * G * blocks)))
    summed = np.empty(partial.shape[1:], x4.dtype)
    sum_partials(partial.reshape(chunks, -1), summed)
    # (G, KH, O_g, KW, C_g) or (G, KH, KW, C_g, O_g) -> (G, O_g, C_g, KH, KW)
    if turned:
        ordered = summed.reshape(G, KH, KW, Cg, Og).transpose(0, 4, 3, 1, 2)
    else:
        ordered = summed.reshape(G, KH, Og, KW, Cg).transpose(0, 2, 4, 1, 3)
    return np.ascontiguousarray(ordered).reshape(weight_shape)


@parallel_kernel
@njit(**BODY_JIT)
def _col2im(gy, wr, gx, band_rows, G, KH, KW, SH, SW, DH, DW, PT, PL, col_lo, col_hi,
            worker, workers):
    """``gx`` (``(N, H, W, C)``) = col2im of ``grad_output @ W_g`` over (image, group,
    band of input rows): the columns ``cols[(oh, ow), (i, j, c)]`` of the output rows
    a band reaches, one chain of fused multiply-adds over the output channels each
    (``gy``'s pixels read in place as the rows of ``A``, ``wr`` the ``(G*O_g, ld)``
    weight laid out ``(i, j, c)``), then each input cell of the band gets its terms
    in kernel-tap order: the channels-first col2im's products and order, so its
    bits."""
    N, OH, OW, O = gy.shape
    H, W, C = gx.shape[1], gx.shape[2], gx.shape[3]
    Cg = C // G
    Og = O // G
    K = KH * KW * Cg
    ld = wr.shape[1]
    bands = (H + band_rows - 1) // band_rows
    tasks = N * G * bands
    gf = gy.reshape(-1)
    xf = gx.reshape(-1)
    wf = wr.reshape(-1)
    most = (band_rows - 1 + (KH - 1) * DH) // SH + 2  # output rows a band reaches
    cols = aligned_empty(most * OW * ld, gf)
    zeros = np.zeros(ld, gf.dtype)
    for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
        n = t // (G * bands)
        g = (t // bands) % G
        h0 = (t % bands) * band_rows
        h1 = min(H, h0 + band_rows)
        lowest = h0 + PT - (KH - 1) * DH
        oh_lo = max(0, -(-lowest // SH))
        oh_hi = min(OH, (h1 - 1 + PT) // SH + 1)
        if oh_hi > oh_lo:
            gemm_batch((oh_hi - oh_lo) * OW, K, Og, gf, ((n * OH + oh_lo) * OW) * O
                       + g * Og, O, 1, wf, g * Og * ld, ld, cols, 0, ld, zeros, 0, 1, 0,
                       0, FROM_COLUMN_INIT)
        for h in range(h0, h1):
            row = (n * H + h) * W * C + g * Cg
            for w in range(W):
                for c in range(Cg):
                    xf[_U(row + w * C + c)] = 0
            for i in range(KH):
                top = h + PT - i * DH
                if top < 0 or top % SH != 0 or top // SH >= OH:
                    continue
                oh = top // SH
                for j in range(KW):
                    offset = j * DW - PL
                    for ow in range(col_lo[j], col_hi[j]):
                        src = ((oh - oh_lo) * OW + ow) * ld + (i * KW + j) * Cg
                        dst = row + (ow * SW + offset) * C
                        for c in range(Cg):
                            xf[_U(dst + c)] += cols[_U(src + c)]


# The columns a band of input rows reaches, at most (per thread).
_COLUMN_BYTES = 1 << 20


def input_grad_col2im(gy4, weight, problem, workers):
    """The channels-last ``(N, C, H, W)`` input gradient of a strided (or im2col)
    convolution from the ``(N, OH, OW, O)`` gradient buffer, by ``_col2im``."""
    p = problem
    O, Cg, KH, KW = weight.shape
    G = p.groups
    K = KH * KW * Cg
    ld = padded_host(K, weight.dtype)
    wr = np.zeros((O, ld), weight.dtype)
    wr[:, :K] = weight.transpose(0, 2, 3, 1).reshape(O, K)
    N = p.batch
    per_row = p.out_w * ld * weight.itemsize
    reach = ((KH - 1) * p.dilation_h) // p.stride_h + 2
    rows = max(1, (max(1, _COLUMN_BYTES // per_row) - reach + 1) * p.stride_h)
    # a band for every thread
    bands = max(-(-p.in_h // rows), min(p.in_h, -(-workers // (N * G))))
    rows = -(-p.in_h // bands)
    gx4 = np.empty((N, p.in_h, p.in_w, p.in_channels), gy4.dtype)
    _col2im(gy4, wr, gx4, rows, G, KH, KW, p.stride_h, p.stride_w, p.dilation_h,
            p.dilation_w, p.pad_top, p.pad_left, *p.column_range(),
            max(1, min(workers, N * G * -(-p.in_h // rows))))
    return gx4.transpose(0, 3, 1, 2)
