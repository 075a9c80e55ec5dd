"""Winograd F(2x2, 3x3) CPU convolution kernels (``"winograd"``): 3x3 kernels, stride 1,
no dilation; the forward (the weight gradient, its transpose: ``_winograd_grad``). The
same kernel runs the 3-D forward whose depth taps are stacked as channels
(``forward_depth``). Dense channels-last inputs and outputs (``dense_channels_last``)
are read and written in place, through blocks of pixels x channels transposed in
vector registers (``_stage_rows``, ``_outputs_channels_last``); other strides through
the rows of each channel.

``_winograd_grad``'s kernel compiles ``input_slices`` and the helpers it calls into
itself, and Numba's disk cache watches only the file of the kernel it loads: after
changing them, clear ``fastpool/cpu/conv/__pycache__``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fastpool._malloc import kept_empty
from fastpool._threading import thread_count
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu._microkernel import MR, aligned_empty, gemm, padded
from fastpool.cpu._transpose import block, side_of
from fastpool.cpu.conv._planner import _U, WINOGRAD, _Problem

# F(2x2, 3x3) (Lavin & Gray, 2016): each 2x2 output tile is A^T [(G g G^T) * (B^T d B)] A
# for its 4x4 input tile d, so the 36 multiplications of four outputs become 16, done as
# 16 GEMMs (one per transform-domain position) over channels x tiles.

# The 16 transform-domain planes are this many elements further apart than their size,
# so the 16 streams a tile reads or writes do not all fall in one L1 cache set (a plane
# size that is a multiple of 4 KiB made them collide and ran 2x slower).
_SKEW = 16


# The bands' transformed input slices (3-D ``_winograd_forward``; one band per thread
# at a time), at most: beyond, the 3-D convolution runs the 2-D Winograd on stacked
# images.
_DEPTH_BYTES = 64 << 20


def forward_depth(x, weight, bias, w, y, plane):
    """``y`` (``(N, C_out, OD, OH, OW)``) of the 3-D convolution ``w`` (the Window)
    with the stacked weight ``weight`` (``(C_out, KD * C_g, 3, 3)``) by
    ``_winograd_forward``, where its stacked 2-D window ``plane`` runs on
    Winograd (as chosen, or pinned), the depth taps are not dilated and the threads'
    bands of slices fit in ``_DEPTH_BYTES``: True; else False, nothing done."""
    problem = _Problem.forward(plane)
    if problem.algorithm() != WINOGRAD or w.dilation[0] != 1:
        return False
    D, OD, KD, SD = w.in_size[0], w.out_size[0], w.kernel[0], w.stride[0]
    N, G = w.batch, w.groups
    tiles_h, tiles_w = (w.out_size[1] + 1) // 2, (w.out_size[2] + 1) // 2
    rows = problem.winograd_band_tile_rows(x.itemsize)
    # the 2-D bands' size, but a band for every thread among N * G volumes (not N * OD
    # planes); equal bands
    bands = min(tiles_h, max(-(-tiles_h // rows), -(-thread_count() // (N * G))))
    rows = -(-tiles_h // bands)
    slices = (OD - 1) * SD + KD
    workers = thread_count()
    if workers * 16 * slices * (w.channels // G) * padded(rows * tiles_w, x) \
            * x.itemsize > _DEPTH_BYTES:
        return False
    O = w.out_channels
    _winograd_forward(x, winograd_weight(weight),
                      bias if bias is not None else np.zeros(O, x.dtype), y, rows, 1, 1, G,
                      w.pad_lo[1], w.pad_lo[2], KD, SD, w.pad_lo[0], workers)
    return True


def winograd_weight(weight):
    """``U[xi*4 + nu, o, c] = (G w[o, c] G^T)[xi, nu]``, computed in float64; valid
    until this thread's next call (``_malloc.kept_empty``)."""
    O, Cg = weight.shape[0], weight.shape[1]
    U = kept_empty(16 * O * Cg, weight.dtype)
    _weight_transform(np.ascontiguousarray(weight), U,
                      max(1, min(thread_count(), O)))
    return U


@njit(inline="always")
def _times_g_t(t0, t1, t2, u0, u1, u2, u3, c):
    """A row ``(t0, t1, t2)`` of ``G w`` times ``G^T``, into column ``c`` of four of
    U's planes."""
    u0[c] = t0
    u1[c] = 0.5 * (t0 + t1 + t2)
    u2[c] = 0.5 * (t0 - t1 + t2)
    u3[c] = t2


