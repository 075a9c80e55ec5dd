"""CPU pooling launchers: any spatial rank, either memory format.

Every launcher takes host arrays validated by ``fastpool._params`` and their
``fastpool._geometry.Window`` and returns host arrays in the caller's shape and memory
format. The kernels (``pool_max``, ``pool_avg``, ``pool_stochastic*``) see 1-, 2- and
3-D inputs alike as ``(planes, D, H, W)`` (``Window.in3``), specialised on the
window's compile-time constants (``Window.constants``) by the one memoised place
``kernel(op, window, *flags)``. Forward kernels parallelise over output rows,
backward kernels over planes; no two threads write the same element and nothing uses
atomics, so results are identical at any thread count.

Channels-last inputs run kernels that read the ``(N, D, H, W, C)`` buffer in place
(``pool_channels_last``, ``pool_stochastic_channels_last``) and write channels-last
results, with the channels-first values bit for bit.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fastpool import _params, _rng
from fastpool._geometry import CHANNELS_LAST
from fastpool._threading import loop_on_one_thread, thread_count
from fastpool.cpu import _half_bits as hb
from fastpool.cpu import (
    pool_adaptive,
    pool_adaptive_stochastic,
    pool_avg,
    pool_channels_last,
    pool_max,
    pool_stochastic,
    pool_stochastic_backward,
    pool_stochastic_channels_last,
    pool_stochastic_flat,
    pool_unpool,
)
from fastpool.cpu._arrays import channels_last, contiguous
from fastpool.cpu._arrays import moved_axes as _moved
from fastpool.cpu._pool_common import interior_columns

_FACTORIES = {
    "max_forward": pool_max.max_forward,
    "max_forward_tiled": pool_max.max_forward_tiled,
    "max_forward_cl": pool_channels_last.max_forward,
    "avg_forward_cl": pool_channels_last.avg_forward,
    "avg_backward_cl": pool_channels_last.avg_backward,
    "avg_backward_cl_tiled": pool_channels_last.avg_backward_tiled,
    "avg_forward": pool_avg.avg_forward,
    "avg_forward_tiled": pool_avg.avg_forward_tiled,
    "avg_backward": pool_avg.avg_backward,
    "avg_backward_flat": pool_avg.avg_backward_flat,
    "avg_backward_tiled": pool_avg.avg_backward_tiled,
    "stochastic_train": pool_stochastic.train_forward,
    "stochastic_train_flat": pool_stochastic_flat.train_forward_flat,
    "stochastic_infer_forward": pool_stochastic.infer_forward,
    "stochastic_infer_forward_flat": pool_stochastic_flat.infer_forward_flat,
    "stochastic_infer_backward": pool_stochastic_backward.infer_backward,
    "stochastic_infer_backward_flat": pool_stochastic_flat.infer_backward_flat,
    "stochastic_infer_backward_tiled": pool_stochastic_backward.infer_backward_tiled,
    "stochastic_train_cl": pool_stochastic_channels_last.train_forward,
    "stochastic_infer_cl": pool_stochastic_channels_last.infer,
    "stochastic_infer_backward_cl": pool_stochastic_channels_last.infer_backward,
}
# Average pooling has no dilation: its kernels take kernel and stride only.
_NO_DILATION = {"avg_forward", "avg_backward", "avg_backward_flat", "avg_backward_tiled",
                "avg_forward_cl", "avg_backward_cl", "avg_backward_cl_tiled",
                "avg_forward_tiled"}


def kernel(op, window, *flags):
    """The compiled kernel of ``op`` for ``window``'s constants (memoised by the
    factories: one compile per specialisation, loaded from disk in later processes)."""
    constants = window.constants[:6] if op in _NO_DILATION else window.constants
    return _FACTORIES[op](*constants, *flags)


def _volumes(a, spatial3):
    """``a`` as a C-contiguous ``(planes, D, H, W)`` kernel view (one copy at most)."""
    return contiguous(a).reshape((-1,) + tuple(spatial3))


def _cl_input_layout(window, spatial3, ndim, channels):
    """``(axes, shape)``: the transpose that takes a channels-last ``(N, C, *spatial)``
    array of ``ndim`` axes to its ``(N, *spatial, C)`` buffer, and that buffer's kernel
    view shape."""
    lead = 1 if window.batched else 0
    return (_moved(ndim, lead, -1), (window.batch,) + tuple(spatial3) + (channels,))


def _cl_output_layout(window, spatial, channels):
    """``(shape, axes, kernel_shape)`` of a new channels-last result: its ``(N,
    *spatial, C)`` buffer's shape, the transpose that views it as ``(N, C, *spatial)``,
    and its ``(N, D, H, W, C)`` kernel view's shape."""
    lead = (window.batch,) if window.batched else ()
    shape = lead + tuple(spatial) + (channels,)
    pad = (1,) * (3 - window.rank)
    return (shape, _moved(len(shape), -1, len(lead)),
            (window.batch,) + pad + tuple(spatial) + (channels,))


