"""numba.cuda adaptive stochastic pooling, mirroring
``fastpool.cpu.pool_adaptive_stochastic``: the same windows, sums, draws and picks, one
thread per output (forward, window shares) or per input element (inference backward,
gathering the shares of the windows covering it in output order)."""

from __future__ import annotations

import numpy as np
from numba import config, cuda

from fastpool import _rng
from fastpool.cuda._launch import grid_start, grid_stride, split_position
from fastpool.cuda._pool_common import inference_shares, sums_scale, weighted_average

_gpu_rng = _rng.compile_with(cuda.jit(device=True, inline=True),
                             interpreted=bool(config.ENABLE_CUDASIM))
_keyed_plane = _gpu_rng.keyed_plane
_keyed_uniform = _gpu_rng.keyed_uniform
_INF = np.inf


@cuda.jit(device=True, inline=True)
def _sums(x, n, c, d0, d1, h0, h1, w0, w1, scale):
    """``(S1, S2, bad)`` of one window's elements times ``scale``, float64, row-major;
    bad: a negative, NaN or infinite element or an overflowing ``S1``."""
    s1 = 0.0
    s2 = 0.0
    bad = False
    for d in range(d0, d1):
        for h in range(h0, h1):
            for w in range(w0, w1):
                v = np.float64(x[n, c, d, h, w])
                if not (0.0 <= v < _INF):  # before scaling: -1e-300 * 2**-600 is -0.0
                    bad = True
                v *= scale
                s1 += v
                s2 += v * v
    return s1, s2, bad or not (s1 < _INF)


@cuda.jit(device=True, inline=True)
def _settled_sums(x, n, c, d0, d1, h0, h1, w0, w1):
    """``(S1, S2, bad, scale)``: ``_sums``, again of scaled elements where the plain
    sums do not serve (``sums_scale``); bad also where ``S2`` overflows."""
    s1, s2, bad = _sums(x, n, c, d0, d1, h0, h1, w0, w1, 1.0)
    scale = sums_scale(s1, s2)
    if scale != 1.0:
        s1, s2, bad = _sums(x, n, c, d0, d1, h0, h1, w0, w1, scale)
    return s1, s2, bad or not (s2 < _INF), scale


@cuda.jit
def train_forward(x, out, indices, with_indices, key, sd, ed, sh, eh, sw, ew, cl, bad):
    N, C, OD, OH, OW = out.shape
    H, W = x.shape[3], x.shape[4]
    total = np.int64(N) * C * OD * OH * OW
    i = grid_start()
    while i < total:
        n, c, od, oh, ow = split_position(i, C, OD, OH, OW, cl)
        d0, d1, h0, h1, w0, w1 = sd[od], ed[od], sh[oh], eh[oh], sw[ow], ew[ow]
        s1, _, invalid = _sums(x, n, c, d0, d1, h0, h1, w0, w1, 1.0)
        if invalid:
            bad[0] = 1
        first = (np.int64(d0) * H + h0) * W + w0
        chosen = first
        if s1 > 0.0:
            threshold = _keyed_uniform(_keyed_plane(key, n, c), key, od, oh, ow) * s1
            running = 0.0
            last_positive = first
            chosen = np.int64(-1)
            for d in range(d0, d1):
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        if chosen < 0:
                            v = np.float64(x[n, c, d, h, w])
                            running += v
                            if v > 0.0:
                                last_positive = (np.int64(d) * H + h) * W + w
                            if running > threshold:
                                chosen = (np.int64(d) * H + h) * W + w
            if chosen < 0:
                chosen = last_positive
            out[n, c, od, oh, ow] = x[n, c, chosen // (np.int64(H) * W), (chosen // W) % H,
                                      chosen % W]
        else:
            out[n, c, od, oh, ow] = 0
        if with_indices:
            indices[n, c, od, oh, ow] = chosen
        i += grid_stride()


@cuda.jit
def infer_forward(x, out, sd, ed, sh, eh, sw, ew, cl, bad):
    N, C, OD, OH, OW = out.shape
    total = np.int64(N) * C * OD * OH * OW
    i = grid_start()
    while i < total:
        n, c, od, oh, ow = split_position(i, C, OD, OH, OW, cl)
        s1, s2, invalid, scale = _settled_sums(x, n, c, sd[od], ed[od], sh[oh], eh[oh],
                                               sw[ow], ew[ow])
        if invalid:
            bad[0] = 1
        out[n, c, od, oh, ow] = weighted_average(s1, s2, scale)
        i += grid_stride()


@cuda.jit
def infer_shares(x, grad_output, share_a, share_b, sd, ed, sh, eh, sw, ew, cl, bad):
    N, C, OD, OH, OW = grad_output.shape
    total = np.int64(N) * C * OD * OH * OW
    i = grid_start()
    while i < total:
        n, c, od, oh, ow = split_position(i, C, OD, OH, OW, cl)
        s1, s2, invalid, scale = _settled_sums(x, n, c, sd[od], ed[od], sh[oh], eh[oh],
                                               sw[ow], ew[ow])
        if invalid:
            bad[0] = 1
        a, b = inference_shares(np.float64(grad_output[n, c, od, oh, ow]), s1, s2, scale)
        share_a[n, c, od, oh, ow] = a
        share_b[n, c, od, oh, ow] = b
        i += grid_stride()


@cuda.jit
def infer_backward(x, share_a, share_b, grad_input, fd, ld, fh, lh, fw, lw, cl):
    N, C, D, H, W = grad_input.shape
    total = np.int64(N) * C * D * H * W
    i = grid_start()
    while i < total:
        n, c, d, h, w = split_position(i, C, D, H, W, cl)
        sum_a = 0.0
        sum_b = 0.0
        for od in range(fd[d], ld[d]):
            for oh in range(fh[h], lh[h]):
                for ow in range(fw[w], lw[w]):
                    sum_a += share_a[n, c, od, oh, ow]
                    sum_b += share_b[n, c, od, oh, ow]
        grad_input[n, c, d, h, w] = np.float64(x[n, c, d, h, w]) * sum_a + sum_b
        i += grid_stride()
