"""The weight of a stride-1 input gradient computed as a forward convolution of
``grad_output``: each group's output and input channels swapped and the taps flipped on
every axis, for any rank (``flipped_transposed``).

NumPy's copy of the reversed, transposed view walked the taps backwards one value at a
time: a 512x512 3x3 weight took 2.2 ms (float32) and 4.7 ms (float64) on 2 threads,
half of the input gradient's GEMM on a batch-1 14x14 plane. Here each output row (one
input channel of a group) is written in order, its taps read as short contiguous runs.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from fastpool._threading import thread_count
from fastpool.cpu._arrays import contiguous
from fastpool.cpu._parallel import BODY_JIT, parallel_kernel

_U = np.uint64
# A tile of the output: rows (input channels) by output channels.
_ROWS, _COLUMNS = 16, 64
# Weights of fewer values, or 1x1 ones (a plain transpose), NumPy copies as fast.
_MIN_SIZE = 1 << 16


def flipped_transposed(weight, groups):
    """``(G*C_g, O_g) + taps`` from ``weight`` of shape ``(O, C_g) + taps``:
    ``out[g*C_g + c, o, t] = weight[g*O_g + o, c, T - 1 - t]`` with the taps ``t``
    flattened (flipping every axis of the taps reverses their flat order)."""
    O, Cg = weight.shape[:2]
    taps = math.prod(weight.shape[2:])
    shape = (groups * Cg, O // groups) + weight.shape[2:]
    if taps == 1 or weight.size < _MIN_SIZE:
        rank = weight.ndim - 2
        per_group = weight.reshape((groups, O // groups, Cg) + weight.shape[2:])
        flipped = per_group[(slice(None),) * 3 + (slice(None, None, -1),) * rank]
        return contiguous(flipped.transpose(
            (0, 2, 1) + tuple(range(3, 3 + rank)))).reshape(shape)
    out = np.empty(shape, weight.dtype)
    _flip_transpose(contiguous(weight).reshape(-1), out.reshape(-1), groups,
                    O // groups, Cg, taps, thread_count())
    return out


@parallel_kernel
@njit(**BODY_JIT)
def _flip_transpose(w, out, G, Og, Cg, T, worker, workers):
    """Tiles of ``_ROWS`` output rows by ``_COLUMNS`` output channels: each reads, per
    output channel, one contiguous run of the rows' taps and writes ``_COLUMNS * T``
    contiguous values per row. One row at a time, the reads were ``O_g`` runs of ``T``
    values a page or more apart (0.84 ms for a float32 512x512 3x3 weight; tiles:
    below)."""
    row_tiles = -(-Cg // _ROWS)
    column_tiles = -(-Og // _COLUMNS)
    tasks = G * row_tiles * column_tiles
    for task in range(worker * tasks // workers, (worker + 1) * tasks // workers):
        g = task // (row_tiles * column_tiles)
        c0 = (task // column_tiles) % row_tiles * _ROWS
        o0 = task % column_tiles * _COLUMNS
        c1 = min(c0 + _ROWS, Cg)
        o1 = min(o0 + _COLUMNS, Og)
        for o in range(o0, o1):
            src = ((g * Og + o) * Cg) * T + T - 1
            for c in range(c0, c1):
                at = ((g * Cg + c) * Og + o) * T
                first = src + c * T
                for t in range(T):
                    out[_U(at + t)] = w[_U(first - t)]
