"""The depth-slab steps of ``fastpool._conv3d`` on the CPU (NumPy on host arrays);
``fastpool.cuda.slabs`` mirrors the names."""

from __future__ import annotations

import numpy as np

from fastpool.cpu._arrays import contiguous  # noqa: F401 (the launchers' copy step)
from fastpool.cpu.conv import conv2d_backward, conv2d_forward  # noqa: F401 (the 2-D steps)
from fastpool.cpu.conv._planner import planned_unless_pinned


def planned(window):
    """Run every depth tap's 2-D convolution with the algorithms the rank-2 ``window``
    (all the output depths as one batch) chooses: sizes decide the algorithm, a tap's
    batch depends on how many output depths it reaches, and a Dask chunk's taps reach
    fewer (``planned_unless_pinned``: a chunk keeps the whole call's)."""
    return planned_unless_pinned(window)


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


def bias_grad(grad_output, w):
    """``grad_output`` summed over N and the spatial axes, in float64."""
    return grad_output.sum(axis=(0, 2, 3, 4), dtype=np.float64).astype(grad_output.dtype)


def add_bias(y, bias):
    """``y[:, c] += bias[c]`` in place (``y`` batched, channels-first)."""
    y += np.asarray(bias, y.dtype).reshape((1, -1) + (1,) * (y.ndim - 2))