def _cl_buffer(a, window, spatial3):
    """The ``(N, D, H, W, C)`` buffer behind a channels-last ``(N, C, *spatial)`` array
    (a view; one copy only if it is not exactly that buffer)."""
    axes, shape = _cl_input_layout(window, spatial3, a.ndim,
                                   a.shape[1 if window.batched else 0])
    return contiguous(a.transpose(axes)).reshape(shape)


def _cl_empty(window, spatial, channels, dtype):
    """A new ``(N, D, H, W, C)`` buffer and the caller's ``(N, C, *spatial)`` view of
    it (channels-last strides)."""
    shape, axes, kernel_shape = _cl_output_layout(window, spatial, channels)
    buffer = np.empty(shape, dtype=dtype)
    return buffer.reshape(kernel_shape), buffer.transpose(axes)


def _pads(window):
    return window.pad_lo3


def _split(tasks):
    """Threads a kernel splits ``tasks`` equal tasks between."""
    threads = thread_count()
    return threads if threads <= tasks else max(1, tasks)


def _row_workers(window):
    """Threads a channels-first forward kernel splits its output rows between."""
    return _split(window.planes * math.prod(window.out3[:2]))


def _cl_row_workers(window):
    """Threads a channels-last forward kernel splits its output rows between."""
    return _split(window.batch * math.prod(window.out3[:2]))


def _cl_input_row_workers(window):
    """Threads a channels-last backward kernel splits its input rows between."""
    return _split(window.batch * math.prod(window.in3[:2]))


def _workers(window):
    """Threads a backward kernel splits its planes between."""
    return max(1, min(thread_count(), window.planes))


# Channels-first planes narrower than this many columns (with at least
# ``_NARROW_CHANNELS`` channels, overlapping windows along W and at most
# ``_NARROW_BYTES`` of input) are pooled forward by the channels-last kernels,
# which vectorise across channels, between two transposing copies: a 14-column row
# leaves too few interior columns for one vector. Same values bit for bit. Measured on
# 2 threads, float32: 3x3 s1 on (8,256,14,14) max 1.01 -> 0.37 ms, avg 0.67 -> 0.38 ms;
# 3x3 s2 max 0.46 -> 0.21 ms. Not taken where it lost: 2x2 s2 (the direct kernel reads
# column phases; (1,512,28,28) 0.12 ms direct, 0.20 through the copies) and inputs of
# more than ``_NARROW_BYTES`` ((32,512,14,14) 2x2 s2: 1.2 ms direct, 3.0 through the
# copies; asv, one call per sample: 3x3 s1 average on (8,512,14,14) float64 2.1 ms
# direct, 6-9 through the copies, float32 1.8 and 3.3).
_NARROW_COLUMNS = 32
_NARROW_CHANNELS = 16
_NARROW_BYTES = 2 << 20


def _narrow(w):
    return (w.layout != CHANNELS_LAST and w.in3[2] < _NARROW_COLUMNS
            and w.channels >= _NARROW_CHANNELS and w.kernel3[2] > w.stride3[2]
            and w.planes > 0)


def _narrow_or_rows(narrow, rows, x, *arguments):
    """``narrow``'s copies where the input is at most ``_NARROW_BYTES``, else the
    channels-first kernel (the window does not know the dtype: decided per call)."""
    return (narrow if x.nbytes <= _NARROW_BYTES else rows)(x, *arguments)


def _as_channels_last(x, w):
    return channels_last(x, 1 if w.batched else 0)


# ----------------------------------------------------------------------------- max

def _cl_forward_plan(op, *flags):
    """``make(window)``: what a channels-last forward of ``op`` derives from the
    geometry, derived once (``Volume.derived``): its kernel (None without planes), the
    output buffer's shape, the axes that view it as ``(N, C, *spatial)``, its kernel
    view's shape, the axes and kernel shape of the input's buffer, pads and output
    rows. A small call's per-call path cost more than its kernel (2x2 average of (1, 6,
    28, 28): shapes and axes made again on every call)."""
    def make(w):
        return (kernel(op, w, *flags) if w.planes else None,
                *_cl_output_layout(w, w.out_size, w.channels),
                *_cl_input_layout(w, w.in3, int(w.batched) + 1 + w.rank, w.channels),
                _pads(w), w.batch * math.prod(w.out3[:2]))
    return make


_CL_MAX_PLAN = {flag: _cl_forward_plan("max_forward_cl", flag) for flag in (False, True)}
_NO_CL_INDICES = np.empty((1,) * 5, np.int64)


def _max_forward_channels_last(x, w, with_indices):
    make = _CL_MAX_PLAN[bool(with_indices)]
    run, shape, axes, out_view, in_axes, in_view, pads, rows = w.derived(make, make)
    out = np.empty(shape, x.dtype)
    indices = np.empty(shape, np.int64) if with_indices else None
    if run is not None:
        run(hb.bits(contiguous(x.transpose(in_axes)).reshape(in_view)),
            hb.bits(out.reshape(out_view)),
            _NO_CL_INDICES if indices is None else indices.reshape(out_view), *pads,
            _split(rows))
    return out.transpose(axes), (None if indices is None else indices.transpose(axes))


