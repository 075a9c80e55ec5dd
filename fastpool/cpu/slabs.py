"""The depth-slab steps of ``fastpool._conv3d`` on the CPU (NumPy on host arrays);
``fastpool.cuda.slabs`` mirrors the names."""

from __future__ import annotations

import numba
import numpy as np

from fastpool._geometry import CHANNELS_LAST
from fastpool.cpu._arrays import contiguous
from fastpool.cpu._flip import flipped_transposed
from fastpool.cpu.conv import conv2d_backward, conv2d_forward  # noqa: F401 (the 2-D steps)
from fastpool.cpu.conv._planner import _JIT, planned_unless_pinned
from fastpool.cpu.conv._winograd import forward_depth
from fastpool.cpu.conv._winograd_grad import weight_grad_depth


def planned(window):
    """Run every 2-D convolution of a 3-D one with the algorithms the rank-2 ``window``
    (all the output depths as one batch) chooses: sizes decide the algorithm, a block's
    or a tap's batch depends on how many output depths it holds or reaches, and a Dask
    chunk's are fewer (``planned_unless_pinned``: a chunk keeps the whole call's)."""
    return planned_unless_pinned(window)


def empty(shape, dtype):
    return np.empty(shape, dtype)


def filled(shape, dtype, bias):
    """A new array of ``shape``: ``bias`` along axis 1 (channels), or zeros."""
    out = np.zeros(shape, dtype)
    if bias is not None:
        out += np.asarray(bias, dtype).reshape((1, -1) + (1,) * (len(shape) - 2))
    return out


def gather(a, first, step, count):
    """``(N * count, C, H, W)``: image ``n * count + k`` is ``a[n, :, first + k*step]``."""
    N, C, _, H, W = a.shape
    slab = a[:, :, first:first + (count - 1) * step + 1:step]
    return np.ascontiguousarray(slab.transpose(0, 2, 1, 3, 4)).reshape(N * count, C, H, W)


@numba.njit(**_JIT)
def _stack(x, out, first, out_depth, step, pad, dilation, taps, groups):
    count, stacked, pixels = out.shape
    depth = x.shape[2]
    per_group = x.shape[1] // groups
    for task in numba.prange(count * stacked):
        i, s = task // stacked, task % stacked
        n, od = (first + i) // out_depth, (first + i) % out_depth
        g, r = s // (taps * per_group), s % (taps * per_group)
        a, c = r // per_group, r % per_group
        d = od * step - pad + a * dilation
        if 0 <= d < depth:
            for p in range(pixels):
                out[i, s, p] = x[n, g * per_group + c, d, p]
        else:
            for p in range(pixels):
                out[i, s, p] = 0


def stack(x, out, first, w):
    """``out[i]`` (``(KD * C, H, W)``) for output depth ``m = first + i`` of all
    ``N * OD``: image ``m // OD``'s input depths ``od * sD - pD + a * dD`` for ``a <
    KD``, output depth ``od = m % OD``, as channels ``(g, a, c)`` (group, depth tap,
    channel of the group), zeros outside the input."""
    N, C, D = x.shape[:3]
    count, stacked = out.shape[:2]
    _stack(x.reshape(N, C, D, -1), out.reshape(count, stacked, -1), first,
           w.out_size[0], w.stride[0], w.pad_lo[0], w.dilation[0], w.kernel[0], w.groups)


@numba.njit(**_JIT)
def _place(volume, part, first, into_volume):
    count, channels, pixels = part.shape
    out_depth = volume.shape[2]
    for task in numba.prange(count * channels):
        i, o = task // channels, task % channels
        n, od = (first + i) // out_depth, (first + i) % out_depth
        if into_volume:
            for p in range(pixels):
                volume[n, o, od, p] = part[i, o, p]
        else:
            for p in range(pixels):
                part[i, o, p] = volume[n, o, od, p]


def place(y, part, first):
    """``y[m // OD, :, m % OD] = part[m - first]`` for ``m`` from ``first``."""
    N, O, OD = y.shape[:3]
    _place(y.reshape(N, O, OD, -1), part.reshape(part.shape[0], O, -1), first, True)


def unplace(grad_output, out, first):
    """``out[m - first] = grad_output[m // OD, :, m % OD]`` (``place`` undone)."""
    N, O, OD = grad_output.shape[:3]
    _place(grad_output.reshape(N, O, OD, -1), out.reshape(out.shape[0], O, -1), first,
           False)


@numba.njit(**_JIT)
def _unstack_add(grad_input, part, first, out_depth, step, pad, dilation, taps, groups):
    N, C, depth, pixels = grad_input.shape
    count = part.shape[0]
    per_group = C // groups
    for task in numba.prange(N * C):
        n, c = task // C, task % C
        g, cg = c // per_group, c % per_group
        # this image's output depths in the block, in order, then the taps in order:
        # every input depth gets its terms in output-depth order, whatever the blocks
        for m in range(max(first, n * out_depth), min(first + count, (n + 1) * out_depth)):
            od = m - n * out_depth
            for a in range(taps):
                d = od * step - pad + a * dilation
                if 0 <= d < depth:
                    s = (g * taps + a) * per_group + cg
                    for p in range(pixels):
                        grad_input[n, c, d, p] += part[m - first, s, p]


def unstack_add(grad_input, part, first, w):
    """``stack`` undone, adding: each stacked channel ``(g, a, c)`` of ``part[i]``
    added into ``grad_input`` at its input depth (none where outside)."""
    N, C, D = grad_input.shape[:3]
    count, stacked = part.shape[:2]
    _unstack_add(grad_input.reshape(N, C, D, -1), part.reshape(count, stacked, -1),
                 first, w.out_size[0], w.stride[0], w.pad_lo[0], w.dilation[0],
                 w.kernel[0], w.groups)


