"""The depth-slab steps of ``fastpool._conv3d`` on the GPU (Numba device arrays);
mirrors ``fastpool.cpu.slabs``. Each step is one grid-stride kernel over whole
slices, so nothing races and results are deterministic."""

from __future__ import annotations

import contextlib

import numpy as np
from numba import cuda

from fastpool.cuda import _stream
from fastpool.cuda._launch import contiguous, grid_start, grid_stride, launch, split_nchw
from fastpool.cuda.conv import _bias_grad, conv2d_backward, conv2d_forward  # noqa: F401


def planned(window):
    """Nothing: the GPU's algorithm choice does not depend on the batch (the CPU's
    ``slabs.planned`` pins it)."""
    return contextlib.nullcontext()


def empty(shape, dtype):
    return _stream.empty(shape, dtype)


def volumes(a, w, shape):
    """``a`` as the batched ``shape``, C-contiguous (the GPU's depth steps index
    channels-first volumes)."""
    return contiguous(a).reshape(shape)


def empty_as(x, shape, dtype):
    """``empty``: the GPU's volumes are channels-first."""
    return empty(shape, dtype)


def filled_as(x, shape, dtype, bias):
    """``filled``: the GPU's volumes are channels-first."""
    return filled(shape, dtype, bias)


def fused_forward(x, weight, bias, w, y, plane):
    """False: the GPU runs the stacked forward as stacked 2-D images (the CPU has a
    depth-aware Winograd)."""
    return False


def input_grad_weight(weight, groups):
    """None: the GPU computes the input gradient as the 2-D backward of the stacked
    images (the CPU as a forward convolution of ``grad_output``)."""
    return None


def fused_weight_grad(x, grad_output, w, plane):
    """None: the GPU computes the weight gradient of the stacked 2-D images (the CPU
    has a depth-aware Winograd weight gradient)."""
    return None


