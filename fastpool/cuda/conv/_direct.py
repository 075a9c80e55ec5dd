"""One-thread-per-result CUDA convolution kernels: the direct algorithm
(``"direct"``: forward, weight gradient), the strided input gradient (gather form), the
bias gradient, the in-order sum of split-K partial sums, and the rearrangement of the
weights that both forward algorithms read."""

from __future__ import annotations

import functools
from typing import NamedTuple

import numba
import numpy as np
from numba import cuda

from fastpool.cuda._launch import grid_start, grid_stride, split_nchw


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