def add_into(target, part):
    target += part


def put_stacked_weight(grad_weight, part):
    """``grad_weight[o, c, a] = part[o, a * C_g + c]`` (``stacked_weight`` undone)."""
    O, Cg, KD = grad_weight.shape[:3]
    grad_weight[...] = part.reshape((O, KD, Cg) + part.shape[2:]).transpose(0, 2, 1, 3, 4)


def empty_channels_last(shape, dtype):
    """A new ``(N, D, H, W, C)`` buffer as its ``(N, C, D, H, W)`` view."""
    return np.empty(shape[:1] + shape[2:] + shape[1:2], dtype).transpose(0, 4, 1, 2, 3)


def fused_forward(x, weight, bias, w, y, plane):
    """The stacked forward in one pass where the CPU has a kernel for it (3x3 planes
    on Winograd: ``forward_depth``, bitwise the 2-D Winograd of the stacked images):
    True; else False."""
    return forward_depth(x, weight, bias, w, y, plane)


def fused_weight_grad(x, grad_output, w, plane):
    """The weight gradient of the stacked images without stacking them, where the CPU
    has a kernel for it (3x3 planes on Winograd: ``weight_grad_depth``, the same
    transform-domain sums as the 2-D Winograd weight gradient of the stacked images,
    chunked over the call's tile rows): the ``weight``-shaped gradient; else None."""
    return weight_grad_depth(x, grad_output, w, plane)


def input_grad_weight(weight, groups):
    """The weight of the input gradient as a forward convolution of ``grad_output``
    (``_conv3d._input_grad_window``): ``(C, O_g, KD, KH, KW)``, each group's output and
    input channels swapped and the taps flipped on every axis. The CPU computes the
    input gradient so (the 3-D Winograd reads ``grad_output`` in place, either
    layout, and nothing is added back from stacked images)."""
    return flipped_transposed(weight, groups)


def stacked_weight(weight):
    """``(C_out, KD * C_g, KH, KW)``: ``weight[o, c, a]`` as channel ``a * C_g + c``
    (``stack``'s order within a group)."""
    O, Cg, KD = weight.shape[:3]
    return np.ascontiguousarray(weight.transpose(0, 2, 1, 3, 4)).reshape(
        (O, KD * Cg) + weight.shape[3:])


def accumulate(y, part, lo):
    """``y[n, :, lo + k] += part[n * count + k]``."""
    N = y.shape[0]
    count = part.shape[0] // N
    y[:, :, lo:lo + count] += part.reshape((N, count) + part.shape[1:]).transpose(
        0, 2, 1, 3, 4)


def scatter_add(g, part, first, step):
    """``g[n, :, first + k*step] += part[n * count + k]``."""
    N = g.shape[0]
    count = part.shape[0] // N
    g[:, :, first:first + (count - 1) * step + 1:step] += part.reshape(
        (N, count) + part.shape[1:]).transpose(0, 2, 1, 3, 4)


def weight_tap(weight, a):
    """The 2-D weight ``weight[:, :, a]``, contiguous."""
    return np.ascontiguousarray(weight[:, :, a])


def put_weight_tap(grad_weight, a, part):
    grad_weight[:, :, a] = part


def shape_only(x, window):
    """An array of the 2-D batch's input shape (``window``, rank 2) that is never read
    (the input gradient needs the shape only)."""
    return np.broadcast_to(np.zeros((), x.dtype),
                           (window.batch, window.channels) + window.in_size)


@numba.njit(**_JIT)
def _bias_grad(g, out):
    N, O, P = g.shape
    for o in numba.prange(O):
        total = 0.0
        for n in range(N):
            for p in range(P):
                total += g[n, o, p]
        out[o] = total


def bias_grad(grad_output, w):
    """``grad_output`` summed over N and the spatial axes: each channel one float64 sum
    over images, then pixels, in order, so both memory formats give the same bits (a
    NumPy sum's order follows the strides)."""
    N, O = grad_output.shape[:2]
    out = np.empty(O, grad_output.dtype)
    _bias_grad(grad_output.reshape(N, O, int(np.prod(grad_output.shape[2:]))), out)
    return out


def volumes(a, w, shape):
    """``a`` as the batched ``shape`` (``(N, C, D, H, W)``): a channels-last call's
    exact ``(N, D, H, W, C)`` buffer as a view (the depth steps read and write it
    through its strides, with the channels-first bits), anything else copied to
    channels-first."""
    if w.layout == CHANNELS_LAST:
        view = a if a.ndim == 5 else a[None]
        if (view.shape == shape and view.transpose(0, 2, 3, 4, 1).flags.c_contiguous
                and view.flags.writeable and view.dtype.isnative):
            return view
    return contiguous(a).reshape(shape)


def empty_as(x, shape, dtype):
    """A new array of ``shape`` in ``x``'s memory format (channels-last where ``x``
    views a channels-last buffer)."""
    if _channels_last(x):
        return empty_channels_last(shape, dtype)
    return np.empty(shape, dtype)


def filled_as(x, shape, dtype, bias):
    """``filled`` in ``x``'s memory format."""
    out = empty_as(x, shape, dtype)
    out[...] = 0
    if bias is not None:
        out += np.asarray(bias, dtype).reshape((1, -1) + (1,) * (len(shape) - 2))
    return out


def _channels_last(x):
    return (x.ndim == 5 and not x.flags.c_contiguous
            and x.transpose(0, 2, 3, 4, 1).flags.c_contiguous)


def add_bias(y, bias):
    """``y[:, c] += bias[c]`` in place (``y`` batched, channels-first)."""
    y += np.asarray(bias, y.dtype).reshape((1, -1) + (1,) * (y.ndim - 2))
