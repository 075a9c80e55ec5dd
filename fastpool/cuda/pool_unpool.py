"""numba.cuda max unpooling, mirroring ``fastpool.cpu.pool_unpool``.

Forward, deterministic with repeated indices: every input records its flat position
``k`` (row-major inside its ``(n, c)`` volume) at the output it names with an integer
``atomic.max``, so each output keeps the last input naming it, the CPU's rule; then one
thread per output copies that input's value (0 where none). Backward gathers
``grad_y[indices[k]]``. Indices outside ``[0, S_out)`` raise the ``bad`` flag and write
nothing. Arrays are the 5-D views of ``fastpool.cuda.pooling``.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from fastpool.cuda._launch import grid_start, grid_stride, split_ncdhw, split_position


@cuda.jit
def claim(indices, winner, cl, bad):
    """``winner[n, c].flat[t] = max k`` over the inputs ``k`` with ``indices == t``."""
    N, C, D, H, W = indices.shape
    outputs = winner.shape[2]
    total = np.int64(N) * C * D * H * W
    i = grid_start()
    while i < total:
        n, c, d, h, w = split_position(i, C, D, H, W, cl)
        target = indices[n, c, d, h, w]
        if 0 <= target < outputs:
            cuda.atomic.max(winner, (n, c, target), (np.int64(d) * H + h) * W + w)
        else:
            bad[0] = 1
        i += grid_stride()


@functools.lru_cache(maxsize=None)
def fill_kernel(dtype):
    zero = np.dtype(dtype).type(0)

    @cuda.jit
    def fill(x, winner, y, cl):
        N, C, OD, OH, OW = y.shape
        H, W = x.shape[3], x.shape[4]
        total = np.int64(N) * C * OD * OH * OW
        i = grid_start()
        while i < total:
            n, c, od, oh, ow = split_position(i, C, OD, OH, OW, cl)
            k = winner[n, c, (np.int64(od) * OH + oh) * OW + ow]
            if k >= 0:
                y[n, c, od, oh, ow] = x[n, c, k // (np.int64(H) * W), (k // W) % H, k % W]
            else:
                y[n, c, od, oh, ow] = zero
            i += grid_stride()

    return fill


@cuda.jit
def reset(winner):
    N, C, S = winner.shape
    total = np.int64(N) * C * S
    i = grid_start()
    while i < total:
        winner[i // (np.int64(C) * S), (i // S) % C, i % S] = -1
        i += grid_stride()


@functools.lru_cache(maxsize=None)
def gather_kernel(dtype):
    zero = np.dtype(dtype).type(0)

    @cuda.jit
    def gather(grad_output, indices, grad_input, cl, bad):
        N, C, D, H, W = grad_input.shape
        OD, OH, OW = grad_output.shape[2], grad_output.shape[3], grad_output.shape[4]
        outputs = np.int64(OD) * OH * OW
        total = np.int64(N) * C * D * H * W
        i = grid_start()
        while i < total:
            n, c, d, h, w = split_position(i, C, D, H, W, cl)
            target = indices[n, c, d, h, w]
            if 0 <= target < outputs:
                _, _, od, oh, ow = split_ncdhw(target, 1, OD, OH, OW)
                grad_input[n, c, d, h, w] = grad_output[n, c, od, oh, ow]
            else:
                grad_input[n, c, d, h, w] = zero
                bad[0] = 1
            i += grid_stride()

    return gather
