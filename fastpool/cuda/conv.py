"""numba.cuda convolution kernels and their launchers, mirroring ``fastpool.cpu.conv``.

Launchers take Numba device arrays already validated by ``fastpool._params`` plus the
``ConvGeometry`` and return Numba device arrays (``fastpool.cuda`` adds the transfers).
Kernels index ``(N, C, H, W)`` arrays of any strides.

Algorithms
----------
Per group ``g`` a convolution is the GEMM ``Y_g[m, p] = sum_k W_g[m, k] * X_g[k, p]``:
``m`` an output channel of the group, ``p = (n, oh, ow)`` an output pixel of any image,
``k = (c, i, j)`` an input channel of the group and a kernel tap, ``X_g`` the implicit
im2col matrix (never built). A small per-call table ``taps[k] = (c, i*DH, j*DW)`` turns
``k`` into an input offset without divisions in the kernels.

``"tiled"`` (forward)
    Shared-memory implicit GEMM (``TileConfig``; production: ``BM x BN = 64`` output
    channels x 64 pixels per block of 256 threads, stages of ``BK = 16`` reduction
    steps, a ``4 x 4`` register micro-tile per thread). Per stage each thread loads
    ``BK*BN/threads`` entries of the input patch (consecutive threads read consecutive
    pixels: coalesced) and as many weights into registers, stores them to shared
    memory, then updates its micro-tile from it, its operands read as 128-bit vectors.
    The next stage's global loads are issued before the current stage's arithmetic,
    so their latency hides behind it. Weights are first rearranged on the device into
    ``(groups, K, M_g)`` so both shared tiles fill without bank conflicts. Blocks walk
    the tiles in a grid-stride loop, channel tiles fastest (neighbouring blocks share
    an input patch in L2).
``"direct"`` (forward)
    One thread per output element, summing its ``K`` products in tap order. For
    depthwise and other convolutions with fewer than 8 output channels or taps per
    group, where a 64-row tile would be mostly idle.

Backward:

- input gradient, stride 1: the forward convolution of ``grad_output`` with the
  flipped, channel-transposed kernel and padding ``d*(k-1) - pad`` (which may be
  negative: a crop), so it runs on the kernels above (as on the CPU);
- input gradient, other strides: gather form, one thread per input element summing the
  ``grad_output * weight`` products of the taps that read it, in a fixed order;
- weight gradient: the GEMM ``dW_g[m, k] = sum_p dY_g[m, p] * X_g[k, p]``. ``"tiled"``
  uses the same tiling (64 output channels x 64 taps, 16 pixels per stage) with a
  fixed split of the pixel range into ``S`` contiguous slices, about 1024 blocks in
  all (``S`` depends only on the shapes); each block writes its slice's partial sums
  into ``partial[s]``.
  ``"direct"`` gives one thread to each ``(s, weight element)`` summing the pixels
  ``p = s (mod S)`` (consecutive threads read consecutive pixels);
- bias gradient: as the direct weight gradient, one thread per ``(s, channel)``.

Partial sums are then added by one thread per result, ``s = 0, 1, ..., S-1`` in order.
Every sum therefore runs in an order fixed by the shapes (and the tile configuration)
alone, not by the launch size: no float atomics, and results are identical from run
to run and under any ``launch_limits``.

Geometry is runtime data: one compile per dtype (and tile configuration) serves every
shape, kernel size, stride, padding and dilation.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import NamedTuple

import numba
import numpy as np
from numba import config, cuda

from fastpool.cuda._launch import (batched, contiguous, grid_start, grid_stride, launch,
                                   split_nchw)

TILED, DIRECT = "tiled", "direct"
ALGORITHMS = (TILED, DIRECT)

# The tiled GEMMs need this many rows (output channels per group) and reduction taps;
# below it most of a 64-row tile would compute zeros.
_TILED_MIN = 8
# Split-K partial sums: aim for this many blocks (tiled) or threads (direct, bias),
# and keep the partial buffer under this many bytes.
_TARGET_BLOCKS = 1024
_TARGET_THREADS = 1 << 16
_PARTIAL_BYTES = 64 << 20
# Shared tiles are 16-byte aligned, so that a thread's 4 consecutive micro-tile operands
# load as one 128-bit access. The simulator takes no alignment.
_ALIGN = None if config.ENABLE_CUDASIM else 16


# Limits of every CUDA GPU Numba supports: threads per block, and static shared memory
# per block (more needs dynamic shared memory and an opt-in).
MAX_THREADS_PER_BLOCK = 1024
MAX_STATIC_SHARED_BYTES = 48 * 1024


class TileConfig(NamedTuple):
    """Shape of the tiled GEMMs' block tile.

    ``block_m`` rows (output channels) by ``block_n`` columns (output pixels in the
    forward, taps in the weight gradient) per block, ``block_k`` reduction steps per
    shared-memory stage, and a ``thread_m x thread_n`` register micro-tile per thread
    (each side 1, 2 or 4: one vector load). The block has ``threads`` threads, which
    must divide among the tile's rows, columns and stage depth for the loads.
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 16
    thread_m: int = 4
    thread_n: int = 4

    @property
    def threads(self):
        return (self.block_m // self.thread_m) * (self.block_n // self.thread_n)

    def shared_bytes(self, itemsize=8):
        """Static shared memory of one block: the two stage tiles (``_tile_groups``)."""
        groups_m, groups_n = _tile_groups(self)
        return self.block_k * (groups_m * self.thread_m + groups_n * self.thread_n) * itemsize

    def check(self):
        bm, bn, bk, tm, tn = self
        t = self.threads
        if (tm not in (1, 2, 4) or tn not in (1, 2, 4) or bm % tm or bn % tn
                or t % bm or t % bn or t % bk or (bk * bm) % t or (bk * bn) % t):
            raise ValueError(f"unsupported tile configuration {self}")
        # The hardware's limits, which the simulator does not enforce: checked for
        # float64, the larger dtype, so a configuration runs in both.
        if t > MAX_THREADS_PER_BLOCK or self.shared_bytes() > MAX_STATIC_SHARED_BYTES:
            raise ValueError(
                f"tile configuration {self} needs {t} threads and "
                f"{self.shared_bytes()} bytes of shared memory per block in float64; "
                f"a GPU allows {MAX_THREADS_PER_BLOCK} threads and "
                f"{MAX_STATIC_SHARED_BYTES} bytes of static shared memory")
        return self


PRODUCTION_TILES = TileConfig()
_tiles = threading.local()


@contextlib.contextmanager
def use_tiles(config):
    """Use the tile configuration ``config`` (a ``TileConfig``) for calls made by this
    thread inside the block; tests use small tiles, which the simulator runs fast."""
    saved = getattr(_tiles, "value", None)
    _tiles.value = TileConfig(*config).check()
    try:
        yield
    finally:
        _tiles.value = saved


def current_tiles():
    return getattr(_tiles, "value", None) or PRODUCTION_TILES


# ----------------------------------------------------------------------------- kernels

_U = np.uint64  # flat indices known to be >= 0: no negative-index wraparound code


@cuda.jit(device=True, inline=True)
def _patch_value(x, taps, k, K, base, h0, w0, H, W, ok, zero):
    """Entry ``(k, p)`` of the implicit im2col matrix, read from the flat C-contiguous
    input ``x``: ``taps[k] = (c, i*DH, j*DW, offset)`` puts the tap at row ``h0 + i*DH``,
    column ``w0 + j*DW`` and flat index ``base + offset``, with ``base`` the flat index
    of row ``h0``, column ``w0`` of the group's first channel in the pixel's image.
    ``zero`` in the padding, past the last tap or when ``ok`` (the pixel exists) is
    False."""
    if ok and k < K:
        h = h0 + taps[_U(k), 1]
        w = w0 + taps[_U(k), 2]
        if h >= 0 and h < H and w >= 0 and w < W:
            return x[_U(base + taps[_U(k), 3])]
    return zero


def _tile_groups(tiles):
    """Shared tiles are ``(block_k, groups, thread_m)`` (``thread_n``): a stage step, a
    thread's group of consecutive tile rows (columns), its lane. The index split lets
    the compiler see each group as one vector. One group more than the tile holds pads
    the rows, which spreads the weight gradient's pixel-fastest stores over the banks.
    """
    return (tiles.block_m // tiles.thread_m + 1, tiles.block_n // tiles.thread_n + 1)


@functools.lru_cache(maxsize=None)
def _stage_product(tiles):
    """Device function: one stage of a tiled GEMM,
    ``acc[a, b] += sum over kk of a_s[kk, ty, a] * b_s[kk, tx, b]``, i.e. the tile rows
    ``ty*TM + a`` and columns ``tx*TN + b``.

    A thread's ``TM`` (``TN``) operands are consecutive words of a 16-byte aligned tile,
    which the compiler loads as one 128-bit access (``TileConfig`` keeps ``TM``, ``TN``
    <= 4); a warp reads two row groups (a broadcast) and 16 consecutive column groups:
    no bank conflicts.
    """
    _, _, BK, TM, TN = tiles

    @cuda.jit(device=True, inline=True)
    def stage_product(a_s, b_s, acc, a_frag, b_frag, ty, tx):
        # while loops, not range(): LLVM then sees non-negative counters with constant
        # bounds, drops the negative-index checks, unrolls and vectorises the loads.
        kk = 0
        while kk < BK:
            a = 0
            while a < TM:
                a_frag[a] = a_s[kk, ty, a]
                a += 1
            b = 0
            while b < TN:
                b_frag[b] = b_s[kk, tx, b]
                b += 1
            a = 0
            while a < TM:
                b = 0
                while b < TN:
                    acc[a, b] += a_frag[a] * b_frag[b]
                    b += 1
                a += 1
            kk += 1

    return stage_product


@functools.lru_cache(maxsize=None)
def _tiled_forward_kernel(dtype, tiles):
    """Implicit-GEMM forward for one dtype and tile configuration (see module doc)."""
    BM, BN, BK, TM, TN = tiles
    THREADS = tiles.threads
    COLS = BN // TN                          # threads along a tile row
    X_LOADS, X_ROW_STEP = BK * BN // THREADS, THREADS // BN
    W_LOADS, W_ROW_STEP = BK * BM // THREADS, THREADS // BM
    real = numba.from_dtype(dtype)
    zero = real(0)
    stage_product = _stage_product(tiles)
    GROUPS_M, GROUPS_N = _tile_groups(tiles)

    @cuda.jit
    def tiled_forward(x, C, H, W, wk, bias, has_bias, y, taps, groups, SH, SW, PT, PL):
        # x: the input, flat and C-contiguous, (N, C, H, W); wk: flat (groups, K, Mg).
        N, O, OH, OW = y.shape
        K = taps.shape[0]
        Mg = O // groups
        Cg = C // groups
        plane = np.int64(OH) * OW
        image = np.int64(C) * H * W
        P = N * plane
        m_tiles = (Mg + BM - 1) // BM
        p_tiles = (P + BN - 1) // BN
        n_tiles = groups * m_tiles * p_tiles

        w_s = cuda.shared.array((BK, GROUPS_M, TM), real, alignment=_ALIGN)
        x_s = cuda.shared.array((BK, GROUPS_N, TN), real, alignment=_ALIGN)
        acc = cuda.local.array((TM, TN), real)
        a_frag = cuda.local.array(TM, real)
        b_frag = cuda.local.array(TN, real)
        x_next = cuda.local.array(X_LOADS, real)
        w_next = cuda.local.array(W_LOADS, real)

        t = cuda.threadIdx.x
        tx, ty = t % COLS, t // COLS              # micro-tile position
        x_col, x_row = t % BN, t // BN            # input-patch loads: pixel fastest
        w_col, w_row = t % BM, t // BM            # weight loads: channel fastest
        x_group, x_lane = x_col // TN, x_col % TN
        w_group, w_lane = w_col // TM, w_col % TM

        for tile in range(cuda.blockIdx.x, n_tiles, cuda.gridDim.x):
            mt = tile % m_tiles                   # channel tiles fastest: neighbouring
            rest = tile // m_tiles                # blocks share one input patch in L2
            p0 = (rest % p_tiles) * BN
            g = rest // p_tiles
            m0 = mt * BM
            # The one output pixel whose input patch this thread loads, all tile long.
            p = p0 + x_col
            pixel_ok = p < P
            n = p // plane
            q = p - n * plane
            oh = q // OW
            h0 = oh * SH - PT
            w0 = (q - oh * OW) * SW - PL
            x_base = n * image + (g * Cg * H + h0) * W + w0
            m_ok = m0 + w_col < Mg
            w_base = g * K * Mg + m0 + w_col      # + k * Mg: weight (k, m0 + w_col)
            for a in range(TM):
                for b in range(TN):
                    acc[a, b] = zero

            for r in range(X_LOADS):
                k = x_row + r * X_ROW_STEP
                x_next[r] = _patch_value(x, taps, k, K, x_base, h0, w0, H, W, pixel_ok,
                                         zero)
            for r in range(W_LOADS):
                k = w_row + r * W_ROW_STEP
                w_next[r] = wk[_U(w_base + k * Mg)] if m_ok and k < K else zero
            for k0 in range(0, K, BK):
                for r in range(X_LOADS):
                    x_s[x_row + r * X_ROW_STEP, x_group, x_lane] = x_next[r]
                for r in range(W_LOADS):
                    w_s[w_row + r * W_ROW_STEP, w_group, w_lane] = w_next[r]
                cuda.syncthreads()
                k1 = k0 + BK
                if k1 < K:  # the next stage's loads fly while this stage computes
                    for r in range(X_LOADS):
                        k = k1 + x_row + r * X_ROW_STEP
                        x_next[r] = _patch_value(x, taps, k, K, x_base, h0, w0, H, W,
                                                 pixel_ok, zero)
                    for r in range(W_LOADS):
                        k = k1 + w_row + r * W_ROW_STEP
                        w_next[r] = wk[_U(w_base + k * Mg)] if m_ok and k < K else zero
                stage_product(w_s, x_s, acc, a_frag, b_frag, ty, tx)
                cuda.syncthreads()

            for b in range(TN):
                p = p0 + tx * TN + b
                if p < P:
                    n = p // plane
                    q = p - n * plane
                    oh = q // OW
                    ow = q - oh * OW
                    for a in range(TM):
                        m = m0 + ty * TM + a
                        if m < Mg:
                            o = g * Mg + m
                            value = acc[a, b]
                            if has_bias:
                                value += bias[o]
                            y[n, o, oh, ow] = value

    return tiled_forward


@functools.lru_cache(maxsize=None)
def _tiled_weight_grad_kernel(dtype, tiles):
    """Weight-gradient GEMM for one dtype and tile configuration: block tile ``BM``
    output channels x ``BN`` taps, ``BK`` pixels per stage, over one slice of the
    pixels (see module doc)."""
    BM, BN, BK, TM, TN = tiles
    THREADS = tiles.threads
    COLS = BN // TN
    ROW_STEP = THREADS // BK
    A_LOADS, B_LOADS = BK * BM // THREADS, BK * BN // THREADS
    real = numba.from_dtype(dtype)
    zero = real(0)
    stage_product = _stage_product(tiles)
    GROUPS_M, GROUPS_N = _tile_groups(tiles)

    @cuda.jit
    def tiled_weight_grad(x, C, H, W, gy, OH, OW, taps, partial, groups, SH, SW, PT, PL,
                          slice_len):
        # x, gy: the input and grad_output, flat and C-contiguous.
        S, O, K = partial.shape
        Og = O // groups
        Cg = C // groups
        plane = np.int64(OH) * OW
        image = np.int64(C) * H * W
        P = gy.size // O
        m_tiles = (Og + BM - 1) // BM
        k_tiles = (K + BN - 1) // BN
        n_tiles = S * groups * m_tiles * k_tiles

        a_s = cuda.shared.array((BK, GROUPS_M, TM), real, alignment=_ALIGN)
        b_s = cuda.shared.array((BK, GROUPS_N, TN), real, alignment=_ALIGN)
        acc = cuda.local.array((TM, TN), real)
        a_frag = cuda.local.array(TM, real)
        b_frag = cuda.local.array(TN, real)
        a_next = cuda.local.array(A_LOADS, real)
        b_next = cuda.local.array(B_LOADS, real)

        t = cuda.threadIdx.x
        tx, ty = t % COLS, t // COLS
        load_p, load_row = t % BK, t // BK        # loads: pixel fastest (coalesced)

        for tile in range(cuda.blockIdx.x, n_tiles, cuda.gridDim.x):
            k0 = (tile % k_tiles) * BN
            rest = tile // k_tiles
            m0 = (rest % m_tiles) * BM
            rest = rest // m_tiles
            g = rest % groups
            s = rest // groups
            o0 = g * Og + m0
            p_begin = s * slice_len
            p_end = min(P, p_begin + slice_len)
            p = p_begin + load_p                  # this thread's pixel in the stage
            n = p // plane
            q = p - n * plane
            oh = q // OW
            ow = q - oh * OW
            for a in range(TM):
                for b in range(TN):
                    acc[a, b] = zero

            # Software pipelined: the turn for stage p0 issues its global loads, then
            # multiplies the previous stage (stored to shared memory at its start)
            # while they fly; one extra turn multiplies the last stage.
            for p0 in range(p_begin, p_end + BK, BK):
                if p0 > p_begin:
                    for r in range(A_LOADS):
                        row = load_row + r * ROW_STEP
                        a_s[load_p, row // TM, row % TM] = a_next[r]
                    for r in range(B_LOADS):
                        row = load_row + r * ROW_STEP
                        b_s[load_p, row // TN, row % TN] = b_next[r]
                    cuda.syncthreads()
                if p0 < p_end:
                    if p0 > p_begin:
                        p += BK
                        ow += BK
                        while ow >= OW:
                            ow -= OW
                            oh += 1
                            if oh == OH:
                                oh = 0
                                n += 1
                    ok = p < p_end
                    gy_base = (n * O + o0) * plane + oh * OW + ow
                    for r in range(A_LOADS):
                        row = load_row + r * ROW_STEP
                        a_next[r] = (gy[_U(gy_base + row * plane)]
                                     if ok and m0 + row < Og else zero)
                    h0 = oh * SH - PT
                    w0 = ow * SW - PL
                    x_base = n * image + (g * Cg * H + h0) * W + w0
                    for r in range(B_LOADS):
                        b_next[r] = _patch_value(x, taps, k0 + load_row + r * ROW_STEP, K,
                                                 x_base, h0, w0, H, W, ok, zero)
                if p0 > p_begin:
                    stage_product(a_s, b_s, acc, a_frag, b_frag, ty, tx)
                    cuda.syncthreads()

            for a in range(TM):
                m = m0 + ty * TM + a
                if m < Og:
                    for b in range(TN):
                        k = k0 + tx * TN + b
                        if k < K:
                            partial[s, g * Og + m, k] = acc[a, b]

    return tiled_weight_grad


class _SimpleKernels(NamedTuple):
    direct_forward: object
    direct_input_grad: object
    direct_weight_grad: object
    bias_grad: object
    sum_partials: object


@functools.lru_cache(maxsize=None)
def _simple_kernels(dtype):
    """The one-thread-per-result kernels for one dtype (their sums start from a zero
    of that dtype, so float32 sums stay float32)."""
    zero = numba.from_dtype(dtype)(0)

    @cuda.jit
    def direct_forward(x, wk, bias, has_bias, y, taps, SH, SW, PT, PL):
        _, O, OH, OW = y.shape
        groups, K, Mg = wk.shape
        Cg = x.shape[1] // groups
        total = np.int64(y.shape[0]) * O * OH * OW
        e = grid_start()
        while e < total:
            n, o, oh, ow = split_nchw(e, O, OH, OW)
            g = o // Mg
            m = o - g * Mg
            acc = zero
            for k in range(K):
                h = oh * SH - PT + taps[k, 1]
                w = ow * SW - PL + taps[k, 2]
                if h >= 0 and h < x.shape[2] and w >= 0 and w < x.shape[3]:
                    acc += wk[g, k, m] * x[n, g * Cg + taps[k, 0], h, w]
            if has_bias:
                acc += bias[o]
            y[n, o, oh, ow] = acc
            e += grid_stride()

    @cuda.jit
    def direct_input_grad(gy, weight, gi, groups, SH, SW, DH, DW, PT, PL):
        N, C, H, W = gi.shape
        O, OH, OW = gy.shape[1], gy.shape[2], gy.shape[3]
        Cg, KH, KW = weight.shape[1], weight.shape[2], weight.shape[3]
        Og = O // groups
        total = np.int64(N) * C * H * W
        e = grid_start()
        while e < total:
            n, c, ih, iw = split_nchw(e, C, H, W)
            g = c // Cg
            acc = zero
            for i in range(KH):  # taps in order, then the group's channels
                th = ih + PT - i * DH
                if th < 0:
                    break
                oh = th // SH
                if oh * SH != th or oh >= OH:
                    continue
                for j in range(KW):
                    tw = iw + PL - j * DW
                    if tw < 0:
                        break
                    ow = tw // SW
                    if ow * SW != tw or ow >= OW:
                        continue
                    for o in range(g * Og, g * Og + Og):
                        acc += gy[n, o, oh, ow] * weight[o, c - g * Cg, i, j]
            gi[n, c, ih, iw] = acc
            e += grid_stride()

    @cuda.jit
    def direct_weight_grad(x, gy, taps, partial, groups, SH, SW, PT, PL):
        N, O, OH, OW = gy.shape
        S, _, K = partial.shape
        Og = O // groups
        Cg = x.shape[1] // groups
        plane = np.int64(OH) * OW
        P = N * plane
        total = np.int64(S) * O * K
        e = grid_start()
        while e < total:
            s = e % S  # consecutive threads: consecutive pixels
            rest = e // S
            k = rest % K
            o = rest // K
            c = (o // Og) * Cg + taps[k, 0]
            h_offset = taps[k, 1] - PT
            w_offset = taps[k, 2] - PL
            acc = zero
            for r in range(s, P, S):
                n = r // plane
                q = r - n * plane
                oh = q // OW
                ow = q - oh * OW
                h = oh * SH + h_offset
                w = ow * SW + w_offset
                if h >= 0 and h < x.shape[2] and w >= 0 and w < x.shape[3]:
                    acc += gy[n, o, oh, ow] * x[n, c, h, w]
            partial[s, o, k] = acc
            e += grid_stride()

    @cuda.jit
    def bias_grad(gy, partial):
        N, O, OH, OW = gy.shape
        S = partial.shape[0]
        plane = np.int64(OH) * OW
        total = np.int64(S) * O
        e = grid_start()
        while e < total:
            s = e % S
            o = e // S
            acc = zero
            for r in range(s, N * plane, S):
                n = r // plane
                q = r - n * plane
                oh = q // OW
                acc += gy[n, o, oh, q - oh * OW]
            partial[s, o] = acc
            e += grid_stride()

    @cuda.jit
    def sum_partials(partial, out):
        S, E = partial.shape
        e = grid_start()
        while e < E:
            acc = zero
            for s in range(S):
                acc += partial[s, e]
            out[e] = acc
            e += grid_stride()

    return _SimpleKernels(direct_forward, direct_input_grad, direct_weight_grad, bias_grad,
                          sum_partials)


@cuda.jit
def _gemm_weights(weight, wk, flip):
    """``weight`` rearranged as the GEMMs read it, ``wk[g, k, m]`` (``k`` the reduction
    index, ``m`` the output channel within group ``g``):

    - ``flip`` False (forward): ``k = (c, i, j)``,
      ``wk[g, k, m] = weight[g*Og + m, c, i, j]``;
    - ``flip`` True (stride-1 input gradient, a convolution of ``grad_output``):
      ``k = (o, i, j)``, ``wk[g, k, c] = weight[g*Og + o, c, KH-1-i, KW-1-j]``.
    """
    O, KH, KW = weight.shape[0], weight.shape[2], weight.shape[3]
    groups, K, Mg = wk.shape
    Og = O // groups
    total = np.int64(groups) * K * Mg
    e = grid_start()
    while e < total:
        m = e % Mg
        rest = e // Mg
        k = rest % K
        g = rest // K
        j = k % KW
        rest = k // KW
        i = rest % KH
        channel = rest // KH
        if flip:
            wk[g, k, m] = weight[g * Og + channel, m, KH - 1 - i, KW - 1 - j]
        else:
            wk[g, k, m] = weight[g * Og + m, channel, i, j]
        e += grid_stride()


# ----------------------------------------------------------------------------- launchers

def _ceil_div(a, b):
    return -(-a // b)


def _taps(channels, kernel_h, kernel_w, dilation_h, dilation_w, in_h, in_w):
    """``taps[k] = (c, i*DH, j*DW, flat offset of that tap in a C-contiguous input of
    in_h x in_w planes)`` for ``k = (c*KH + i)*KW + j``, on the device."""
    c, i, j = np.meshgrid(np.arange(channels), np.arange(kernel_h), np.arange(kernel_w),
                          indexing="ij")
    dh, dw = i.ravel() * dilation_h, j.ravel() * dilation_w
    offset = (c.ravel() * in_h + dh) * in_w + dw
    return cuda.to_device(np.stack([c.ravel(), dh, dw, offset], axis=1).astype(np.int64))


def _flat(array):
    """A 4-D device array's elements as a flat C-ordered vector (copied when its
    strides are not C-contiguous): the tiled kernels index flat arrays."""
    array = contiguous(array)
    return array.reshape(array.size)


def _pick(algorithm, rows, depth):
    """The algorithm for a GEMM of ``rows`` output channels and reduction ``depth``
    per group (``algorithm`` None) or the one asked for."""
    if algorithm is None:
        return TILED if min(rows, depth) >= _TILED_MIN else DIRECT
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return algorithm


def _launch_tiles(kernel, tiles, n_tiles, *args):
    """One block of ``tiles.threads`` per tile, at most the launch limit's block count
    (the kernels' grid-stride loops over tiles do the rest)."""
    threads = tiles.threads
    launch(kernel, n_tiles * threads, *args, threads_per_block=threads, fixed_block=True)


def _convolve(x, weight, bias, y, groups, stride, pad, dilation, flip, algorithm):
    """``y = conv(x, weight) + bias`` on 4-D arrays; with ``flip`` the convolution with
    the flipped, channel-transposed ``weight`` (a stride-1 input gradient)."""
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    out_per_group = out_channels // groups
    channels, rows = (out_per_group, in_per_group) if flip else (in_per_group,
                                                                  out_per_group)
    depth = channels * kernel_h * kernel_w
    wk = cuda.device_array((groups, depth, rows), x.dtype)
    launch(_gemm_weights, wk.size, weight, wk, flip)
    _, in_channels, in_h, in_w = x.shape
    taps = _taps(channels, kernel_h, kernel_w, *dilation, in_h, in_w)
    has_bias = bias is not None
    if not has_bias:
        bias = cuda.device_array(1, x.dtype)
    if _pick(algorithm, rows, depth) == TILED:
        tiles = current_tiles()
        pixels = y.shape[0] * y.shape[2] * y.shape[3]
        n_tiles = groups * _ceil_div(rows, tiles.block_m) * _ceil_div(pixels, tiles.block_n)
        _launch_tiles(_tiled_forward_kernel(np.dtype(x.dtype), tiles), tiles, n_tiles,
                      _flat(x), in_channels, in_h, in_w, wk.reshape(wk.size), bias,
                      has_bias, y, taps, groups, *stride, *pad)
    else:
        launch(_simple_kernels(np.dtype(x.dtype)).direct_forward, y.size, x, wk, bias,
               has_bias, y, taps, *stride, *pad)


def _splits(pixels, most, partial_size, itemsize):
    """Number of pixel slices for split-K partial sums: about ``most``, at most one per
    pixel (or stage), and a partial buffer of at most ``_PARTIAL_BYTES``."""
    return max(1, min(most, pixels, _PARTIAL_BYTES // (partial_size * itemsize)))


def _sum_partials(partial, out):
    """``out = partial.sum(axis=0)``, adding the slices in order; nothing when there is
    one slice, which is ``out`` itself (reshaped)."""
    if partial.shape[0] > 1:
        size = out.size
        launch(_simple_kernels(np.dtype(out.dtype)).sum_partials, size,
               partial.reshape(partial.shape[0], size), out.reshape(size))


def _weight_grad(x, grad_output, weight_shape, g, algorithm):
    out_channels, in_per_group, kernel_h, kernel_w = weight_shape
    depth = in_per_group * kernel_h * kernel_w
    out_per_group = out_channels // g.groups
    grad_weight = cuda.device_array(weight_shape, x.dtype)
    taps = _taps(in_per_group, kernel_h, kernel_w, g.dilation_h, g.dilation_w, g.in_h,
                 g.in_w)
    pixels = g.batch * g.out_h * g.out_w
    geometry = (g.groups, g.stride_h, g.stride_w, g.pad_top, g.pad_left)
    size = out_channels * depth
    if _pick(algorithm, out_per_group, depth) == TILED:
        tiles = current_tiles()
        stages = _ceil_div(pixels, tiles.block_k)
        tiles_per_slice = (g.groups * _ceil_div(out_per_group, tiles.block_m)
                           * _ceil_div(depth, tiles.block_n))
        splits = _splits(stages, _ceil_div(_TARGET_BLOCKS, tiles_per_slice), size,
                         x.dtype.itemsize)
        stages_per_slice = _ceil_div(stages, splits)
        splits = _ceil_div(stages, stages_per_slice)  # no empty slice
        partial = (grad_weight.reshape(1, out_channels, depth) if splits == 1 else
                   cuda.device_array((splits, out_channels, depth), x.dtype))
        _launch_tiles(_tiled_weight_grad_kernel(np.dtype(x.dtype), tiles), tiles,
                      splits * tiles_per_slice, _flat(x), g.in_channels, g.in_h, g.in_w,
                      _flat(grad_output), g.out_h, g.out_w, taps, partial, *geometry,
                      stages_per_slice * tiles.block_k)
    else:
        splits = _splits(pixels, _ceil_div(_TARGET_THREADS, size), size, x.dtype.itemsize)
        partial = (grad_weight.reshape(1, out_channels, depth) if splits == 1 else
                   cuda.device_array((splits, out_channels, depth), x.dtype))
        launch(_simple_kernels(np.dtype(x.dtype)).direct_weight_grad, splits * size, x,
               grad_output, taps, partial, *geometry)
    _sum_partials(partial, grad_weight)
    return grad_weight


def _bias_grad(grad_output, g):
    grad_bias = cuda.device_array(g.out_channels, grad_output.dtype)
    pixels = g.batch * g.out_h * g.out_w
    splits = _splits(pixels, _ceil_div(_TARGET_THREADS, g.out_channels), g.out_channels,
                     grad_output.dtype.itemsize)
    partial = (grad_bias.reshape(1, g.out_channels) if splits == 1 else
               cuda.device_array((splits, g.out_channels), grad_output.dtype))
    launch(_simple_kernels(np.dtype(grad_output.dtype)).bias_grad, splits * g.out_channels,
           grad_output, partial)
    _sum_partials(partial, grad_bias)
    return grad_bias


def _input_grad(grad_output, weight, g, algorithm):
    grad_input = cuda.device_array((g.batch, g.in_channels, g.in_h, g.in_w),
                                   grad_output.dtype)
    dilation = (g.dilation_h, g.dilation_w)
    if g.stride_h == g.stride_w == 1:
        pad = (g.dilation_h * (g.kernel_h - 1) - g.pad_top,
               g.dilation_w * (g.kernel_w - 1) - g.pad_left)
        _convolve(grad_output, weight, None, grad_input, g.groups, (1, 1), pad, dilation,
                  True, algorithm)
    else:
        _pick(algorithm, 0, 0)  # checks the name; strided input gradients gather
        launch(_simple_kernels(np.dtype(grad_output.dtype)).direct_input_grad,
               grad_input.size, grad_output, weight, grad_input, g.groups, g.stride_h,
               g.stride_w, *dilation, g.pad_top, g.pad_left)
    return grad_input


def choose_algorithm(geometry):
    """Name of the algorithm ``conv2d_forward`` uses for ``geometry``."""
    g = geometry
    return _pick(None, g.out_channels // g.groups,
                 g.in_channels // g.groups * g.kernel_h * g.kernel_w)


def conv2d_forward(x, weight, bias, geometry, algorithm=None):
    """``y`` of shape ``geometry.output_shape``. ``algorithm`` (``"tiled"`` or
    ``"direct"``) overrides ``choose_algorithm``; tests use it to cover both paths."""
    g = geometry
    x = batched(x, (g.batch, g.in_channels, g.in_h, g.in_w))
    y = cuda.device_array((g.batch, g.out_channels, g.out_h, g.out_w), x.dtype)
    if g.batch > 0:
        _convolve(x, weight, bias, y, g.groups, (g.stride_h, g.stride_w),
                  (g.pad_top, g.pad_left), (g.dilation_h, g.dilation_w), False, algorithm)
    return y.reshape(g.output_shape)


def conv2d_backward(grad_output, x, weight, geometry, output_mask, algorithm=None):
    """``(grad_input, grad_weight, grad_bias)``, None where ``output_mask`` is False.
    ``algorithm`` forces the GEMMs' algorithm, as in ``conv2d_forward``."""
    g = geometry
    want_input, want_weight, want_bias = output_mask
    grad_output = batched(grad_output, (g.batch, g.out_channels, g.out_h, g.out_w))
    x = batched(x, (g.batch, g.in_channels, g.in_h, g.in_w))
    empty = g.batch == 0
    grad_input = grad_weight = grad_bias = None
    if want_input:
        grad_input = (cuda.device_array(x.shape, x.dtype) if empty
                      else _input_grad(grad_output, weight, g, algorithm))
        grad_input = grad_input.reshape(g.input_shape)
    if want_weight:
        grad_weight = (cuda.to_device(np.zeros(weight.shape, x.dtype)) if empty
                       else _weight_grad(x, grad_output, weight.shape, g, algorithm))
    if want_bias:
        grad_bias = (cuda.to_device(np.zeros(g.out_channels, x.dtype)) if empty
                     else _bias_grad(grad_output, g))
    return grad_input, grad_weight, grad_bias