def _forward_plan(op, plans, *flags):
    """``make(window)``: ``plan(x, *arguments)``, the channels-first forward call of
    ``op`` on a geometry with everything but the arrays derived once (a small call's
    per-call path costs more than its kernel: docs/site/performance.md). ``plans``:
    the functions that run the exact-tiling kernel ``op + "_tiled"`` where windows tile
    the input, the channels-last kernels between two copies for narrow planes
    (``_narrow``), and ``op``'s kernel otherwise."""
    tiled_plan, narrow_plan, rows_plan = plans

    def make(w):
        shape = w.output_shape
        tiled = _tiled_launch(op + "_tiled", *flags)(w)
        if tiled:
            run, rows = tiled
            return functools.partial(tiled_plan, run, shape, (rows, w.out3[2]),
                                     w.out3[0] * w.out3[1], rows, math.prod(w.kernel))
        rows = w.planes * math.prod(w.out3[:2])
        direct = functools.partial(
            rows_plan, kernel(op, w, *flags) if rows else None, shape,
            (-1,) + w.in3, (-1,) + w.out3, _pads(w), w.derived("interior", interior_columns),
            rows, math.prod(w.kernel))
        if _narrow(w):
            return functools.partial(_narrow_or_rows, functools.partial(narrow_plan, w),
                                     direct)
        return direct
    return make


def _max_tiled(run, shape, view, plane_rows, rows, taps, x, with_indices):
    out = np.empty(shape, x.dtype)
    indices = np.empty(shape, np.int64) if with_indices else None
    run.launch(_split(rows),
               *hb.kernel_views(contiguous(x).ravel(), out.reshape(view)),
               _NO_ROW_INDICES if indices is None else indices.reshape(view), plane_rows)
    return out, indices


def _max_narrow(w, x, with_indices):
    y, indices = _max_forward_channels_last(_as_channels_last(x, w), w, with_indices)
    return contiguous(y), (contiguous(indices) if with_indices else None)


def _max_rows(run, shape, in_view, out_view, pads, columns, rows, taps, x, with_indices):
    out = np.empty(shape, dtype=x.dtype)
    indices = np.empty(shape, dtype=np.int64) if with_indices else None
    if rows:
        run(hb.bits(contiguous(x).reshape(in_view)), hb.bits(out.reshape(out_view)),
            _NO_INDICES if indices is None else indices.reshape(out_view), *pads,
            *columns, _split(rows))
    return out, indices


def _avg_tiled(run, shape, view, plane_rows, rows, taps, x, count_include_pad,
               divisor_override):
    out = np.empty(shape, x.dtype)
    run.launch(_split(rows),
               *hb.kernel_views(contiguous(x).ravel(), out.reshape(view)),
               *hb.scalars(x.dtype, 0, divisor_override or taps))
    return out


def _avg_narrow(w, x, count_include_pad, divisor_override):
    return contiguous(_avg_forward_channels_last(_as_channels_last(x, w), w,
                                                 count_include_pad, divisor_override))


def _avg_rows(run, shape, in_view, out_view, pads, columns, rows, taps, x,
              count_include_pad, divisor_override):
    out = np.empty(shape, dtype=x.dtype)
    if rows:
        run(hb.bits(contiguous(x).reshape(in_view)), hb.bits(out.reshape(out_view)),
            *pads, count_include_pad, divisor_override, *columns,
            # Sum and divide in the input's dtype (float32 for half), as PyTorch does.
            *hb.scalars(x.dtype, 0, divisor_override or taps), _split(rows))
    return out


_MAX_PLAN = {flag: _forward_plan("max_forward", (_max_tiled, _max_narrow, _max_rows), flag)
             for flag in (False, True)}
_AVG_PLAN = _forward_plan("avg_forward", (_avg_tiled, _avg_narrow, _avg_rows))
# The kernels compiled without indices never touch their ``indices`` argument.
_NO_INDICES = np.empty((1, 1, 1, 1), np.int64)


def max_pool_forward(x, window, with_indices):
    if window.layout == CHANNELS_LAST:
        return _max_forward_channels_last(x, window, with_indices)
    make = _MAX_PLAN[bool(with_indices)]
    return window.derived(make, make)(x, with_indices)


def scatter_to_indices(grad_output, indices, window):
    """Backward of a pooling that picked one element per window (max, stochastic
    training): ``grad_input.flat[index] += grad_output`` within each plane."""
    w = window
    if w.layout != CHANNELS_LAST:
        return w.derived(_scatter_plan, _scatter_plan)(grad_output, indices)
    plane_in = math.prod(w.in_size)
    plane_out = math.prod(w.out_size)
    grad_input, view = _cl_empty(w, w.in_size, w.channels, grad_output.dtype)
    bad = 0
    if w.planes:
        blocks = pool_channels_last.scatter_blocks(w.batch, w.channels)
        bad = loop_on_one_thread(
            pool_channels_last.scatter_to_indices,
            hb.bits(_cl_buffer(grad_output, w, w.out3).reshape(w.batch, plane_out, -1)),
            _cl_buffer(indices, w, w.out3).reshape(w.batch, plane_out, -1),
            hb.bits(grad_input.reshape(w.batch, plane_in, -1)), blocks)
    _raise_bad_indices(bad, plane_in, w)
    return view


