"""Parallel CPU convolution kernels (Numba + BLAS) and their launchers.

Launchers take host arrays already validated by ``fastpool._params.conv_geometry`` and
the ``ConvGeometry``; arrays are ``(N, C, H, W)`` (the public layer adds and removes the
batch axis of unbatched input).

Algorithms, chosen per problem by ``choose_algorithm`` (the README lists them):

``"pointwise"``  1x1 kernel, stride 1, no padding: one GEMM per (image, group, band of
                 rows) straight on the input, ``y = W_g @ x[n, g]``; no copies.
``"rows"``       stride 1 along H: gather the ``KW`` column shifts of a band of input
                 rows once (``C_g * KW`` rows), then one accumulating GEMM per kernel
                 row ``i``, whose operand is the same buffer offset by ``i * DH`` rows.
                 A third of im2col's copying for a 3x3 kernel.
``"im2col"``     anything else: gather the whole ``C_g * KH * KW`` column matrix of a
                 band, one GEMM.
``"direct"``     one input channel per group (depthwise and channel multipliers), or
                 planes too big for BLAS's 32-bit sizes: plain loops vectorised along
                 output columns. A GEMM with ``K = KH * KW`` would be all overhead.

GEMMs write straight into the output (``ldc``), run single-threaded BLAS, one call per
Numba thread (``fastpool.cpu._blas``). Bands of output rows are sized so the gathered
columns stay in the core's L2 cache.

Backward: with stride 1 the input gradient is the forward convolution of
``grad_output`` with the flipped, channel-transposed kernel, so it runs on the forward
algorithms; with a stride it is ``W_g^T @ grad_output`` scattered back (col2im) by one
thread per (image, group). The weight gradient sums per-chunk partial products over
fixed chunks of images (the chunking depends only on the shapes), added in chunk order.
Every result is therefore identical at any thread count; nothing uses atomics.

Geometry is runtime data: one compiled kernel per dtype serves every shape, kernel
size, stride, padding and dilation (they are memory- or BLAS-bound, so constant
folding buys little here, unlike the pooling kernels).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from fastpool.cpu._arrays import contiguous
from fastpool.cpu._blas import gemm, single_threaded_blas

_JIT = dict(parallel=True, cache=True, boundscheck=False, error_model="numpy", nogil=True)
_U = np.uint64

POINTWISE, ROWS, IM2COL, DIRECT, WINOGRAD = 0, 1, 2, 3, 4
ALGORITHMS = {"pointwise": POINTWISE, "rows": ROWS, "im2col": IM2COL, "direct": DIRECT,
              "winograd": WINOGRAD}
_NAMES = {code: name for name, code in ALGORITHMS.items()}

# Winograd F(2x2, 3x3) needs enough channels per group for its 16 GEMMs (K = C_g) to pay.
_WINOGRAD_MIN_CHANNELS = 8
# Transformed input + output per Winograd band: more than L2, as the 16 GEMMs (K = C_g)
# run faster on more tiles.
_WINOGRAD_BYTES = 1 << 21
# Gathered columns per band: half of a 2 MiB L2, leaving room for the GEMM's panels.
_COLUMN_BYTES = 1 << 20
# Pointwise GEMMs read the input in place (no gathering): larger bands run faster.
_POINTWISE_BYTES = 4 << 20
# BLAS sizes are 32-bit ints.
_BLAS_LIMIT = 2**31 - 1
# Weight-gradient partial sums: at most this many chunks of images, and this many bytes.
_MAX_CHUNKS = 16
_PARTIAL_BYTES = 64 << 20


class _Problem:
    """One convolution as the kernels see it. ``pad_top``/``pad_left`` may be negative
    (the input-gradient problem of a heavily padded convolution crops instead)."""

    def __init__(self, in_shape, out_hw, weight_shape, groups, stride, pad, dilation):
        self.batch, self.in_channels, self.in_h, self.in_w = in_shape
        self.out_h, self.out_w = out_hw
        self.out_channels, self.channels_per_group, self.kernel_h, self.kernel_w = \
            weight_shape
        self.groups = groups
        self.stride_h, self.stride_w = stride
        self.pad_top, self.pad_left = pad
        self.dilation_h, self.dilation_w = dilation

    @property
    def outputs_per_group(self):
        return self.out_channels // self.groups

    @property
    def args(self):
        """Geometry arguments shared by every kernel."""
        return (self.groups, self.kernel_h, self.kernel_w, self.stride_h, self.stride_w,
                self.dilation_h, self.dilation_w, self.pad_top, self.pad_left,
                *self.column_range())

    def column_range(self):
        """Per kernel column ``j``: output columns ``[lo[j], hi[j])`` whose tap
        ``ow*SW + j*DW - pad_left`` lies inside the input row."""
        lo = np.empty(self.kernel_w, np.int64)
        hi = np.empty(self.kernel_w, np.int64)
        for j in range(self.kernel_w):
            offset = j * self.dilation_w - self.pad_left
            first = min(max(-(offset // self.stride_w), 0), self.out_w)  # ceil(-off/SW)
            last = -((offset - self.in_w) // self.stride_w)            # ceil((W-off)/SW)
            lo[j], hi[j] = first, min(max(last, first), self.out_w)
        return lo, hi

    def algorithm(self):
        if (self.channels_per_group == 1
                or max(self.in_h * self.in_w, self.out_h * self.out_w,
                       self.channels_per_group * self.kernel_h * self.kernel_w)
                > _BLAS_LIMIT):
            return DIRECT
        if (self.kernel_h == self.kernel_w == 1 and self.stride_h == self.stride_w == 1
                and self.pad_top == self.pad_left == 0):
            return POINTWISE
        if self.winograd_applies() and self.channels_per_group >= _WINOGRAD_MIN_CHANNELS:
            return WINOGRAD
        return ROWS if self.stride_h == 1 else IM2COL

    def winograd_applies(self):
        return (self.kernel_h == self.kernel_w == 3 and self.stride_h == self.stride_w == 1
                and self.dilation_h == self.dilation_w == 1)

    def winograd_band_tile_rows(self, itemsize):
        """Tile rows per band: the transformed input and output of a band fit in
        ``_WINOGRAD_BYTES``, and the bands are of equal size."""
        tiles_w = (self.out_w + 1) // 2
        tiles_h = (self.out_h + 1) // 2
        per_row = 16 * (self.channels_per_group + self.outputs_per_group) * tiles_w * itemsize
        most = max(1, min(_WINOGRAD_BYTES // per_row, tiles_h))
        bands = -(-tiles_h // most)
        return -(-tiles_h // bands)  # equal bands: no short last band

    def unit_stride_planes(self):
        """Whether the padded-plane direct kernels apply: stride 1 and a padded plane
        of at most ``_PADDED_PLANE_LIMIT`` elements."""
        padded = ((self.out_h + self.dilation_h * (self.kernel_h - 1))
                  * (self.out_w + self.dilation_w * (self.kernel_w - 1)))
        return self.stride_h == self.stride_w == 1 and padded <= _PADDED_PLANE_LIMIT

    def band_rows(self, algorithm, itemsize):
        """Output rows per band: the gathered columns fit in ``_COLUMN_BYTES`` (the
        input rows a pointwise GEMM reads, in ``_POINTWISE_BYTES``)."""
        row_bytes = self.out_w * itemsize * self.channels_per_group * self.kernel_w
        if algorithm == POINTWISE:
            rows = _POINTWISE_BYTES // row_bytes
        elif algorithm == ROWS:
            rows = _COLUMN_BYTES // row_bytes - self.dilation_h * (self.kernel_h - 1)
        else:
            rows = _COLUMN_BYTES // (row_bytes * self.kernel_h)
        rows = max(1, min(rows, self.out_h))
        if rows * self.out_w * max(self.channels_per_group * self.kernel_h
                                   * self.kernel_w, 1) > _BLAS_LIMIT:
            rows = max(1, _BLAS_LIMIT // (self.out_w * self.channels_per_group
                                          * self.kernel_h * self.kernel_w))
        return rows

    def gemm_weight(self, weight, algorithm):
        """The weight as the GEMMs read it: ``(O, C_g*KH*KW)``, or for ``"rows"``
        ``(KH, O, C_g*KW)`` so each kernel row is one matrix."""
        if algorithm == ROWS:
            return contiguous(weight.transpose(2, 0, 1, 3)).reshape(-1)
        return contiguous(weight).reshape(-1)


def choose_algorithm(geometry):
    """Name of the algorithm ``conv2d_forward``/``conv2d_backward`` use for
    ``geometry``."""
    return _NAMES[_forward_problem(geometry).algorithm()]


def valid_algorithms(geometry):
    """Names of every algorithm that can run ``geometry`` (tests run them all)."""
    problem = _forward_problem(geometry)
    names = ["direct"]
    if max(problem.in_h * problem.in_w, problem.out_h * problem.out_w) <= _BLAS_LIMIT:
        names.append("im2col")
        if problem.stride_h == 1:
            names.append("rows")
        if problem.winograd_applies():
            names.append("winograd")
        if (problem.kernel_h == problem.kernel_w == 1 and problem.stride_h == 1
                and problem.stride_w == 1 and problem.pad_top == problem.pad_left == 0):
            names.append("pointwise")
    return names


# ----------------------------------------------------------------------------- gather

@njit(inline="always")
def _gather_columns(x, n, c0, channels, h0, h_step, n_rows, taps_h, DH, KW, SW, DW, PL,
                    OW, col_lo, col_hi, cols):
    """``cols[((c*taps_h + i)*KW + j)*L + r*OW + ow] = x[n, c0+c, h, ow*SW + j*DW - PL]``
    with ``h = h0 + r*h_step + i*DH`` and ``L = n_rows * OW``; 0 outside the input."""
    H = x.shape[2]
    L = n_rows * OW
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
def _scatter_columns(cols, gx, n, c0, channels, h0, h_step, n_rows, KH, DH, KW, SW, DW,
                     PL, OW, col_lo, col_hi):
    """Inverse of ``_gather_columns`` with ``taps_h = KH``: add every column entry back
    onto the input cell it was read from (cells outside the input are dropped)."""
    H = gx.shape[2]
    L = n_rows * OW
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


@njit(**_JIT)
def _gemm_forward(x, w, bias, has_bias, y, algorithm, rows_per_band, workers, status,
                  G, KH, KW, SH, SW, DH, DW, PT, PL, col_lo, col_hi):
    """``y = conv(x, w) (+ bias)`` by GEMMs over (image, group, band of output rows)."""
    N, C, H, W = x.shape
    O, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    Cg = C // G
    Og = O // G
    bands = (OH + rows_per_band - 1) // rows_per_band
    tasks = N * G * bands
    k_gemm, col_size = _gemm_sizes(algorithm, Cg, KH, KW, DH, OW, rows_per_band)
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    for worker in prange(workers):
        cols = np.empty(col_size, x.dtype)
        for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
            n = t // (G * bands)
            g = (t // bands) % G
            oh0 = (t % bands) * rows_per_band
            rows = min(rows_per_band, OH - oh0)
            pixels = rows * OW
            out = ((n * O + g * Og) * OH + oh0) * OW
            beta = 0.0
            if has_bias:
                beta = 1.0
                for o in range(Og):
                    b = bias[g * Og + o]
                    start = out + o * OH * OW
                    for p in range(pixels):
                        yf[_U(start + p)] = b
            if algorithm == POINTWISE:
                s = gemm(False, False, Og, pixels, Cg, w, g * Og * Cg, Cg,
                         xf, (n * C + g * Cg) * H * W + oh0 * W, H * W,
                         beta, yf, out, OH * OW)
            elif algorithm == ROWS:
                n_rows = rows + DH * (KH - 1)
                _gather_columns(x, n, g * Cg, Cg, oh0 - PT, 1, n_rows, 1, DH, KW, SW, DW,
                                PL, OW, col_lo, col_hi, cols)
                s = 0
                for i in range(KH):
                    s |= gemm(False, False, Og, pixels, k_gemm, w, (i * O + g * Og) * k_gemm,
                              k_gemm, cols, i * DH * OW, n_rows * OW,
                              beta if i == 0 else 1.0, yf, out, OH * OW)
            else:
                _gather_columns(x, n, g * Cg, Cg, oh0 * SH - PT, SH, rows, KH, DH, KW, SW,
                                DW, PL, OW, col_lo, col_hi, cols)
                s = gemm(False, False, Og, pixels, k_gemm, w, g * Og * k_gemm, k_gemm,
                         cols, 0, pixels, beta, yf, out, OH * OW)
            if s != 0:
                status[0] = s


@njit(**_JIT)
def _gemm_backward_input(grad_output, w, grad_input, rows_per_band, status,
                         G, KH, KW, SH, SW, DH, DW, PT, PL, col_lo, col_hi):
    """``grad_input = col2im(W_g^T @ grad_output)``, one thread per (image, group)."""
    N, C, H, W = grad_input.shape
    O, OH, OW = grad_output.shape[1], grad_output.shape[2], grad_output.shape[3]
    Cg = C // G
    Og = O // G
    K = Cg * KH * KW
    bands = (OH + rows_per_band - 1) // rows_per_band
    gf = grad_output.reshape(-1)
    for t in prange(N * G):
        n = t // G
        g = t % G
        cols = np.empty(K * rows_per_band * OW, grad_input.dtype)
        for c in range(Cg):
            grad_input[n, g * Cg + c] = 0
        for b in range(bands):
            oh0 = b * rows_per_band
            rows = min(rows_per_band, OH - oh0)
            s = gemm(True, False, K, rows * OW, Og, w, g * Og * K, K,
                     gf, ((n * O + g * Og) * OH + oh0) * OW, OH * OW,
                     0.0, cols, 0, rows * OW)
            if s != 0:
                status[0] = s
            _scatter_columns(cols, grad_input, n, g * Cg, Cg, oh0 * SH - PT, SH, rows, KH,
                             DH, KW, SW, DW, PL, OW, col_lo, col_hi)


@njit(**_JIT)
def _gemm_backward_weight(x, grad_output, partial, algorithm, rows_per_band, status,
                          G, KH, KW, SH, SW, DH, DW, PT, PL, col_lo, col_hi):
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
    for chunk in prange(chunks):
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
                                        SW, DW, PL, OW, col_lo, col_hi, cols)
                        s = 0
                        for i in range(KH):
                            s |= gemm(False, True, Og, k_gemm, pixels, gf, dy, OH * OW,
                                      cols, i * DH * OW, n_rows * OW,
                                      1.0, acc, (i * O + g * Og) * k_gemm, k_gemm)
                    else:
                        _gather_columns(x, n, g * Cg, Cg, oh0 * SH - PT, SH, rows, KH, DH,
                                        KW, SW, DW, PL, OW, col_lo, col_hi, cols)
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


@njit(**_JIT)
def _bias_grad(grad_output, out):
    """``out[o] = sum of grad_output[:, o]``, accumulated in float64."""
    N, O = grad_output.shape[0], grad_output.shape[1]
    P = grad_output.shape[2] * grad_output.shape[3]
    gf = grad_output.reshape(N, O, P)
    for o in prange(O):
        total = 0.0
        for n in range(N):
            for p in range(P):
                total += gf[n, o, p]
        out[o] = total


# ----------------------------------------------------------------------------- Winograd

# F(2x2, 3x3) (Lavin & Gray, 2016): each 2x2 output tile is A^T [(G g G^T) * (B^T d B)] A
# for its 4x4 input tile d, so the 36 multiplications of four outputs become 16, done as
# 16 GEMMs (one per transform-domain position) over channels x tiles.

# The 16 transform-domain planes are this many elements further apart than their size,
# so the 16 streams a tile reads or writes do not all fall in one L1 cache set (a plane
# size that is a multiple of 4 KiB made them collide and ran 2x slower).
_SKEW = 16


def winograd_weight(weight):
    """``U[xi*4 + nu, o, c] = (G w[o, c] G^T)[xi, nu]``, computed in float64."""
    G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
    U = np.einsum("ai,ocij,bj->aboc", G, weight.astype(np.float64), G)
    return np.ascontiguousarray(U.reshape(16, weight.shape[0], weight.shape[1]),
                                dtype=weight.dtype).reshape(-1)


@njit(inline="always")
def _winograd_input(x, n, c, th0, tile_rows, TW, PT, PL, rows, V, v_base, stride):
    """Transform the 4x4 input tiles of channel ``c`` for tile rows ``th0 ..``:
    ``V[v_base + (xi*4 + nu)*stride + t] = (B^T d B)[xi, nu]``, ``t`` the tile's index
    in the band. ``rows`` is a scratch
    ``(4, 2*TW + 2)`` array holding the tile row's input rows, zero-padded."""
    H, W = x.shape[2], x.shape[3]
    plane = x[n, c]
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
        r0, r1, r2, r3 = rows[0], rows[1], rows[2], rows[3]
        base = v_base + tr * TW
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
def _winograd_output(M, m_base, stride, y, n, o, th0, tile_rows, TW, b):
    """``y[n, o]`` 2x2 tiles ``A^T m A + b`` from ``m[xi, nu] = M[m_base +
    (xi*4 + nu)*stride + t]``; tiles past the edge are clipped."""
    OH, OW = y.shape[2], y.shape[3]
    out = y[n, o]
    full_w = OW // 2
    for tr in range(tile_rows):
        oh = 2 * (th0 + tr)
        row0 = out[oh]
        second = oh + 1 < OH
        row1 = out[oh + 1] if second else out[oh]
        base = m_base + tr * TW
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


