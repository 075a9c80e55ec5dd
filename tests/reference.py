"""Slow, obviously-correct reference implementations of fastpool's ops.

Written from the formulas in docs/design.md section 2 (never from the kernels), as plain
Python loops over n, c, the output positions and the window elements (the any-rank
``conv`` loops over n, the output positions and the taps, and takes the sum over a
group's channels at each as one matrix-vector product: about 60x faster than a Python
loop over channels, which made the 3-D convolution tests minutes long). Pooling inputs are
NumPy arrays of shape (N, C, *spatial) with 1, 2 or 3 spatial axes; everything is
computed in float64 and returned as float64 (indices as int64, PyTorch's convention:
flat positions inside each (n, c) volume, ``(d * H + h) * W + w`` in 3-D).

A window element lying in the padding is skipped (max: -inf, stochastic: weight 0).
Should a (dilated) window contain no in-input element at all, max pooling outputs -inf
with index -1 and stochastic pooling outputs 0 with index -1; backward ignores index -1.

The per-window functions (``max_window``, ``avg_window``, ``stochastic_window``,
``stochastic_window_grad``, ``windows_covering``) take a position tuple and a
``Geometry``; the whole-array functions loop over them.
"""

import itertools
import math
from typing import NamedTuple

import numpy as np

MASK = 2**64 - 1
GAMMA = 0x9E3779B97F4A7C15


# ----------------------------------------------------------------------------- geometry

def ntuple(v, rank):
    """int or rank-sequence -> tuple of rank ints."""
    if isinstance(v, (tuple, list)):
        assert len(v) == rank, (v, rank)
        return tuple(int(e) for e in v)
    return (int(v),) * rank


def pair(v):
    """int or (h, w) pair -> (int, int)."""
    return ntuple(v, 2)