def _scatter_plan(w):
    """``plan(grad_output, indices)``: the channels-first ``scatter_to_indices`` on the
    geometry ``w``, what it derives from ``w`` derived once."""
    shape, planes = w.input_shape, w.planes
    plane_in, plane_out = math.prod(w.in_size), math.prod(w.out_size)

    def plan(grad_output, indices):
        grad_input = np.empty(shape, grad_output.dtype)
        if planes:
            bad = pool_max.scatter_to_indices(
                hb.bits(contiguous(grad_output).reshape(-1, plane_out)),
                contiguous(indices).reshape(-1, plane_out),
                hb.bits(grad_input.reshape(-1, plane_in)))
            _raise_bad_indices(bad, plane_in, w)
        return grad_input
    return plan


def _raise_bad_indices(bad, plane_in, w):
    if bad:
        raise ValueError(
            f"indices holds {bad} value(s) outside [0, {plane_in}), the flat positions "
            f"of an input volume of size {w.in_size}; indices must be flat positions "
            "inside each (n, c) volume, as the forward returns them")


def max_pool_backward(grad_output, x, window, indices):
    if indices is None:
        _, indices = max_pool_forward(x, window, with_indices=True)
    return scatter_to_indices(grad_output, indices, window)


# ----------------------------------------------------------------------------- average

_CL_AVG_PLAN = _cl_forward_plan("avg_forward_cl")


def _avg_forward_channels_last(x, w, count_include_pad, divisor_override):
    run, shape, axes, out_view, in_axes, in_view, pads, rows = w.derived(_CL_AVG_PLAN,
                                                                         _CL_AVG_PLAN)
    out = np.empty(shape, x.dtype)
    if run is not None:
        run(hb.bits(contiguous(x.transpose(in_axes)).reshape(in_view)),
            hb.bits(out.reshape(out_view)), *pads, count_include_pad, divisor_override,
            hb.scalar(x.dtype, 0), _split(rows))
    return out.transpose(axes)


def avg_pool_forward(x, window, count_include_pad, divisor_override):
    if window.layout == CHANNELS_LAST:
        return _avg_forward_channels_last(x, window, count_include_pad, divisor_override)
    return window.derived(_AVG_PLAN, _AVG_PLAN)(x, count_include_pad, divisor_override)


def _tiled_launch(op, *flags):
    """``make(window)``: ``(kernel, output rows)`` of the exact-tiling kernel ``op``
    (``avg_forward_tiled``, ``max_forward_tiled``) where the windows tile the input
    exactly along every axis (no dilation, a depth kernel of 1), else False (not None,
    which ``Volume.derived`` would compute again on every call). Measured
    on 2 threads, float32, average 2x2 s2, old build against new in alternating
    processes: (32,6,28,28) 54-69 -> 37-45 us, (1,512,28,28) 114-125 -> 67-78 us,
    (8,64,56,56) 291-298 -> 214-224 us."""
    def make(w):
        exact = all(o * k == i for o, k, i in zip(w.out3, w.kernel3, w.in3))
        if not (_tiled(w) and exact and w.kernel3[0] == 1
                and w.dilation3 == (1, 1, 1)):
            return False
        rows = w.planes * w.out3[0] * w.out3[1]
        return (kernel(op, w, *flags), rows) if rows else False
    return make


_NO_ROW_INDICES = np.empty((1, 1), np.int64)


def _tiled(w):
    """Whether the windows tile the input: stride = kernel, no padding, and every
    window inside the input (no partial windows of ``ceil_mode``)."""
    return (w.stride3 == w.kernel3 and not any(w.pad_lo3)
            and all(o * k <= i for o, k, i in zip(w.out3, w.kernel3, w.in3)))


_EXACT_IN_FLOAT32 = 1 << 24


def _avg_backward_op(w):
    """The channels-first average backward kernel for ``w``: whole-plane loops
    (``avg_backward_flat``) for stride 1 along H and W, a depth kernel of 1 and planes
    small enough, else the ring of spread rows. Same bits either way. Measured on 2
    threads, old kernel against new in one process, (8,512,14,14) 3x3 s1 p1: float32
    1.41 -> 0.35 ms, float64 1.49 -> 0.71 ms (see docs/design.md)."""
    padded = ((w.out3[1] + 2 * (w.kernel3[1] - 1))
              * (w.out3[2] + 2 * (w.kernel3[2] - 1)))
    if (w.kernel3[0], w.stride3) == (1, (1, 1, 1)) and \
            padded <= pool_avg.FLAT_PLANE_LIMIT:
        return "avg_backward_flat"
    return "avg_backward"


