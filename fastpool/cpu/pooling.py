"""CPU pooling launchers: any spatial rank, either memory format.

Every launcher takes host arrays validated by ``fastpool._params`` and their
``fastpool._geometry.Window`` and returns host arrays in the caller's shape and memory
format. The kernels (``pool_max``, ``pool_avg``, ``pool_stochastic``) see 1-, 2- and
3-D inputs alike as ``(planes, D, H, W)`` (``Window.in3``), specialised on the
window's compile-time constants (``Window.constants``) by the one memoised place
``kernel(op, window, *flags)``. Forward kernels parallelise over output rows,
backward kernels over planes; no two threads write the same element and nothing uses
atomics, so results are identical at any thread count.

Channels-last inputs are computed on a channels-first copy and their results are
returned channels-last (the kernels that read them in place are planned: issue 14).
"""

from __future__ import annotations

import numba
import numpy as np

from fastpool import _params
from fastpool._geometry import CHANNELS_LAST
from fastpool.cpu import pool_avg, pool_max, pool_stochastic
from fastpool.cpu._arrays import contiguous
from fastpool.cpu._pool_common import interior_columns

_FACTORIES = {
    "max_forward": pool_max.max_forward,
    "avg_forward": pool_avg.avg_forward,
    "avg_backward": pool_avg.avg_backward,
    "stochastic_train": pool_stochastic.train_forward,
    "stochastic_infer_forward": pool_stochastic.infer_forward,
    "stochastic_infer_backward": pool_stochastic.infer_backward,
}
# Average pooling has no dilation: its kernels take kernel and stride only.
_NO_DILATION = {"avg_forward", "avg_backward"}


def kernel(op, window, *flags):
    """The compiled kernel of ``op`` for ``window``'s constants (memoised by the
    factories: one compile per specialisation, loaded from disk in later processes)."""
    constants = window.constants[:6] if op in _NO_DILATION else window.constants
    return _FACTORIES[op](*constants, *flags)


def _volumes(a, spatial3):
    """``a`` as a C-contiguous ``(planes, D, H, W)`` kernel view (one copy at most)."""
    return contiguous(a).reshape((-1,) + tuple(spatial3))


def _channels_last(result, window):
    """A channels-first result in the caller's channels-last memory format: the same
    shape and values, channels-last strides (one copy)."""
    if result is None or window.layout != CHANNELS_LAST:
        return result
    axis = 1 if window.batched else 0
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(result, axis, -1)), -1, axis)


def _pads(window):
    return window.pad_lo3


def _workers(window):
    """Threads a backward kernel splits its planes between."""
    return max(1, min(numba.get_num_threads(), window.planes))


# ----------------------------------------------------------------------------- max

def max_pool_forward(x, window, with_indices):
    w = window
    out = np.empty(w.output_shape, dtype=x.dtype)
    indices = np.empty(w.output_shape if with_indices else (1,), dtype=np.int64)
    if w.planes:
        lo, hi = interior_columns(w)
        kernel("max_forward", w, bool(with_indices))(
            _volumes(x, w.in3), out.reshape((-1,) + w.out3),
            indices.reshape((-1,) + w.out3) if with_indices else indices.reshape(1, 1, 1, 1),
            *_pads(w), lo, hi)
    return (_channels_last(out, w),
            _channels_last(indices, w) if with_indices else None)


def scatter_to_indices(grad_output, indices, window):
    """Backward of a pooling that picked one element per window (max, stochastic
    training): ``grad_input.flat[index] += grad_output`` within each plane."""
    w = window
    grad_input = np.empty(w.input_shape, dtype=grad_output.dtype)
    if w.planes:
        plane_in = int(np.prod(w.in_size))
        plane_out = int(np.prod(w.out_size))
        bad = pool_max.scatter_to_indices(
            contiguous(grad_output).reshape(-1, plane_out),
            contiguous(indices).reshape(-1, plane_out),
            grad_input.reshape(-1, plane_in))
        if bad:
            raise ValueError(
                f"indices holds {bad} value(s) outside [0, {plane_in}), the flat "
                f"positions of an input plane of size {w.in_size}; indices must be flat "
                "positions inside each (n, c) plane, as the forward returns them")
    return _channels_last(grad_input, w)


def max_pool_backward(grad_output, x, window, indices):
    if indices is None:
        _, indices = max_pool_forward(x, window, with_indices=True)
    return scatter_to_indices(grad_output, indices, window)


# ----------------------------------------------------------------------------- average

def avg_pool_forward(x, window, count_include_pad, divisor_override):
    w = window
    out = np.empty(w.output_shape, dtype=x.dtype)
    if w.planes:
        lo, hi = interior_columns(w)
        area = int(np.prod(w.kernel))
        kernel("avg_forward", w)(
            _volumes(x, w.in3), out.reshape((-1,) + w.out3), *_pads(w),
            count_include_pad, divisor_override, lo, hi,
            # Sum and divide in the input's dtype, as PyTorch does.
            x.dtype.type(0), x.dtype.type(divisor_override or area))
    return _channels_last(out, w)


def avg_pool_backward(grad_output, window, count_include_pad, divisor_override):
    w = window
    grad_input = np.empty(w.input_shape, dtype=grad_output.dtype)
    if w.planes:
        kernel("avg_backward", w)(
            _volumes(grad_output, w.out3), grad_input.reshape((-1,) + w.in3), *_pads(w),
            count_include_pad, divisor_override, grad_output.dtype.type(0), _workers(w))
    return _channels_last(grad_input, w)


# ----------------------------------------------------------------------------- stochastic

def _raise_if_invalid(flags):
    if flags.any():
        raise _params.invalid_stochastic_input()


def stochastic_pool_forward(x, window, training, seed, with_indices):
    w = window
    with_indices = bool(training and with_indices)
    out = np.empty(w.output_shape, dtype=x.dtype)
    indices = np.empty(w.output_shape if with_indices else (1,), dtype=np.int64)
    if w.planes:
        OD, OH, _ = w.out3
        invalid = np.zeros(w.planes * OD * OH, dtype=np.bool_)
        lo, hi = interior_columns(w)
        volumes_x = _volumes(x, w.in3)
        volumes_out = out.reshape((-1,) + w.out3)
        if training:
            kernel("stochastic_train", w, with_indices)(
                volumes_x, volumes_out,
                indices.reshape((-1,) + w.out3) if with_indices
                else indices.reshape(1, 1, 1, 1),
                *_pads(w), np.uint64(seed), w.channels, invalid, lo, hi)
        else:
            kernel("stochastic_infer_forward", w)(volumes_x, volumes_out, *_pads(w),
                                                  invalid, lo, hi)
        _raise_if_invalid(invalid)
    return (_channels_last(out, w),
            _channels_last(indices, w) if with_indices else None)


def stochastic_pool_backward(grad_output, x, window, training, indices):
    w = window
    if training:
        return scatter_to_indices(grad_output, indices, window)
    grad_input = np.empty(w.input_shape, dtype=grad_output.dtype)
    if w.planes:
        invalid = np.zeros(w.planes, dtype=np.bool_)
        lo, hi = interior_columns(w)
        kernel("stochastic_infer_backward", w)(
            _volumes(grad_output, w.out3), _volumes(x, w.in3),
            grad_input.reshape((-1,) + w.in3), *_pads(w), invalid, lo, hi, _workers(w))
        _raise_if_invalid(invalid)
    return _channels_last(grad_input, w)
