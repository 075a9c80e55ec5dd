"""The weight gradient of 3x3, stride-1, undilated convolutions by Winograd F(2x2, 3x3),
in 2-D and in 3-D with the depth taps stacked as channels, on any strides (channels-
first and channels-last buffers are read in place).

The forward computes each 2x2 output tile as ``A^T [(G w G^T) * (B^T d B)] A``
(``_winograd``); it is linear in ``w``, and its adjoint gives the weight gradient as a
sum over the tiles of

    ``dW = G^T [(A dy A^T) * (B^T d B)] G``

with ``dy`` the tile's 2x2 block of ``grad_output`` (zeros past the output's edge) and
``d`` the forward's 4x4 input tile (the forward's input transform, reused). The 36
multiply-adds per tile and channel pair of a direct weight gradient become 16, as 16
GEMMs (one per transform-domain position) that reduce over the tiles:
``M[xi, (a, c), o] += V[xi, (a, c), t] @ U[xi, t, o]``. (Lavin & Gray, 2016, derive the
forward; the backward is its transpose.)

Determinism: the tiles are visited image by image, tile row by tile row, in fixed
chunks of tile rows (their number fixed by the shapes), so each transform-domain sum is
one chain of fused multiply-adds per chunk (fastpool's GEMM); the chunks' sums are added
in chunk order and ``G^T M G`` is taken in float64 and rounded once. The bits are the
same at any thread count and in either memory format (the same values read through the
strides); they are not those of the direct (``"rows"``) weight gradient.

3-D (``fastpool._conv3d``, depth taps stacked as channels): each input slice of a band
is transformed once, slices in depth order (zeros for the padding), and output depth
``od``'s ``KD * C_g`` rows start at slice ``od * SD``, read in place by its GEMMs (as
in the 3-D Winograd forward), so nothing is stacked.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fastpool._malloc import kept_empty
from fastpool._threading import loop_on_one_thread, thread_count
from fastpool.cpu._microkernel import aligned_empty, gemm_add, padded, padded_host
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu.conv._gemm import _sum_partials
from fastpool.cpu.conv._planner import _JIT, _U, WINOGRAD, _Problem
from fastpool.cpu.conv._winograd import _SKEW, input_slices

# Tiles per GEMM (its depth) at least: below, loading and storing the accumulators
# (16 x C_g x O_g of them) costs more than the products.
_MIN_TILES = 128
# Bytes of a band's transformed input (per thread), aimed at: more tile rows per band
# where they fit.
_BAND_BYTES = 1 << 20
# The chunks' partial sums (16/9 of the weight each), at most, and chunks at most.
_PARTIAL_BYTES = 16 << 20
_MAX_CHUNKS = 4
# Output channels per task at least (each task transforms the input again).
_BLOCK_CHANNELS = 16
# The bands' transformed input, at most: per thread (beyond, the caller's other
# kernel runs: decided from the shapes alone, so that the bits never depend on the
# thread count), and of all threads together (beyond, fewer threads run: they change
# who computes an element, never its sum). The 3-D gradient transforms every input
# slice of a band at once.
_BAND_LIMIT = 32 << 20
_DEPTH_BYTES = 64 << 20


@njit(inline="always")
def _gradient_tiles(gy, n, o, od, th, TW, rows, U, u_base, ldo, stride):
    """``U[u_base + (xi*4 + nu)*stride + tw*ldo] = (A dy A^T)[xi, nu]`` for the 2x2
    tiles of ``gy[n, o, od]``'s output rows ``2*th, 2*th + 1`` (zeros past the edge);
    ``rows`` a ``(2, 2*TW)`` scratch. ``A = [[1, 0], [1, 1], [1, -1], [0, -1]]``."""
    OH, OW = gy.shape[3], gy.shape[4]
    plane = gy[n, o, od]
    for r in range(2):
        dst = rows[r]
        h = 2 * th + r
        if h < OH:
            src = plane[h]
            for col in range(OW):
                dst[_U(col)] = src[_U(col)]
            for col in range(OW, 2 * TW):
                dst[_U(col)] = 0
        else:
            for col in range(2 * TW):
                dst[_U(col)] = 0
    r0, r1 = rows[0], rows[1]
    for tw in range(TW):
        s = 2 * tw
        p0, q0 = r0[_U(s)], r0[_U(s + 1)]      # A dy: rows dy0, dy0 + dy1, dy0 - dy1,
        p1, q1 = r1[_U(s)], r1[_U(s + 1)]      # -dy1; then each row [p, q] times A^T:
        a0, a1 = p0 + p1, q0 + q1              # [p, p + q, p - q, -q]
        b0, b1 = p0 - p1, q0 - q1
        t = _U(u_base + tw * ldo)
        U[t] = p0
        U[t + _U(stride)] = p0 + q0
        U[t + _U(2 * stride)] = p0 - q0
        U[t + _U(3 * stride)] = -q0
        U[t + _U(4 * stride)] = a0
        U[t + _U(5 * stride)] = a0 + a1
        U[t + _U(6 * stride)] = a0 - a1
        U[t + _U(7 * stride)] = -a1
        U[t + _U(8 * stride)] = b0
        U[t + _U(9 * stride)] = b0 + b1
        U[t + _U(10 * stride)] = b0 - b1
        U[t + _U(11 * stride)] = -b1
        U[t + _U(12 * stride)] = -p1
        U[t + _U(13 * stride)] = -(p1 + q1)
        U[t + _U(14 * stride)] = q1 - p1
        U[t + _U(15 * stride)] = q1


@parallel_kernel
@njit(**BODY_JIT)
def _transform_sums(x, gy, partial, band_rows, o_blocks, G, PT, PL, KD, SD, PD, worker,
                    workers):
    """``partial[chunk, g, xi*4 + nu, a*C_g + c, o]`` = the sum over the chunk's tiles
    of ``(B^T d B)[xi, nu] * (A dy A^T)[xi, nu]`` for input channel ``g*C_g + c`` at
    depth tap ``a`` and output channel ``g*O_g + o``, over (chunk, group). ``x``:
    ``(N, C, D, H, W)``, ``gy``: ``(N, O, OD, OH, OW)``, any strides (2-D: ``D = OD =
    KD = SD = 1``, ``PD = 0``). A chunk is a fixed run of the call's tile rows (image
    by image), taken in bands of ``band_rows`` tile rows; tasks are (chunk, group,
    block of output channels): the blocks change which thread computes an element,
    never its sum."""
    N, Cg = x.shape[0], x.shape[1] // G
    OD, OH, OW = gy.shape[2], gy.shape[3], gy.shape[4]
    K, Og = partial.shape[3], partial.shape[4]  # KD * C_g, O_g
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    slices = (OD - 1) * SD + KD
    chunks = partial.shape[0]
    tasks = chunks * G * o_blocks
    size = -(-Og // o_blocks)
    total = N * TH
    T_max = padded(band_rows * TW, x)
    ldo = padded(Og, x)  # B's rows (a tile's output channels) start on cache lines
    u_stride = T_max * ldo + _SKEW
    V = aligned_empty(16 * (slices * Cg * T_max + _SKEW), x)
    U = aligned_empty(16 * u_stride, x)
    rows = np.empty((4, 2 * TW + 2), x.dtype)
    grad_rows = np.empty((2, 2 * TW), x.dtype)
    pf = partial.reshape(-1)
    per = 16 * K * Og
    for task in range(worker * tasks // workers, (worker + 1) * tasks // workers):
        chunk = task // (G * o_blocks)
        g = (task // o_blocks) % G
        o0 = min(Og, (task % o_blocks) * size)
        o1 = min(Og, o0 + size)
        if o1 <= o0:
            continue
        base = (chunk * G + g) * per
        for e in range(16):
            for k in range(K):
                for o in range(o0, o1):
                    pf[_U(base + (e * K + k) * Og + o)] = 0
        q_hi = (chunk + 1) * total // chunks
        for q0 in range(chunk * total // chunks, q_hi, band_rows):
            nq = min(band_rows, q_hi - q0)
            T = nq * TW
            ld = padded(T, x)
            v_stride = slices * Cg * ld + _SKEW
            for r in range(nq):
                n = (q0 + r) // TH
                th = q0 + r - n * TH
                input_slices(x, n, g * Cg, Cg, th, 1, TW, PT, PL, KD, SD, PD, slices,
                             rows, V, r * TW, ld, v_stride)
            for od in range(OD):
                for r in range(nq):
                    n = (q0 + r) // TH
                    th = q0 + r - n * TH
                    for o in range(o0, o1):
                        _gradient_tiles(gy, n, g * Og + o, od, th, TW, grad_rows, U,
                                        r * TW * ldo + o, ldo, u_stride)
                first = od * SD * Cg * ld
                for e in range(16):
                    gemm_add(K, o1 - o0, T, V, e * v_stride + first, ld, U,
                             e * u_stride + o0, ldo, pf, base + e * K * Og + o0, Og)


@njit(**_JIT)
def _untransform(summed, out):
    """``out[g*O_g + o, c, a, i, j] = (G^T M G)[i, j]`` with ``M[xi, nu] =
    summed[g, xi*4 + nu, a*C_g + c, o]``, in float64; ``out`` is ``(O, C_g, KD, 3,
    3)``. Tasks take (group, row ``a*C_g + c``): every read is a run of output
    channels."""
    G, K, Og = summed.shape[0], summed.shape[2], summed.shape[3]
    Cg = out.shape[1]
    for task in prange(G * K):
        g = task // K
        k = task - g * K
        a = k // Cg
        c = k - a * Cg
        t = np.empty((3, 4))
        for o in range(Og):
            for nu in range(4):
                m0 = np.float64(summed[g, nu, k, o])
                m1 = np.float64(summed[g, 4 + nu, k, o])
                m2 = np.float64(summed[g, 8 + nu, k, o])
                m3 = np.float64(summed[g, 12 + nu, k, o])
                t[0, nu] = m0 + 0.5 * (m1 + m2)
                t[1, nu] = 0.5 * (m1 - m2)
                t[2, nu] = 0.5 * (m1 + m2) + m3
            for i in range(3):
                t0, t1, t2, t3 = t[i, 0], t[i, 1], t[i, 2], t[i, 3]
                out[g * Og + o, c, a, i, 0] = t0 + 0.5 * (t1 + t2)
                out[g * Og + o, c, a, i, 1] = 0.5 * (t1 - t2)
                out[g * Og + o, c, a, i, 2] = 0.5 * (t1 + t2) + t3


def _plan(N, Cg, Og, KD, slices, TH, TW, G, itemsize):
    """``(chunks, band_rows, band_bytes)`` from the shapes alone (the chunks fix the
    sums, and whether this kernel runs at all fixes the bits: never from the thread
    count), or None where a band's transformed input would exceed ``_BAND_LIMIT``."""
    total = N * TH
    per_chunk = 16 * G * KD * Cg * Og * itemsize
    chunks = max(1, min(_MAX_CHUNKS, total * TW // _MIN_TILES,
                        _PARTIAL_BYTES // per_chunk))
    row_bytes = 16 * slices * Cg * TW * itemsize
    band = max(-(-_MIN_TILES // TW), _BAND_BYTES // row_bytes)
    band = max(1, min(band, -(-total // chunks)))
    band_bytes = 16 * slices * Cg * padded_host(band * TW, np.dtype(f"f{itemsize}")) \
        * itemsize
    if band_bytes > _BAND_LIMIT:
        return None
    return chunks, band, band_bytes


def weight_grad(x, gy, KD, SD, PD, PT, PL, groups, workers):
    """The ``(O, C_g, KD, 3, 3)`` weight gradient of a 3x3 (in the plane) stride-1
    convolution of ``x`` (``(N, C, D, H, W)``) with output gradient ``gy`` (``(N, O,
    OD, OH, OW)``), any strides; for 2-D pass planes as volumes one slice deep
    (``KD = SD = 1``, ``PD = 0``) and drop the depth axis of the result. None where
    a band's transformed input would exceed ``_BAND_LIMIT`` (shapes only): nothing
    done."""
    N, C = x.shape[0], x.shape[1]
    O, OD, OH, OW = gy.shape[1], gy.shape[2], gy.shape[3], gy.shape[4]
    G = groups
    Cg, Og = C // G, O // G
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    slices = (OD - 1) * SD + KD
    plan = _plan(N, Cg, Og, KD, slices, TH, TW, G, x.itemsize)
    if plan is None:
        return None
    chunks, band, band_bytes = plan
    workers = max(1, min(workers, _DEPTH_BYTES // band_bytes))
    # Blocks of output channels where chunks and groups are fewer than the threads
    # (each block transforms the input again)
    blocks = max(1, min(-(-2 * workers // (chunks * G)), Og // _BLOCK_CHANNELS))
    partial = kept_empty((chunks, G, 16, KD * Cg, Og), x.dtype)
    _transform_sums(x, gy, partial, band, blocks, G, PT, PL, KD, SD, PD,
                    max(1, min(workers, chunks * G * blocks)))
    if chunks > 1:
        summed = np.empty(partial.shape[1:], x.dtype)
        loop_on_one_thread(_sum_partials, partial.reshape(chunks, -1), summed)
    else:
        summed = partial[0]
    out = np.empty((O, Cg, KD, 3, 3), x.dtype)
    loop_on_one_thread(_untransform, summed, out)
    return out


def weight_grad_depth(x, gy, w, plane):
    """The ``(O, C_g, KD, 3, 3)`` weight gradient of the 3-D convolution ``w`` (the
    Window) from ``x`` and ``gy`` volumes, where its stacked 2-D window ``plane`` runs
    on Winograd (as chosen, or pinned) and the depth taps are not dilated; else (or
    where the bands would not fit) None, nothing done."""
    # the backward's choice (the forward's may be Winograd where the gradients' is not)
    if _Problem.forward(plane).backward_algorithm() != WINOGRAD or w.dilation[0] != 1:
        return None
    return weight_grad(x, gy, w.kernel[0], w.stride[0], w.pad_lo[0], w.pad_lo[1],
                       w.pad_lo[2], w.groups, thread_count())