def avg_pool_backward(grad_output, window, count_include_pad, divisor_override):
    w = window
    if w.layout == CHANNELS_LAST:
        grad_input, view = _cl_empty(w, w.in_size, w.channels, grad_output.dtype)
        if w.planes:
            go = _cl_buffer(grad_output, w, w.out3)
            shares = np.empty(go.shape, hb.compute_dtype(go.dtype))
            exact = (abs(divisor_override) <= _EXACT_IN_FLOAT32
                     and math.prod(w.kernel3) <= _EXACT_IN_FLOAT32)
            pool_channels_last.avg_shares(hb.bits(go), shares, *_pads(w), *w.kernel3,
                                          *w.stride3, *w.in3, count_include_pad,
                                          divisor_override, exact, _cl_row_workers(w))
            zero = hb.scalar(grad_output.dtype, 0)
            if w.derived("tiled", _tiled):
                kernel("avg_backward_cl_tiled", w)(shares, hb.bits(grad_input), zero,
                                                   _cl_input_row_workers(w))
            else:
                kernel("avg_backward_cl", w)(shares, hb.bits(grad_input), *_pads(w),
                                             zero, _cl_input_row_workers(w))
        return view
    grad_input = np.empty(w.input_shape, dtype=grad_output.dtype)
    # The ring kernel divides by the integer divisor in float64 and rounds; the tiled
    # and flat kernels divide in the dtype computed with, the same bits while the
    # divisor is exact in float32 (every integer up to 2**24 is).
    exact = abs(divisor_override) <= _EXACT_IN_FLOAT32
    tiled = exact and w.derived("avg_backward_tiled", _tiled_launch("avg_backward_tiled"))
    if tiled and (divisor_override or math.prod(w.kernel3) <= _EXACT_IN_FLOAT32):
        run, rows = tiled
        taps = math.prod(w.kernel3)
        run.launch(_split(rows), *hb.kernel_views(
            contiguous(grad_output).reshape(rows, -1), grad_input.reshape(rows, -1)),
            *hb.scalars(grad_output.dtype, 0, divisor_override or taps))
    elif w.planes:
        op = w.derived("avg_backward", _avg_backward_op) if exact else "avg_backward"
        kernel(op, w)(
            hb.bits(_volumes(grad_output, w.out3)),
            hb.bits(grad_input.reshape((-1,) + w.in3)), *_pads(w), count_include_pad,
            divisor_override, hb.scalar(grad_output.dtype, 0), _workers(w))
    return grad_input


# ----------------------------------------------------------------------------- stochastic

def _raise_if_invalid(flags):
    if flags.any():
        raise _params.invalid_stochastic_input()


def _stochastic_forward_channels_last(x, w, training, seed, with_indices):
    out, out_view = _cl_empty(w, w.out_size, w.channels, x.dtype)
    indices, indices_view = (_cl_empty(w, w.out_size, w.channels, np.int64)
                             if with_indices else (np.empty((1,) * 5, np.int64), None))
    if w.planes:
        invalid = np.zeros(w.batch * w.out3[0] * w.out3[1], dtype=np.bool_)
        volume = hb.bits(_cl_buffer(x, w, w.in3))
        out_bits = hb.bits(out)
        if training:
            kernel("stochastic_train_cl", w, with_indices)(
                volume, out_bits, indices, *_pads(w), _rng.kernel_key_array(seed, w.out3[1]),
                invalid, *interior_columns(w), _cl_row_workers(w))
        else:
            kernel("stochastic_infer_cl", w, False)(volume, out_bits, out_bits, out_bits,
                                                    *_pads(w), invalid, _cl_row_workers(w))
        _raise_if_invalid(invalid)
    return out_view, indices_view


def stochastic_pool_forward(x, window, training, seed, with_indices):
    w = window
    with_indices = bool(training and with_indices)
    if w.layout == CHANNELS_LAST:
        return _stochastic_forward_channels_last(x, w, training, seed, with_indices)
    out = np.empty(w.output_shape, dtype=x.dtype)
    indices = np.empty(w.output_shape if with_indices else (1,), dtype=np.int64)
    if w.planes:
        OD, OH, _ = w.out3
        invalid = np.zeros(w.planes * OD * OH, dtype=np.bool_)
        lo, hi = w.derived("interior", interior_columns)
        volumes_x = hb.bits(_volumes(x, w.in3))
        volumes_out = hb.bits(out.reshape((-1,) + w.out3))
        if training:
            op = w.derived("stochastic_train_forward", _stochastic_train_op)
            kernel(op, w, with_indices)(
                volumes_x, volumes_out,
                indices.reshape((-1,) + w.out3) if with_indices
                else indices.reshape(1, 1, 1, 1),
                *_pads(w), _rng.kernel_key_array(seed, w.out3[1]), w.channels, invalid,
                lo, hi,
                _row_workers(w))
        else:
            op = w.derived("stochastic_infer_forward", _stochastic_infer_op)
            kernel(op, w)(volumes_x, volumes_out, *_pads(w), invalid, lo, hi,
                          _row_workers(w))
        _raise_if_invalid(invalid)
    return out, (indices if with_indices else None)


