"""fastpool on Dask arrays: the in-memory functions, lazily, chunk by chunk.

Every function takes ``dask.array.Array`` inputs (NumPy or CuPy chunks) and returns
lazy Dask arrays equal to what the ``fastpool`` function of the same name returns for
the whole array: bit for bit for pooling under any chunking and for 1-D and 2-D
convolutions chunked along the batch; to rounding for convolutions chunked across
space, 3-D convolutions, and weight and bias gradients (docs/site/dask.md says why).

- Chunked along the batch (and the channels, for pooling): each chunk is one call.
- Chunked across spatial axes: each output chunk is one call on the input slice its
  windows read (``fastpool._dask_plan``), whatever the input's spatial chunk
  boundaries: they are never rechunked to a stride grid. (A convolution's channels
  are joined into one chunk; gradients and indices are rechunked to the input's
  batch and channel chunks.)
- Stochastic pooling draws, for a seed, exactly the picks of the whole-array call
  under any chunking: each chunk's kernel is keyed by the global position of its
  outputs (``fastpool._rng.Origin``).
- A convolution's weight and bias become one-chunk arrays: one key each, sent once to
  each worker.
- Adaptive pooling, transposed convolution and max-unpooling chunk along the batch
  (and channels); their spatial axes are rechunked to one chunk (with a warning) since
  their windows are not a stride grid or their outputs come from the whole plane.

Unbatched inputs (``(C, *spatial)``) work as in ``fastpool``. ``device`` is passed to
every chunk's call (``"auto"`` follows each chunk: CuPy chunks run on the GPU).
Requires ``pip install fastpool[dask]``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Optional, Tuple

import dask
import dask.array as da
import numpy as np

import fastpool
from fastpool import _conv3d, _dask_graph, _dispatch, _params, _reproducible, _rng
from fastpool._conv_transpose import _planar
from fastpool._types import Device, Padding, Size
from fastpool.conv import Conv2dGrads

_POOL_DOC = """Lazy :func:`fastpool.{name}` of Dask arrays, chunk by chunk.

    Parameters
    ----------
    Those of :func:`fastpool.{name}`; arrays may be ``dask.array.Array`` (NumPy or
    CuPy chunks; other arrays are taken as one chunk). Validated when called, before
    any task runs.

    Returns
    -------
    The results of :func:`fastpool.{name}` as lazy Dask arrays with ``chunks``,
    ``dtype`` and ``meta`` set (docs/site/dask.md: how each chunk is computed and
    which results are bitwise those of the in-memory call).

    Shape
    -----
    As :func:`fastpool.{name}`. Results are chunked as the input along the batch and
    channels (a convolution's channels are one chunk); per spatial axis, an output
    chunk holds the outputs ``o`` whose cell ``o * stride`` lies in one input chunk
    (input chunks holding no such cell give none). Gradients are chunked as ``x``.
    """


def _public(function, name, doc=_POOL_DOC):
    function.__name__ = function.__qualname__ = name
    function.__module__ = "fastpool.dask"
    if function.__doc__ is None and fastpool._docs.DOCSTRINGS:
        function.__doc__ = doc.format(name=name)
    return function


# ----------------------------------------------------------------------------- inputs

def _as_dask(name, value, rank):
    """``(batched dask array, batched)``: arrays of other kinds become one chunk."""
    if not isinstance(value, da.Array):
        value = da.from_array(value, chunks=value.shape) if hasattr(value, "shape") \
            else da.from_array(np.asarray(value))
    if value.ndim not in (rank + 1, rank + 2):
        raise ValueError(f"{name} must be {rank + 2}-D (N, C, *spatial) or {rank + 1}-D "
                         f"(C, *spatial), got shape {value.shape}")
    if any(np.isnan(c) for c in value.shape):
        raise ValueError(f"{name} must have known chunk sizes (call compute_chunk_sizes())")
    batched = value.ndim == rank + 2
    return (value if batched else value[None]), batched


def _one_chunk(name, value):
    """A weight or bias as a one-chunk Dask array (None stays None)."""
    if value is None:
        return None
    if isinstance(value, da.Array):
        return value.rechunk(value.shape)
    return da.from_array(value, chunks=value.shape, name=f"{name}-{da.core.tokenize(value)}")


def _stand_in(array):
    """A zero-stride NumPy array of ``array``'s shape and dtype: validates the
    in-memory geometry without data."""
    return _dask_graph.shape_stand_in(array.shape, array.dtype)


def _unbatch(result, batched):
    if batched:
        return result
    if isinstance(result, tuple):
        return tuple(r[0] for r in result)
    return result[0]


def _index_meta(x):
    return np.zeros_like(x._meta, shape=(0,) * x.ndim, dtype=np.int64)


def _globalise(indices, context):
    """Flat positions in a call's slice -> flat positions in the whole volume."""
    flat = np.zeros_like(indices)
    rest = indices.copy()
    sizes = [p.hi - p.lo for p in context.pieces]
    scale = 1
    for p, size, whole in zip(reversed(context.pieces), reversed(sizes),
                              reversed(context.in_size)):
        flat += (rest % size + p.lo) * scale
        rest //= size
        scale *= whole
    return flat


# ----------------------------------------------------------------------------- runners

def _max_run(x, context, *, rank, args, return_indices, device):
    if not return_indices:
        return fastpool.pooling.__dict__[f"max_pool{rank}d"](x, *args, device=device)
    y, indices = fastpool.pooling.__dict__[f"max_pool{rank}d"](
        x, *args, return_indices=True, device=device)
    return y, _globalise(indices, context)


def _avg_run(x, context, *, rank, args, device):
    return fastpool.pooling.__dict__[f"avg_pool{rank}d"](x, *args, device=device)


def _stochastic_run(x, context, *, rank, args, training, seed, return_indices, out_h,
                    device):
    x, window = _params.pool_window(x, rank, *args)
    lead = (0,) * (3 - rank)
    offsets = lead + tuple(p.first - p.skip for p in context.pieces)
    origin = _rng.Origin(seed, context.n0, context.c0, *offsets, out_h=out_h)
    y, indices = _dispatch.backend(device, x).stochastic_pool_forward(
        x, window, training, origin, return_indices)
    return (y, _globalise(indices, context)) if return_indices else y


def _conv_run(x, context, weight, bias=None, *, rank, args, plane, device):
    with _planned(plane):
        return fastpool.conv.__dict__[f"conv{rank}d"](x, weight, bias, *args,
                                                      device=device)


def _max_backward_run(grad_output, x, indices, context, *, rank, args, device):
    return fastpool.pooling.__dict__[f"max_pool{rank}d_backward"](
        grad_output, x, *args, indices=indices, device=device)


def _avg_backward_run(grad_output, x, indices, context, *, rank, args, device):
    return fastpool.pooling.__dict__[f"avg_pool{rank}d_backward"](
        grad_output, x, *args, device=device)


def _stochastic_backward_run(grad_output, x, indices, context, *, rank, args, training,
                             device):
    return fastpool.pooling.__dict__[f"stochastic_pool{rank}d_backward"](
        grad_output, x, *args, training=training, indices=indices, device=device)


def _conv_input_run(grad_output, x, indices, context, weight, *, rank, args, plane,
                    device):
    with _planned(plane):
        return fastpool.conv.__dict__[f"conv{rank}d_backward"](
            grad_output, x, weight, *args, output_mask=(True, False, False),
            device=device).grad_input


def _planned(plane):
    """Run a chunk's CPU convolution with the algorithms of the whole call (2-D
    ``plane`` window; None: chosen per chunk)."""
    if plane is None:
        return contextlib.nullcontext()
    from fastpool.cpu.conv._planner import planned_as
    return planned_as(plane)


# ----------------------------------------------------------------------------- pooling

def _pool_geometry(x, rank, kernel_size, stride, padding, dilation, ceil_mode):
    x, batched = _as_dask("x", x, rank)
    _, window = _params.pool_window(_stand_in(x), rank, kernel_size, stride, padding,
                                    dilation, ceil_mode)
    return x, batched, window


def _backward_inputs(grad_output, x, indices, rank, window):
    x, batched = _as_dask("x", x, rank)
    grad_output = _like_x("grad_output", grad_output, rank, batched)
    _params.check_grad_output(_stand_in(grad_output), _stand_in(x), window)
    if indices is not None:
        indices = _like_x("indices", indices, rank, batched)
        if indices.shape != grad_output.shape:
            raise ValueError(f"indices must have grad_output's shape {grad_output.shape}, "
                             f"got {indices.shape}")
    return grad_output, x, batched, indices


def _like_x(name, value, rank, batched):
    """``value`` (batched) after checking it is batched as ``x`` is."""
    value, value_batched = _as_dask(name, value, rank)
    if value_batched != batched:
        raise ValueError(f"{name} must be {'batched' if batched else 'unbatched'} as x is, "
                         f"got shape {value.shape if value_batched else value.shape[1:]}")
    return value


def _max_pool(rank):
    def max_pool(x, kernel_size: Size, stride: Optional[Size] = None, padding: Size = 0,
                 dilation: Size = 1, ceil_mode: bool = False,
                 return_indices: bool = False, *, device: Device = None):
        x, batched, window = _pool_geometry(x, rank, kernel_size, stride, padding,
                                            dilation, ceil_mode)
        return_indices = _params.check_bool("return_indices", return_indices)
        args = (window.kernel, window.stride, window.pad_lo, window.dilation, ceil_mode)
        run = functools.partial(_max_run, rank=rank, args=args,
                                return_indices=return_indices, device=device)
        metas = [x._meta] + ([_index_meta(x)] if return_indices else [])
        results = _dask_graph.forward(x, window, run, f"max_pool{rank}d", metas=metas)
        return _unbatch(tuple(results) if return_indices else results[0], batched)
    return _public(max_pool, f"max_pool{rank}d")


def _max_pool_backward(rank):
    def max_pool_backward(grad_output, x, kernel_size: Size,
                          stride: Optional[Size] = None, padding: Size = 0,
                          dilation: Size = 1, ceil_mode: bool = False, *, indices=None,
                          device: Device = None):
        _, _, window = _pool_geometry(x, rank, kernel_size, stride, padding, dilation,
                                      ceil_mode)
        grad_output, x, batched, indices = _backward_inputs(grad_output, x, indices, rank,
                                                            window)
        args = (window.kernel, window.stride, window.pad_lo, window.dilation, ceil_mode)
        run = functools.partial(_max_backward_run, rank=rank, args=args, device=device)
        return _unbatch(_dask_graph.backward(grad_output, x, window, run,
                                             f"max_pool{rank}d_backward",
                                             read_x=indices is None, indices=indices),
                        batched)
    return _public(max_pool_backward, f"max_pool{rank}d_backward")


def _avg_args(window, ceil_mode, count_include_pad, divisor_override):
    count_include_pad = _params.check_bool("count_include_pad", count_include_pad)
    _params.check_divisor_override(divisor_override)
    return (window.kernel, window.stride, window.pad_lo, ceil_mode, count_include_pad,
            divisor_override)


def _avg_pool(rank):
    def avg_pool(x, kernel_size: Size, stride: Optional[Size] = None, padding: Size = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: Optional[int] = None, *, device: Device = None):
        x, batched, window = _pool_geometry(x, rank, kernel_size, stride, padding, 1,
                                            ceil_mode)
        args = _avg_args(window, ceil_mode, count_include_pad, divisor_override)
        run = functools.partial(_avg_run, rank=rank, args=args, device=device)
        return _unbatch(_dask_graph.forward(x, window, run, f"avg_pool{rank}d",
                                            metas=[x._meta])[0], batched)
    return _public(avg_pool, f"avg_pool{rank}d")


def _avg_pool_backward(rank):
    def avg_pool_backward(grad_output, x, kernel_size: Size,
                          stride: Optional[Size] = None, padding: Size = 0,
                          ceil_mode: bool = False, count_include_pad: bool = True,
                          divisor_override: Optional[int] = None, *,
                          device: Device = None):
        _, _, window = _pool_geometry(x, rank, kernel_size, stride, padding, 1, ceil_mode)
        grad_output, x, batched, _ = _backward_inputs(grad_output, x, None, rank, window)
        args = _avg_args(window, ceil_mode, count_include_pad, divisor_override)
        run = functools.partial(_avg_backward_run, rank=rank, args=args, device=device)
        return _unbatch(_dask_graph.backward(grad_output, x, window, run,
                                             f"avg_pool{rank}d_backward", read_x=False),
                        batched)
    return _public(avg_pool_backward, f"avg_pool{rank}d_backward")


def _stochastic_pool(rank):
    def stochastic_pool(x, kernel_size: Size, stride: Optional[Size] = None,
                        padding: Size = 0, dilation: Size = 1, ceil_mode: bool = False,
                        return_indices: bool = False, *, training: bool = True,
                        seed: Optional[int] = None, device: Device = None):
        x, batched, window = _pool_geometry(x, rank, kernel_size, stride, padding,
                                            dilation, ceil_mode)
        # One seed for the whole array, drawn now (as the in-memory call draws it).
        training, return_indices, seed = _params.stochastic_forward_flags(
            training, return_indices, seed)
        args = (window.kernel, window.stride, window.pad_lo, window.dilation, ceil_mode)
        run = functools.partial(_stochastic_run, rank=rank, args=args, training=training,
                                seed=seed, return_indices=return_indices,
                                out_h=window.out3[1], device=device)
        metas = [x._meta] + ([_index_meta(x)] if return_indices else [])
        results = _dask_graph.forward(x, window, run, f"stochastic_pool{rank}d",
                                      metas=metas)
        return _unbatch(tuple(results) if return_indices else results[0], batched)
    return _public(stochastic_pool, f"stochastic_pool{rank}d")


def _stochastic_training(training, indices, forward):
    """Validate a stochastic backward's ``training`` against ``indices``."""
    training = _params.check_bool("training", training)
    if training and indices is None:
        raise ValueError("indices is required when training=True: pass the indices "
                         f"returned by {forward}(..., return_indices=True)")
    if not training and indices is not None:
        raise ValueError("indices must be None when training=False")
    return training


def _stochastic_pool_backward(rank):
    def stochastic_pool_backward(grad_output, x, kernel_size: Size,
                                 stride: Optional[Size] = None, padding: Size = 0,
                                 dilation: Size = 1, ceil_mode: bool = False, *,
                                 training: bool = True, indices=None,
                                 device: Device = None):
        _, _, window = _pool_geometry(x, rank, kernel_size, stride, padding, dilation,
                                      ceil_mode)
        training = _stochastic_training(training, indices, f"stochastic_pool{rank}d")
        grad_output, x, batched, indices = _backward_inputs(grad_output, x, indices, rank,
                                                            window)
        args = (window.kernel, window.stride, window.pad_lo, window.dilation, ceil_mode)
        run = functools.partial(_stochastic_backward_run, rank=rank, args=args,
                                training=training, device=device)
        return _unbatch(_dask_graph.backward(grad_output, x, window, run,
                                             f"stochastic_pool{rank}d_backward",
                                             read_x=not training, indices=indices),
                        batched)
    return _public(stochastic_pool_backward, f"stochastic_pool{rank}d_backward")


# ----------------------------------------------------------------------------- convolution

def _conv_geometry(x, weight, bias, rank, stride, padding, dilation, groups):
    x, batched = _as_dask("x", x, rank)
    weight = _one_chunk("weight", weight)
    bias = _one_chunk("bias", bias)
    _, _, _, window = _params.conv_window(
        _stand_in(x), _stand_in(weight), None if bias is None else _stand_in(bias), rank,
        stride, padding, dilation, groups)
    # Every output channel sums over all input channels (of its group).
    return x.rechunk({1: -1}), batched, weight, bias, window


def _conv_plan(window, rank, x, weight, stride, padding, dilation, groups):
    """``(plane, tile)``: the whole call's 2-D window, whose algorithms every chunk
    runs (a 3-D convolution's: its stacked images' or depth taps', ``_conv3d.planes``),
    and the output
    tile of the Winograd algorithm where it may run (3x3, stride 1)."""
    if rank == 3:
        plane = _conv3d.planes(window)
    elif rank == 2:
        plane = window
    else:
        x4 = _dask_graph.shape_stand_in(x.shape[:2] + (1,) + x.shape[2:], x.dtype)
        w4 = _dask_graph.shape_stand_in(weight.shape[:2] + (1,) + weight.shape[2:],
                                        weight.dtype)
        (s,), (d,) = _params.ntuple("stride", stride, 1), _params.ntuple("dilation",
                                                                          dilation, 1)
        p = padding if isinstance(padding, str) else (0,) + _params.ntuple(
            "padding", padding, 1)
        plane = _params.conv_window(x4, w4, None, 2, (1, s), p, (1, d), groups)[3]
    winograd = plane.kernel == (3, 3) and plane.stride == (1, 1) and plane.dilation == (1, 1)
    return plane, 2 if winograd else 1


def _conv(rank):
    def conv(x, weight, bias=None, stride: Size = 1, padding: Padding = 0,
             dilation: Size = 1, groups: int = 1, *, device: Device = None):
        x, batched, weight, bias, window = _conv_geometry(x, weight, bias, rank, stride,
                                                          padding, dilation, groups)
        args = (stride, padding, dilation, groups)
        plane, tile = _conv_plan(window, rank, x, weight, stride, padding, dilation, groups)
        run = functools.partial(_conv_run, rank=rank, args=args, plane=plane,
                                device=device)
        extra = [weight] + ([bias] if bias is not None else [])
        y = _dask_graph.forward(x, window, run, f"conv{rank}d",
                                out_channels=window.out_channels, metas=[x._meta],
                                extra=extra, tile=tile)[0]
        return _unbatch(y, batched)
    return _public(conv, f"conv{rank}d")


def _conv_backward(rank):
    def conv_backward(grad_output, x, weight, stride: Size = 1, padding: Padding = 0,
                      dilation: Size = 1, groups: int = 1, *,
                      output_mask: Tuple[bool, bool, bool] = (True, True, True),
                      reproducible: bool = False, device: Device = None) -> Conv2dGrads:
        x, batched, weight, _, window = _conv_geometry(x, weight, None, rank, stride,
                                                       padding, dilation, groups)
        output_mask = _params.check_output_mask(output_mask)
        reproducible = _params.check_bool("reproducible", reproducible)
        grad_output = _like_x("grad_output", grad_output, rank, batched)
        _params.check_grad_output(_stand_in(grad_output), _stand_in(x), window)
        args = (stride, padding, dilation, groups)
        plane, tile = _conv_plan(window, rank, x, weight, stride, padding, dilation, groups)
        grad_input = grad_weight = grad_bias = None
        if output_mask[0]:
            run = functools.partial(_conv_input_run, rank=rank, args=args, plane=plane,
                                    device=device)
            grad_input = _unbatch(_dask_graph.backward(
                grad_output, x, window, run, f"conv{rank}d_backward_input", read_x=False,
                whole_channels=True, extra=[weight], tile=tile), batched)
        if (output_mask[1] or output_mask[2]) and reproducible:
            mask = (False,) + tuple(output_mask[1:])
            grad_weight, grad_bias = _dask_graph.parameter_grads(
                grad_output, x, weight, window, functools.partial(
                    _conv_folds_run, rank=rank, args=args, mask=mask, device=device),
                f"conv{rank}d_backward_weight_reproducible",
                _reproducible_plan(_reproducible.Roles(grad_output, x, grad_output),
                                   window, mask, device),
                functools.partial(_finish_folds, dtype=x.dtype, device=device))
            grad_weight = grad_weight if output_mask[1] else None
            grad_bias = grad_bias if output_mask[2] else None
        elif output_mask[1] or output_mask[2]:
            grad_weight, grad_bias = _dask_graph.parameter_grads(
                grad_output, x, weight, window, functools.partial(
                    _conv_parameter_run, rank=rank, args=args,
                    mask=(False,) + tuple(output_mask[1:]), device=device),
                f"conv{rank}d_backward_weight")
            grad_weight = grad_weight if output_mask[1] else None
            grad_bias = grad_bias if output_mask[2] else None
        return Conv2dGrads(grad_input, grad_weight, grad_bias)
    return _public(conv_backward, f"conv{rank}d_backward")


def _conv_parameter_run(grad_output, x, weight, *, rank, args, mask, device):
    grads = fastpool.conv.__dict__[f"conv{rank}d_backward"](
        grad_output, x, weight, *args, output_mask=mask, device=device)
    return grads.grad_weight, grads.grad_bias


# Reproducible weight and bias gradients (``fastpool._reproducible``): the maxima of
# the whole arrays fix the folds' grids, every chunk returns its folds, their sum is
# exact in any order and is finished once, as the in-memory call finishes its own.

def _block_max(block, device):
    from fastpool import _half
    backend = _dispatch.backend(device, block)
    return getattr(backend, "_module", backend).max_abs(_half._widen(block))


def _combined(pairs):
    """``(max, all finite)`` of the blocks' ``(max, finite)``: exact, any order."""
    return max(p[0] for p in pairs), all(p[1] for p in pairs)


def _finite_max(a, device):
    pairs = [dask.delayed(_block_max, pure=True)(b, device)
             for b in a.to_delayed().ravel()]
    return dask.delayed(_combined, pure=True)(pairs)


def _plan_of(g, x, bias, weight_terms, bias_terms):
    return _reproducible.plan((g[0], x[0]), weight_terms, bias[0], bias_terms,
                              g[1] and x[1] and bias[1])


def _reproducible_plan(roles, window, mask, device):
    """``fastpool._reproducible.make_plan`` of the whole arrays, as a Delayed."""
    none = (0.0, True)
    g = _finite_max(roles.grad_output, device) if mask[1] else none
    x = _finite_max(roles.x, device) if mask[1] else none
    bias = _finite_max(roles.summed, device) if mask[2] else none
    return dask.delayed(_plan_of, pure=True)(
        g, x, bias, _reproducible.terms(window),
        _reproducible.channel_terms(roles.summed, True))


def _conv_folds_run(grad_output, x, weight, plan, *, rank, args, mask, device):
    x, weight, _, window = _params.conv_window(x, weight, None, rank, *args)
    grad_output = _params.check_grad_output(grad_output, x, window)
    backend = _dispatch.backend(device, grad_output, x, weight)
    return _reproducible.parameter_folds(
        backend, _reproducible.Roles(grad_output, x, grad_output), window, mask, plan)


def _finish_folds(sums, plan, *, dtype, device):
    """``(grad_weight, grad_bias)`` from the summed folds (None stays None)."""
    return tuple(None if folds is None else _finish_one(folds, plan, which=i, dtype=dtype,
                                                        device=device)
                 for i, folds in enumerate(sums))


# ----------------------------------------------------------------------------- adaptive

def _whole_planes(x, rank, name, why="adaptive windows do not follow a stride grid"):
    """``x`` with its spatial axes in one chunk, with a warning if they were not."""
    if any(len(c) > 1 for c in x.chunks[2:]):
        warnings.warn(f"{name}: rechunking the spatial axes of {x.shape} into one chunk "
                      f"({why}); chunk along the batch or channels instead", stacklevel=4)
        x = x.rechunk({a: -1 for a in range(2, 2 + rank)})
    return x


def _adaptive_run(x, *, name, rank, output_size, return_indices, training, seed, device,
                  block_info=None):
    """A tuple of the adaptive op's results on one chunk."""
    function = fastpool.adaptive.__dict__[f"{name}{rank}d"]
    if name == "adaptive_avg_pool":
        return (function(x, output_size, device=device),)
    if name == "adaptive_max_pool":
        result = function(x, output_size, return_indices, device=device)
        return result if return_indices else (result,)
    (n0, _), (c0, _) = block_info[0]["array-location"][:2]
    x, window = _params.adaptive_window(x, rank, output_size)
    y, indices = _dispatch.backend(device, x).adaptive_stochastic_pool_forward(
        x, window, training, _rng.Origin(seed, n0, c0, out_h=window.out3[1]),
        return_indices)
    return (y, indices) if return_indices else (y,)


def _adaptive_forward(x, rank, name, output_size, return_indices=False, training=True,
                      seed=None, device=None):
    x, batched = _as_dask("x", x, rank)
    _, window = _params.adaptive_window(_stand_in(x), rank, output_size)
    x = _whole_planes(x, rank, f"{name}{rank}d")
    chunks = x.chunks[:2] + tuple((o,) for o in window.out_size)
    run = functools.partial(_adaptive_run, name=name, rank=rank,
                            output_size=window.out_size, return_indices=return_indices,
                            training=training, seed=seed, device=device)
    metas = [x._meta] + ([_index_meta(x)] if return_indices else [])
    pair = da.map_blocks(run, x, chunks=chunks,
                         meta=np.empty((0,) * x.ndim, dtype=object),
                         name=f"{name}{rank}d-{da.core.tokenize(x, run)}")
    results = [pair.map_blocks(_dask_graph._item, i, meta=meta, dtype=meta.dtype)
               for i, meta in enumerate(metas)]
    return _unbatch(tuple(results) if return_indices else results[0], batched)


def _adaptive_backward(grad_output, x, rank, name, output_size, indices=None,
                       **keywords):
    _, window = _params.adaptive_window(_stand_in(_as_dask("x", x, rank)[0]), rank,
                                        output_size)
    grad_output, x, batched, indices = _backward_inputs(grad_output, x, indices, rank,
                                                        window)
    x = _whole_planes(x, rank, f"{name}{rank}d_backward")
    grad_output = grad_output.rechunk(x.chunks[:2] + tuple((o,) for o in window.out_size))
    arrays = [grad_output, x]
    if indices is not None:
        arrays.append(indices.rechunk(grad_output.chunks))
    run = functools.partial(_adaptive_backward_run,
                            function=fastpool.adaptive.__dict__[f"{name}{rank}d_backward"],
                            output_size=window.out_size, keywords=keywords)
    return _unbatch(da.map_blocks(run, *arrays, chunks=x.chunks, meta=grad_output._meta),
                    batched)


def _adaptive_backward_run(grad_output, x, indices=None, *, function, output_size,
                           keywords):
    if indices is not None:
        keywords = dict(keywords, indices=indices)
    return function(grad_output, x, output_size, **keywords)


def _adaptive_avg(rank):
    def adaptive_avg_pool(x, output_size, *, device: Device = None):
        return _adaptive_forward(x, rank, "adaptive_avg_pool", output_size, device=device)

    def adaptive_avg_pool_backward(grad_output, x, output_size, *,
                                   device: Device = None):
        return _adaptive_backward(grad_output, x, rank, "adaptive_avg_pool", output_size,
                                  device=device)
    return adaptive_avg_pool, adaptive_avg_pool_backward


def _adaptive_max(rank):
    def adaptive_max_pool(x, output_size, return_indices: bool = False, *,
                          device: Device = None):
        return_indices = _params.check_bool("return_indices", return_indices)
        return _adaptive_forward(x, rank, "adaptive_max_pool", output_size,
                                 return_indices, device=device)

    def adaptive_max_pool_backward(grad_output, x, output_size, *, indices=None,
                                   device: Device = None):
        return _adaptive_backward(grad_output, x, rank, "adaptive_max_pool", output_size,
                                  indices, device=device)
    return adaptive_max_pool, adaptive_max_pool_backward


def _adaptive_stochastic(rank):
    def adaptive_stochastic_pool(x, output_size, return_indices: bool = False, *,
                                 training: bool = True, seed: Optional[int] = None,
                                 device: Device = None):
        # One seed for the whole array, drawn now (as the in-memory call draws it).
        training, return_indices, seed = _params.stochastic_forward_flags(
            training, return_indices, seed)
        return _adaptive_forward(x, rank, "adaptive_stochastic_pool", output_size,
                                 return_indices, training, seed, device)

    def adaptive_stochastic_pool_backward(grad_output, x, output_size, *,
                                          training: bool = True, indices=None,
                                          device: Device = None):
        training = _stochastic_training(training, indices,
                                        f"adaptive_stochastic_pool{rank}d")
        return _adaptive_backward(grad_output, x, rank, "adaptive_stochastic_pool",
                                  output_size, indices, training=training, device=device)
    return adaptive_stochastic_pool, adaptive_stochastic_pool_backward


# ----------------------------------------------------------------------------- transposed, unpool

_SCATTERS = "its outputs are scattered from every input cell"


def _conv_transpose_run(x, weight, bias=None, *, rank, args, plane, device):
    with _planned(plane):
        return fastpool.transposed.__dict__[f"conv_transpose{rank}d"](
            x, weight, bias, *args, device=device)


def _conv_transpose_backward_run(grad_output, x, weight, *, rank, args, mask, plane,
                                 device):
    with _planned(plane):
        grads = fastpool.transposed.__dict__[f"conv_transpose{rank}d_backward"](
            grad_output, x, weight, *args, output_mask=mask, device=device)
    return grads.grad_input if mask == (True, False, False) else grads[1:]


def _conv_transpose_folds_run(grad_output, x, weight, plan, *, rank, args, mask, device):
    x, weight, _, window = _params.conv_transpose_window(x, weight, None, rank, *args)
    grad_output = _params.check_grad_output(grad_output, x,
                                            fastpool.transposed._ResultShape(window))
    backend = _dispatch.backend(device, grad_output, x, weight)
    return _reproducible.parameter_folds(
        backend, _reproducible.Roles(x, grad_output, grad_output), window, mask, plan)


def _finish_one(folds, plan, *, which, dtype, device):
    return _reproducible.finish(_dispatch.backend(device, folds), folds, plan[which],
                                np.empty(0, dtype))


def _transposed_reproducible(grad_output, x, weight, window, rank, args, output_mask,
                             device, name):
    """A transposed convolution's ``[grad_weight, grad_bias]`` from folds: per batch
    chunk, summed (exactly), finished once."""
    mask = (False,) + tuple(output_mask[1:])
    roles = _reproducible.Roles(x, grad_output, grad_output)
    plan = da.from_delayed(_reproducible_plan(roles, window, mask, device), (), object)
    run = functools.partial(_conv_transpose_folds_run, rank=rank, args=args, mask=mask,
                            device=device)
    pairs = _dask_graph.per_block([grad_output, x], run, f"{name}-folds", x.chunks,
                                  np.empty((0,) * x.ndim, object), [weight, plan])
    grads = [None, None]
    for i, shape in enumerate((weight.shape, (window.channels,))):
        if output_mask[1 + i]:
            summed = _dask_graph.sum_item(pairs, i, (_reproducible.SUMS,) + shape,
                                          np.empty((0,) * (len(shape) + 1)), f"{name}-sum")
            grads[i] = _dask_graph.one_block(
                summed, functools.partial(_finish_one, which=i, dtype=x.dtype,
                                          device=device),
                f"{name}-{'wb'[i]}", shape, weight._meta, [plan])
    return grads


def _transposed_plane(window):
    """The 2-D window of the whole call's convolution (the one a transposed
    convolution transposes), whose algorithms every batch chunk runs."""
    if window.rank == 3:
        return _conv3d.planes(window)
    return _planar(window)


def _conv_transpose_inputs(x, weight, bias, rank, args):
    x, batched = _as_dask("x", x, rank)
    weight, bias = _one_chunk("weight", weight), _one_chunk("bias", bias)
    _, _, _, window = _params.conv_transpose_window(
        _stand_in(x), _stand_in(weight), None if bias is None else _stand_in(bias), rank,
        *args)
    name = f"conv_transpose{rank}d"
    x = _whole_planes(x, rank, name, _SCATTERS).rechunk({1: -1})
    return x, batched, weight, bias, window


def _conv_transpose(rank):
    def conv_transpose(x, weight, bias=None, stride: Size = 1, padding: Size = 0,
                       output_padding: Size = 0, groups: int = 1, dilation: Size = 1, *,
                       device: Device = None):
        args = (stride, padding, output_padding, groups, dilation)
        x, batched, weight, bias, window = _conv_transpose_inputs(x, weight, bias, rank,
                                                                  args)
        run = functools.partial(_conv_transpose_run, rank=rank, args=args,
                                plane=_transposed_plane(window), device=device)
        chunks = (x.chunks[0], (window.channels,)) + tuple((s,) for s in window.in_size)
        extra = [weight] + ([bias] if bias is not None else [])
        return _unbatch(_dask_graph.per_block([x], run, f"conv_transpose{rank}d", chunks,
                                              x._meta, extra), batched)

    def conv_transpose_backward(grad_output, x, weight, stride: Size = 1,
                                padding: Size = 0, output_padding: Size = 0,
                                groups: int = 1, dilation: Size = 1, *,
                                output_mask: Tuple[bool, bool, bool] = (True, True, True),
                                reproducible: bool = False,
                                device: Device = None) -> Conv2dGrads:
        args = (stride, padding, output_padding, groups, dilation)
        x, batched, weight, _, window = _conv_transpose_inputs(x, weight, None, rank, args)
        output_mask = _params.check_output_mask(output_mask)
        reproducible = _params.check_bool("reproducible", reproducible)
        grad_output = _like_x("grad_output", grad_output, rank, batched)
        expected = (x.shape[0], window.channels) + tuple(window.in_size)
        if grad_output.shape != expected:
            raise ValueError(f"grad_output must have the forward result's shape "
                             f"{expected}, got {grad_output.shape}")
        grad_output = grad_output.rechunk((x.chunks[0],) + tuple(
            (s,) for s in grad_output.shape[1:]))
        name = f"conv_transpose{rank}d_backward"
        grads = [None, None, None]
        if output_mask[0]:
            run = functools.partial(_conv_transpose_backward_run, rank=rank, args=args,
                                    mask=(True, False, False),
                                    plane=_transposed_plane(window), device=device)
            grads[0] = _unbatch(_dask_graph.per_block([grad_output, x], run, name,
                                                      x.chunks, x._meta, [weight]),
                                batched)
        if (output_mask[1] or output_mask[2]) and reproducible:
            grads[1:] = _transposed_reproducible(grad_output, x, weight, window, rank, args,
                                                 output_mask, device, name)
        elif output_mask[1] or output_mask[2]:
            run = functools.partial(_conv_transpose_backward_run, rank=rank, args=args,
                                    mask=(False, True, True), plane=None, device=device)
            pairs = _dask_graph.per_block([grad_output, x], run, f"{name}-parameters",
                                          x.chunks, np.empty((0,) * x.ndim, object),
                                          [weight])
            shapes = (weight.shape, (window.channels,))
            for i in (1, 2):
                if output_mask[i]:
                    grads[i] = _dask_graph.sum_item(pairs, i - 1, shapes[i - 1],
                                                    weight._meta, name)
        return Conv2dGrads(*grads)
    return conv_transpose, conv_transpose_backward


def _unpool_run(*arrays, rank, function, args, device):
    return fastpool.unpooling.__dict__[f"max_unpool{rank}d{function}"](
        *arrays, *args, device=device)


def _max_unpool(rank):
    def inputs(x, indices, kernel_size, stride, padding, output_size):
        x, batched = _as_dask("x", x, rank)
        indices = _like_x("indices", indices, rank, batched)
        _, _, volume = _params.unpool_volume(_stand_in(x), _stand_in(indices), rank,
                                             kernel_size, stride, padding, output_size)
        x = _whole_planes(x, rank, f"max_unpool{rank}d", "indices point anywhere in a plane")
        return x, indices.rechunk(x.chunks), batched, volume

    def max_unpool(x, indices, kernel_size: Size, stride: Optional[Size] = None,
                   padding: Size = 0, output_size=None, *, device: Device = None):
        x, indices, batched, volume = inputs(x, indices, kernel_size, stride, padding,
                                             output_size)
        args = (kernel_size, stride, padding, volume.out_size)
        run = functools.partial(_unpool_run, rank=rank, function="", args=args,
                                device=device)
        chunks = x.chunks[:2] + tuple((s,) for s in volume.out_size)
        return _unbatch(_dask_graph.per_block([x, indices], run, f"max_unpool{rank}d",
                                              chunks, x._meta), batched)

    def max_unpool_backward(grad_output, x, indices, kernel_size: Size,
                            stride: Optional[Size] = None, padding: Size = 0,
                            output_size=None, *, device: Device = None):
        x, indices, batched, volume = inputs(x, indices, kernel_size, stride, padding,
                                             output_size)
        grad_output = _like_x("grad_output", grad_output, rank, batched)
        expected = x.shape[:2] + tuple(volume.out_size)
        if grad_output.shape != expected:
            raise ValueError(f"grad_output must have the forward result's shape "
                             f"{expected}, got {grad_output.shape}")
        grad_output = grad_output.rechunk(x.chunks[:2] + tuple((s,) for s in expected[2:]))
        args = (kernel_size, stride, padding, volume.out_size)
        run = functools.partial(_unpool_run, rank=rank, function="_backward", args=args,
                                device=device)
        return _unbatch(_dask_graph.per_block([grad_output, x, indices], run,
                                              f"max_unpool{rank}d_backward", x.chunks,
                                              x._meta), batched)
    return max_unpool, max_unpool_backward


def _define(namespace):
    for rank in (1, 2, 3):
        for name, factory in (("max_pool", _max_pool), ("avg_pool", _avg_pool),
                              ("stochastic_pool", _stochastic_pool), ("conv", _conv)):
            namespace[f"{name}{rank}d"] = factory(rank)
        for name, factory in (("max_pool", _max_pool_backward),
                              ("avg_pool", _avg_pool_backward),
                              ("stochastic_pool", _stochastic_pool_backward),
                              ("conv", _conv_backward)):
            namespace[f"{name}{rank}d_backward"] = factory(rank)
        for name, factory in (("adaptive_avg_pool", _adaptive_avg),
                              ("adaptive_max_pool", _adaptive_max),
                              ("adaptive_stochastic_pool", _adaptive_stochastic),
                              ("conv_transpose", _conv_transpose),
                              ("max_unpool", _max_unpool)):
            forward, backward = factory(rank)
            namespace[f"{name}{rank}d"] = _public(forward, f"{name}{rank}d")
            namespace[f"{name}{rank}d_backward"] = _public(backward,
                                                           f"{name}{rank}d_backward")


_define(globals())

__all__ = sorted(name for name in globals()
                 if not name.startswith("_") and (name.endswith("d")
                                                  or name.endswith("d_backward")))