@njit(**_JIT)
def _winograd_forward(x, U, bias, y, band_tile_rows, workers, status, G, PT,
                      PL):
    """``y = conv3x3(x) (+ bias)``, stride 1, by Winograd F(2x2, 3x3) over (image,
    group, band of tile rows)."""
    N, C = x.shape[0], x.shape[1]
    O, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    Cg = C // G
    Og = O // G
    TH = (OH + 1) // 2
    TW = (OW + 1) // 2
    bands = (TH + band_tile_rows - 1) // band_tile_rows
    tasks = N * G * bands
    T_max = band_tile_rows * TW
    for worker in prange(workers):
        V = np.empty(16 * (Cg * T_max + _SKEW), x.dtype)
        M = np.empty(16 * (Og * T_max + _SKEW), x.dtype)
        rows = np.empty((4, 2 * TW + 2), x.dtype)
        for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
            n = t // (G * bands)
            g = (t // bands) % G
            th0 = (t % bands) * band_tile_rows
            tile_rows = min(band_tile_rows, TH - th0)
            T = tile_rows * TW
            v_stride = Cg * T + _SKEW
            m_stride = Og * T + _SKEW
            for c in range(Cg):
                _winograd_input(x, n, g * Cg + c, th0, tile_rows, TW, PT, PL, rows, V,
                                c * T, v_stride)
            s = 0
            for e in range(16):
                s |= gemm(False, False, Og, T, Cg, U, (e * O + g * Og) * Cg, Cg,
                          V, e * v_stride, T, 0.0, M, e * m_stride, T)
            if s != 0:
                status[0] = s
            for o in range(Og):
                b = bias[g * Og + o]
                _winograd_output(M, o * T, m_stride, y, n, g * Og + o, th0, tile_rows, TW,
                                 b)


# ----------------------------------------------------------------------------- direct

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


# Stride-1 direct kernels work on zero-padded copies of whole planes laid out with the
# padded width ``Wp``: every tap is then one long unit-stride loop over the flat plane
# (``OH * Wp`` elements, the ``Wp - OW`` extra columns of each row are discarded), with
# no bounds checks and no short-row remainders to hold back vectorisation.
_PADDED_PLANE_LIMIT = 1 << 22  # elements; larger planes use the row kernels above


@njit(inline="always")
def _pad_plane(src, dst, PT, PL, Hp, Wp):
    """``dst[r*Wp + c] = src[r - PT, c - PL]``, 0 outside ``src``; the slack after
    ``Hp * Wp`` is zeroed too."""
    H, W = src.shape
    lo = min(max(PL, 0), Wp)
    hi = min(max(PL + W, lo), Wp)
    for r in range(Hp):
        h = r - PT
        base = r * Wp
        if h < 0 or h >= H:
            for c in range(Wp):
                dst[_U(base + c)] = 0
            continue
        row = src[h]
        for c in range(lo):
            dst[_U(base + c)] = 0
        for c in range(lo, hi):
            dst[_U(base + c)] = row[_U(c - PL)]
        for c in range(hi, Wp):
            dst[_U(base + c)] = 0
    for e in range(Hp * Wp, dst.shape[0]):
        dst[e] = 0


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
def _tap_offsets(KH, KW, DH, DW, Wp):
    offsets = np.empty(KH * KW, np.int64)
    for i in range(KH):
        for j in range(KW):
            offsets[i * KW + j] = i * DH * Wp + j * DW
    return offsets


@njit(**_JIT)
def _direct_forward_unit_stride(x, w, bias, has_bias, y, workers, G, KH, KW, DH, DW, PT,
                                PL):
    N, C, H, W = x.shape
    O, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    Cg = C // G
    Og = O // G
    Hp = OH + DH * (KH - 1)
    Wp = OW + DW * (KW - 1)
    Q = OH * Wp
    tasks = N * O
    offsets = _tap_offsets(KH, KW, DH, DW, Wp)
    for worker in prange(workers):
        padded = np.empty(Hp * Wp + DW * (KW - 1), x.dtype)
        acc = np.empty(Q, x.dtype)
        for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
            n = t // O
            o = t % O
            g = o // Og
            b = bias[o] if has_bias else 0.0
            for q in range(Q):
                acc[q] = b
            for c in range(Cg):
                _pad_plane(x[n, g * Cg + c], padded, PT, PL, Hp, Wp)
                _accumulate_taps(acc, padded, w[o, c].reshape(-1), offsets, Q)
            out = y[n, o]
            for oh in range(OH):
                row = out[oh]
                for ow in range(OW):
                    row[_U(ow)] = acc[_U(oh * Wp + ow)]


@njit(cache=True, boundscheck=False, nogil=True, fastmath={"reassoc"})
def _dot(a, b, b_offset, length):
    """``sum a[q] * b[q + b_offset]`` over ``q < length``. Reassociation lets LLVM keep
    vector partial sums; the order depends only on ``length``, so it is fixed."""
    total = a.dtype.type(0)
    for q in range(length):
        total += a[_U(q)] * b[_U(q + b_offset)]
    return total


@njit(**_JIT)
def _direct_backward_weight_unit_stride(x, grad_output, grad_weight, G, KH, KW, DH, DW,
                                        PT, PL):
    """One thread per output channel: per image, one dot product per tap over the flat
    padded plane, summed over images in float64."""
    N, C, H, W = x.shape
    O, OH, OW = grad_output.shape[1], grad_output.shape[2], grad_output.shape[3]
    Cg = C // G
    Og = O // G
    Hp = OH + DH * (KH - 1)
    Wp = OW + DW * (KW - 1)
    Q = OH * Wp
    offsets = _tap_offsets(KH, KW, DH, DW, Wp)
    for o in prange(O):
        g = o // Og
        totals = np.zeros((Cg, KH * KW), np.float64)
        padded = np.empty(Hp * Wp + DW * (KW - 1), x.dtype)
        dy = np.zeros(Q, x.dtype)  # grad_output rows at stride Wp, zero beyond OW
        for n in range(N):
            plane = grad_output[n, o]
            for oh in range(OH):
                row = plane[oh]
                for ow in range(OW):
                    dy[_U(oh * Wp + ow)] = row[_U(ow)]
            for c in range(Cg):
                _pad_plane(x[n, g * Cg + c], padded, PT, PL, Hp, Wp)
                for k in range(KH * KW):
                    totals[c, k] += _dot(dy, padded, offsets[k], Q)
        flat = grad_weight[o].reshape(-1)
        for c in range(Cg):
            for k in range(KH * KW):
                flat[c * KH * KW + k] = totals[c, k]

# ----------------------------------------------------------------------------- launchers

def _forward_problem(g):
    return _Problem((g.batch, g.in_channels, g.in_h, g.in_w), (g.out_h, g.out_w),
                    (g.out_channels, g.in_channels // g.groups, g.kernel_h, g.kernel_w),
                    g.groups, (g.stride_h, g.stride_w), (g.pad_top, g.pad_left),
                    (g.dilation_h, g.dilation_w))


def _input_grad_problem(g):
    """Stride-1 input gradient as a forward convolution of ``grad_output``."""
    return _Problem((g.batch, g.out_channels, g.out_h, g.out_w), (g.in_h, g.in_w),
                    (g.in_channels, g.out_channels // g.groups, g.kernel_h, g.kernel_w),
                    g.groups, (1, 1),
                    (g.dilation_h * (g.kernel_h - 1) - g.pad_top,
                     g.dilation_w * (g.kernel_w - 1) - g.pad_left),
                    (g.dilation_h, g.dilation_w))


def _flipped_transposed(weight, groups):
    """``wt[g*Cg + c, o, i, j] = weight[g*Og + o, c, KH-1-i, KW-1-j]``."""
    O, Cg, KH, KW = weight.shape
    per_group = weight.reshape(groups, O // groups, Cg, KH, KW)[:, :, :, ::-1, ::-1]
    return contiguous(per_group.transpose(0, 2, 1, 3, 4)).reshape(
        groups * Cg, O // groups, KH, KW)


def _algorithm_code(geometry, algorithm):
    """``None`` (choose per problem) or the code of a named algorithm valid here."""
    if algorithm is None:
        return None
    if algorithm not in valid_algorithms(geometry):
        raise ValueError(f"algorithm {algorithm!r} cannot run this convolution; valid: "
                         f"{valid_algorithms(geometry)}")
    return ALGORITHMS[algorithm]


def _check(status):
    if status[0] != 0:
        raise RuntimeError(f"BLAS gemm failed with status {status[0]}")


def _run_forward(problem, x, weight, bias, y, algorithm=None):
    algorithm = problem.algorithm() if algorithm is None else algorithm
    has_bias = bias is not None
    bias = contiguous(bias) if has_bias else np.zeros(1, x.dtype)
    if algorithm == DIRECT:
        weight = contiguous(weight)
        if problem.unit_stride_planes():
            p = problem
            _direct_forward_unit_stride(x, weight, bias, has_bias, y,
                                        numba.get_num_threads(), p.groups, p.kernel_h,
                                        p.kernel_w, p.dilation_h, p.dilation_w,
                                        p.pad_top, p.pad_left)
        else:
            _direct_forward(x, weight, bias, has_bias, y, *problem.args)
        return y
    status = np.zeros(1, np.int32)
    if algorithm == WINOGRAD:
        with single_threaded_blas(x.dtype):
            _winograd_forward(x, winograd_weight(weight),
                              bias if has_bias else np.zeros(y.shape[1], x.dtype), y,
                              problem.winograd_band_tile_rows(x.itemsize),
                              numba.get_num_threads(), status, problem.groups,
                              problem.pad_top, problem.pad_left)
        _check(status)
        return y
    with single_threaded_blas(x.dtype):
        _gemm_forward(x, problem.gemm_weight(weight, algorithm), bias, has_bias, y,
                      algorithm, problem.band_rows(algorithm, x.itemsize),
                      numba.get_num_threads(), status, *problem.args)
    _check(status)
    return y


def conv2d_forward(x, weight, bias, geometry, algorithm=None):
    """``y`` of shape ``(N, C_out, OH, OW)``. ``algorithm`` (a name from
    ``ALGORITHMS``) overrides ``choose_algorithm``; tests use it to cover every path."""
    g = geometry
    x = contiguous(x).reshape(g.batch, g.in_channels, g.in_h, g.in_w)
    y = np.empty((g.batch, g.out_channels, g.out_h, g.out_w), x.dtype)
    if g.batch > 0:
        _run_forward(_forward_problem(g), x, weight, bias, y, _algorithm_code(g, algorithm))
    return y.reshape(g.output_shape)


def _input_grad(grad_output, weight, g, algorithm):
    grad_input = np.empty((g.batch, g.in_channels, g.in_h, g.in_w), grad_output.dtype)
    problem = _forward_problem(g)
    if algorithm == DIRECT and not problem.unit_stride_planes():
        _direct_backward_input(grad_output, contiguous(weight), grad_input,
                               *problem.args)
    elif algorithm != IM2COL and g.stride_h == g.stride_w == 1:
        transposed = _input_grad_problem(g)
        _run_forward(transposed, grad_output, _flipped_transposed(weight, g.groups), None,
                     grad_input, DIRECT if algorithm == DIRECT else None)
    else:
        status = np.zeros(1, np.int32)
        rows = problem.band_rows(IM2COL, grad_output.itemsize)
        with single_threaded_blas(grad_output.dtype):
            _gemm_backward_input(grad_output, contiguous(weight).reshape(-1),
                                 grad_input, rows, status, *problem.args)
        _check(status)
    return grad_input


def _weight_grad(x, grad_output, weight_shape, g, algorithm):
    if algorithm == WINOGRAD:
        algorithm = ROWS  # the weight gradient's GEMMs reduce over pixels; no tiles
    grad_weight = np.empty(weight_shape, x.dtype)
    problem = _forward_problem(g)
    if algorithm == DIRECT:
        p = problem
        if p.unit_stride_planes():
            _direct_backward_weight_unit_stride(x, grad_output, grad_weight, p.groups,
                                                p.kernel_h, p.kernel_w, p.dilation_h,
                                                p.dilation_w, p.pad_top, p.pad_left)
        else:
            _direct_backward_weight(x, grad_output, grad_weight, *problem.args)
        return grad_weight
    weight_bytes = grad_weight.nbytes
    chunks = max(1, min(g.batch, _MAX_CHUNKS, _PARTIAL_BYTES // weight_bytes))
    partial = np.empty((chunks, grad_weight.size), x.dtype)
    status = np.zeros(1, np.int32)
    with single_threaded_blas(x.dtype):
        _gemm_backward_weight(x, grad_output, partial, algorithm,
                              problem.band_rows(algorithm, x.itemsize), status,
                              *problem.args)
    _check(status)
    if algorithm == ROWS:
        O, Cg, KH, KW = weight_shape
        summed = np.empty((KH, O, Cg, KW), x.dtype)
        _sum_partials(partial, summed)
        grad_weight[...] = summed.transpose(1, 2, 0, 3)
    else:
        _sum_partials(partial, grad_weight)
    return grad_weight


def conv2d_backward(grad_output, x, weight, geometry, output_mask, algorithm=None):
    """``(grad_input, grad_weight, grad_bias)``, ``None`` where ``output_mask`` is
    False."""
    g = geometry
    want_input, want_weight, want_bias = output_mask
    grad_output = contiguous(grad_output).reshape(
        g.batch, g.out_channels, g.out_h, g.out_w)
    if want_weight:  # only the weight gradient reads x: no copy of it otherwise
        x = contiguous(x).reshape(g.batch, g.in_channels, g.in_h, g.in_w)
    code = _algorithm_code(g, algorithm)
    if code is None:
        code = _forward_problem(g).algorithm()
    grad_input = grad_weight = grad_bias = None
    if want_input:
        if g.batch == 0:
            grad_input = np.zeros((0, g.in_channels, g.in_h, g.in_w), grad_output.dtype)
        else:
            grad_input = _input_grad(grad_output, weight, g, code)
        grad_input = grad_input.reshape(g.input_shape)
    if want_weight:
        if g.batch == 0:
            grad_weight = np.zeros(weight.shape, grad_output.dtype)
        else:
            grad_weight = _weight_grad(x, grad_output, weight.shape, g, code)
    if want_bias:
        grad_bias = np.empty(g.out_channels, grad_output.dtype)
        if g.batch == 0:
            grad_bias[:] = 0
        else:
            _bias_grad(grad_output, grad_bias)
    return grad_input, grad_weight, grad_bias
