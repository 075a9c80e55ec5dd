"""numba.cuda pooling kernels and their launchers, mirroring ``fastpool.cpu.pooling``.

Launchers take Numba device arrays already validated by ``fastpool._params`` plus the
``PoolGeometry`` and return Numba device arrays (``fastpool.cuda`` adds the transfers).
Kernels index ``(N, C, H, W)`` arrays of any strides.

Every kernel is a grid-stride loop over int64 element numbers, one element per turn:
forward kernels over outputs, backward kernels over ``grad_input`` elements. Backward
kernels are in gather form: each input element sums the contributions of the windows
that cover it, in the order the CPU kernels add them, so nothing races, nothing uses
atomics, and results are identical from run to run. Window loops visit elements in
row-major order with the CPU's tie, NaN and zero-window rules, and stochastic pooling
draws from ``fastpool._rng`` compiled for the GPU, so one seed picks the same elements
on both devices.

Geometry (kernel, stride, padding, dilation) is runtime data here: one compile per
dtype serves every shape. Kernels that cast to the array's dtype are built per dtype.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import config, cuda

from fastpool import _params, _rng
from fastpool.cuda._launch import (
    batched,
    error_flag,
    flag_raised,
    grid_start,
    grid_stride,
    launch,
    split_nchw,
)

_gpu_rng = _rng.compile_with(cuda.jit(device=True, inline=True),
                             interpreted=bool(config.ENABLE_CUDASIM))
# Module globals: kernels can call a device function global, not a namespace attribute.
_plane_key = _gpu_rng.plane_key
_uniform = _gpu_rng.uniform
_INF = np.inf


def _window_args(g):
    """Geometry arguments shared by every kernel."""
    return (g.pad_h, g.pad_w, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w,
            g.dilation_h, g.dilation_w)


def _planes_shape(g, h, w):
    return (g.batch, g.channels, h, w)


def _output(g, dtype):
    return cuda.device_array(_planes_shape(g, g.out_h, g.out_w), dtype)


def _dummy_indices():
    return cuda.device_array((1, 1, 1, 1), np.int64)


@cuda.jit(device=True, inline=True)
def _covering(t, pad, k_index, dilation, stride, out_size):
    """The output position whose window puts tap ``k_index`` on input position ``t``
    along one axis, or -1 when none does."""
    start = t + pad - k_index * dilation
    if start < 0 or start % stride != 0 or start // stride >= out_size:
        return -1
    return start // stride


@cuda.jit(device=True, inline=True)
def _replaces(value, best):
    """Max-pool ordering: larger wins; the first NaN wins and then sticks."""
    return value > best or (value != value and best == best)


# ----------------------------------------------------------------------------- max

@cuda.jit
def _max_forward(x, out, indices, with_indices, ph, pw, KH, KW, SH, SW, DH, DW):
    N, C, OH, OW = out.shape
    H, W = x.shape[2], x.shape[3]
    total = np.int64(N) * C * OH * OW
    i = grid_start()
    while i < total:
        n, c, oh, ow = split_nchw(i, C, OH, OW)
        h0 = oh * SH - ph
        w0 = ow * SW - pw
        best = x[n, c, 0, 0]
        arg = np.int64(-1)
        for a in range(KH):
            h = h0 + a * DH
            if 0 <= h < H:
                for b in range(KW):
                    w = w0 + b * DW
                    if 0 <= w < W:
                        v = x[n, c, h, w]
                        if arg < 0 or _replaces(v, best):
                            best = v
                            arg = np.int64(h) * W + w
        out[n, c, oh, ow] = best
        if with_indices:
            indices[n, c, oh, ow] = arg
        i += grid_stride()


@cuda.jit
def _check_window_indices(indices, H, W, ph, pw, KH, KW, SH, SW, DH, DW, bad):
    """Set ``bad[0]`` if an index is not a position inside its own window."""
    N, C, OH, OW = indices.shape
    total = np.int64(N) * C * OH * OW
    i = grid_start()
    while i < total:
        n, c, oh, ow = split_nchw(i, C, OH, OW)
        target = indices[n, c, oh, ow]
        inside = 0 <= target < np.int64(H) * W
        if inside:
            dh = target // W - (oh * SH - ph)
            dw = target % W - (ow * SW - pw)
            inside = (dh >= 0 and dh % DH == 0 and dh // DH < KH
                      and dw >= 0 and dw % DW == 0 and dw // DW < KW)
        if not inside:
            bad[0] = 1
        i += grid_stride()


@functools.lru_cache(maxsize=None)
def _gather_to_indices_kernel(dtype):
    zero = np.dtype(dtype).type(0)

    @cuda.jit
    def gather_to_indices(grad_output, indices, grad_input, ph, pw, KH, KW, SH, SW, DH,
                          DW):
        """``grad_input[h, w]`` = the sum of ``grad_output`` over the windows whose
        index is ``h * W + w``, in output order (the CPU scatter's order)."""
        N, C, H, W = grad_input.shape
        OH, OW = grad_output.shape[2], grad_output.shape[3]
        total = np.int64(N) * C * H * W
        i = grid_start()
        while i < total:
            n, c, h, w = split_nchw(i, C, H, W)
            target = np.int64(h) * W + w
            acc = zero
            for a in range(KH - 1, -1, -1):  # descending taps: ascending output rows
                oh = _covering(h, ph, a, DH, SH, OH)
                if oh >= 0:
                    for b in range(KW - 1, -1, -1):
                        ow = _covering(w, pw, b, DW, SW, OW)
                        if ow >= 0 and indices[n, c, oh, ow] == target:
                            acc += grad_output[n, c, oh, ow]
            grad_input[n, c, h, w] = acc
            i += grid_stride()

    return gather_to_indices


def max_pool2d_forward(x, geometry, with_indices):
    g = geometry
    x = batched(x, _planes_shape(g, g.in_h, g.in_w))
    out = _output(g, x.dtype)
    indices = (cuda.device_array(out.shape, np.int64) if with_indices
               else _dummy_indices())
    launch(_max_forward, out.size, x, out, indices, bool(with_indices), *_window_args(g))
    return (out.reshape(g.output_shape),
            indices.reshape(g.output_shape) if with_indices else None)


def scatter_to_indices(grad_output, indices, geometry, checked=True):
    """Backward of a pooling that picked one element per window (max, stochastic
    training). ``checked=False`` skips the index check (indices this module made)."""
    g = geometry
    out_shape = _planes_shape(g, g.out_h, g.out_w)
    grad_output = batched(grad_output, out_shape)
    indices = batched(indices, out_shape)
    if checked and indices.size:
        bad = error_flag()
        launch(_check_window_indices, indices.size, indices, g.in_h, g.in_w,
               *_window_args(g), bad)
        if flag_raised(bad):
            raise ValueError(
                "indices holds value(s) that are not a position inside their own window; "
                "indices must be the flat positions h * W + w (inside each (n, c) plane) "
                "returned by the forward pass")
    grad_input = cuda.device_array(_planes_shape(g, g.in_h, g.in_w), grad_output.dtype)
    launch(_gather_to_indices_kernel(grad_output.dtype), grad_input.size, grad_output,
           indices, grad_input, *_window_args(g))
    return grad_input.reshape(g.input_shape)


def max_pool2d_backward(grad_output, x, geometry, indices):
    checked = indices is not None
    if indices is None:
        _, indices = max_pool2d_forward(x, geometry, with_indices=True)
    return scatter_to_indices(grad_output, indices, geometry, checked)


# ----------------------------------------------------------------------------- average

@cuda.jit(device=True, inline=True)
def _avg_divisor(oh, ow, H, W, ph, pw, KH, KW, SH, SW, count_include_pad,
                 divisor_override):
    if divisor_override != 0:
        return np.int64(divisor_override)
    h0 = oh * SH - ph
    w0 = ow * SW - pw
    h1 = min(h0 + KH, H + ph)
    w1 = min(w0 + KW, W + pw)
    if count_include_pad:
        return np.int64(h1 - h0) * (w1 - w0)
    return np.int64(min(h1, H) - max(h0, 0)) * (min(w1, W) - max(w0, 0))


@functools.lru_cache(maxsize=None)
def _avg_kernels(dtype):
    scalar = np.dtype(dtype).type
    zero = scalar(0)

    @cuda.jit
    def avg_forward(x, out, ph, pw, KH, KW, SH, SW, count_include_pad, divisor_override):
        """Sum in the input's dtype, row-major, as the CPU and PyTorch do."""
        N, C, OH, OW = out.shape
        H, W = x.shape[2], x.shape[3]
        total = np.int64(N) * C * OH * OW
        i = grid_start()
        while i < total:
            n, c, oh, ow = split_nchw(i, C, OH, OW)
            h0 = oh * SH - ph
            w0 = ow * SW - pw
            acc = zero
            for h in range(max(h0, 0), min(h0 + KH, H)):
                for w in range(max(w0, 0), min(w0 + KW, W)):
                    acc += x[n, c, h, w]
            out[n, c, oh, ow] = acc / _avg_divisor(oh, ow, H, W, ph, pw, KH, KW, SH, SW,
                                                   count_include_pad, divisor_override)
            i += grid_stride()

    @cuda.jit
    def avg_backward(grad_output, grad_input, ph, pw, KH, KW, SH, SW, count_include_pad,
                     divisor_override):
        """Each element sums ``grad / divisor`` (rounded to the dtype) of its windows:
        along a window row first, then over rows in tap order, as the CPU's separable
        gather does."""
        N, C, H, W = grad_input.shape
        OH, OW = grad_output.shape[2], grad_output.shape[3]
        total = np.int64(N) * C * H * W
        i = grid_start()
        while i < total:
            n, c, h, w = split_nchw(i, C, H, W)
            acc = zero
            for a in range(KH):
                oh = _covering(h, ph, a, 1, SH, OH)
                if oh >= 0:
                    row = zero
                    for b in range(KW):
                        ow = _covering(w, pw, b, 1, SW, OW)
                        if ow >= 0:
                            row += scalar(grad_output[n, c, oh, ow] / _avg_divisor(
                                oh, ow, H, W, ph, pw, KH, KW, SH, SW, count_include_pad,
                                divisor_override))
                    acc += row
            grad_input[n, c, h, w] = acc
            i += grid_stride()

    return avg_forward, avg_backward


def _avg_args(g, count_include_pad, divisor_override):
    return (g.pad_h, g.pad_w, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w,
            bool(count_include_pad), int(divisor_override))


def avg_pool2d_forward(x, geometry, count_include_pad, divisor_override):
    g = geometry
    x = batched(x, _planes_shape(g, g.in_h, g.in_w))
    out = _output(g, x.dtype)
    forward, _ = _avg_kernels(x.dtype)
    launch(forward, out.size, x, out, *_avg_args(g, count_include_pad, divisor_override))
    return out.reshape(g.output_shape)


def avg_pool2d_backward(grad_output, geometry, count_include_pad, divisor_override):
    g = geometry
    grad_output = batched(grad_output, _planes_shape(g, g.out_h, g.out_w))
    grad_input = cuda.device_array(_planes_shape(g, g.in_h, g.in_w), grad_output.dtype)
    _, backward = _avg_kernels(grad_output.dtype)
    launch(backward, grad_input.size, grad_output, grad_input,
           *_avg_args(g, count_include_pad, divisor_override))
    return grad_input.reshape(g.input_shape)


# ----------------------------------------------------------------------------- stochastic

@cuda.jit(device=True, inline=True)
def _window_sums(x, n, c, h0, w0, KH, KW, DH, DW):
    """``(S1, S2, first in-input flat position, invalid)`` of one window, in float64
    and row-major order; invalid: a negative, NaN or infinite element or sum."""
    H, W = x.shape[2], x.shape[3]
    s1 = 0.0
    s2 = 0.0
    first = np.int64(-1)
    invalid = False
    for a in range(KH):
        h = h0 + a * DH
        if 0 <= h < H:
            for b in range(KW):
                w = w0 + b * DW
                if 0 <= w < W:
                    v = np.float64(x[n, c, h, w])
                    if not (0.0 <= v < _INF):
                        invalid = True
                    if first < 0:
                        first = np.int64(h) * W + w
                    s1 += v
                    s2 += v * v
    return s1, s2, first, invalid or not (s1 < _INF)


@cuda.jit
def _stochastic_train(x, out, indices, with_indices, seed, ph, pw, KH, KW, SH, SW, DH, DW,
                      bad):
    """Pick the first element (row-major) whose running float64 sum exceeds
    ``u * S1``; when rounding lets none exceed it, the last positive element (the CPU's
    rule); a zero-sum window outputs 0 and records its first in-input element."""
    N, C, OH, OW = out.shape
    W = x.shape[3]
    total = np.int64(N) * C * OH * OW
    i = grid_start()
    while i < total:
        n, c, oh, ow = split_nchw(i, C, OH, OW)
        h0 = oh * SH - ph
        w0 = ow * SW - pw
        s1, _, first, invalid = _window_sums(x, n, c, h0, w0, KH, KW, DH, DW)
        if invalid:
            bad[0] = 1
        chosen = first
        if s1 > 0.0:
            threshold = _uniform(_plane_key(seed, n, c), oh, ow) * s1
            running = 0.0
            last_positive = first
            chosen = np.int64(-1)
            for e in range(KH * KW):
                h = h0 + (e // KW) * DH
                w = w0 + (e % KW) * DW
                if chosen < 0 and 0 <= h < x.shape[2] and 0 <= w < W:
                    v = np.float64(x[n, c, h, w])
                    running += v
                    if v > 0.0:
                        last_positive = np.int64(h) * W + w
                    if running > threshold:
                        chosen = np.int64(h) * W + w
            if chosen < 0:
                chosen = last_positive
            out[n, c, oh, ow] = x[n, c, chosen // W, chosen % W]
        else:
            out[n, c, oh, ow] = 0
        if with_indices:
            indices[n, c, oh, ow] = chosen
        i += grid_stride()


@cuda.jit(device=True, inline=True)
def _checked_window_sums(x, n, c, oh, ow, ph, pw, KH, KW, SH, SW, DH, DW, bad):
    """``(S1, S2)`` of output ``(oh, ow)``'s window, for stochastic inference; raises
    the ``bad`` flag for a negative or NaN element or an infinite ``S2``."""
    s1, s2, _, invalid = _window_sums(x, n, c, oh * SH - ph, ow * SW - pw, KH, KW, DH, DW)
    if invalid or not (s2 < _INF):
        bad[0] = 1
    return s1, s2


@cuda.jit
def _stochastic_infer(x, out, ph, pw, KH, KW, SH, SW, DH, DW, bad):
    """``S2 / S1`` (0 when ``S1 == 0``), in float64."""
    N, C, OH, OW = out.shape
    total = np.int64(N) * C * OH * OW
    i = grid_start()
    while i < total:
        n, c, oh, ow = split_nchw(i, C, OH, OW)
        s1, s2 = _checked_window_sums(x, n, c, oh, ow, ph, pw, KH, KW, SH, SW, DH, DW, bad)
        out[n, c, oh, ow] = s2 / s1 if s1 > 0.0 else 0.0
        i += grid_stride()


@cuda.jit
def _stochastic_infer_shares(x, grad_output, share_a, share_b, ph, pw, KH, KW, SH, SW, DH,
                             DW, bad):
    """Per window: ``A = 2 g / S1`` and ``B = -g S2 / S1**2`` (0 when ``S1 == 0``), so
    that its contribution to element ``a_i`` is ``a_i * A + B``."""
    N, C, OH, OW = grad_output.shape
    total = np.int64(N) * C * OH * OW
    i = grid_start()
    while i < total:
        n, c, oh, ow = split_nchw(i, C, OH, OW)
        s1, s2 = _checked_window_sums(x, n, c, oh, ow, ph, pw, KH, KW, SH, SW, DH, DW, bad)
        g = np.float64(grad_output[n, c, oh, ow])
        share_a[n, c, oh, ow] = 2.0 * g / s1 if s1 > 0.0 else 0.0
        share_b[n, c, oh, ow] = -g * s2 / (s1 * s1) if s1 > 0.0 else 0.0
        i += grid_stride()


@cuda.jit
def _stochastic_infer_backward(x, share_a, share_b, grad_input, ph, pw, KH, KW, SH, SW, DH,
                               DW):
    """``grad = x * sum(A) + sum(B)`` over the windows covering each element, summed
    along window rows first, then over rows in tap order (the CPU's order)."""
    N, C, H, W = grad_input.shape
    OH, OW = share_a.shape[2], share_a.shape[3]
    total = np.int64(N) * C * H * W
    i = grid_start()
    while i < total:
        n, c, h, w = split_nchw(i, C, H, W)
        sum_a = 0.0
        sum_b = 0.0
        for a in range(KH):
            oh = _covering(h, ph, a, DH, SH, OH)
            if oh >= 0:
                row_a = 0.0
                row_b = 0.0
                for b in range(KW):
                    ow = _covering(w, pw, b, DW, SW, OW)
                    if ow >= 0:
                        row_a += share_a[n, c, oh, ow]
                        row_b += share_b[n, c, oh, ow]
                sum_a += row_a
                sum_b += row_b
        grad_input[n, c, h, w] = np.float64(x[n, c, h, w]) * sum_a + sum_b
        i += grid_stride()


def _raise_if_invalid(bad):
    if flag_raised(bad):
        raise _params.invalid_stochastic_input()


def stochastic_pool2d_forward(x, geometry, training, seed, with_indices):
    g = geometry
    with_indices = bool(training and with_indices)
    x = batched(x, _planes_shape(g, g.in_h, g.in_w))
    out = _output(g, x.dtype)
    indices = (cuda.device_array(out.shape, np.int64) if with_indices
               else _dummy_indices())
    bad = error_flag()
    if training:
        launch(_stochastic_train, out.size, x, out, indices, with_indices, np.uint64(seed),
               *_window_args(g), bad)
    else:
        launch(_stochastic_infer, out.size, x, out, *_window_args(g), bad)
    _raise_if_invalid(bad)
    return (out.reshape(g.output_shape),
            indices.reshape(g.output_shape) if with_indices else None)


def stochastic_pool2d_backward(grad_output, x, geometry, training, indices):
    g = geometry
    if training:
        return scatter_to_indices(grad_output, indices, geometry)
    out_shape = _planes_shape(g, g.out_h, g.out_w)
    x = batched(x, _planes_shape(g, g.in_h, g.in_w))
    grad_output = batched(grad_output, out_shape)
    share_a = cuda.device_array(out_shape, np.float64)
    share_b = cuda.device_array(out_shape, np.float64)
    bad = error_flag()
    launch(_stochastic_infer_shares, share_a.size, x, grad_output, share_a, share_b,
           *_window_args(g), bad)
    _raise_if_invalid(bad)
    grad_input = cuda.device_array(x.shape, grad_output.dtype)
    launch(_stochastic_infer_backward, grad_input.size, x, share_a, share_b, grad_input,
           *_window_args(g))
    return grad_input.reshape(g.input_shape)
