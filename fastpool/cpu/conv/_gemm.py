"""The GEMM family of CPU convolution kernels (``"pointwise"``, ``"rows"``,
``"im2col"``): gathering a band's input columns (im2col) and scattering them back
(col2im), the forward, input-gradient and weight-gradient GEMM kernels, and the
reductions the weight and bias gradients end with.

GEMMs write straight into the output (``ldc``), one call per Numba thread. The
forwards run fastpool's own GEMM (``fastpool.cpu._microkernel``: each output one chain
of FMAs, the same bits however the work is cut); the gradients' products still run
single-threaded BLAS (``fastpool.cpu._blas``). Bands of output rows are sized
(``_planner._Problem.band_rows``) so the gathered columns stay in the core's L2 cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu._blas import gemm
from fastpool.cpu._microkernel import (FROM_ROW_INIT, MR, aligned_empty, gemm as own_gemm, gemm_add,
                                      gemm_batch as own_gemm_batch, padded)
from fastpool.cpu.conv._deinterleave import deinterleave
from fastpool.cpu.conv._planner import _JIT, _U, IM2COL, POINTWISE, ROWS


# ----------------------------------------------------------------------------- gather

# Output rows at least this wide take ``_gather_columns_s2``: on shorter ones its extra
# loops cost more than the strided reads (batch 1, 2 threads, minimum of 40 calls: 3x3
# s2 256->512 on 14x14, 7 columns, 0.82 -> 0.88 ms; 128->128 on 56x56, 28 columns, 1.56
# -> 1.52; 3->32 on 224x224 0.20 -> 0.18; the 7x7 stem 1.52 -> 1.42).
_S2_MIN_WIDTH = 16


@njit(inline="always")
def _gather_columns(x, n, c0, channels, h0, h_step, n_rows, taps_h, DH, KW, SW, DW, PL,
                    OW, col_lo, col_hi, cols, L):
    """``cols[((c*taps_h + i)*KW + j)*L + r*OW + ow] = x[n, c0+c, h, ow*SW + j*DW - PL]``
    with ``h = h0 + r*h_step + i*DH``, rows ``L >= n_rows * OW`` apart; 0 outside the
    input."""
    H = x.shape[2]
    if SW == 2 and DW == 1 and KW >= 2 and OW >= _S2_MIN_WIDTH:
        _gather_columns_s2(x, n, c0, channels, h0, h_step, n_rows, taps_h, DH, KW, PL,
                           OW, col_lo, col_hi, cols, L)
        return
    for c in range(channels):
        plane = x[n, c0 + c]
        for i in range(taps_h):
            for j in range(KW):
                dst = ((c * taps_h + i) * KW + j) * L
                offset = j * DW - PL
                lo = col_lo[j]
                hi = col_hi[j]
                for r in range(n_rows):
                    h = h0 + r * h_step + i * DH
                    base = dst + r * OW
                    if h < 0 or h >= H:
                        for ow in range(OW):
                            cols[_U(base + ow)] = 0
                        continue
                    src = plane[h]
                    for ow in range(lo):
                        cols[_U(base + ow)] = 0
                    if SW == 1:
                        for ow in range(lo, hi):
                            cols[_U(base + ow)] = src[_U(ow + offset)]
                    else:
                        for ow in range(lo, hi):
                            cols[_U(base + ow)] = src[_U(ow * SW + offset)]
                    for ow in range(hi, OW):
                        cols[_U(base + ow)] = 0


@njit(inline="always")
def _gather_columns_s2(x, n, c0, channels, h0, h_step, n_rows, taps_h, DH, KW, PL, OW,
                       col_lo, col_hi, cols, L):
    """``_gather_columns`` at stride 2 (no dilation): taps 0 and 1 of each kernel row
    read the input row's two column phases, in one loop (``deinterleave``); tap ``j >=
    2`` reads what tap ``j - 2`` read one output column later, so it is that row of
    ``cols`` shifted by one (a contiguous copy), but for a last column the shift does
    not reach. Batch 1 of 3x3 s2 128->128 on 56x56 gathers 0.9 million values."""
    H = x.shape[2]
    lo = max(col_lo[0], col_lo[1])
    hi = max(min(col_hi[0], col_hi[1]), lo)
    for c in range(channels):
        plane = x[n, c0 + c]
        for i in range(taps_h):
            first = (c * taps_h + i) * KW * L
            for r in range(n_rows):
                h = h0 + r * h_step + i * DH
                row0 = first + r * OW
                if h < 0 or h >= H:
                    for j in range(KW):
                        for ow in range(OW):
                            cols[_U(row0 + j * L + ow)] = 0
                    continue
                src = plane[h]
                deinterleave(src, -PL, cols, row0, row0 + L, lo, hi)
                for j in range(KW):
                    base = row0 + j * L
                    a = col_lo[j]
                    b = col_hi[j]
                    for ow in range(a):
                        cols[_U(base + ow)] = 0
                    if j < 2:
                        # the columns where only this tap of the pair lies inside
                        for ow in range(a, min(lo, b)):
                            cols[_U(base + ow)] = src[_U(ow * 2 + j - PL)]
                        for ow in range(max(hi, a), b):
                            cols[_U(base + ow)] = src[_U(ow * 2 + j - PL)]
                    else:
                        shifted = min(b, OW - 1)
                        for ow in range(a, shifted):
                            cols[_U(base + ow)] = cols[_U(base - 2 * L + ow + 1)]
                        for ow in range(max(shifted, a), b):
                            cols[_U(base + ow)] = src[_U(ow * 2 + j - PL)]
                    for ow in range(b, OW):
                        cols[_U(base + ow)] = 0


@njit(inline="always")
def _scatter_columns(cols, L, gx, n, c0, channels, h0, h_step, n_rows, KH, DH, KW, SW,
                     DW, PL, OW, col_lo, col_hi):
    """Inverse of ``_gather_columns`` with ``taps_h = KH`` (rows ``L`` apart): add
    every column entry back onto the input cell it was read from (cells outside the
    input are dropped), kernel tap by kernel tap."""
    H = gx.shape[2]
    for c in range(channels):
        plane = gx[n, c0 + c]
        for i in range(KH):
            for j in range(KW):
                src = ((c * KH + i) * KW + j) * L
                offset = j * DW - PL
                lo = col_lo[j]
                hi = col_hi[j]
                for r in range(n_rows):
                    h = h0 + r * h_step + i * DH
                    if h < 0 or h >= H:
                        continue
                    dst = plane[h]
                    base = src + r * OW
                    if SW == 1:
                        for ow in range(lo, hi):
                            dst[_U(ow + offset)] += cols[_U(base + ow)]
                    else:
                        for ow in range(lo, hi):
                            dst[_U(ow * SW + offset)] += cols[_U(base + ow)]


# ----------------------------------------------------------------------------- GEMM kernels

@njit(inline="always")
def _gemm_sizes(algorithm, Cg, KH, KW, DH, OW, rows_per_band):
    """The GEMMs' inner dimension and the gathered-column buffer size of one band."""
    if algorithm == ROWS:
        k_gemm = Cg * KW
        return k_gemm, k_gemm * (rows_per_band + DH * (KH - 1)) * OW
    if algorithm == IM2COL:
        k_gemm = Cg * KH * KW
        return k_gemm, k_gemm * rows_per_band * OW
    return Cg, 0  # pointwise reads the input in place