@njit(inline="always")
def _taps_by_tap(wf, o, Cg, taps):
    """``taps[k*C_g + c] = wf[(o*C_g + c)*9 + k]``: output channel ``o``'s taps of the
    flat ``(C_out, C_g, 3, 3)`` weight ``wf`` laid out tap by tap, in blocks of
    ``side`` channels transposed in vector registers (``_transpose.block``: rows of
    ``side`` taps from tap ``j0``, the last block from tap ``9 - side``, overlapping
    the one before with the same values), the remainder one value at a time. Read one
    value at a time at a stride of 9, the gather took 0.22 of 0.37 ms of a 256x256
    weight's transform on one thread (0.10 in blocks)."""
    side = side_of(wf)
    c_end = Cg - Cg % side if side > 1 else 0
    for c in range(0, c_end, side):
        src = (o * Cg + c) * 9
        for j0 in range(0, 9 - side, side):
            block(wf, src + j0, 9, taps, j0 * Cg + c, Cg)
        block(wf, src + 9 - side, 9, taps, (9 - side) * Cg + c, Cg)
    for c in range(c_end, Cg):
        for k in range(9):
            taps[_U(k * Cg + c)] = wf[_U((o * Cg + c) * 9 + k)]


@parallel_kernel
@njit(**BODY_JIT)
def _weight_transform(weight, U, worker, workers):
    """``winograd_weight``'s kernel: ``G = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5],
    [0, 0, 1]]`` applied to both sides by hand (a NumPy einsum took 40 ms for a
    512x512 weight, more than the convolution it served at batch 1).

    One output channel at a time, vectorised across its input channels: its taps laid
    out tap by tap in float64 (``taps[k, c]``), then each row ``a`` of ``t = G w`` made
    from them and multiplied by ``G^T`` into U's planes ``4a .. 4a + 3``, one loop of
    contiguous reads and writes per row. Computed per input channel through scratch
    arrays, LLVM kept it scalar: 0.46 ms of a 1.3 ms batch-1 3x3 256->256 convolution
    on 14x14, 2 threads (now 0.2). The same float64 expressions, so the same bits."""
    O, Cg = weight.shape[0], weight.shape[1]
    plane = O * Cg
    wf = weight.reshape(-1)
    taps = np.empty((9, Cg), weight.dtype)
    for o in range(worker * O // workers, (worker + 1) * O // workers):
        _taps_by_tap(wf, o, Cg, taps.reshape(-1))
        w0, w1, w2, w3, w4, w5, w6, w7, w8 = (taps[0], taps[1], taps[2], taps[3],
                                              taps[4], taps[5], taps[6], taps[7],
                                              taps[8])
        f = np.float64
        # Four planes at a time: the 16 streams of one pass (planes 4 MiB apart) fell in
        # one L1 set and ran 10x slower.
        for a in range(4):
            base = 4 * a * plane + o * Cg
            u0 = U[base:base + Cg]
            u1 = U[base + plane:base + plane + Cg]
            u2 = U[base + 2 * plane:base + 2 * plane + Cg]
            u3 = U[base + 3 * plane:base + 3 * plane + Cg]
            # row a of t: kernel row 0, their half sum, half difference, kernel row 2
            if a == 0:
                for c in range(Cg):
                    t0, t1, t2 = f(w0[c]), f(w1[c]), f(w2[c])
                    _times_g_t(t0, t1, t2, u0, u1, u2, u3, c)
            elif a == 1:
                for c in range(Cg):
                    t0 = 0.5 * (f(w0[c]) + f(w3[c]) + f(w6[c]))
                    t1 = 0.5 * (f(w1[c]) + f(w4[c]) + f(w7[c]))
                    t2 = 0.5 * (f(w2[c]) + f(w5[c]) + f(w8[c]))
                    _times_g_t(t0, t1, t2, u0, u1, u2, u3, c)
            elif a == 2:
                for c in range(Cg):
                    t0 = 0.5 * (f(w0[c]) - f(w3[c]) + f(w6[c]))
                    t1 = 0.5 * (f(w1[c]) - f(w4[c]) + f(w7[c]))
                    t2 = 0.5 * (f(w2[c]) - f(w5[c]) + f(w8[c]))
                    _times_g_t(t0, t1, t2, u0, u1, u2, u3, c)
            else:
                for c in range(Cg):
                    t0, t1, t2 = f(w6[c]), f(w7[c]), f(w8[c])
                    _times_g_t(t0, t1, t2, u0, u1, u2, u3, c)


@njit(inline="always")
def _winograd_input(x, n, c, d, th0, tile_rows, TW, PT, PL, rows, V, v_base, stride):
    """Transform the 4x4 input tiles of channel ``c``, depth ``d`` for tile rows
    ``th0 ..``:
    ``V[v_base + (xi*4 + nu)*stride + t] = (B^T d B)[xi, nu]``, ``t`` the tile's index
    in the band. ``rows`` is a scratch
    ``(4, 2*TW + 2)`` array holding the tile row's input rows, zero-padded."""
    H, W = x.shape[3], x.shape[4]
    plane = x[n, c, d]
    width = rows.shape[1]
    lo = min(max(PL, 0), width)
    hi = min(max(PL + W, lo), width)
    for tr in range(tile_rows):
        h0 = 2 * (th0 + tr) - PT
        for r in range(4):
            dst = rows[r]
            h = h0 + r
            if h < 0 or h >= H:
                for col in range(width):
                    dst[_U(col)] = 0
                continue
            src = plane[h]
            for col in range(lo):
                dst[_U(col)] = 0
            for col in range(lo, hi):
                dst[_U(col)] = src[_U(col - PL)]
            for col in range(hi, width):
                dst[_U(col)] = 0
        _transform_row(rows[0], rows[1], rows[2], rows[3], TW, V, v_base + tr * TW,
                       stride)


@njit(inline="always")
def _transform_row(r0, r1, r2, r3, TW, V, base, stride):
    """One tile row's input transform from its four zero-padded input rows."""
    for tw in range(TW):
        s = 2 * tw
        # t_r = (B^T d) rows, then each row times B.
        a0 = r0[_U(s)] - r2[_U(s)]
        a1 = r0[_U(s + 1)] - r2[_U(s + 1)]
        a2 = r0[_U(s + 2)] - r2[_U(s + 2)]
        a3 = r0[_U(s + 3)] - r2[_U(s + 3)]
        b0 = r1[_U(s)] + r2[_U(s)]
        b1 = r1[_U(s + 1)] + r2[_U(s + 1)]
        b2 = r1[_U(s + 2)] + r2[_U(s + 2)]
        b3 = r1[_U(s + 3)] + r2[_U(s + 3)]
        c0 = r2[_U(s)] - r1[_U(s)]
        c1 = r2[_U(s + 1)] - r1[_U(s + 1)]
        c2 = r2[_U(s + 2)] - r1[_U(s + 2)]
        c3 = r2[_U(s + 3)] - r1[_U(s + 3)]
        d0 = r1[_U(s)] - r3[_U(s)]
        d1 = r1[_U(s + 1)] - r3[_U(s + 1)]
        d2 = r1[_U(s + 2)] - r3[_U(s + 2)]
        d3 = r1[_U(s + 3)] - r3[_U(s + 3)]
        t = _U(base + tw)
        V[t] = a0 - a2
        V[t + _U(stride)] = a1 + a2
        V[t + _U(2 * stride)] = a2 - a1
        V[t + _U(3 * stride)] = a1 - a3
        V[t + _U(4 * stride)] = b0 - b2
        V[t + _U(5 * stride)] = b1 + b2
        V[t + _U(6 * stride)] = b2 - b1
        V[t + _U(7 * stride)] = b1 - b3
        V[t + _U(8 * stride)] = c0 - c2
        V[t + _U(9 * stride)] = c1 + c2
        V[t + _U(10 * stride)] = c2 - c1
        V[t + _U(11 * stride)] = c1 - c3
        V[t + _U(12 * stride)] = d0 - d2
        V[t + _U(13 * stride)] = d1 + d2
        V[t + _U(14 * stride)] = d2 - d1
        V[t + _U(15 * stride)] = d1 - d3


@njit(inline="always")
def dense_channels_last(a):
    """Whether the ``(N, C, D, H, W)`` array ``a`` is a dense ``(N, D, H, W, C)``
    buffer seen channels-first: element ``(n, c, d, h, w)`` at ``(((n*D + d)*H +
    h)*W + w)*C + c`` items from ``a``'s first (axes of length 1 may have any
    stride)."""
    step = a.itemsize
    dense = True
    for axis in (1, 4, 3, 2, 0):  # innermost first: C, W, H, D, N
        dense = dense and (a.strides[axis] == step or a.shape[axis] == 1)
        step *= a.shape[axis]
    return dense


@njit(inline="always")
def _stage_rows(x, n, c0, Cg, d, h0, R, PL, staged, width):
    """``staged[(c*R + r)*width + col] = x[n, c0 + c, d, h0 + r, col - PL]`` for
    ``c < Cg``, ``r < R`` (zeros outside the input) from the dense channels-last ``x``
    (``dense_channels_last``): each input row's pixels x channels in blocks transposed
    in vector registers (``_transpose.block``), the remainders one value at a time."""
    C, D, H, W = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    side = side_of(staged)
    lo = min(max(PL, 0), width)
    hi = min(max(PL + W, lo), width)
    c_end = Cg - Cg % side
    for r in range(R):
        h = h0 + r
        if h < 0 or h >= H:
            for c in range(Cg):
                row = (c * R + r) * width
                for col in range(width):
                    staged[_U(row + col)] = 0
            continue
        for c in range(Cg):
            row = (c * R + r) * width
            for col in range(lo):
                staged[_U(row + col)] = 0
            for col in range(hi, width):
                staged[_U(row + col)] = 0
        pixels = ((n * D + d) * H + h) * W  # the input row's first pixel
        col_end = hi - (hi - lo) % side
        for col in range(lo, col_end, side):
            at = (pixels + col - PL) * C + c0
            for c in range(0, c_end, side):
                block(x, at + c, C, staged, (c * R + r) * width + col, R * width)
        for c in range(c_end, Cg):
            for col in range(lo, col_end):
                staged[_U((c * R + r) * width + col)] = x[n, c0 + c, d, h, col - PL]
        for c in range(Cg):
            for col in range(col_end, hi):
                staged[_U((c * R + r) * width + col)] = x[n, c0 + c, d, h, col - PL]


@njit(inline="always")
def input_slices(x, n, c0, Cg, th0, tile_rows, TW, PT, PL, KD, SD, PD, slices, rows, V,
                 at, ld, stride):
    """``_winograd_input`` of channels ``c0 ..`` of image ``n`` for every slice ``s`` a
    depth tap reads (input depth ``s - PD``; zeros for the padding), slice ``s``'s
    channel ``c`` at ``V[(s*C_g + c)*ld + at ..]``."""
    D = x.shape[2]
    width = rows.shape[1]
    # Channels-last: the tile rows' input rows of all the channels staged
    # channels-first, a slice at a time, in blocks (``_stage_rows``); then channel by
    # channel, tile row by tile row, as the channels-first loop writes V. Read one
    # value at a time at the stride of the pixels, the rows were left scalar by LLVM,
    # and staging a tile row at a time wrote V in 16 x C_g short runs: conv3d 3x3x3
    # 32->32 on (4, 32, 16, 56, 56), 2 threads, 46.9 ms against 38.8 channels-first;
    # now 39.2. The same values, so the same bits.
    staged_cl = Cg >= side_of(V) and dense_channels_last(x)
    R = 2 * tile_rows + 2  # input rows of the tile rows
    staged = np.empty(Cg * R * width if staged_cl else 0, x.dtype)
    for s in range(slices):
        if s % SD >= KD:
            continue  # read by no output depth (stride past the kernel)
        d = s - PD
        if staged_cl and 0 <= d < D:
            _stage_rows(x, n, c0, Cg, d, 2 * th0 - PT, R, PL, staged, width)
            for c in range(Cg):
                for tr in range(tile_rows):
                    row = (c * R + 2 * tr) * width
                    _transform_row(staged[row:row + width],
                                   staged[row + width:row + 2 * width],
                                   staged[row + 2 * width:row + 3 * width],
                                   staged[row + 3 * width:row + 4 * width], TW, V,
                                   (s * Cg + c) * ld + at + tr * TW, stride)
            continue
        for c in range(Cg):
            base = (s * Cg + c) * ld + at
            if 0 <= d < D:
                _winograd_input(x, n, c0 + c, d, th0, tile_rows, TW, PT, PL, rows, V,
                                base, stride)
            else:
                for e in range(16):
                    for i in range(tile_rows * TW):
                        V[_U(e * stride + base + i)] = 0


@njit(inline="always")
def _winograd_output(M, m_base, stride, y, n, o, od, th0, tile_rows, TW, b):
    """``y[n, o, od]`` 2x2 tiles ``A^T m A + b`` from ``m[xi, nu] = M[m_base +
    (xi*4 + nu)*stride + t]``; tiles past the edge are clipped."""
    OH = y.shape[3]
    out = y[n, o, od]
    for tr in range(tile_rows):
        oh = 2 * (th0 + tr)
        second = oh + 1 < OH
        _output_row(M, m_base + tr * TW, stride, TW, out[oh],
                    out[oh + 1] if second else out[oh], second, b)


@njit(inline="always")
def _output_row(M, base, stride, TW, row0, row1, second, b):
    """One tile row's 2x2 tiles into output rows ``row0`` and (if ``second``)
    ``row1``; a last tile past the rows' end is clipped."""
    full_w = row0.shape[0] // 2
    for tw in range(TW):
        t = _U(base + tw)
        m0 = M[t]
        m1 = M[t + _U(stride)]
        m2 = M[t + _U(2 * stride)]
        m3 = M[t + _U(3 * stride)]
        m4 = M[t + _U(4 * stride)]
        m5 = M[t + _U(5 * stride)]
        m6 = M[t + _U(6 * stride)]
        m7 = M[t + _U(7 * stride)]
        m8 = M[t + _U(8 * stride)]
        m9 = M[t + _U(9 * stride)]
        m10 = M[t + _U(10 * stride)]
        m11 = M[t + _U(11 * stride)]
        m12 = M[t + _U(12 * stride)]
        m13 = M[t + _U(13 * stride)]
        m14 = M[t + _U(14 * stride)]
        m15 = M[t + _U(15 * stride)]
        # s = A^T m (two rows of four), then each row times A.
        s0 = m0 + m4 + m8
        s1 = m1 + m5 + m9
        s2 = m2 + m6 + m10
        s3 = m3 + m7 + m11
        u0 = m4 - m8 - m12
        u1 = m5 - m9 - m13
        u2 = m6 - m10 - m14
        u3 = m7 - m11 - m15
        w = 2 * tw
        if tw < full_w:
            row0[_U(w)] = s0 + s1 + s2 + b
            row0[_U(w + 1)] = s1 - s2 - s3 + b
            if second:
                row1[_U(w)] = u0 + u1 + u2 + b
                row1[_U(w + 1)] = u1 - u2 - u3 + b
        else:
            row0[_U(w)] = s0 + s1 + s2 + b
            if second:
                row1[_U(w)] = u0 + u1 + u2 + b


@njit(inline="always")
def _outputs_channels_last(M, ld, at, stride, y, n, o0, Og, od, th0, tile_rows, TW,
                           bias, staged):
    """``_winograd_output`` of output channels ``o0 .. o0 + Og - 1`` (image ``n``'s
    tiles from column ``at`` of ``M``) into the dense
    channels-last ``y`` (``dense_channels_last``): the band's output rows of all the
    channels made in ``staged`` (channels-first, channel by channel as
    ``_winograd_output`` makes them) and stored in blocks transposed in vector
    registers, the remainders one value at a time (the same values, so the same
    bits)."""
    O, OD, OH, OW = y.shape[1], y.shape[2], y.shape[3], y.shape[4]
    side = side_of(staged)
    R = min(2 * tile_rows, OH - 2 * th0)  # output rows of the band
    for o in range(Og):
        for tr in range(tile_rows):
            row = (o * R + 2 * tr) * OW
            second = 2 * tr + 1 < R
            _output_row(M, o * ld + at + tr * TW, stride, TW, staged[row:row + OW],
                        staged[row + OW:row + 2 * OW] if second else staged[row:row + OW],
                        second, bias[o0 + o])
    w_end = OW - OW % side
    o_end = Og - Og % side
    for r in range(R):
        oh = 2 * th0 + r
        pixels = ((n * OD + od) * OH + oh) * OW  # the output row's first pixel
        for w0 in range(0, w_end, side):
            for o in range(0, o_end, side):
                block(staged, (o * R + r) * OW + w0, R * OW, y, (pixels + w0) * O + o0 + o,
                      O)
        for o in range(o_end, Og):
            for w in range(w_end):
                y[n, o0 + o, od, oh, w] = staged[_U((o * R + r) * OW + w)]
        for o in range(Og):
            for w in range(w_end, OW):
                y[n, o0 + o, od, oh, w] = staged[_U((o * R + r) * OW + w)]


@parallel_kernel
@njit(**BODY_JIT)
def _winograd_forward(x, U, bias, y, band_tile_rows, images, out_blocks, G, PT, PL, KD,
                      SD, PD, worker, workers):
    """``y = conv3x3(x) (+ bias)``, stride 1 in the plane, by Winograd F(2x2, 3x3)
    over (image, group, band of tile rows); ``x`` is ``(N, C, D, H, W)``, ``y`` ``(N,
    C_out, OD, OH, OW)``, any strides (channels-last buffers are read and written in
    place). 2-D: ``D = OD = KD = SD = 1``, ``PD = 0`` (planes viewed as volumes).
    3-D, depth taps stacked as channels (``fastpool._conv3d``): ``U`` the transform of
    the stacked weight ``(C_out, KD * C_g, 3, 3)``. Each input slice
    of a band is transformed once (a 2-D Winograd of the stacked images transforms it
    once per depth tap) into ``V``, slices in depth order and zero slices for the
    padding, so output depth ``od``'s ``KD * C_g`` rows start at slice ``od * SD`` and
    its 16 GEMMs read them in place: the very products, in the same order, as the 2-D
    Winograd of the stacked images.

    ``images`` > 1 (whole planes in one band only): a task's band is the planes of that
    many images side by side, so the 16 GEMMs of small planes run on that many times
    the tiles (a 7x7 plane has 16, which leave the GEMM tile's columns part empty).
    Each output is still one chain over the channels, so the bits do not change.

    ``out_blocks`` > 1: each band's output channels in that many blocks (whole tiles of
    the GEMM's rows), a task each, so that threads share a small plane's band instead of
    cutting it into shorter bands, whose GEMMs have fewer columns; a worker transforms a
    band's input once for its consecutive blocks of it."""
    N, C = x.shape[0], x.shape[1]
    O, OD, OH, OW = y.shape[1], y.shape[2], y.shape[3], y.shape[4]
    Cg = C // G
    Og = O // G
    K = KD * Cg
    TH = (OH + 1) // 2
    TW = (OW + 1) // 2
    slices = (OD - 1) * SD + KD
    bands = (TH + band_tile_rows - 1) // band_tile_rows
    runs = (N + images - 1) // images  # runs of images a band holds
    tasks = runs * G * bands * out_blocks
    # output channels per block: whole tiles of the GEMM's rows
    per_block = -(-(-(-Og // out_blocks)) // MR) * MR
    # rows of each plane start on cache lines (``gemm``'s loads of V)
    T_max = padded(images * band_tile_rows * TW, x)
    V = aligned_empty(16 * (slices * Cg * T_max + _SKEW), x)
    M = aligned_empty(16 * (min(Og, per_block) * T_max + _SKEW), x)
    zeros = np.zeros(Og, x.dtype)
    rows = np.empty((4, 2 * TW + 2), x.dtype)
    staged_cl = Og >= side_of(y) and dense_channels_last(y)
    staged = np.empty(Og * 2 * band_tile_rows * OW if staged_cl else 0, y.dtype)
    transformed = -1  # the band whose input V holds
    for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
        band = t // out_blocks
        o_lo = min(Og, (t % out_blocks) * per_block)
        On = min(Og, o_lo + per_block) - o_lo
        n0 = (band // (G * bands)) * images
        count = min(images, N - n0)
        g = (band // bands) % G
        th0 = (band % bands) * band_tile_rows
        tile_rows = min(band_tile_rows, TH - th0)
        T = tile_rows * TW
        ld = padded(count * T, x)
        v_stride = slices * Cg * ld + _SKEW
        m_stride = On * ld + _SKEW
        if band != transformed:
            for i in range(count):
                input_slices(x, n0 + i, g * Cg, Cg, th0, tile_rows, TW, PT, PL, KD, SD,
                             PD, slices, rows, V, i * T, ld, v_stride)
            transformed = band
        if On == 0:
            continue
        o0 = g * Og + o_lo
        # fastpool's own GEMM: each product is one chain over the channels, so a tile's
        # bits do not depend on the band (or the Dask chunk, or the images) holding it
        for od in range(OD):
            first = od * SD * Cg * ld
            for e in range(16):
                gemm(On, count * T, K, U, (e * O + o0) * K, K, V,
                     e * v_stride + first, ld, M, e * m_stride, ld, zeros, 0)
            for i in range(count):
                if staged_cl:
                    _outputs_channels_last(M, ld, i * T, m_stride, y, n0 + i, o0, On,
                                           od, th0, tile_rows, TW, bias, staged)
                    continue
                for o in range(On):
                    _winograd_output(M, o * ld + i * T, m_stride, y, n0 + i, o0 + o,
                                     od, th0, tile_rows, TW, bias[o0 + o])