def pool_output_size(size, k, s, p, d, ceil_mode):
    """Output length along one axis (docs/design.md section 2)."""
    ek = d * (k - 1) + 1
    out = (size + 2 * p - ek + ((s - 1) if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


class Geometry(NamedTuple):
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    in_size: tuple
    out_size: tuple


def pool_geometry(x_shape, kernel_size, stride=None, padding=0, dilation=1,
                  ceil_mode=False):
    """The ``Geometry`` of a pooling over ``x_shape`` (N, C, *spatial)."""
    rank = len(x_shape) - 2
    k = ntuple(kernel_size, rank)
    s = k if stride is None else ntuple(stride, rank)
    p = ntuple(padding, rank)
    d = ntuple(dilation, rank)
    size = tuple(int(n) for n in x_shape[2:])
    out = tuple(pool_output_size(*a, ceil_mode) for a in zip(size, k, s, p, d))
    if min(out) < 1:
        raise ValueError(f"output size {out} < 1")
    return Geometry(k, s, p, d, size, out)


def flat_index(pos, size):
    """Row-major flat position of ``pos`` in a volume of ``size``."""
    index = 0
    for q, n in zip(pos, size):
        index = index * n + q
    return index


def window(pos, g):
    """In-input elements of the window at output position ``pos``, row-major."""
    taps = itertools.product(*(range(k) for k in g.kernel))
    out = []
    for tap in taps:
        q = tuple(o * s - p + t * d for o, s, p, t, d in
                  zip(pos, g.stride, g.padding, tap, g.dilation))
        if all(0 <= e < n for e, n in zip(q, g.in_size)):
            out.append(q)
    return out


def windows_covering(q, g):
    """The output positions whose window holds input element ``q``, in output order."""
    per_axis = []
    for e, k, s, p, d, n in zip(q, g.kernel, g.stride, g.padding, g.dilation,
                                g.out_size):
        # Window o holds e when o * s - p + t * d == e for a tap t < k.
        per_axis.append(sorted({(e + p - t * d) // s for t in range(k)
                                if (e + p - t * d) % s == 0 and 0 <= (e + p - t * d) // s < n}))
    return list(itertools.product(*per_axis))


def positions(size):
    return itertools.product(*(range(n) for n in size))


def scatter_to_indices(grad_output, indices, input_shape):
    """grad_input[n, c].flat[indices[n, c, ...]] += grad_output[n, c, ...]."""
    go = np.asarray(grad_output, dtype=np.float64)
    indices = np.asarray(indices)
    gi = np.zeros(input_shape, dtype=np.float64)
    N, C = go.shape[:2]
    for n in range(N):
        for c in range(C):
            flat = gi[n, c].reshape(-1)
            for index, g in zip(indices[n, c].reshape(-1), go[n, c].reshape(-1)):
                if index >= 0:
                    flat[int(index)] += g
    return gi


# ----------------------------------------------------------------------------- max

def max_window(volume, pos, g):
    """(value, flat index) of the window at ``pos`` of one (n, c) volume: the first
    maximum in row-major order wins; the first NaN wins and propagates; (-inf, -1) if
    the window holds no input element."""
    best, best_idx = -math.inf, -1
    for q in window(pos, g):
        v = float(volume[q])
        if math.isnan(v):
            return v, flat_index(q, g.in_size)
        if best_idx == -1 or v > best:
            best, best_idx = v, flat_index(q, g.in_size)
    return best, best_idx


def max_pool(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """-> (y, indices), any spatial rank."""
    x = np.asarray(x, dtype=np.float64)
    g = pool_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    N, C = x.shape[:2]
    y = np.empty((N, C) + g.out_size, dtype=np.float64)
    ind = np.empty((N, C) + g.out_size, dtype=np.int64)
    for n in range(N):
        for c in range(C):
            for pos in positions(g.out_size):
                y[(n, c) + pos], ind[(n, c) + pos] = max_window(x[n, c], pos, g)
    return y, ind


def max_pool_backward(grad_output, x, kernel_size, stride=None, padding=0, dilation=1,
                      ceil_mode=False):
    """Each output's gradient goes to its argmax (accumulating over overlapping windows)."""
    x = np.asarray(x, dtype=np.float64)
    _, ind = max_pool(x, kernel_size, stride, padding, dilation, ceil_mode)
    return scatter_to_indices(grad_output, ind, x.shape)


# ----------------------------------------------------------------------------- average

def avg_window(pos, g, count_include_pad, divisor_override):
    """(lo, hi, divisor) of the window at ``pos``: per axis ``[lo, hi)`` clipped to the
    input; the divisor counts padding cells up to ``size + p`` when
    ``count_include_pad`` (PyTorch's rule)."""
    lo, hi, padded, inside = [], [], 1, 1
    for o, k, s, p, n in zip(pos, g.kernel, g.stride, g.padding, g.in_size):
        a = o * s - p
        b = min(a + k, n + p)
        padded *= b - a
        lo.append(max(a, 0))
        hi.append(min(b, n))
        inside *= hi[-1] - lo[-1]
    if divisor_override is not None:
        div = divisor_override
    elif count_include_pad:
        div = padded
    else:
        div = inside
    return tuple(lo), tuple(hi), float(div)


def _box(lo, hi):
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def avg_pool(x, kernel_size, stride=None, padding=0, ceil_mode=False,
             count_include_pad=True, divisor_override=None):
    x = np.asarray(x, dtype=np.float64)
    g = pool_geometry(x.shape, kernel_size, stride, padding, 1, ceil_mode)
    N, C = x.shape[:2]
    y = np.empty((N, C) + g.out_size, dtype=np.float64)
    for n in range(N):
        for c in range(C):
            for pos in positions(g.out_size):
                lo, hi, div = avg_window(pos, g, count_include_pad, divisor_override)
                total = 0.0
                for q in positions(tuple(b - a for a, b in zip(lo, hi))):
                    total += x[(n, c) + tuple(a + e for a, e in zip(lo, q))]
                y[(n, c) + pos] = total / div
    return y


def avg_pool_backward(grad_output, x, kernel_size, stride=None, padding=0, ceil_mode=False,
                      count_include_pad=True, divisor_override=None):
    go = np.asarray(grad_output, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    g = pool_geometry(x.shape, kernel_size, stride, padding, 1, ceil_mode)
    gi = np.zeros(x.shape, dtype=np.float64)
    N, C = x.shape[:2]
    for n in range(N):
        for c in range(C):
            for pos in positions(g.out_size):
                lo, hi, div = avg_window(pos, g, count_include_pad, divisor_override)
                gi[(n, c) + _box(lo, hi)] += go[(n, c) + pos] / div
    return gi


# ----------------------------------------------------------------------------- stochastic

def mix64(z):
    """SplitMix64 finaliser on a Python int, modulo 2**64."""
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def plane_key(seed, n, c):
    k = mix64((seed + GAMMA) & MASK)
    k = mix64(((k ^ n) + GAMMA) & MASK)
    return mix64(((k ^ c) + GAMMA) & MASK)


def stochastic_uniform(seed, n, c, row, col):
    """Counter-based U[0, 1) draw keyed by (seed, n, c, row, col); row, col < 2**32."""
    counter = ((row << 32) | col) & MASK
    z = mix64((plane_key(seed, n, c) + counter * GAMMA) & MASK)
    return (z >> 11) * 2.0**-53


def window_counter(pos, out_size):
    """(row, col) of the counter of output position ``pos``: ``col`` is the position
    along the last axis, ``row`` the flat position along the others (``oh`` in 2-D,
    ``od * H_out + oh`` in 3-D, 0 in 1-D)."""
    return flat_index(pos[:-1], out_size[:-1]), pos[-1]


def stochastic_position_uniform(seed, n, c, pos, out_size):
    return stochastic_uniform(seed, n, c, *window_counter(pos, out_size))


def _check_stochastic_input(x):
    if not np.all(np.isfinite(x)):
        raise ValueError("stochastic pooling input must be finite (no NaN or inf)")
    if np.any(x < 0):
        raise ValueError("stochastic pooling input must be >= 0")


def stochastic_window(volume, pos, g, u, training=True):
    """(value, flat index) of the window at ``pos`` of one volume for the draw ``u``;
    index -1 at inference (nothing is picked) and for a window without input
    elements."""
    return stochastic_cells(volume, window(pos, g), g.in_size, u, training)


def stochastic_cells(volume, win, in_size, u, training=True):
    """``stochastic_window`` on the list of input positions ``win`` (row-major)."""
    vals = [float(volume[q]) for q in win]
    flat = [flat_index(q, in_size) for q in win]
    S = 0.0
    for a in vals:
        S += a
    if not training:
        # sum(a**2) / sum(a) = m * sum(b**2) / sum(b) with b = a / m, m the largest
        # element: squares of tiny or huge elements neither vanish nor overflow
        m = max(vals, default=0.0)
        if not m > 0:
            return 0.0, -1
        T1 = T2 = 0.0
        for a in vals:
            T1 += a / m
            T2 += (a / m) ** 2
        return m * (T2 / T1), -1
    if S == 0:
        return 0.0, (flat[0] if flat else -1)
    threshold = u * S
    running = 0.0
    for a, index in zip(vals, flat):
        running += a
        if running > threshold:
            return a, index
    # rounding: fall back to the last nonzero element
    t = max(t for t, a in enumerate(vals) if a != 0)
    return vals[t], flat[t]


def stochastic_window_grad(volume, pos, g):
    """Inference backward of one window: [(q, d y / d a_q)], with
    ``d y / d a_i = (2 a_i S1 - S2) / S1**2``; empty when ``S1 == 0``."""
    return stochastic_cells_grad(volume, window(pos, g))


def stochastic_cells_grad(volume, win):
    """``stochastic_window_grad`` on the list of input positions ``win``, from the
    sums ``T1``, ``T2`` of ``b = a / m`` (``m`` the largest element), as in
    ``stochastic_cells``: ``(2 a_i S1 - S2) / S1**2 = (2 b_i T1 - T2) / T1**2``."""
    m = max((float(volume[q]) for q in win), default=0.0)
    if not m > 0:
        return []
    T1 = T2 = 0.0
    for q in win:
        b = float(volume[q]) / m
        T1 += b
        T2 += b * b
    return [(q, (2 * (float(volume[q]) / m) * T1 - T2) / T1**2) for q in win]


def stochastic_pool(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                    *, training=True, seed=0):
    """-> (y, indices); indices is None when training=False. Any spatial rank."""
    x = np.asarray(x, dtype=np.float64)
    _check_stochastic_input(x)
    g = pool_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    N, C = x.shape[:2]
    y = np.empty((N, C) + g.out_size, dtype=np.float64)
    ind = np.empty((N, C) + g.out_size, dtype=np.int64) if training else None
    for n in range(N):
        for c in range(C):
            for pos in positions(g.out_size):
                u = (stochastic_position_uniform(seed, n, c, pos, g.out_size)
                     if training else 0.0)
                value, index = stochastic_window(x[n, c], pos, g, u, training)
                y[(n, c) + pos] = value
                if training:
                    ind[(n, c) + pos] = index
    return y, ind


def stochastic_pool_backward(grad_output, x, kernel_size, stride=None, padding=0,
                             dilation=1, ceil_mode=False, *, training=True, indices=None):
    x = np.asarray(x, dtype=np.float64)
    if training:
        if indices is None:
            raise ValueError("training backward needs the forward's indices")
        return scatter_to_indices(grad_output, indices, x.shape)
    go = np.asarray(grad_output, dtype=np.float64)
    g = pool_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    gi = np.zeros(x.shape, dtype=np.float64)
    N, C = x.shape[:2]
    for n in range(N):
        for c in range(C):
            for pos in positions(g.out_size):
                for q, d in stochastic_window_grad(x[n, c], pos, g):
                    gi[(n, c) + q] += go[(n, c) + pos] * d
    return gi


# ----------------------------------------------------------------------------- adaptive

def adaptive_output_size(in_size, output_size):
    rank = len(in_size)
    sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * rank
    return tuple(n if o is None else o for n, o in zip(in_size, sizes))


def adaptive_window(pos, in_size, out_size):
    """The input positions of adaptive window ``pos``: along each axis
    ``[floor(o * n / m), ceil((o + 1) * n / m))`` (PyTorch's rule)."""
    ranges = [range(math.floor(o * n / m), math.ceil((o + 1) * n / m))
              for o, n, m in zip(pos, in_size, out_size)]
    return list(itertools.product(*ranges))


def adaptive_pool(x, output_size, mode):
    """``mode`` "avg" -> y; "max" -> (y, indices), any spatial rank, float64."""
    x = np.asarray(x, dtype=np.float64)
    in_size = x.shape[2:]
    out_size = adaptive_output_size(in_size, output_size)
    N, C = x.shape[:2]
    y = np.empty((N, C) + out_size)
    ind = np.empty((N, C) + out_size, dtype=np.int64)
    for n in range(N):
        for c in range(C):
            for pos in positions(out_size):
                cells = adaptive_window(pos, in_size, out_size)
                if mode == "avg":
                    y[(n, c) + pos] = sum(x[(n, c) + q] for q in cells) / len(cells)
                    continue
                best, best_idx = None, None
                for q in cells:
                    v = x[(n, c) + q]
                    if best is None or v > best or (math.isnan(v) and not math.isnan(best)):
                        best, best_idx = v, flat_index(q, in_size)
                y[(n, c) + pos], ind[(n, c) + pos] = best, best_idx
    return y if mode == "avg" else (y, ind)


def adaptive_stochastic_pool(x, output_size, *, training=True, seed=0):
    """-> (y, indices): stochastic pooling inside adaptive windows, the draw of window
    ``pos`` that of stochastic pooling's output ``pos``; indices None at inference."""
    x = np.asarray(x, dtype=np.float64)
    _check_stochastic_input(x)
    in_size = x.shape[2:]
    out_size = adaptive_output_size(in_size, output_size)
    N, C = x.shape[:2]
    y = np.empty((N, C) + out_size)
    ind = np.empty((N, C) + out_size, dtype=np.int64) if training else None
    for n in range(N):
        for c in range(C):
            for pos in positions(out_size):
                u = stochastic_position_uniform(seed, n, c, pos, out_size) if training else 0
                value, index = stochastic_cells(x[n, c], adaptive_window(pos, in_size,
                                                                         out_size),
                                                in_size, u, training)
                y[(n, c) + pos] = value
                if training:
                    ind[(n, c) + pos] = index
    return y, ind


def adaptive_stochastic_pool_backward(grad_output, x, output_size):
    """Inference backward: each window's ``d y / d a_i`` times its gradient."""
    x = np.asarray(x, dtype=np.float64)
    go = np.asarray(grad_output, dtype=np.float64)
    in_size = x.shape[2:]
    out_size = adaptive_output_size(in_size, output_size)
    gi = np.zeros(x.shape)
    N, C = x.shape[:2]
    for n in range(N):
        for c in range(C):
            for pos in positions(out_size):
                for q, d in stochastic_cells_grad(x[n, c], adaptive_window(pos, in_size,
                                                                           out_size)):
                    gi[(n, c) + q] += go[(n, c) + pos] * d
    return gi


def global_avg_pool_in_order(x, lanes=16):
    """Global average pooling in fastpool's documented summation order, in ``x``'s own
    dtype (docs/design.md): per ``(n, c)``, partial ``j`` adds the row-major flattened
    elements ``j, j + lanes, ...`` one by one from +0; then ``p[j] += p[j + width]``
    for ``width = lanes / 2, ..., 1``; the mean is ``float64(p[0]) / size`` rounded to
    the dtype."""
    x = np.asarray(x)
    dtype = x.dtype.type
    N, C = x.shape[:2]
    flat = x.reshape(N, C, -1)
    size = flat.shape[2]
    y = np.empty((N, C) + (1,) * (x.ndim - 2), dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            partial = [dtype(0)] * lanes
            for k in range(size):
                partial[k % lanes] = dtype(partial[k % lanes] + flat[n, c, k])
            width = lanes // 2
            while width:
                for j in range(width):
                    partial[j] = dtype(partial[j] + partial[j + width])
                width //= 2
            y[n, c] = np.float64(partial[0]) / size
    return y


def adaptive_avg_pool_backward(grad_output, x_shape, output_size):
    go = np.asarray(grad_output, dtype=np.float64)
    in_size = tuple(x_shape[2:])
    out_size = adaptive_output_size(in_size, output_size)
    gi = np.zeros(x_shape)
    N, C = x_shape[:2]
    for n in range(N):
        for c in range(C):
            for pos in positions(out_size):
                cells = adaptive_window(pos, in_size, out_size)
                for q in cells:
                    gi[(n, c) + q] += go[(n, c) + pos] / len(cells)
    return gi


# ----------------------------------------------------------------------------- unpooling

def unpool_output_size(in_size, kernel_size, stride=None, padding=0):
    rank = len(in_size)
    k = ntuple(kernel_size, rank)
    s = k if stride is None else ntuple(stride, rank)
    p = ntuple(padding, rank)
    return tuple((n - 1) * si - 2 * pi + ki for n, ki, si, pi in zip(in_size, k, s, p))


def max_unpool(x, indices, out_size):
    """y[n, c].flat[indices[n, c, ...]] = x[n, c, ...], later inputs (row-major) winning."""
    x = np.asarray(x, dtype=np.float64)
    N, C = x.shape[:2]
    y = np.zeros((N, C) + tuple(out_size))
    for n in range(N):
        for c in range(C):
            flat = y[n, c].reshape(-1)
            for index, v in zip(np.asarray(indices)[n, c].reshape(-1), x[n, c].reshape(-1)):
                flat[int(index)] = v
    return y


def max_unpool_backward(grad_output, indices):
    go = np.asarray(grad_output, dtype=np.float64)
    indices = np.asarray(indices)
    N, C = indices.shape[:2]
    gi = np.zeros(indices.shape)
    for n in range(N):
        for c in range(C):
            flat = go[n, c].reshape(-1)
            for pos in positions(indices.shape[2:]):
                gi[(n, c) + pos] = flat[int(indices[(n, c) + pos])]
    return gi


# The 2-D names the tests use; every function above takes any spatial rank.
max_pool2d, max_pool2d_backward = max_pool, max_pool_backward
avg_pool2d, avg_pool2d_backward = avg_pool, avg_pool_backward
stochastic_pool2d, stochastic_pool2d_backward = stochastic_pool, stochastic_pool_backward


# ----------------------------------------------------------------------------- conv

def conv_padding(padding, kernel, dilation):
    """((top, bottom), (left, right)) of an int/pair/'valid'/'same' conv padding."""
    kh, kw = kernel
    dh, dw = dilation
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (th // 2, th - th // 2), (tw // 2, tw - tw // 2)
    ph, pw = pair(padding)
    return (ph, ph), (pw, pw)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Cross-correlation, zero padding: y[n, o, oh, ow] = bias[o] + sum over the input
    channels c of o's group and taps (i, j) of weight[o, c - g*Cg, i, j] * x[n, c, h, w]
    with h = oh*sh - top + i*dh, w = ow*sw - left + j*dw."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    N, C, H, W = x.shape
    O, Cg, kh, kw = weight.shape
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    (pt, pb), (pl, pr) = conv_padding(padding, (kh, kw), (dh, dw))
    OH = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
    Og = O // groups
    y = np.zeros((N, O, OH, OW))
    for n in range(N):
        for o in range(O):
            g = o // Og
            for oh in range(OH):
                for ow in range(OW):
                    total = 0.0 if bias is None else float(bias[o])
                    for c in range(Cg):
                        for i in range(kh):
                            h = oh * sh - pt + i * dh
                            if not 0 <= h < H:
                                continue
                            for j in range(kw):
                                w = ow * sw - pl + j * dw
                                if 0 <= w < W:
                                    total += weight[o, c, i, j] * x[n, g * Cg + c, h, w]
                    y[n, o, oh, ow] = total
    return y


def conv2d_backward(grad_output, x, weight, stride=1, padding=0, dilation=1, groups=1):
    """(grad_input, grad_weight, grad_bias) of conv2d, by the chain rule on the same
    loops: each product weight * x sends grad_output * weight to x and
    grad_output * x to weight."""
    go = np.asarray(grad_output, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    N, C, H, W = x.shape
    O, Cg, kh, kw = weight.shape
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    (pt, _), (pl, _) = conv_padding(padding, (kh, kw), (dh, dw))
    OH, OW = go.shape[2:]
    Og = O // groups
    gx = np.zeros_like(x)
    gw = np.zeros_like(weight)
    for n in range(N):
        for o in range(O):
            g = o // Og
            for oh in range(OH):
                for ow in range(OW):
                    d = go[n, o, oh, ow]
                    for c in range(Cg):
                        for i in range(kh):
                            h = oh * sh - pt + i * dh
                            if not 0 <= h < H:
                                continue
                            for j in range(kw):
                                w = ow * sw - pl + j * dw
                                if 0 <= w < W:
                                    gx[n, g * Cg + c, h, w] += d * weight[o, c, i, j]
                                    gw[o, c, i, j] += d * x[n, g * Cg + c, h, w]
    return gx, gw, go.sum(axis=(0, 2, 3))


# ----------------------------------------------------------------------------- conv, any rank

def conv_pads(padding, kernel, dilation):
    """Per-axis (before, after) padding of an int / tuple / 'valid' / 'same' conv
    padding, any rank ('same': total d*(k-1), the odd cell after)."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                for k, d in zip(kernel, dilation)]
    return [(p, p) for p in ntuple(padding, len(kernel))]


def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Cross-correlation of any spatial rank: y[n, o, *q] = bias[o] + sum over the input
    channels c of o's group and the taps t of weight[o, c - g*Cg, *t] * x[n, c, *(q*s -
    p_before + t*d)], cells outside the input being zero. The loops run over n, the
    output positions q and the taps t; the sum over a group's channels at one (q, t) is
    a matrix-vector product (weight[group's o, :, *t] @ x[n, group's c, *pos]), every
    group at once."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    rank = x.ndim - 2
    N, C = x.shape[:2]
    O, Cg = weight.shape[:2]
    kernel = weight.shape[2:]
    s, d = ntuple(stride, rank), ntuple(dilation, rank)
    pads = conv_pads(padding, kernel, d)
    out = tuple((n + a + b - e * (k - 1) - 1) // st + 1 for n, (a, b), k, st, e in
                zip(x.shape[2:], pads, kernel, s, d))
    w = weight.reshape((groups, O // groups, Cg) + kernel)
    y = np.zeros((N, O) + out)
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64).reshape((1, O) + (1,) * rank)
    for n in range(N):
        for q in positions(out):
            for t in positions(kernel):
                pos = _tap_position(q, t, s, pads, d, x.shape[2:])
                if pos is not None:
                    xc = x[(n, slice(None)) + pos].reshape(groups, Cg, 1)
                    y[(n, slice(None)) + q] += (w[(Ellipsis,) + t] @ xc).reshape(O)
    return y


def _tap_position(q, t, s, pads, d, size):
    """The input position tap ``t`` of output position ``q`` reads, None in padding."""
    pos = tuple(qi * si - a + ti * di for qi, si, (a, _), ti, di in zip(q, s, pads, t, d))
    return pos if all(0 <= e < n for e, n in zip(pos, size)) else None


def conv_backward(grad_output, x, weight, stride=1, padding=0, dilation=1, groups=1):
    """(grad_input, grad_weight, grad_bias) of ``conv``, any rank, by the chain rule on
    the same loops: each product weight[o, c, t] * x[n, c, pos] sends
    grad_output[n, o, q] * weight[o, c, t] to x[n, c, pos] and grad_output[n, o, q] *
    x[n, c, pos] to weight[o, c, t] (per (n, q, t), every (o, c) pair of each group at
    once)."""
    go = np.asarray(grad_output, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    rank = x.ndim - 2
    N, C = x.shape[:2]
    O, Cg = weight.shape[:2]
    kernel = weight.shape[2:]
    s, d = ntuple(stride, rank), ntuple(dilation, rank)
    pads = conv_pads(padding, kernel, d)
    Og = O // groups
    w = weight.reshape((groups, Og, Cg) + kernel)
    gx = np.zeros(x.shape)
    gw = np.zeros(weight.shape)
    gwg = gw.reshape((groups, Og, Cg) + kernel)  # a view (gw is C-contiguous)
    for n in range(N):
        for q in positions(go.shape[2:]):
            v = go[(n, slice(None)) + q].reshape(groups, Og, 1)
            for t in positions(kernel):
                pos = _tap_position(q, t, s, pads, d, x.shape[2:])
                if pos is not None:
                    wt = w[(Ellipsis,) + t]                      # (groups, Og, Cg)
                    xc = x[(n, slice(None)) + pos].reshape(groups, 1, Cg)
                    gx[(n, slice(None)) + pos] += (v * wt).sum(axis=1).reshape(C)
                    gwg[(Ellipsis,) + t] += v * xc
    return gx, gw, go.sum(axis=(0,) + tuple(range(2, go.ndim)))


# ----------------------------------------------------------------------------- transposed conv

def conv_transpose(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                   dilation=1):
    """Plain loops from the definition, any spatial rank, float64: every input element
    spreads ``x[n, ci, p] * weight[ci, o, k]`` to position ``p * s - pad + k * d`` of
    output channel ``g * C_out_g + o`` (``g`` the group of ``ci``)."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    rank = x.ndim - 2
    s, p, o, d = (ntuple(v, rank) for v in (stride, padding, output_padding, dilation))
    kernel = weight.shape[2:]
    N, C_in = x.shape[:2]
    C_out_g = weight.shape[1]
    C_in_g = C_in // groups
    size = tuple((n - 1) * si - 2 * pi + di * (k - 1) + oi + 1 for n, si, pi, di, k, oi in
                 zip(x.shape[2:], s, p, d, kernel, o))
    y = np.zeros((N, C_out_g * groups) + size)
    for n in range(N):
        for ci in range(C_in):
            g = ci // C_in_g
            for pos in positions(x.shape[2:]):
                v = x[(n, ci) + pos]
                for tap in positions(kernel):
                    q = tuple(a * si - pi + t * di for a, si, pi, t, di in
                              zip(pos, s, p, tap, d))
                    if all(0 <= qi < n_ for qi, n_ in zip(q, size)):
                        for oc in range(C_out_g):
                            y[(n, g * C_out_g + oc) + q] += v * weight[(ci, oc) + tap]
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64).reshape((1, -1) + (1,) * rank)
    return y


def conv_transpose_backward(grad_output, x, weight, stride=1, padding=0, output_padding=0,
                            groups=1, dilation=1):
    """``(grad_x, grad_weight, grad_bias)`` of ``conv_transpose`` by the chain rule over
    the same loops."""
    go = np.asarray(grad_output, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    rank = x.ndim - 2
    s, p, d = (ntuple(v, rank) for v in (stride, padding, dilation))
    kernel = weight.shape[2:]
    N, C_in = x.shape[:2]
    C_out_g = weight.shape[1]
    C_in_g = C_in // groups
    size = go.shape[2:]
    gx = np.zeros(x.shape)
    gw = np.zeros(weight.shape)
    for n in range(N):
        for ci in range(C_in):
            g = ci // C_in_g
            for pos in positions(x.shape[2:]):
                for tap in positions(kernel):
                    q = tuple(a * si - pi + t * di for a, si, pi, t, di in
                              zip(pos, s, p, tap, d))
                    if all(0 <= qi < n_ for qi, n_ in zip(q, size)):
                        for oc in range(C_out_g):
                            gy = go[(n, g * C_out_g + oc) + q]
                            gx[(n, ci) + pos] += gy * weight[(ci, oc) + tap]
                            gw[(ci, oc) + tap] += gy * x[(n, ci) + pos]
    return gx, gw, go.sum(axis=(0,) + tuple(range(2, go.ndim)))


def conv_parameter_grads_exact(grad_output, x, weight_shape, stride=1, padding=0,
                               dilation=1, groups=1):
    """(grad_weight, grad_bias) of ``conv`` (any rank), each element the exact sum of
    its terms rounded once to float64 (``math.fsum``): grad_weight[o, c, *t] sums
    grad_output[n, o, *q] * x[n, g*Cg + c, *(q*s - p_before + t*d)] over n and q (cells
    outside the input: no term); grad_bias[o] sums grad_output[n, o, *q]. Products of
    float32 (or half) values are exact in float64."""
    go = np.asarray(grad_output, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    rank = x.ndim - 2
    O, Cg = weight_shape[:2]
    kernel = tuple(weight_shape[2:])
    s, d = ntuple(stride, rank), ntuple(dilation, rank)
    pads = conv_pads(padding, kernel, d)
    Og = O // groups
    terms = {}
    for n in range(go.shape[0]):
        for o in range(O):
            g = o // Og
            for q in positions(go.shape[2:]):
                for c in range(Cg):
                    for t in positions(kernel):
                        pos = tuple(qi * si - a + ti * di for qi, si, (a, _), ti, di in
                                    zip(q, s, pads, t, d))
                        if all(0 <= e < n_ for e, n_ in zip(pos, x.shape[2:])):
                            terms.setdefault((o, c) + t, []).append(
                                go[(n, o) + q] * x[(n, g * Cg + c) + pos])
    grad_weight = np.zeros(tuple(weight_shape))
    for key in positions(tuple(weight_shape)):
        grad_weight[key] = math.fsum(terms.get(key, []))
    grad_bias = np.array([math.fsum(go[:, o].ravel()) for o in range(O)])
    return grad_weight, grad_bias