def _flat_forward(w, limit):
    """Whether the channels-first stochastic forwards of ``w`` run whole-plane loops
    (``infer_forward_flat``, ``train_forward_flat``): stride 1 and no dilation along H
    and W, a depth kernel of 1 and zero-bordered planes of at most ``limit`` elements.
    Same bits either way."""
    padded = (w.out3[1] + w.kernel3[1] - 1) * (w.out3[2] + w.kernel3[2] - 1)
    return ((w.kernel3[0], w.stride3, w.dilation3) == (1, (1, 1, 1), (1, 1, 1))
            and padded <= limit)


def _stochastic_infer_op(w):
    """The channels-first stochastic inference forward for ``w`` (``_flat_forward``)."""
    if _flat_forward(w, pool_stochastic_flat.FLAT_PLANE_LIMIT):
        return "stochastic_infer_forward_flat"
    return "stochastic_infer_forward"


def _stochastic_train_op(w):
    """The channels-first stochastic training forward for ``w`` (``_flat_forward``)."""
    if _flat_forward(w, pool_stochastic_flat.FLAT_TRAIN_PLANE_LIMIT):
        return "stochastic_train_flat"
    return "stochastic_train"


def _stochastic_infer_backward_op(w):
    """The channels-first stochastic inference backward for ``w``: whole-plane loops
    (``infer_backward_flat``) where ``_stochastic_infer_op`` takes them and the planes
    of ``(OH + 2(KH - 1)) x (OW + 2(KW - 1))`` are small enough, else the ring kernel.
    Same bits either way."""
    padded = ((w.out3[1] + 2 * (w.kernel3[1] - 1))
              * (w.out3[2] + 2 * (w.kernel3[2] - 1)))
    if (w.kernel3[0], w.stride3, w.dilation3) == (1, (1, 1, 1), (1, 1, 1)) and \
            padded <= pool_stochastic_flat.FLAT_BACKWARD_LIMIT:
        return "stochastic_infer_backward_flat"
    return "stochastic_infer_backward"


def _stochastic_backward_channels_last(grad_output, x, w):
    grad_input, view = _cl_empty(w, w.in_size, w.channels, grad_output.dtype)
    if w.planes:
        volume = hb.bits(_cl_buffer(x, w, w.in3))
        go = hb.bits(_cl_buffer(grad_output, w, w.out3))
        share_a = np.empty(go.shape)
        share_b = np.empty(go.shape)
        invalid = np.zeros(w.batch * w.out3[0] * w.out3[1], dtype=np.bool_)
        kernel("stochastic_infer_cl", w, True)(volume, go, share_a, share_b, *_pads(w),
                                               invalid, _cl_row_workers(w))
        _raise_if_invalid(invalid)
        kernel("stochastic_infer_backward_cl", w)(volume, share_a, share_b,
                                                  hb.bits(grad_input), *_pads(w),
                                                  _cl_input_row_workers(w))
    return view


def stochastic_pool_backward(grad_output, x, window, training, indices):
    w = window
    if training:
        return scatter_to_indices(grad_output, indices, window)
    if w.layout == CHANNELS_LAST:
        return _stochastic_backward_channels_last(grad_output, x, w)
    grad_input = np.empty(w.input_shape, dtype=grad_output.dtype)
    tiled = w.derived("stochastic_infer_backward_tiled",
                      _tiled_launch("stochastic_infer_backward_tiled"))
    if tiled:
        run, rows = tiled
        invalid = np.zeros(rows, dtype=np.bool_)
        go, gi = hb.kernel_views(contiguous(grad_output).reshape(rows, -1),
                                 grad_input.reshape(rows * w.kernel3[1], -1))
        run.launch(_split(rows), go, hb.bits(contiguous(x).reshape(gi.shape)), gi, invalid)
        _raise_if_invalid(invalid)
    elif w.planes:
        invalid = np.zeros(w.planes, dtype=np.bool_)
        lo, hi = w.derived("interior", interior_columns)
        kernel(w.derived("stochastic_infer_backward", _stochastic_infer_backward_op), w)(
            hb.bits(_volumes(grad_output, w.out3)), hb.bits(_volumes(x, w.in3)),
            hb.bits(grad_input.reshape((-1,) + w.in3)), *_pads(w), invalid, lo, hi,
            _workers(w))
        _raise_if_invalid(invalid)
    return grad_input


# ----------------------------------------------------------------------------- adaptive

def _bounds(w):
    return (w.starts3[0], w.ends3[0], w.starts3[1], w.ends3[1], w.starts3[2], w.ends3[2])


def _cover(w):
    return (w.first3[0], w.last3[0], w.first3[1], w.last3[1], w.first3[2], w.last3[2])


def _rows_of(buffer):
    """Threads an adaptive kernel splits the rows ``(b, d, h)`` of ``buffer`` (a
    ``(B, D, H, W, C)`` kernel buffer) between."""
    return _split(math.prod(buffer.shape[:3]))


def _adaptive_view(a, w, spatial3):
    """``a`` as the ``(B, D, H, W, C)`` buffer the adaptive kernels read: channels-last
    in place, channels-first as ``(planes, D, H, W, 1)``."""
    if w.layout == CHANNELS_LAST:
        return _cl_buffer(a, w, spatial3)
    return contiguous(a).reshape((-1,) + tuple(spatial3) + (1,))