@njit(inline="always")
def band_task(t, m_blocks, G, bands, rows_per_band, OH):
    """Task ``t`` of a forward over (image, group, band of output rows, block of output
    channels): ``(block, band's index, image, group, first row, rows)``."""
    b = t // m_blocks
    oh0 = (b % bands) * rows_per_band
    return (t % m_blocks, b, b // (G * bands), (b // bands) % G, oh0,
            min(rows_per_band, OH - oh0))


@parallel_kernel
@njit(**BODY_JIT)
def _gemm_forward(x, w, bias, has_bias, y, algorithm, rows_per_band, m_blocks, images, G, KH, KW, SH, SW, DH, DW, PT, PL, col_lo, col_hi, worker, workers):
    """``y = conv(x, w) (+ bias)`` by GEMMs over (run of ``images`` images, group, band
    of output rows, block of output channels). Runs of several images (im2col, whole
    planes: ``_Problem.im2col_images``) gather their columns side by side (image ``i``
    from column ``i * pixels``) into one GEMM, whose products go to ``side`` and are
    copied out to each image."""
    N, C, H, W = x.shape
    O, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    Cg = C // G
    Og = O // G
    bands = (OH + rows_per_band - 1) // rows_per_band
    runs = (N + images - 1) // images
    tasks = runs * G * bands * m_blocks
    k_gemm, col_size = _gemm_sizes(algorithm, Cg, KH, KW, DH, OW, rows_per_band)
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    # im2col rows start on cache lines (``own_gemm``'s loads of B)
    ld = padded(images * rows_per_band * OW, yf)
    if algorithm == IM2COL:
        col_size = k_gemm * ld
    cols = aligned_empty(col_size, yf)
    # a run's products, its images side by side as in ``cols``
    side = aligned_empty(Og * images * OH * OW if images > 1 else 0, yf)
    # each output's chain of products starts from its bias, or from zero
    starts = bias if has_bias else np.zeros(O, x.dtype)
    # the band whose columns ``cols`` holds: a worker's tasks of one band (its blocks of
    # output channels) gather it once (batch 1 of 1x1 s2 256->512 on 14x14: 8 blocks,
    # each gathered the band again)
    gathered = -1
    for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
        mb, b, run, g, oh0, rows = band_task(t, m_blocks, G, bands, rows_per_band, OH)
        n = run * images
        pixels = rows * OW
        m0 = mb * Og // m_blocks
        m = (mb + 1) * Og // m_blocks - m0
        o0 = g * Og + m0  # first output channel of the task
        out = ((n * O + o0) * OH + oh0) * OW
        if algorithm == POINTWISE:
            own_gemm(m, pixels, Cg, w, o0 * Cg, Cg, xf, (n * C + g * Cg) * H * W + oh0 * W,
                     H * W, yf, out, OH * OW, starts, o0)
        elif algorithm == ROWS:
            n_rows = rows + DH * (KH - 1)
            if b != gathered:
                _gather_columns(x, n, g * Cg, Cg, oh0 - PT, 1, n_rows, 1, DH, KW, SW,
                                DW, PL, OW, col_lo, col_hi, cols, n_rows * OW)
                gathered = b
            # one chain per output: kernel rows in order, each over (channel, column)
            own_gemm(m, pixels, k_gemm, w, o0 * k_gemm, k_gemm, cols, 0, n_rows * OW, yf,
                     out, OH * OW, starts, o0)
            for i in range(1, KH):
                gemm_add(m, pixels, k_gemm, w, (i * O + o0) * k_gemm, k_gemm, cols,
                         i * DH * OW, n_rows * OW, yf, out, OH * OW)
        else:
            count = min(images, N - n)
            if b != gathered:
                for i in range(count):
                    _gather_columns(x, n + i, g * Cg, Cg, oh0 * SH - PT, SH, rows, KH,
                                    DH, KW, SW, DW, PL, OW, col_lo, col_hi,
                                    cols[i * pixels:], ld)
                gathered = b
            if images == 1:
                own_gemm(m, pixels, k_gemm, w, o0 * k_gemm, k_gemm, cols, 0, ld, yf, out,
                         OH * OW, starts, o0)
                continue
            own_gemm(m, count * pixels, k_gemm, w, o0 * k_gemm, k_gemm, cols, 0, ld, side,
                     0, count * pixels, starts, o0)
            for i in range(count):
                for o in range(m):
                    src = o * count * pixels + i * pixels
                    dst = out + (i * O + o) * OH * OW
                    for p in range(pixels):
                        yf[_U(dst + p)] = side[_U(src + p)]


