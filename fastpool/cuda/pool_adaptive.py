"""numba.cuda adaptive pooling kernels (average and max), mirroring
``fastpool.cpu.pool_adaptive``: the same windows (per-axis ``starts``/``ends`` tables),
the same sums in the same order (global average pooling: the CPU's ``_lanes`` order),
the same rounding, so results are the CPU's bit for bit. One thread per output
(forward) or per input element (backward, gather form over the ``first``/``last``
tables of the windows covering it), 5-D views of any strides, walked channel-fastest
for channels-last calls (``fastpool.cuda._launch``).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from fastpool.cpu._lanes import LANES
from fastpool.cuda._launch import grid_start, grid_stride, split_position

LANES_LOG2 = LANES.bit_length() - 1


@cuda.jit(device=True, inline=True)
def _replaces(value, best):
    """Max-pool ordering: larger wins; the first NaN wins and then sticks."""
    return value > best or (value != value and best == best)


@functools.lru_cache(maxsize=None)
def avg_kernels(dtype):
    """``(forward, backward)`` for one dtype."""
    scalar = np.dtype(dtype).type
    zero = scalar(0)

    @cuda.jit
    def forward(x, out, sd, ed, sh, eh, sw, ew, cl):
        N, C, OD, OH, OW = out.shape
        total = np.int64(N) * C * OD * OH * OW
        i = grid_start()
        while i < total:
            n, c, od, oh, ow = split_position(i, C, OD, OH, OW, cl)
            acc = zero
            for d in range(sd[od], ed[od]):
                for h in range(sh[oh], eh[oh]):
                    for w in range(sw[ow], ew[ow]):
                        acc += x[n, c, d, h, w]
            count = (ed[od] - sd[od]) * (eh[oh] - sh[oh]) * (ew[ow] - sw[ow])
            out[n, c, od, oh, ow] = np.float64(acc) / count
            i += grid_stride()

    @cuda.jit
    def backward(grad_output, grad_input, sd, ed, sh, eh, sw, ew, fd, ld, fh, lh, fw, lw,
                 cl):
        N, C, D, H, W = grad_input.shape
        total = np.int64(N) * C * D * H * W
        i = grid_start()
        while i < total:
            n, c, d, h, w = split_position(i, C, D, H, W, cl)
            acc = zero
            for od in range(fd[d], ld[d]):
                for oh in range(fh[h], lh[h]):
                    for ow in range(fw[w], lw[w]):
                        count = (ed[od] - sd[od]) * (eh[oh] - sh[oh]) * (ew[ow] - sw[ow])
                        acc += scalar(np.float64(grad_output[n, c, od, oh, ow]) / count)
            grad_input[n, c, d, h, w] = acc
            i += grid_stride()

    return forward, backward


@functools.lru_cache(maxsize=None)
def global_avg_kernel(dtype):
    """Global average pooling (every window the whole input), one thread per output, in
    the CPU's order (``fastpool.cpu._lanes``): ``LANES`` interleaved partial sums of the
    row-major flattened volume, folded pairwise."""
    scalar = np.dtype(dtype).type
    zero = scalar(0)

    # The partials are indexed only by constants once the loops over them are unrolled
    # (their trip counts are constants), so they live in registers: indexed by
    # ``k % LANES`` they were a local-memory array, 64-128 bytes of stack per thread.
    @cuda.jit
    def forward(x, out, cl):
        N, C = out.shape[0], out.shape[1]
        D, H, W = x.shape[2], x.shape[3], x.shape[4]
        size = np.int64(D) * H * W
        total = np.int64(N) * C
        i = grid_start()
        while i < total:
            n, c, _, _, _ = split_position(i, C, 1, 1, 1, cl)
            partials = cuda.local.array(LANES, dtype)
            for j in range(LANES):
                partials[j] = zero
            d = h = w = 0
            for k0 in range(0, size, LANES):  # element k0 + j goes to partial j
                for j in range(LANES):
                    if k0 + j < size:
                        partials[j] += x[n, c, d, h, w]
                        w += 1
                        if w == W:
                            w = 0
                            h += 1
                            if h == H:
                                h = 0
                                d += 1
            for level in range(LANES_LOG2):
                width = LANES >> (level + 1)
                for j in range(width):
                    partials[j] += partials[j + width]
            out[n, c, 0, 0, 0] = np.float64(partials[0]) / size
            i += grid_stride()

    return forward


@cuda.jit
def max_forward(x, out, indices, with_indices, sd, ed, sh, eh, sw, ew, cl):
    N, C, OD, OH, OW = out.shape
    H, W = x.shape[3], x.shape[4]
    total = np.int64(N) * C * OD * OH * OW
    i = grid_start()
    while i < total:
        n, c, od, oh, ow = split_position(i, C, OD, OH, OW, cl)
        best = x[n, c, sd[od], sh[oh], sw[ow]]
        arg = (np.int64(sd[od]) * H + sh[oh]) * W + sw[ow]
        for d in range(sd[od], ed[od]):
            for h in range(sh[oh], eh[oh]):
                for w in range(sw[ow], ew[ow]):
                    v = x[n, c, d, h, w]
                    if _replaces(v, best):
                        best = v
                        arg = (np.int64(d) * H + h) * W + w
        out[n, c, od, oh, ow] = best
        if with_indices:
            indices[n, c, od, oh, ow] = arg
        i += grid_stride()


@cuda.jit
def check_indices(indices, H, W, sd, ed, sh, eh, sw, ew, cl, bad):
    """Set ``bad[0]`` if an index is not a position inside its own adaptive window."""
    N, C, OD, OH, OW = indices.shape
    total = np.int64(N) * C * OD * OH * OW
    i = grid_start()
    while i < total:
        n, c, od, oh, ow = split_position(i, C, OD, OH, OW, cl)
        target = indices[n, c, od, oh, ow]
        d = target // (np.int64(H) * W)
        h = (target // W) % H
        w = target % W
        if not (target >= 0 and sd[od] <= d < ed[od] and sh[oh] <= h < eh[oh]
                and sw[ow] <= w < ew[ow]):
            bad[0] = 1
        i += grid_stride()


@functools.lru_cache(maxsize=None)
def max_backward_kernel(dtype):
    zero = np.dtype(dtype).type(0)

    @cuda.jit
    def max_backward(grad_output, indices, grad_input, fd, ld, fh, lh, fw, lw, cl):
        """``grad_input[d, h, w]`` = the sum of ``grad_output`` over the windows whose
        index is ``(d * H + h) * W + w``, in output order (the CPU scatter's order)."""
        N, C, D, H, W = grad_input.shape
        total = np.int64(N) * C * D * H * W
        i = grid_start()
        while i < total:
            n, c, d, h, w = split_position(i, C, D, H, W, cl)
            target = (np.int64(d) * H + h) * W + w
            acc = zero
            for od in range(fd[d], ld[d]):
                for oh in range(fh[h], lh[h]):
                    for ow in range(fw[w], lw[w]):
                        if indices[n, c, od, oh, ow] == target:
                            acc += grad_output[n, c, od, oh, ow]
            grad_input[n, c, d, h, w] = acc
            i += grid_stride()

    return max_backward