def _adaptive_empty(w, shape, spatial, dtype):
    """A new result of the user's ``shape`` in the call's layout: ``(kernel buffer,
    the user's view)``."""
    if w.layout == CHANNELS_LAST:
        return _cl_empty(w, spatial, w.channels, dtype)
    out = np.empty(shape, dtype=dtype)
    pad = (1,) * (3 - w.rank)
    return out.reshape((-1,) + pad + tuple(spatial) + (1,)), out


def _global_avg_plan(w):
    """``plan(x)``: global average pooling on the geometry ``w``, with what the call
    derives from ``w`` derived once (global pooling ends most networks: a small call
    whose fixed cost was most of its time, 512@7 at batch 1 behind PyTorch)."""
    size = w.planes * math.prod(w.in_size)
    if w.layout != CHANNELS_LAST:
        shape, planes = w.output_shape, w.planes

        def plan(x):
            out = np.empty(shape, x.dtype)
            if planes:
                pool_adaptive.global_avg_channels_first.launch(
                    _global_workers(size), contiguous(x).reshape(planes, -1),
                    out.reshape(-1))
            return out
        return plan
    # channels-last: read the (N, S, C) buffer behind x, write an (N, 1.., C) buffer
    axis = 1 if w.batched else 0
    lead = (w.batch,) if w.batched else ()
    buffer_shape = lead + (1,) * w.rank + (w.channels,)
    to_buffer = _moved(len(buffer_shape), axis, -1)
    to_view = _moved(len(buffer_shape), -1, axis)
    pixels = (w.batch, math.prod(w.in_size), w.channels)
    rows = (w.batch, w.channels)
    blocks = {}  # channel block per worker count
    small = size < _GLOBAL_PER_THREAD  # one worker, without asking Numba
    one_block = _channel_block(w.batch, w.channels, 1)

    def plan_channels_last(x):
        out = np.empty(rows, x.dtype)
        if size:
            if small:
                workers, block = 1, one_block
            else:
                workers = _global_workers(size)
                block = blocks.get(workers)
                if block is None:
                    block = blocks[workers] = _channel_block(w.batch, w.channels,
                                                             workers)
            pool_adaptive.global_avg_channels_last.launch(
                workers, contiguous(x.transpose(to_buffer)).reshape(pixels), out,
                hb.scalar(x.dtype, 0), block)
        return out.reshape(buffer_shape).transpose(to_view)
    return plan_channels_last


def adaptive_avg_pool_forward(x, window):
    w = window
    if w.is_global:
        return w.derived(_global_avg_plan, _global_avg_plan)(x)
    out, view = _adaptive_empty(w, w.output_shape, w.out_size, x.dtype)
    if w.planes:
        pool_adaptive.avg_forward(w.layout == CHANNELS_LAST)(
            _adaptive_view(x, w, w.in3), out, *_bounds(w), x.dtype.type(0), _rows_of(out))
    return view