@cuda.jit
def _fill(out, bias, has_bias):
    N, C = out.shape[0], out.shape[1]
    P = out.shape[2]
    total = np.int64(N) * C * P
    i = grid_start()
    while i < total:
        p = i % P
        c = (i // P) % C
        n = i // (np.int64(P) * C)
        out[n, c, p] = bias[c] if has_bias else 0
        i += grid_stride()


@cuda.jit
def _gather(a, out, first, step):
    """``out[n * count + k, c, h, w] = a[n, c, first + k * step, h, w]``."""
    M, C, H, W = out.shape
    count = M // a.shape[0]
    total = np.int64(M) * C * H * W
    i = grid_start()
    while i < total:
        m, c, h, w = split_nchw(i, C, H, W)
        out[m, c, h, w] = a[m // count, c, first + (m % count) * step, h, w]
        i += grid_stride()


@cuda.jit
def _add_slabs(target, part, first, step):
    """``target[n, c, first + k * step, h, w] += part[n * count + k, c, h, w]``."""
    M, C, H, W = part.shape
    count = M // target.shape[0]
    total = np.int64(M) * C * H * W
    i = grid_start()
    while i < total:
        m, c, h, w = split_nchw(i, C, H, W)
        target[m // count, c, first + (m % count) * step, h, w] += part[m, c, h, w]
        i += grid_stride()


@cuda.jit
def _stack(x, out, first, out_depth, step, pad, dilation, taps, groups):
    """``fastpool.cpu.slabs.stack``: ``out[i, (g, a, c), p] = x[n, g*C_g + c, od*step
    - pad + a*dilation, p]`` (zero outside), ``n, od = divmod(first + i, out_depth)``."""
    count, stacked, pixels = out.shape
    depth = x.shape[2]
    per_group = x.shape[1] // groups
    total = np.int64(count) * stacked * pixels
    i = grid_start()
    while i < total:
        p = i % pixels
        s = (i // pixels) % stacked
        m = i // (np.int64(pixels) * stacked)
        n, od = (first + m) // out_depth, (first + m) % out_depth
        g, r = s // (taps * per_group), s % (taps * per_group)
        a, c = r // per_group, r % per_group
        d = od * step - pad + a * dilation
        out[m, s, p] = x[n, g * per_group + c, d, p] if 0 <= d < depth else 0
        i += grid_stride()


@cuda.jit
def _place(volume, part, first, into_volume):
    """``volume[n, o, od, p] = part[i, o, p]`` (``into_volume``) or the other way,
    ``n, od = divmod(first + i, OD)``."""
    count, channels, pixels = part.shape
    out_depth = volume.shape[2]
    total = np.int64(count) * channels * pixels
    i = grid_start()
    while i < total:
        p = i % pixels
        o = (i // pixels) % channels
        m = i // (np.int64(pixels) * channels)
        n, od = (first + m) // out_depth, (first + m) % out_depth
        if into_volume:
            volume[n, o, od, p] = part[m, o, p]
        else:
            part[m, o, p] = volume[n, o, od, p]
        i += grid_stride()


@cuda.jit
def _stack_weight(weight, out):
    """``out[o, a * C_g + c, q] = weight[o, c, a, q]``."""
    O, stacked, Q = out.shape
    Cg = weight.shape[1]
    total = np.int64(O) * stacked * Q
    i = grid_start()
    while i < total:
        q = i % Q
        s = (i // Q) % stacked
        o = i // (np.int64(Q) * stacked)
        out[o, s, q] = weight[o, s % Cg, s // Cg, q]
        i += grid_stride()


@cuda.jit
def _unstack_add(grad_input, part, first, out_depth, step, pad, dilation, taps, groups):
    """``grad_input[n, c, d, p] +=`` every ``part[i, (g, a, c_g), p]`` of this block
    whose tap reads depth ``d``, output depths in order (as the CPU adds them)."""
    N, C, depth, pixels = grad_input.shape
    count = part.shape[0]
    per_group = C // groups
    total = np.int64(N) * C * depth * pixels
    i = grid_start()
    while i < total:
        p = i % pixels
        d = (i // pixels) % depth
        c = (i // (np.int64(pixels) * depth)) % C
        n = i // (np.int64(pixels) * depth * C)
        g, cg = c // per_group, c % per_group
        acc = grad_input[n, c, d, p]
        for b in range(taps):
            a = taps - 1 - b  # output depths ascending
            shifted = d + pad - a * dilation
            if shifted >= 0 and shifted % step == 0:
                m = n * out_depth + shifted // step
                if shifted // step < out_depth and first <= m < first + count:
                    acc += part[m - first, (g * taps + a) * per_group + cg, p]
        grad_input[n, c, d, p] = acc
        i += grid_stride()


@cuda.jit
def _add_flat(target, part):
    i = grid_start()
    while i < target.size:
        target[i] += part[i]
        i += grid_stride()


@cuda.jit
def _put_stacked_weight(grad_weight, part):
    """``grad_weight[o, c, a, q] = part[o, a * C_g + c, q]``."""
    O, Cg, KD, Q = grad_weight.shape
    total = np.int64(O) * Cg * KD * Q
    i = grid_start()
    while i < total:
        q = i % Q
        a = (i // Q) % KD
        c = (i // (np.int64(Q) * KD)) % Cg
        o = i // (np.int64(Q) * KD * Cg)
        grad_weight[o, c, a, q] = part[o, a * Cg + c, q]
        i += grid_stride()


@cuda.jit
def _put_tap(grad_weight, a, part):
    O, C, H, W = part.shape
    total = np.int64(O) * C * H * W
    i = grid_start()
    while i < total:
        o, c, h, w = split_nchw(i, C, H, W)
        grad_weight[o, c, a, h, w] = part[o, c, h, w]
        i += grid_stride()


@cuda.jit
def _add_bias(out, bias):
    N, C, P = out.shape
    total = np.int64(N) * C * P
    i = grid_start()
    while i < total:
        p = i % P
        c = (i // P) % C
        n = i // (np.int64(P) * C)
        out[n, c, p] += bias[c]
        i += grid_stride()


def add_bias(y, bias):
    """``y[:, c] += bias[c]`` in place (``y`` batched, C-contiguous)."""
    launch(_add_bias, y.size, y.reshape(y.shape[0], y.shape[1], -1), bias)


def filled(shape, dtype, bias):
    out = _stream.empty(shape, dtype)
    if out.size == 0:  # nothing to fill (and a device array of size 0 cannot reshape)
        return out
    flat = out.reshape(shape[0], shape[1], -1)
    has_bias = bias is not None
    launch(_fill, out.size, flat, bias if has_bias else _stream.empty(1, dtype),
           has_bias)
    return out


def gather(a, first, step, count):
    N, C, _, H, W = a.shape
    out = _stream.empty((N * count, C, H, W), a.dtype)
    launch(_gather, out.size, a, out, first, step)
    return out


def accumulate(y, part, lo):
    launch(_add_slabs, part.size, y, part, lo, 1)


def scatter_add(g, part, first, step):
    launch(_add_slabs, part.size, g, part, first, step)


def stack(x, out, first, w):
    N, C, D = x.shape[:3]
    count, stacked = out.shape[:2]
    flat = out.reshape(count, stacked, -1)
    launch(_stack, flat.size, x.reshape(N, C, D, -1), flat, first, w.out_size[0],
           w.stride[0], w.pad_lo[0], w.dilation[0], w.kernel[0], w.groups)


def place(y, part, first):
    N, O, OD = y.shape[:3]
    flat = part.reshape(part.shape[0], O, -1)
    launch(_place, flat.size, y.reshape(N, O, OD, -1), flat, first, True)


def unplace(grad_output, out, first):
    N, O, OD = grad_output.shape[:3]
    flat = out.reshape(out.shape[0], O, -1)
    launch(_place, flat.size, grad_output.reshape(N, O, OD, -1), flat, first, False)


def unstack_add(grad_input, part, first, w):
    N, C, D = grad_input.shape[:3]
    flat = grad_input.reshape(N, C, D, -1)
    launch(_unstack_add, flat.size, flat, part.reshape(part.shape[0], part.shape[1], -1),
           first, w.out_size[0], w.stride[0], w.pad_lo[0], w.dilation[0], w.kernel[0],
           w.groups)


def add_into(target, part):
    launch(_add_flat, target.size, target.reshape(-1), part.reshape(-1))


def put_stacked_weight(grad_weight, part):
    O, Cg, KD = grad_weight.shape[:3]
    launch(_put_stacked_weight, grad_weight.size, grad_weight.reshape(O, Cg, KD, -1),
           part.reshape(O, KD * Cg, -1))


def stacked_weight(weight):
    O, Cg, KD = weight.shape[:3]
    out = _stream.empty((O, KD * Cg) + tuple(weight.shape[3:]), weight.dtype)
    flat = out.reshape(O, KD * Cg, -1)
    launch(_stack_weight, flat.size, contiguous(weight).reshape(O, Cg, KD, -1), flat)
    return out


def weight_tap(weight, a):
    return contiguous(weight[:, :, a])


def put_weight_tap(grad_weight, a, part):
    launch(_put_tap, part.size, grad_weight, a, part)


def shape_only(x, window):
    """A device array of the 2-D batch's input shape (``window``, rank 2), never
    read."""
    return _stream.empty((window.batch, window.channels) + window.in_size, x.dtype)


def bias_grad(grad_output, w):
    N, O = grad_output.shape[0], grad_output.shape[1]
    OD, OH, OW = grad_output.shape[2], grad_output.shape[3], grad_output.shape[4]
    return _bias_grad(contiguous(grad_output).reshape(N, O, OD * OH, OW))
