"""The ``"im2col"`` forward of channels-last inputs with few input channels (a network's
first layer on RGB images, 1-D convolutions) as implicit GEMMs: no columns gathered.

In a zero-padded ``(H_p, W_p, C)`` copy of an image's rows, output pixel ``ow`` of an
output row reads tap ``(c, i, j)`` at ``row + ow*SW*C + taps[(c*KH + i)*KW + j]``,
``taps[...] = (i*DH*W_p + j*DW)*C + c``. So ``_microkernel.gemm_taps`` reads A in
place (``lda = SW*C``, A's columns at the offsets ``taps``), with B the weight turned
over (``W^T``, its rows in im2col's order ``(c, i, j)``), the product turned over
(pixels as rows) straight into the output row's pixels. Every output is one chain of
fused multiply-adds over ``(c, i, j)`` from its bias, through the padding's zeros too:
the chain of the channels-first ``"im2col"``, so the same bits. Where the convolution
runs ``"rows"`` the taps and the weight's rows are in its order, ``(i, c, j)``: its
chains (kernel rows in order, each over channels and columns), so its bits.

The channels-last ``"im2col"`` (``_channels_last_gemm``) gathers the columns first, for
so few channels from a channels-first copy, a value at a time: batch 1 of 3x3 s2 3->32
on 224x224 (MobileNetV2's first layer), 2 threads, 0.45 ms there against 0.24 here
and PyTorch ``channels_last``'s 0.23; 7x7 s2 3->64 (ResNet's) 1.73, 1.08 and 1.06
(2026-12-07, Intel Xeon, interleaved). One ``KW``-deep product per ``(c, i)`` instead
(``a_step = DW*C``, no table), each going on with the chains of the one before, took
0.45 ms: a tile's fixed cost (loading and storing C) outweighed its 3 steps of ``k``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fastpool.cpu._microkernel import FROM_COLUMN_INIT, gemm_taps, padded_host
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel
from fastpool.cpu.conv._gemm import _transpose_groups
from fastpool.cpu.conv._planner import _U

# Input channels (one group) up to which a channels-last forward runs here. 2026-12-07,
# Intel Xeon, 2 threads, interleaved, against the gathering ``_channels_last_gemm`` (ms):
# batch 1, 3x3 s2 16->32 on 112x112 0.27 -> 0.22, 24->48 on 56x56 0.22 -> 0.14, 32->64
# 0.26 -> 0.24, 48->96 on 28x28 0.24 -> 0.19, but 64->128 on 56x56 0.60 -> 0.70 and
# 128->256 on 28x28 0.76 -> 1.24; 1x3 16->32 on 1x4096, batch 4, 0.60 -> 0.36.
MAX_CHANNELS = 48
# Bytes of a band of padded input rows (a worker's buffer): bands are cut to fit, and a
# convolution one of whose output rows needs more does not run here.
_BAND_BYTES = 1 << 20


def _input_rows(output_rows, problem):
    """Padded input rows that ``output_rows`` output rows read."""
    p = problem
    return (output_rows - 1) * p.stride_h + (p.kernel_h - 1) * p.dilation_h + 1


def _padded_width(problem):
    p = problem
    return (p.out_w - 1) * p.stride_w + (p.kernel_w - 1) * p.dilation_w + 1


def applies(problem, dtype):
    """Whether the channels-last forward of ``problem`` runs here: one group of at most
    ``MAX_CHANNELS`` input channels, a kernel larger than 1x1, and an output row's
    padded input rows within ``_BAND_BYTES``."""
    return (problem.groups == 1 and problem.channels_per_group <= MAX_CHANNELS
            and problem.kernel_h * problem.kernel_w > 1
            and dtype in (np.float32, np.float64)
            and _input_rows(1, problem) * _padded_width(problem)
            * problem.channels_per_group * np.dtype(dtype).itemsize <= _BAND_BYTES)


@njit(inline="always")
def _pad_rows(x, n, h0, PL, band):
    """``band[r, PL + w, c] = x[n, h0 + r, w, c]``, zeros around (rows outside the
    input, the padding's columns)."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    R, Wp = band.shape[0], band.shape[1]
    lo = min(PL, Wp) * C
    hi = min(PL + W, Wp) * C
    for r in range(R):
        row = band[r].reshape(-1)
        h = h0 + r
        if h < 0 or h >= H:
            for v in range(Wp * C):
                row[_U(v)] = 0
            continue
        src = x[n, h].reshape(-1)
        for v in range(lo):
            row[_U(v)] = 0
        for v in range(lo, hi):
            row[_U(v)] = src[_U(v - lo)]
        for v in range(hi, Wp * C):
            row[_U(v)] = 0


@parallel_kernel
@njit(**BODY_JIT)
def _taps_forward(x, wt, ldw, bias, y, band_rows, by_rows, KH, KW, SH, SW, DH, DW, PT,
                  PL, worker, workers):
    """``y`` (``(N, OH, OW, O)``, C-contiguous) of the convolution of ``x`` (``(N, H,
    W, C)``, C-contiguous) with the weight turned over, ``wt[((c*KH + i)*KW + j)*ldw +
    o]`` (``by_rows``: ``wt[((i*C + c)*KW + j)*ldw + o]``, the taps in that order), from
    ``bias``; tasks are bands of ``band_rows`` output rows of an image, each padded
    into a buffer of the worker's own first."""
    N, C = x.shape[0], x.shape[3]
    OH, OW, O = y.shape[1], y.shape[2], y.shape[3]
    Wp = (OW - 1) * SW + (KW - 1) * DW + 1
    bands = (OH + band_rows - 1) // band_rows
    tasks = N * bands
    buffer = np.empty(((band_rows - 1) * SH + (KH - 1) * DH + 1, Wp, C), x.dtype)
    bf = buffer.reshape(-1)
    yf = y.reshape(-1)
    K = C * KH * KW
    taps = np.empty(K, np.intp)
    for c in range(C):
        for i in range(KH):
            for j in range(KW):
                at = ((i * C + c) if by_rows else (c * KH + i)) * KW + j
                taps[at] = (i * DH * Wp + j * DW) * C + c
    for t in range(worker * tasks // workers, (worker + 1) * tasks // workers):
        n = t // bands
        oh0 = (t - n * bands) * band_rows
        rows = min(band_rows, OH - oh0)
        _pad_rows(x, n, oh0 * SH - PT, PL, buffer[:(rows - 1) * SH + (KH - 1) * DH + 1])
        for r in range(rows):
            gemm_taps(OW, O, K, bf, r * SH * Wp * C, SW * C, taps, wt, 0, ldw, yf,
                      (n * OH + oh0 + r) * OW * O, O, bias, 0, FROM_COLUMN_INIT)


def forward(x, weight, bias, problem, workers, by_rows=False):
    """``y`` (``(N, C_out, OH, OW)`` with channels-last strides) of the convolution of
    the channels-last ``x`` (``(N, C, H, W)``, a dense ``(N, H, W, C)`` buffer): the
    chains of ``"im2col"``, or with ``by_rows`` those of ``"rows"`` (kernel rows in
    order, each over channels and columns)."""
    N, O = x.shape[0], weight.shape[0]
    OH, OW = problem.out_h, problem.out_w
    weight = np.ascontiguousarray(weight.transpose(0, 2, 1, 3) if by_rows else weight)
    ldw = padded_host(O, weight.dtype)
    wt = np.empty((weight.size // O) * ldw, weight.dtype)
    _transpose_groups(weight, wt, 1, ldw, 1)
    bias = np.ascontiguousarray(bias) if bias is not None else np.zeros(O, x.dtype)
    y = np.empty((N, OH, OW, O), x.dtype)
    # a band for every thread (whole images where the batch gives each one), within
    # _BAND_BYTES
    bands = max(1, -(-workers // N))
    band_rows = -(-OH // bands)
    row_bytes = _padded_width(problem) * x.shape[1] * x.itemsize
    while band_rows > 1 and _input_rows(band_rows, problem) * row_bytes > _BAND_BYTES:
        band_rows = -(-band_rows // 2)
    tasks = N * -(-OH // band_rows)
    if y.size:
        _taps_forward(x.transpose(0, 2, 3, 1), wt, ldw, bias, y, band_rows, by_rows,
                      problem.kernel_h, problem.kernel_w, problem.stride_h,
                      problem.stride_w, problem.dilation_h, problem.dilation_w,
                      problem.pad_top, problem.pad_left, max(1, min(workers, tasks)))
    return y.transpose(0, 3, 1, 2)