@parallel_kernel
@njit(**BODY_JIT)
def _gather_images(x, cols, n0, count, g, G, KH, KW, SH, SW, DH, DW, PT, PL, col_lo,
                   col_hi, OH, OW, worker, workers):
    """``cols``: the whole im2col matrices (``C_g*KH*KW`` rows of ``OH*OW``) of group
    ``g`` of images ``n0 .. n0 + count - 1``, one after another; workers take shares of
    the (image, channel) pairs."""
    Cg = x.shape[1] // G
    ld = padded(OH * OW, cols)
    rows = KH * KW * ld
    pairs = count * Cg
    first = worker * pairs // workers
    last = (worker + 1) * pairs // workers
    while first < last:
        t = first // Cg
        c0 = first - t * Cg
        c1 = min(Cg, c0 + last - first)
        _gather_columns(x, n0 + t, g * Cg + c0, c1 - c0, -PT, SH, OH, KH, DH, KW, SW, DW,
                        PL, OW, col_lo, col_hi, cols[(t * Cg + c0) * rows:], ld)
        first += c1 - c0


@parallel_kernel
@njit(**BODY_JIT)
def _gemm_channel_blocks(w, b, b_off, b_step, ldb, starts, y, n0, count, g, G, parts,
                         worker, workers):
    """``y[n, group g] = starts + W_g @ B_n`` for images ``n0 .. n0 + count - 1``
    (fastpool's own GEMM), ``B_n`` (``K x OH*OW``, rows ``ldb`` apart) at
    ``b[b_off + (n - n0)*b_step:]``;
    the group's output channels cut into ``parts`` blocks of whole tiles, workers
    taking shares of them. Each block of the weight serves every image."""
    O = y.shape[1]
    P = y.shape[2] * y.shape[3]
    Og = O // G
    K = w.size // O
    yf = y.reshape(-1)
    tiles = (Og + MR - 1) // MR
    for part in range(worker * parts // workers, (worker + 1) * parts // workers):
        m0 = min(part * tiles // parts * MR, Og)
        m1 = min((part + 1) * tiles // parts * MR, Og)
        if m1 > m0:
            o0 = g * Og + m0
            own_gemm_batch(m1 - m0, P, K, w, o0 * K, K, 1, b, b_off, ldb, yf,
                           (n0 * O + o0) * P, P, starts, o0, count, b_step, O * P,
                           FROM_ROW_INIT)


@parallel_kernel
@njit(**BODY_JIT)
def _transpose_groups(w, wt, G, ld, worker, workers):
    """``wt[(g*K + k)*ld + o] = w[g*O_g + o, k]`` (each group's ``W_g^T``, its rows
    ``ld >= O_g`` apart), in blocks of 16x16 values."""
    O = w.shape[0]
    K = w.size // O
    Og = O // G
    wf = w.reshape(-1)
    blocks_o = (Og + 15) // 16
    tasks = G * blocks_o
    for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
        g = t // blocks_o
        o0 = (t % blocks_o) * 16
        o1 = min(o0 + 16, Og)
        for k0 in range(0, K, 16):
            k1 = min(k0 + 16, K)
            for k in range(k0, k1):
                for o in range(o0, o1):
                    wt[_U((g * K + k) * ld + o)] = wf[_U((g * Og + o) * K + k)]


@parallel_kernel
@njit(**BODY_JIT)
def _gemm_backward_input(grad_output, a, a_row, a_col, grad_input, rows_per_band,
                         channel_blocks, images, G, KH, KW, SH, SW, DH, DW, PT, PL, col_lo,
                         col_hi, worker, workers):
    """``grad_input = col2im(W_g^T @ grad_output)`` over (group, block of input
    channels: the blocks scatter onto disjoint planes, run of ``images`` images).
    ``W_g^T[i, o]`` is at ``a[g*O_g*K + i*a_row + o*a_col]``: a transposed copy of the
    weight (``_transpose_groups``), or the weight itself read by columns (one image: the
    copy would cost as much as the product).

    Runs of several images (whole planes, ``rows_per_band = OH``) are copied side by
    side into the columns of one GEMM, which reads ``W_g^T`` once for all of them and
    fills its panels of 16 columns better (a 7x7 plane's 49 pixels fill 3 of 4).

    Each input cell gets its terms in kernel-tap order, however the output rows are cut
    into bands (a Dask chunk's call has other bands than the whole call): the bands run
    from the last up, and a later output row reaches a cell through an earlier kernel
    row; within a band ``_scatter_columns`` adds tap by tap. Each term is one chain of
    fused multiply-adds over the output channels (fastpool's own GEMM)."""
    N, C, H, W = grad_input.shape
    O, OH, OW = grad_output.shape[1], grad_output.shape[2], grad_output.shape[3]
    Cg = C // G
    Og = O // G
    K = Cg * KH * KW
    taps = KH * KW
    bands = (OH + rows_per_band - 1) // rows_per_band
    gf = grad_output.reshape(-1)
    ld = padded(images * rows_per_band * OW, gf)
    zeros = np.zeros(K, gf.dtype)
    runs = (N + images - 1) // images
    tasks = runs * G * channel_blocks
    most = (Cg + channel_blocks - 1) // channel_blocks
    cols = aligned_empty(most * taps * ld, gf)
    band = aligned_empty(Og * ld if images > 1 else 0, gf)
    for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
        block = t % channel_blocks
        g = (t // channel_blocks) % G
        n0 = t // (G * channel_blocks) * images
        count = min(images, N - n0)
        c0 = block * Cg // channel_blocks
        channels = (block + 1) * Cg // channel_blocks - c0
        for n in range(n0, n0 + count):
            for c in range(channels):
                grad_input[n, g * Cg + c0 + c] = 0
        for b in range(bands - 1, -1, -1):
            oh0 = b * rows_per_band
            rows = min(rows_per_band, OH - oh0)
            pixels = rows * OW
            first = ((n0 * O + g * Og) * OH + oh0) * OW
            a_off = g * Og * K + c0 * taps * a_row
            if images == 1:
                own_gemm_batch(channels * taps, pixels, Og, a, a_off, a_row, a_col, gf,
                               first, OH * OW, cols, 0, ld, zeros, 0, 1, 0, 0,
                               FROM_ROW_INIT)
            else:
                for o in range(Og):
                    for i in range(count):
                        src = first + (i * O + o) * OH * OW
                        dst = o * ld + i * pixels
                        for p in range(pixels):
                            band[_U(dst + p)] = gf[_U(src + p)]
                own_gemm_batch(channels * taps, count * pixels, Og, a, a_off, a_row, a_col,
                               band, 0, ld, cols, 0, ld, zeros, 0, 1, 0, 0,
                               FROM_ROW_INIT)
            for i in range(count):
                _scatter_columns(cols[i * pixels:], ld, grad_input, n0 + i, g * Cg + c0,
                                 channels, oh0 * SH - PT, SH, rows, KH, DH, KW, SW, DW, PL,
                                 OW, col_lo, col_hi)


@parallel_kernel
@njit(**BODY_JIT)
def _gemm_backward_weight(x, grad_output, partial, algorithm, rows_per_band, status,
                          G, KH, KW, SH, SW, DH, DW, PT, PL, col_lo, col_hi, worker,
                         workers):
    """``partial[chunk] = sum over the chunk's images of grad_output @ columns^T``, in
    the weight layout ``_Problem.gemm_weight`` gives for ``algorithm``."""
    N, C, H, W = x.shape
    O, OH, OW = grad_output.shape[1], grad_output.shape[2], grad_output.shape[3]
    Cg = C // G
    Og = O // G
    chunks = partial.shape[0]
    bands = (OH + rows_per_band - 1) // rows_per_band
    k_gemm, col_size = _gemm_sizes(algorithm, Cg, KH, KW, DH, OW, rows_per_band)
    xf = x.reshape(-1)
    gf = grad_output.reshape(-1)
    for chunk in range(worker * chunks // workers, (worker + 1) * chunks // workers):
        acc = partial[chunk]
        acc[:] = 0
        cols = np.empty(col_size, x.dtype)
        for n in range(chunk * N // chunks, (chunk + 1) * N // chunks):
            for g in range(G):
                for b in range(bands):
                    oh0 = b * rows_per_band
                    rows = min(rows_per_band, OH - oh0)
                    pixels = rows * OW
                    dy = ((n * O + g * Og) * OH + oh0) * OW
                    if algorithm == POINTWISE:
                        s = gemm(False, True, Og, Cg, pixels, gf, dy, OH * OW,
                                 xf, (n * C + g * Cg) * H * W + oh0 * W, H * W,
                                 1.0, acc, g * Og * Cg, Cg)
                    elif algorithm == ROWS:
                        n_rows = rows + DH * (KH - 1)
                        _gather_columns(x, n, g * Cg, Cg, oh0 - PT, 1, n_rows, 1, DH, KW,
                                        SW, DW, PL, OW, col_lo, col_hi, cols,
                                        n_rows * OW)
                        s = 0
                        for i in range(KH):
                            s |= gemm(False, True, Og, k_gemm, pixels, gf, dy, OH * OW,
                                      cols, i * DH * OW, n_rows * OW,
                                      1.0, acc, (i * O + g * Og) * k_gemm, k_gemm)
                    else:
                        _gather_columns(x, n, g * Cg, Cg, oh0 * SH - PT, SH, rows, KH, DH,
                                        KW, SW, DW, PL, OW, col_lo, col_hi, cols, pixels)
                        s = gemm(False, True, Og, k_gemm, pixels, gf, dy, OH * OW,
                                 cols, 0, pixels, 1.0, acc, g * Og * k_gemm, k_gemm)
                    if s != 0:
                        status[0] = s


@njit(**_JIT)
def _sum_partials(partial, out):
    """``out = partial[0] + partial[1] + ...`` in chunk order."""
    flat = out.reshape(-1)
    for e in prange(flat.shape[0]):
        total = partial[0, e]
        for chunk in range(1, partial.shape[0]):
            total += partial[chunk, e]
        flat[e] = total


@parallel_kernel
@njit(**BODY_JIT)
def _bias_grad(grad_output, out, worker, workers):
    """``out[o] = sum of grad_output[:, o]``, accumulated in float64 (worker
    ``worker``'s share of the channels)."""
    N, O = grad_output.shape[0], grad_output.shape[1]
    P = grad_output.shape[2] * grad_output.shape[3]
    gf = grad_output.reshape(N, O, P)
    for o in range(worker * O // workers, (worker + 1) * O // workers):
        total = 0.0
        for n in range(N):
            for p in range(P):
                total += gf[n, o, p]
        out[o] = total
