"""Slow, obviously-correct reference implementations of fastpool's pooling ops.

Written from the formulas in docs/design.md section 2 (never from the kernels), as plain
Python loops over n, c, oh, ow and the window elements.  Inputs are NumPy arrays of
shape (N, C, H, W); everything is computed in float64 and returned as float64
(indices as int64, PyTorch's flat ``h * W + w`` convention inside each (n, c) plane).

A window element lying in the padding is skipped (max: -inf, stochastic: weight 0).
Should a (dilated) window contain no in-input element at all, max pooling outputs -inf
with index -1 and stochastic pooling outputs 0 with index -1; backward ignores index -1.
"""

import math

import numpy as np

MASK = 2**64 - 1
GAMMA = 0x9E3779B97F4A7C15


# ----------------------------------------------------------------------------- geometry

def pair(v):
    """int or (h, w) pair -> (int, int)."""
    if isinstance(v, (tuple, list)):
        h, w = v
        return int(h), int(w)
    return int(v), int(v)


def pool_output_size(size, k, s, p, d, ceil_mode):
    """Output length along one axis (docs/design.md section 2)."""
    ek = d * (k - 1) + 1
    out = (size + 2 * p - ek + ((s - 1) if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _geometry(x_shape, kernel_size, stride, padding, dilation, ceil_mode):
    N, C, H, W = x_shape
    kh, kw = pair(kernel_size)
    sh, sw = pair(kernel_size if stride is None else stride)
    ph, pw = pair(padding)
    dh, dw = pair(dilation)
    OH = pool_output_size(H, kh, sh, ph, dh, ceil_mode)
    OW = pool_output_size(W, kw, sw, pw, dw, ceil_mode)
    if OH < 1 or OW < 1:
        raise ValueError(f"output size ({OH}, {OW}) < 1")
    return N, C, H, W, OH, OW, (kh, kw, sh, sw, ph, pw, dh, dw)


def pool_geometry(x_shape, kernel_size, stride=None, padding=0, dilation=1,
                  ceil_mode=False):
    """(OH, OW, g) of a pooling over ``x_shape`` (N, C, H, W); ``g`` is the tuple the
    per-window functions take."""
    *_, OH, OW, g = _geometry(x_shape, kernel_size, stride, padding, dilation, ceil_mode)
    return OH, OW, g


def windows_covering(h, w, OH, OW, g):
    """The windows (oh, ow) that hold input element (h, w), in output order."""
    kh, kw, sh, sw, ph, pw, dh, dw = g
    # Window oh holds row h when oh * sh - ph + i * dh == h for a tap i < kh.
    rows = sorted({(h + ph - i * dh) // sh for i in range(kh)
                   if (h + ph - i * dh) % sh == 0 and 0 <= (h + ph - i * dh) // sh < OH})
    cols = sorted({(w + pw - j * dw) // sw for j in range(kw)
                   if (w + pw - j * dw) % sw == 0 and 0 <= (w + pw - j * dw) // sw < OW})
    return [(oh, ow) for oh in rows for ow in cols]


def _window(oh, ow, H, W, g):
    """In-input elements (h, w) of window (oh, ow), in row-major (i then j) order."""
    kh, kw, sh, sw, ph, pw, dh, dw = g
    out = []
    for i in range(kh):
        h = oh * sh - ph + i * dh
        for j in range(kw):
            w = ow * sw - pw + j * dw
            if 0 <= h < H and 0 <= w < W:
                out.append((h, w))
    return out


def scatter_to_indices(grad_output, indices, input_shape):
    """grad_input[n, c].flat[indices[n, c, oh, ow]] += grad_output[n, c, oh, ow]."""
    go = np.asarray(grad_output, dtype=np.float64)
    indices = np.asarray(indices)
    gi = np.zeros(input_shape, dtype=np.float64)
    N, C, OH, OW = go.shape
    W = input_shape[3]
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    idx = int(indices[n, c, oh, ow])
                    if idx < 0:
                        continue
                    gi[n, c, idx // W, idx % W] += go[n, c, oh, ow]
    return gi


# ----------------------------------------------------------------------------- max

def max_window(plane, oh, ow, g):
    """(value, flat index) of window (oh, ow) of one (H, W) plane: the first maximum in
    row-major order wins; the first NaN wins and propagates; (-inf, -1) if the window
    holds no input element."""
    H, W = plane.shape
    best, best_idx = -math.inf, -1
    for h, w in _window(oh, ow, H, W, g):
        v = float(plane[h, w])
        if math.isnan(v):
            return v, h * W + w
        if best_idx == -1 or v > best:
            best, best_idx = v, h * W + w
    return best, best_idx


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """-> (y, indices). First maximum (row-major) wins; first NaN wins and propagates."""
    x = np.asarray(x, dtype=np.float64)
    N, C, H, W, OH, OW, g = _geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    y = np.empty((N, C, OH, OW), dtype=np.float64)
    ind = np.empty((N, C, OH, OW), dtype=np.int64)
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    y[n, c, oh, ow], ind[n, c, oh, ow] = max_window(x[n, c], oh, ow, g)
    return y, ind


def max_pool2d_backward(grad_output, x, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode=False):
    """Each output's gradient goes to its argmax (accumulating over overlapping windows)."""
    x = np.asarray(x, dtype=np.float64)
    _, ind = max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    return scatter_to_indices(grad_output, ind, x.shape)


# ----------------------------------------------------------------------------- average

def avg_window(H, W, oh, ow, g, count_include_pad, divisor_override):
    """(h0, h1, w0, w1, divisor) of window (oh, ow): ``[h0, h1) x [w0, w1)`` clipped to
    the input; the divisor counts padding cells up to ``H + p`` when
    ``count_include_pad`` (PyTorch's rule)."""
    kh, kw, sh, sw, ph, pw, _, _ = g
    h0 = oh * sh - ph
    w0 = ow * sw - pw
    h1 = min(h0 + kh, H + ph)
    w1 = min(w0 + kw, W + pw)
    pool_area = (h1 - h0) * (w1 - w0)
    h0, w0 = max(h0, 0), max(w0, 0)
    h1, w1 = min(h1, H), min(w1, W)
    if divisor_override is not None:
        div = divisor_override
    elif count_include_pad:
        div = pool_area
    else:
        div = (h1 - h0) * (w1 - w0)
    return h0, h1, w0, w1, float(div)


def _avg_windows(x_shape, kernel_size, stride, padding, ceil_mode, count_include_pad,
                 divisor_override):
    """Yield (n, c, oh, ow, h0, h1, w0, w1, divisor) with [h0, h1) x [w0, w1) clipped."""
    N, C, H, W, OH, OW, g = _geometry(x_shape, kernel_size, stride, padding, 1, ceil_mode)
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    yield (n, c, oh, ow) + avg_window(H, W, oh, ow, g, count_include_pad,
                                                      divisor_override)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    x = np.asarray(x, dtype=np.float64)
    N, C, _, _, OH, OW, _ = _geometry(x.shape, kernel_size, stride, padding, 1, ceil_mode)
    y = np.empty((N, C, OH, OW), dtype=np.float64)
    for n, c, oh, ow, h0, h1, w0, w1, div in _avg_windows(
            x.shape, kernel_size, stride, padding, ceil_mode, count_include_pad,
            divisor_override):
        s = 0.0
        for h in range(h0, h1):
            for w in range(w0, w1):
                s += x[n, c, h, w]
        y[n, c, oh, ow] = s / div
    return y


def avg_pool2d_backward(grad_output, x, kernel_size, stride=None, padding=0, ceil_mode=False,
                        count_include_pad=True, divisor_override=None):
    go = np.asarray(grad_output, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    gi = np.zeros(x.shape, dtype=np.float64)
    for n, c, oh, ow, h0, h1, w0, w1, div in _avg_windows(
            x.shape, kernel_size, stride, padding, ceil_mode, count_include_pad,
            divisor_override):
        for h in range(h0, h1):
            for w in range(w0, w1):
                gi[n, c, h, w] += go[n, c, oh, ow] / div
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


def stochastic_uniform(seed, n, c, oh, ow):
    """Counter-based U[0, 1) draw keyed by (seed, n, c, oh, ow); oh, ow < 2**32."""
    counter = ((oh << 32) | ow) & MASK
    z = mix64((plane_key(seed, n, c) + counter * GAMMA) & MASK)
    return (z >> 11) * 2.0**-53


def _check_stochastic_input(x):
    if not np.all(np.isfinite(x)):
        raise ValueError("stochastic pooling input must be finite (no NaN or inf)")
    if np.any(x < 0):
        raise ValueError("stochastic pooling input must be >= 0")


def stochastic_window(plane, oh, ow, g, u, training=True):
    """(value, flat index) of window (oh, ow) of one plane for the draw ``u``; index -1
    at inference (nothing is picked) and for a window without input elements."""
    H, W = plane.shape
    win = _window(oh, ow, H, W, g)
    vals = [float(plane[h, w]) for h, w in win]
    flat = [h * W + w for h, w in win]
    S = 0.0
    for a in vals:
        S += a
    if not training:
        S2 = 0.0
        for a in vals:
            S2 += a * a
        return (S2 / S if S != 0 else 0.0), -1
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


def stochastic_window_grad(plane, oh, ow, g):
    """Inference backward of one window: [((h, w), d y / d a_hw)], with
    ``d y / d a_i = (2 a_i S1 - S2) / S1**2``; empty when ``S1 == 0``."""
    H, W = plane.shape
    win = _window(oh, ow, H, W, g)
    S1 = S2 = 0.0
    for h, w in win:
        a = float(plane[h, w])
        S1 += a
        S2 += a * a
    if S1 == 0:
        return []
    return [((h, w), (2 * float(plane[h, w]) * S1 - S2) / S1**2) for h, w in win]


def stochastic_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *,
                      training=True, seed=0):
    """-> (y, indices); indices is None when training=False."""
    x = np.asarray(x, dtype=np.float64)
    _check_stochastic_input(x)
    N, C, H, W, OH, OW, g = _geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    y = np.empty((N, C, OH, OW), dtype=np.float64)
    ind = np.empty((N, C, OH, OW), dtype=np.int64) if training else None
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    u = stochastic_uniform(seed, n, c, oh, ow) if training else 0.0
                    value, index = stochastic_window(x[n, c], oh, ow, g, u, training)
                    y[n, c, oh, ow] = value
                    if training:
                        ind[n, c, oh, ow] = index
    return y, ind


def stochastic_pool2d_backward(grad_output, x, kernel_size, stride=None, padding=0, dilation=1,
                               ceil_mode=False, *, training=True, indices=None):
    x = np.asarray(x, dtype=np.float64)
    if training:
        if indices is None:
            raise ValueError("training backward needs the forward's indices")
        return scatter_to_indices(grad_output, indices, x.shape)
    go = np.asarray(grad_output, dtype=np.float64)
    N, C, H, W, OH, OW, g = _geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    gi = np.zeros(x.shape, dtype=np.float64)
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    for (h, w), d in stochastic_window_grad(x[n, c], oh, ow, g):
                        gi[n, c, h, w] += go[n, c, oh, ow] * d
    return gi


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
