"""Tiled implicit-GEMM CUDA convolution kernels (``"tiled"``): the forward and the
weight gradient, one compile per dtype and tile configuration (``fastpool.cuda.conv``
describes the tiling)."""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import config, cuda

from fastpool.cuda.conv._tiles import _tile_groups

# Shared tiles are 16-byte aligned, so that a thread's 4 consecutive micro-tile operands
# load as one 128-bit access. The simulator takes no alignment.
_ALIGN = None if config.ENABLE_CUDASIM else 16

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
    """Implicit-GEMM forward for one dtype and tile configuration (see
    ``fastpool.cuda.conv``)."""
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
    pixels (see ``fastpool.cuda.conv``)."""
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
