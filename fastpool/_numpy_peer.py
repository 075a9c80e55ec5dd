"""Plain NumPy versions of the pooling and convolution ops: the peer that
``python -m fastpool bench`` times fastpool against when PyTorch is not installed.

They are what a NumPy user would write without fastpool: strided window views,
reductions and ``einsum``, vectorised over the batch and channels with Python loops only
over the kernel taps. They cover the benchmarked cases only (square windows given as
ints, no dilation, ``count_include_pad=True``, no ceil mode) and are checked against
fastpool in ``tests/test_bench.py``.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

name = "NumPy"


def put(array):
    return array


def sync():
    pass


def _padded(x, padding, fill):
    if padding == 0:
        return x
    pad = ((0, 0), (0, 0), (padding, padding), (padding, padding))
    return np.pad(x, pad, constant_values=fill)


def _windows(x, kernel_size, stride, padding, fill):
    """(N, C, OH, OW, k, k) strided view of the padded input."""
    view = sliding_window_view(_padded(x, padding, fill), (kernel_size, kernel_size),
                               axis=(2, 3))
    return view[:, :, ::stride, ::stride]


def max_pool2d(x, kernel_size, stride, padding, return_indices=False):
    windows = _windows(x, kernel_size, stride, padding, -np.inf)
    n, c, oh, ow = windows.shape[:4]
    flat = windows.reshape(n, c, oh, ow, kernel_size * kernel_size)
    if not return_indices:
        return flat.max(axis=-1)
    arg = flat.argmax(axis=-1)
    out = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    rows = np.arange(oh)[:, None] * stride - padding + arg // kernel_size
    cols = np.arange(ow)[None, :] * stride - padding + arg % kernel_size
    return out, rows * x.shape[3] + cols


def max_pool2d_backward(grad_output, x, kernel_size, stride, padding, indices):
    n, c, h, w = x.shape
    grad_input = np.zeros((n * c, h * w), dtype=grad_output.dtype)
    planes = np.arange(n * c)[:, None]
    np.add.at(grad_input, (planes, indices.reshape(n * c, -1)),
              grad_output.reshape(n * c, -1))
    return grad_input.reshape(x.shape)


def avg_pool2d(x, kernel_size, stride, padding):
    return _windows(x, kernel_size, stride, padding, 0).mean(axis=(-2, -1))


def avg_pool2d_backward(grad_output, x, kernel_size, stride, padding):
    n, c, h, w = x.shape
    oh, ow = grad_output.shape[2:]
    padded = np.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=grad_output.dtype)
    share = grad_output / (kernel_size * kernel_size)
    for i in range(kernel_size):
        for j in range(kernel_size):
            padded[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += share
    return padded[:, :, padding:padding + h, padding:padding + w]


def _grouped(x, groups):
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w)


def conv2d(x, weight, stride, padding, groups):
    c_out, c_in_group, kh, kw = weight.shape
    view = sliding_window_view(_padded(x, padding, 0), (kh, kw), axis=(2, 3))
    view = view[:, :, ::stride, ::stride]
    n, _, oh, ow = view.shape[:4]
    view = view.reshape(n, groups, c_in_group, oh, ow, kh, kw)
    w = weight.reshape(groups, c_out // groups, c_in_group, kh, kw)
    out = np.einsum("ngchwij,gocij->ngohw", view, w, optimize=True)
    return out.reshape(n, c_out, oh, ow)


def conv2d_backward(grad_output, x, weight, stride, padding, groups):
    """(grad_input, grad_weight)."""
    c_out, c_in_group, kh, kw = weight.shape
    n, c_in, h, w = x.shape
    oh, ow = grad_output.shape[2:]
    g = grad_output.reshape(n, groups, c_out // groups, oh, ow)
    wg = weight.reshape(groups, c_out // groups, c_in_group, kh, kw)
    xg = _grouped(_padded(x, padding, 0), groups)
    grad_padded = np.zeros_like(xg)
    grad_weight = np.empty_like(wg)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + stride * oh, stride)
            cols = slice(j, j + stride * ow, stride)
            grad_padded[:, :, :, rows, cols] += np.einsum(
                "ngohw,goc->ngchw", g, wg[:, :, :, i, j], optimize=True)
            grad_weight[:, :, :, i, j] = np.einsum(
                "ngohw,ngchw->goc", g, xg[:, :, :, rows, cols], optimize=True)
    grad_input = grad_padded.reshape(n, c_in, h + 2 * padding, w + 2 * padding)
    return (grad_input[:, :, padding:padding + h, padding:padding + w],
            grad_weight.reshape(weight.shape))