def _channel_block(images, channels, workers):
    """Channels per task of the channels-last global reduction: whole images when
    there are at least two per thread, else blocks (multiples of 16) that make about
    two tasks per thread, of at most 256 channels (the block's 16 partial sums stay in
    L1: one image of 2048 channels on 7x7, 13.1 us in blocks of 1024, 11.0 in 256)."""
    if images >= 2 * workers:
        return channels
    per_piece = -(-channels // -(-2 * workers // images))
    return min(channels, 256, -(-per_piece // 16) * 16)


def _global_workers(elements):
    """Threads for a global reduction: one per 96 Ki elements at most (waking a second
    thread cost about as much as summing that many: 2048@7 at batch 1, 100 Ki
    elements, 15.9 us on one thread and 17.9 on two channels-first, 20.9 and 23.1
    channels-last; twice that, 25.2 and 23.7)."""
    if elements < _GLOBAL_PER_THREAD:  # without asking Numba (0.4 us a call)
        return 1
    return max(1, min(thread_count(), elements // _GLOBAL_PER_THREAD))


_GLOBAL_PER_THREAD = 96 << 10


def adaptive_avg_pool_backward(grad_output, window):
    w = window
    grad_input, view = _adaptive_empty(w, w.input_shape, w.in_size, grad_output.dtype)
    if w.planes and w.is_global:
        pool_adaptive.global_avg_backward(w.layout == CHANNELS_LAST)(
            _adaptive_view(grad_output, w, w.out3), grad_input, grad_output.dtype.type(0),
            max(1, min(thread_count(), grad_input.shape[0])))
    elif w.planes:
        pool_adaptive.avg_backward(w.layout == CHANNELS_LAST)(
            _adaptive_view(grad_output, w, w.out3), grad_input, *_bounds(w), *_cover(w),
            grad_output.dtype.type(0), _rows_of(grad_input))
    return view


def adaptive_max_pool_forward(x, window, with_indices):
    w = window
    out, view = _adaptive_empty(w, w.output_shape, w.out_size, x.dtype)
    indices, indices_view = (_adaptive_empty(w, w.output_shape, w.out_size, np.int64)
                             if with_indices else (np.empty((1,) * 5, np.int64), None))
    if w.planes:
        pool_adaptive.max_forward(w.layout == CHANNELS_LAST, bool(with_indices))(
            _adaptive_view(x, w, w.in3), out, indices, *_bounds(w), _rows_of(out))
    return view, indices_view


def adaptive_max_pool_backward(grad_output, x, window, indices):
    if indices is None:
        _, indices = adaptive_max_pool_forward(x, window, with_indices=True)
    return scatter_to_indices(grad_output, indices, window)


def adaptive_stochastic_pool_forward(x, window, training, seed, with_indices):
    w = window
    with_indices = bool(training and with_indices)
    cl = w.layout == CHANNELS_LAST
    out, view = _adaptive_empty(w, w.output_shape, w.out_size, x.dtype)
    indices, indices_view = (_adaptive_empty(w, w.output_shape, w.out_size, np.int64)
                             if with_indices else (np.empty((1,) * 5, np.int64), None))
    if w.planes:
        invalid = np.zeros(out.shape[0] * out.shape[1] * out.shape[2], dtype=np.bool_)
        volume = _adaptive_view(x, w, w.in3)
        if training:
            pool_adaptive_stochastic.train_forward(cl, with_indices)(
                volume, out, indices, *_bounds(w), _rng.kernel_key_array(seed, w.out3[1]), w.channels,
                invalid,
                _rows_of(out))
        else:
            pool_adaptive_stochastic.infer(cl, False)(volume, out, out, out, *_bounds(w),
                                                      invalid, _rows_of(out))
        _raise_if_invalid(invalid)
    return view, indices_view


def adaptive_stochastic_pool_backward(grad_output, x, window, training, indices):
    w = window
    if training:
        return scatter_to_indices(grad_output, indices, window)
    cl = w.layout == CHANNELS_LAST
    grad_input, view = _adaptive_empty(w, w.input_shape, w.in_size, grad_output.dtype)
    if w.planes:
        volume = _adaptive_view(x, w, w.in3)
        go = _adaptive_view(grad_output, w, w.out3)
        share_a, share_b = np.empty(go.shape), np.empty(go.shape)
        invalid = np.zeros(go.shape[0] * go.shape[1] * go.shape[2], dtype=np.bool_)
        pool_adaptive_stochastic.infer(cl, True)(volume, go, share_a, share_b,
                                                 *_bounds(w), invalid, _rows_of(go))
        _raise_if_invalid(invalid)
        pool_adaptive_stochastic.infer_backward(cl)(volume, share_a, share_b, grad_input,
                                                    *_cover(w), _rows_of(grad_input))
    return view


# ----------------------------------------------------------------------------- unpooling

def _unpool_raise(bad, v):
    if bad:
        raise ValueError(
            f"indices holds {bad} value(s) outside [0, {int(np.prod(v.out_size))}), the "
            f"flat positions of an unpooled volume of size {v.out_size}")


def _planes_view(a, v, spatial):
    """``a`` as ``(planes, S)`` (channels-first) or ``(N, S, C)`` (channels-last)."""
    if v.layout == CHANNELS_LAST:
        return _cl_buffer(a, v, (1,) * (3 - v.rank) + tuple(spatial)).reshape(
            v.batch, -1, v.channels)
    return contiguous(a).reshape(v.planes, -1)


def _planes_empty(v, shape, spatial, dtype):
    """A new result of the user's ``shape`` in the call's layout: ``(its _planes_view,
    the user's view)``."""
    if v.layout == CHANNELS_LAST:
        buffer, view = _cl_empty(v, spatial, v.channels, dtype)
        return buffer.reshape(v.batch, -1, v.channels), view
    out = np.empty(shape, dtype=dtype)
    return out.reshape(v.planes, -1), out


def max_unpool_forward(x, indices, volume):
    v = volume
    y, view = _planes_empty(v, v.output_shape, v.out_size, x.dtype)
    if v.planes:
        xs, js = _planes_view(x, v, v.in_size), _planes_view(indices, v, v.in_size)
        if v.layout == CHANNELS_LAST:
            blocks = pool_channels_last.scatter_blocks(v.batch, v.channels)
            bad = pool_unpool.unpool_channels_last(xs, js, y, blocks)
        else:
            bad = pool_unpool.unpool_channels_first(xs, js, y)
        _unpool_raise(bad, v)
    return view


def max_unpool_backward(grad_output, indices, volume):
    v = volume
    grad_input, view = _planes_empty(v, v.input_shape, v.in_size, grad_output.dtype)
    if v.planes:
        go, js = _planes_view(grad_output, v, v.out_size), _planes_view(indices, v,
                                                                        v.in_size)
        gather = (pool_unpool.gather_channels_last if v.layout == CHANNELS_LAST
                  else pool_unpool.gather_channels_first)
        _unpool_raise(gather(go, js, grad_input), v)
    return view
