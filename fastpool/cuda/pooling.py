"""numba.cuda pooling kernels and their launchers, mirroring ``fastpool.cpu.pooling``.

Launchers take Numba device arrays already validated by ``fastpool._params`` plus the
``Window`` and return Numba device arrays (``fastpool.cuda`` adds the transfers).
Kernels index 5-D ``(N, C, D, H, W)`` arrays of any strides (1-D and 2-D arrays are
viewed with unit depth and height, unbatched ones with a unit batch: ``_volume``).

Every kernel is a grid-stride loop over int64 element numbers, one element per turn:
forward kernels over outputs, backward kernels over ``grad_input`` elements. Backward
kernels are in gather form: each input element sums the contributions of the windows
that cover it, in the order the CPU kernels add them, so nothing races, nothing uses
atomics, and results are identical from run to run. Window loops visit elements in
row-major order with the CPU's tie, NaN and zero-window rules, and stochastic pooling
draws from ``fastpool._rng`` compiled for the GPU with the CPU's counter
``(od * OH + oh, ow)``, so one seed picks the same elements on both devices.

Geometry (kernel, stride, padding, dilation) is runtime data here: one compile per
dtype serves every shape. Kernels that cast to the array's dtype are built per dtype.
Every array is read and written through a 5-D view of its own strides (``volume``), so
channels-last inputs are computed in place, results (outputs, indices, gradients) are
allocated in the call's memory format (``Window.layout``), and a channels-last call walks
its elements channel-fastest (``split_position``) so that neighbouring threads touch
neighbouring addresses in either layout.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import config, cuda

from fastpool import _params, _rng
from fastpool.cuda import _stream, pool_adaptive, pool_adaptive_stochastic, pool_unpool
from fastpool._geometry import CHANNELS_LAST
from fastpool.cuda._launch import (
    empty,
    error_flag,
    raise_if,
    grid_start,
    grid_stride,
    launch,
    split_position,
    volume,
)
from fastpool.cuda._pool_common import inference_shares, sums_scale, weighted_average

_gpu_rng = _rng.compile_with(cuda.jit(device=True, inline=True),
                             interpreted=bool(config.ENABLE_CUDASIM))
# Module globals: kernels can call a device function global, not a namespace attribute.
_keyed_plane = _gpu_rng.keyed_plane
_keyed_uniform = _gpu_rng.keyed_uniform
_INF = np.inf


def _window_args(w):
    """Geometry arguments shared by every kernel: the memory format (walk order), then
    padding, kernel, stride and dilation of the three axes ``(D, H, W)``."""
    return (_channels_last(w),) + w.pad_lo3 + w.kernel3 + w.stride3 + w.dilation3


def _channels_last(w):
    return w.layout == CHANNELS_LAST


def _volume(array, w):
    """``array`` (an input, output or gradient of the call) as the 5-D ``(N, C, D, H,
    W)`` view the kernels index, whatever its strides: no copy."""
    return volume(array, w.batched, w.rank)


def _allocate(w, shape, dtype):
    """A result of the user's ``shape`` in the call's memory format."""
    return empty(shape, dtype, _channels_last(w), 1 if w.batched else 0)


_NO_INDICES = []


def _dummy_indices():
    """The indices argument of a forward that returns none (the kernel never touches
    it): one empty array made once. An empty array allocates nothing, so it is valid in
    every context; a fresh one per call cost a ``cuMemAlloc`` (about 30 us on an H200
    virtual machine, docs/site/devices.md)."""
    if not _NO_INDICES:
        _NO_INDICES.append(cuda.device_array((0, 0, 0, 0, 0), np.int64))
    return _NO_INDICES[0]


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
def _max_forward(x, out, indices, with_indices, cl, pd, ph, pw, KD, KH, KW, SD, SH, SW, DD, DH,
                 DW):
    N, C, OD, OH, OW = out.shape
    D, H, W = x.shape[2], x.shape[3], x.shape[4]
    total = np.int64(N) * C * OD * OH * OW
    i = grid_start()
    while i < total:
        n, c, od, oh, ow = split_position(i, C, OD, OH, OW, cl)
        d0 = od * SD - pd
        h0 = oh * SH - ph
        w0 = ow * SW - pw
        best = x[n, c, 0, 0, 0]
        arg = np.int64(-1)
        for a in range(KD):
            d = d0 + a * DD
            if 0 <= d < D:
                for b in range(KH):
                    h = h0 + b * DH
                    if 0 <= h < H:
                        for e in range(KW):
                            w = w0 + e * DW
                            if 0 <= w < W:
                                v = x[n, c, d, h, w]
                                if arg < 0 or _replaces(v, best):
                                    best = v
                                    arg = (np.int64(d) * H + h) * W + w
        out[n, c, od, oh, ow] = best
        if with_indices:
            indices[n, c, od, oh, ow] = arg
        i += grid_stride()


@cuda.jit
def _check_window_indices(indices, D, H, W, cl, pd, ph, pw, KD, KH, KW, SD, SH, SW, DD, DH, DW,
                          bad):
    """Set ``bad[0]`` if an index is not a position inside its own window."""
    N, C, OD, OH, OW = indices.shape
    total = np.int64(N) * C * OD * OH * OW
    i = grid_start()
    while i < total:
        n, c, od, oh, ow = split_position(i, C, OD, OH, OW, cl)
        target = indices[n, c, od, oh, ow]
        inside = 0 <= target < np.int64(D) * H * W
        if inside:
            dd = target // (np.int64(H) * W) - (od * SD - pd)
            dh = (target // W) % H - (oh * SH - ph)
            dw = target % W - (ow * SW - pw)
            inside = (dd >= 0 and dd % DD == 0 and dd // DD < KD
                      and dh >= 0 and dh % DH == 0 and dh // DH < KH
                      and dw >= 0 and dw % DW == 0 and dw // DW < KW)
        if not inside:
            bad[0] = 1
        i += grid_stride()


def _compute_type(dtype):
    """The scalar type a kernel for arrays of ``dtype`` sums in: float32 for float16
    (whose arrays the max and average kernels read and write as they are: loads widen,
    stores round once), else the dtype itself."""
    return np.float32 if np.dtype(dtype) == np.float16 else np.dtype(dtype).type


@functools.lru_cache(maxsize=None)
def _gather_to_indices_kernel(dtype):
    zero = _compute_type(dtype)(0)

    @cuda.jit
    def gather_to_indices(grad_output, indices, grad_input, cl, pd, ph, pw, KD, KH, KW, SD, SH,
                          SW, DD, DH, DW):
        """``grad_input[d, h, w]`` = the sum of ``grad_output`` over the windows whose
        index is ``(d * H + h) * W + w``, in output order (the CPU scatter's order)."""
        N, C, D, H, W = grad_input.shape
        OD, OH, OW = grad_output.shape[2], grad_output.shape[3], grad_output.shape[4]
        total = np.int64(N) * C * D * H * W
        i = grid_start()
        while i < total:
            n, c, d, h, w = split_position(i, C, D, H, W, cl)
            target = (np.int64(d) * H + h) * W + w
            acc = zero
            for a in range(KD - 1, -1, -1):  # descending taps: ascending outputs
                od = _covering(d, pd, a, DD, SD, OD)
                if od >= 0:
                    for b in range(KH - 1, -1, -1):
                        oh = _covering(h, ph, b, DH, SH, OH)
                        if oh >= 0:
                            for e in range(KW - 1, -1, -1):
                                ow = _covering(w, pw, e, DW, SW, OW)
                                if ow >= 0 and indices[n, c, od, oh, ow] == target:
                                    acc += grad_output[n, c, od, oh, ow]
            grad_input[n, c, d, h, w] = acc
            i += grid_stride()

    return gather_to_indices


def max_pool_forward(x, window, with_indices):
    w = window
    out = _allocate(w, w.output_shape, x.dtype)
    indices = _allocate(w, w.output_shape, np.int64) if with_indices else None
    launch(_max_forward, out.size, _volume(x, w), _volume(out, w),
           _volume(indices, w) if with_indices else _dummy_indices(), bool(with_indices),
           *_window_args(w))
    return out, indices


def scatter_to_indices(grad_output, indices, window, checked=True):
    """Backward of a pooling that picked one element per window (max, stochastic
    training). ``checked=False`` skips the index check (indices this module made)."""
    w = window
    indices = _volume(indices, w)
    if checked and indices.size:
        bad = error_flag()
        launch(_check_window_indices, indices.size, indices, *w.in3, *_window_args(w),
               bad)
        raise_if(bad, ValueError(
            "indices holds value(s) that are not a position inside their own window; "
            "indices must be the flat positions (inside each (n, c) volume) returned "
            "by the forward pass"))
    grad_input = _allocate(w, w.input_shape, grad_output.dtype)
    launch(_gather_to_indices_kernel(grad_output.dtype), grad_input.size,
           _volume(grad_output, w), indices, _volume(grad_input, w), *_window_args(w))
    return grad_input


def max_pool_backward(grad_output, x, window, indices):
    checked = indices is not None
    if indices is None:
        _, indices = max_pool_forward(x, window, with_indices=True)
    return scatter_to_indices(grad_output, indices, window, checked)


# ----------------------------------------------------------------------------- average

@cuda.jit(device=True, inline=True)
def _extent(o, size, pad, K, S, count_include_pad):
    """One axis's factor of a window's divisor (docs/design.md section 2)."""
    lo = o * S - pad
    hi = min(lo + K, size + pad)
    if count_include_pad:
        return np.int64(hi - lo)
    return np.int64(min(hi, size) - max(lo, 0))


@cuda.jit(device=True, inline=True)
def _avg_divisor(od, oh, ow, D, H, W, pd, ph, pw, KD, KH, KW, SD, SH, SW,
                 count_include_pad, divisor_override):
    if divisor_override != 0:
        return np.int64(divisor_override)
    return (_extent(od, D, pd, KD, SD, count_include_pad)
            * _extent(oh, H, ph, KH, SH, count_include_pad)
            * _extent(ow, W, pw, KW, SW, count_include_pad))


@functools.lru_cache(maxsize=None)
def _avg_kernels(dtype):
    scalar = _compute_type(dtype)
    zero = scalar(0)

    @cuda.jit
    def avg_forward(x, out, cl, pd, ph, pw, KD, KH, KW, SD, SH, SW, count_include_pad,
                    divisor_override):
        """Sum in the input's dtype (float32 for float16), row-major, as the CPU and
        PyTorch do; the quotient is rounded to that type, then stored."""
        N, C, OD, OH, OW = out.shape
        D, H, W = x.shape[2], x.shape[3], x.shape[4]
        total = np.int64(N) * C * OD * OH * OW
        i = grid_start()
        while i < total:
            n, c, od, oh, ow = split_position(i, C, OD, OH, OW, cl)
            d0 = od * SD - pd
            h0 = oh * SH - ph
            w0 = ow * SW - pw
            acc = zero
            for d in range(max(d0, 0), min(d0 + KD, D)):
                for h in range(max(h0, 0), min(h0 + KH, H)):
                    for w in range(max(w0, 0), min(w0 + KW, W)):
                        acc += x[n, c, d, h, w]
            out[n, c, od, oh, ow] = scalar(acc / _avg_divisor(
                od, oh, ow, D, H, W, pd, ph, pw, KD, KH, KW, SD, SH, SW, count_include_pad,
                divisor_override))
            i += grid_stride()

    @cuda.jit
    def avg_backward(grad_output, grad_input, cl, pd, ph, pw, KD, KH, KW, SD, SH, SW,
                     count_include_pad, divisor_override):
        """Each element sums ``grad / divisor`` (rounded to the dtype) of its windows:
        along a window row first, then over rows in tap order, then over depths in tap
        order, as the CPU's separable gather does."""
        N, C, D, H, W = grad_input.shape
        OD, OH, OW = grad_output.shape[2], grad_output.shape[3], grad_output.shape[4]
        total = np.int64(N) * C * D * H * W
        i = grid_start()
        while i < total:
            n, c, d, h, w = split_position(i, C, D, H, W, cl)
            acc = zero
            for a in range(KD):
                od = _covering(d, pd, a, 1, SD, OD)
                if od >= 0:
                    plane = zero
                    for b in range(KH):
                        oh = _covering(h, ph, b, 1, SH, OH)
                        if oh >= 0:
                            row = zero
                            for e in range(KW):
                                ow = _covering(w, pw, e, 1, SW, OW)
                                if ow >= 0:
                                    row += scalar(grad_output[n, c, od, oh, ow]
                                                  / _avg_divisor(
                                                      od, oh, ow, D, H, W, pd, ph, pw, KD,
                                                      KH, KW, SD, SH, SW,
                                                      count_include_pad, divisor_override))
                            plane += row
                    acc += plane
            grad_input[n, c, d, h, w] = acc
            i += grid_stride()

    return avg_forward, avg_backward


def _avg_args(w, count_include_pad, divisor_override):
    return ((_channels_last(w),) + w.pad_lo3 + w.kernel3 + w.stride3
            + (bool(count_include_pad), int(divisor_override)))


def avg_pool_forward(x, window, count_include_pad, divisor_override):
    w = window
    out = _allocate(w, w.output_shape, x.dtype)
    forward, _ = _avg_kernels(x.dtype)
    launch(forward, out.size, _volume(x, w), _volume(out, w),
           *_avg_args(w, count_include_pad, divisor_override))
    return out


def avg_pool_backward(grad_output, window, count_include_pad, divisor_override):
    w = window
    grad_input = _allocate(w, w.input_shape, grad_output.dtype)
    _, backward = _avg_kernels(grad_output.dtype)
    launch(backward, grad_input.size, _volume(grad_output, w), _volume(grad_input, w),
           *_avg_args(w, count_include_pad, divisor_override))
    return grad_input


# ----------------------------------------------------------------------------- stochastic

@cuda.jit(device=True, inline=True)
def _window_sums(x, n, c, d0, h0, w0, KD, KH, KW, DD, DH, DW, scale):
    """``(S1, S2, first in-input flat position, invalid)`` of one window's elements
    times ``scale``, in float64 and row-major order; invalid: a negative, NaN or
    infinite element or sum."""
    D, H, W = x.shape[2], x.shape[3], x.shape[4]
    s1 = 0.0
    s2 = 0.0
    first = np.int64(-1)
    invalid = False
    for a in range(KD):
        d = d0 + a * DD
        if 0 <= d < D:
            for b in range(KH):
                h = h0 + b * DH
                if 0 <= h < H:
                    for e in range(KW):
                        w = w0 + e * DW
                        if 0 <= w < W:
                            v = np.float64(x[n, c, d, h, w])
                            if not (0.0 <= v < _INF):  # before scaling (CPU's note)
                                invalid = True
                            v *= scale
                            if first < 0:
                                first = (np.int64(d) * H + h) * W + w
                            s1 += v
                            s2 += v * v
    return s1, s2, first, invalid or not (s1 < _INF)


@cuda.jit
def _stochastic_train(x, out, indices, with_indices, key, cl, pd, ph, pw, KD, KH, KW, SD, SH,
                      SW, DD, DH, DW, bad):
    """Pick the first element (row-major) whose running float64 sum exceeds
    ``u * S1``; when rounding lets none exceed it, the last positive element (the CPU's
    rule); a zero-sum window outputs 0 and records its first in-input element."""
    N, C, OD, OH, OW = out.shape
    D, H, W = x.shape[2], x.shape[3], x.shape[4]
    total = np.int64(N) * C * OD * OH * OW
    i = grid_start()
    while i < total:
        n, c, od, oh, ow = split_position(i, C, OD, OH, OW, cl)
        d0 = od * SD - pd
        h0 = oh * SH - ph
        w0 = ow * SW - pw
        s1, _, first, invalid = _window_sums(x, n, c, d0, h0, w0, KD, KH, KW, DD, DH, DW,
                                             1.0)
        if invalid:
            bad[0] = 1
        chosen = first
        if s1 > 0.0:
            threshold = _keyed_uniform(_keyed_plane(key, n, c), key, od, oh, ow) * s1
            running = 0.0
            last_positive = first
            chosen = np.int64(-1)
            for e in range(KD * KH * KW):
                d = d0 + (e // (KH * KW)) * DD
                h = h0 + ((e // KW) % KH) * DH
                w = w0 + (e % KW) * DW
                if chosen < 0 and 0 <= d < D and 0 <= h < H and 0 <= w < W:
                    v = np.float64(x[n, c, d, h, w])
                    running += v
                    if v > 0.0:
                        last_positive = (np.int64(d) * H + h) * W + w
                    if running > threshold:
                        chosen = (np.int64(d) * H + h) * W + w
            if chosen < 0:
                chosen = last_positive
            out[n, c, od, oh, ow] = x[n, c, chosen // (np.int64(H) * W),
                                      (chosen // W) % H, chosen % W]
        else:
            out[n, c, od, oh, ow] = 0
        if with_indices:
            indices[n, c, od, oh, ow] = chosen
        i += grid_stride()


@cuda.jit(device=True, inline=True)
def _checked_window_sums(x, n, c, od, oh, ow, pd, ph, pw, KD, KH, KW, SD, SH, SW, DD, DH,
                         DW, bad):
    """``(S1, S2, scale)`` of an output's window for stochastic inference, summed again
    with scaled elements where the plain sums do not serve (``sums_scale``); raises the
    ``bad`` flag for a negative, NaN or infinite element."""
    d0, h0, w0 = od * SD - pd, oh * SH - ph, ow * SW - pw
    s1, s2, _, invalid = _window_sums(x, n, c, d0, h0, w0, KD, KH, KW, DD, DH, DW, 1.0)
    scale = sums_scale(s1, s2)
    if scale != 1.0:
        s1, s2, _, invalid = _window_sums(x, n, c, d0, h0, w0, KD, KH, KW, DD, DH, DW,
                                          scale)
    if invalid or not (s2 < _INF):
        bad[0] = 1
    return s1, s2, scale


@functools.lru_cache(maxsize=None)
def _stochastic_infer_kernel(dtype):
    scalar = _compute_type(dtype)

    @cuda.jit
    def stochastic_infer(x, out, cl, pd, ph, pw, KD, KH, KW, SD, SH, SW, DD, DH, DW, bad):
        """``S2 / S1`` (0 when ``S1 == 0``), in float64, rounded to the compute type
        (float32 for float16, as the CPU stores it) before the store."""
        N, C, OD, OH, OW = out.shape
        total = np.int64(N) * C * OD * OH * OW
        i = grid_start()
        while i < total:
            n, c, od, oh, ow = split_position(i, C, OD, OH, OW, cl)
            s1, s2, scale = _checked_window_sums(x, n, c, od, oh, ow, pd, ph, pw, KD, KH,
                                                 KW, SD, SH, SW, DD, DH, DW, bad)
            out[n, c, od, oh, ow] = scalar(weighted_average(s1, s2, scale))
            i += grid_stride()

    return stochastic_infer


@cuda.jit
def _stochastic_infer_shares(x, grad_output, share_a, share_b, cl, pd, ph, pw, KD, KH, KW, SD,
                             SH, SW, DD, DH, DW, bad):
    """Per window: ``A = 2 g / S1`` and ``B = -g S2 / S1**2`` (0 when ``S1 == 0``), so
    that its contribution to element ``a_i`` is ``a_i * A + B``."""
    N, C, OD, OH, OW = grad_output.shape
    total = np.int64(N) * C * OD * OH * OW
    i = grid_start()
    while i < total:
        n, c, od, oh, ow = split_position(i, C, OD, OH, OW, cl)
        s1, s2, scale = _checked_window_sums(x, n, c, od, oh, ow, pd, ph, pw, KD, KH, KW,
                                             SD, SH, SW, DD, DH, DW, bad)
        a, b = inference_shares(np.float64(grad_output[n, c, od, oh, ow]), s1, s2, scale)
        share_a[n, c, od, oh, ow] = a
        share_b[n, c, od, oh, ow] = b
        i += grid_stride()


@cuda.jit(device=True, inline=True)
def _shares_covering(share_a, share_b, n, c, d, h, w, pd, ph, pw, KD, KH, KW, SD, SH, SW,
                     DD, DH, DW):
    """``(sum(A), sum(B))`` over the windows covering ``(d, h, w)``, summed along window
    rows first, then over rows in tap order, then over depths in tap order (the CPU's
    order)."""
    OD, OH, OW = share_a.shape[2], share_a.shape[3], share_a.shape[4]
    sum_a = 0.0
    sum_b = 0.0
    for a in range(KD):
        od = _covering(d, pd, a, DD, SD, OD)
        if od >= 0:
            plane_a = 0.0
            plane_b = 0.0
            for b in range(KH):
                oh = _covering(h, ph, b, DH, SH, OH)
                if oh >= 0:
                    row_a = 0.0
                    row_b = 0.0
                    for e in range(KW):
                        ow = _covering(w, pw, e, DW, SW, OW)
                        if ow >= 0:
                            row_a += share_a[n, c, od, oh, ow]
                            row_b += share_b[n, c, od, oh, ow]
                    plane_a += row_a
                    plane_b += row_b
            sum_a += plane_a
            sum_b += plane_b
    return sum_a, sum_b


@functools.lru_cache(maxsize=None)
def _stochastic_infer_backward_kernel(dtype):
    scalar = _compute_type(dtype)

    @cuda.jit
    def stochastic_infer_backward(x, share_a, share_b, grad_input, cl, pd, ph, pw, KD, KH,
                                  KW, SD, SH, SW, DD, DH, DW):
        """``grad = x * sum(A) + sum(B)`` over the windows covering each element
        (``_shares_covering``), rounded to the compute type before the store."""
        N, C, D, H, W = grad_input.shape
        total = np.int64(N) * C * D * H * W
        i = grid_start()
        while i < total:
            n, c, d, h, w = split_position(i, C, D, H, W, cl)
            sum_a, sum_b = _shares_covering(share_a, share_b, n, c, d, h, w, pd, ph, pw,
                                            KD, KH, KW, SD, SH, SW, DD, DH, DW)
            grad_input[n, c, d, h, w] = scalar(np.float64(x[n, c, d, h, w]) * sum_a
                                               + sum_b)
            i += grid_stride()

    return stochastic_infer_backward


def _raise_if_invalid(bad):
    raise_if(bad, _params.invalid_stochastic_input())


def stochastic_pool_forward(x, window, training, seed, with_indices):
    w = window
    with_indices = bool(training and with_indices)
    out = _allocate(w, w.output_shape, x.dtype)
    indices = _allocate(w, w.output_shape, np.int64) if with_indices else None
    bad = error_flag()
    if training:
        launch(_stochastic_train, out.size, _volume(x, w), _volume(out, w),
               _volume(indices, w) if with_indices else _dummy_indices(), with_indices,
               _rng.kernel_key(seed, w.out3[1]), *_window_args(w), bad)
    else:
        launch(_stochastic_infer_kernel(x.dtype), out.size, _volume(x, w), _volume(out, w),
               *_window_args(w), bad)
    _raise_if_invalid(bad)
    return out, indices


def stochastic_pool_backward(grad_output, x, window, training, indices):
    w = window
    if training:
        return scatter_to_indices(grad_output, indices, window)
    x = _volume(x, w)
    share_a = _volume(_allocate(w, w.output_shape, np.float64), w)
    share_b = _volume(_allocate(w, w.output_shape, np.float64), w)
    bad = error_flag()
    launch(_stochastic_infer_shares, share_a.size, x, _volume(grad_output, w), share_a,
           share_b, *_window_args(w), bad)
    _raise_if_invalid(bad)
    grad_input = _allocate(w, w.input_shape, grad_output.dtype)
    launch(_stochastic_infer_backward_kernel(grad_output.dtype), grad_input.size, x,
           share_a, share_b, _volume(grad_input, w), *_window_args(w))
    return grad_input


# ----------------------------------------------------------------------------- adaptive

def _tables(arrays):
    """Per-axis window tables of an ``AdaptiveWindow``, on the device."""
    return tuple(_stream.upload(a) for a in arrays)


def _bounds(w):
    return _tables((w.starts3[0], w.ends3[0], w.starts3[1], w.ends3[1], w.starts3[2],
                    w.ends3[2]))


def _cover(w):
    return _tables((w.first3[0], w.last3[0], w.first3[1], w.last3[1], w.first3[2],
                    w.last3[2]))


def adaptive_avg_pool_forward(x, window):
    w = window
    out = _allocate(w, w.output_shape, x.dtype)
    if w.is_global:
        launch(pool_adaptive.global_avg_kernel(x.dtype), out.size, _volume(x, w),
               _volume(out, w), _channels_last(w))
        return out
    forward, _ = pool_adaptive.avg_kernels(x.dtype)
    launch(forward, out.size, _volume(x, w), _volume(out, w), *_bounds(w),
           _channels_last(w))
    return out


def adaptive_avg_pool_backward(grad_output, window):
    w = window
    grad_input = _allocate(w, w.input_shape, grad_output.dtype)
    _, backward = pool_adaptive.avg_kernels(grad_output.dtype)
    launch(backward, grad_input.size, _volume(grad_output, w), _volume(grad_input, w),
           *_bounds(w), *_cover(w), _channels_last(w))
    return grad_input


def adaptive_max_pool_forward(x, window, with_indices):
    w = window
    out = _allocate(w, w.output_shape, x.dtype)
    indices = _allocate(w, w.output_shape, np.int64) if with_indices else None
    launch(pool_adaptive.max_forward, out.size, _volume(x, w), _volume(out, w),
           _volume(indices, w) if with_indices else _dummy_indices(), bool(with_indices),
           *_bounds(w), _channels_last(w))
    return out, indices


def adaptive_max_pool_backward(grad_output, x, window, indices):
    w = window
    checked = indices is not None
    if indices is None:
        _, indices = adaptive_max_pool_forward(x, window, with_indices=True)
    indices = _volume(indices, w)
    if checked and indices.size:
        bad = error_flag()
        launch(pool_adaptive.check_indices, indices.size, indices, *w.in3[1:],
               *_bounds(w), _channels_last(w), bad)
        raise_if(bad, ValueError(
            "indices holds value(s) that are not a position inside their own "
            "adaptive window; indices must be the flat positions (inside each (n, c) "
            "volume) returned by the forward pass"))
    grad_input = _allocate(w, w.input_shape, grad_output.dtype)
    launch(pool_adaptive.max_backward_kernel(grad_output.dtype), grad_input.size,
           _volume(grad_output, w), indices, _volume(grad_input, w), *_cover(w),
           _channels_last(w))
    return grad_input


def adaptive_stochastic_pool_forward(x, window, training, seed, with_indices):
    w = window
    with_indices = bool(training and with_indices)
    out = _allocate(w, w.output_shape, x.dtype)
    indices = _allocate(w, w.output_shape, np.int64) if with_indices else None
    bad = error_flag()
    if training:
        launch(pool_adaptive_stochastic.train_forward, out.size, _volume(x, w),
               _volume(out, w), _volume(indices, w) if with_indices else _dummy_indices(),
               with_indices, _rng.kernel_key(seed, w.out3[1]), *_bounds(w),
               _channels_last(w), bad)
    else:
        launch(pool_adaptive_stochastic.infer_forward, out.size, _volume(x, w),
               _volume(out, w), *_bounds(w), _channels_last(w), bad)
    _raise_if_invalid(bad)
    return out, indices


def adaptive_stochastic_pool_backward(grad_output, x, window, training, indices):
    w = window
    if training:
        return adaptive_max_pool_backward(grad_output, x, window, indices)
    shares = [_volume(_allocate(w, w.output_shape, np.float64), w) for _ in range(2)]
    bad = error_flag()
    launch(pool_adaptive_stochastic.infer_shares, shares[0].size, _volume(x, w),
           _volume(grad_output, w), *shares, *_bounds(w), _channels_last(w), bad)
    _raise_if_invalid(bad)
    grad_input = _allocate(w, w.input_shape, grad_output.dtype)
    launch(pool_adaptive_stochastic.infer_backward, grad_input.size, _volume(x, w),
           *shares, _volume(grad_input, w), *_cover(w), _channels_last(w))
    return grad_input


# ----------------------------------------------------------------------------- unpooling

def _raise_bad_unpool_indices(bad, v):
    raise_if(bad, ValueError(
        f"indices holds value(s) outside [0, {int(np.prod(v.out_size))}), the flat "
        f"positions of an unpooled volume of size {v.out_size}"))


def max_unpool_forward(x, indices, volume):
    v = volume
    y = _allocate(v, v.output_shape, x.dtype)
    winner = _stream.empty((v.batch, v.channels, int(np.prod(v.out_size))), np.int64)
    launch(pool_unpool.reset, winner.size, winner)
    bad = error_flag()
    launch(pool_unpool.claim, indices.size, _volume(indices, v), winner,
           _channels_last(v), bad)
    _raise_bad_unpool_indices(bad, v)
    launch(pool_unpool.fill_kernel(x.dtype), y.size, _volume(x, v), winner, _volume(y, v),
           _channels_last(v))
    return y


def max_unpool_backward(grad_output, indices, volume):
    v = volume
    grad_input = _allocate(v, v.input_shape, grad_output.dtype)
    bad = error_flag()
    launch(pool_unpool.gather_kernel(grad_output.dtype), grad_input.size,
           _volume(grad_output, v), _volume(indices, v), _volume(grad_input, v),
           _channels_last(v), bad)
    _raise_bad_unpool_indices(bad, v)
    return grad_input
