"""Public adaptive pooling functions for 1, 2 and 3 spatial axes (average and max):
validate once, dispatch once, call one backend launcher.

Arguments and windows follow ``torch.nn.functional.adaptive_{avg,max}_pool{1,2,3}d``:
output ``i`` of an axis pools input positions ``[floor(i * in / out), ceil((i + 1) *
in / out))`` (``fastpool._geometry.adaptive_bounds``). Each function is made for its
rank by one factory per op, as in ``fastpool.pooling``.
"""

from __future__ import annotations

from typing import Any, Optional

from fastpool import _dispatch, _params, _types
from fastpool._types import AdaptiveSize, ArrayLike, Device
from fastpool.pooling import _public

_SHAPE = """
    Shape
    -----
    - Input: ``{shape_in}`` or unbatched ``{shape_in_u}``, in either memory format:
      an input with channels-last strides gives channels-last results.
    - Output: ``{shape_out}`` or ``{shape_out_u}`` with ({axes}) = ``output_size``
      (a ``None`` entry keeps that axis's input size).
"""

_OUTPUT_SIZE = """output_size : int or {tuple}
        Output size per spatial axis; entries may be None (keep the input's size).
        Larger than the input is allowed (windows then overlap)."""

_AVG_DOC = """{rank}-D adaptive average pooling: ``output_size`` windows per axis that
    together cover the input (PyTorch's windows).

    Parameters
    ----------
    x : array of float16, bfloat16, float32 or float64
        Input; any strides (channels-last strides are kept).
    """ + _OUTPUT_SIZE + """
    device : {{"cpu", "cuda", "auto"}}, optional
        Overrides ``use_device``/``set_device``/``FASTPOOL_DEVICE`` for this call.

    Returns
    -------
    y : array
        Window means, same dtype as ``x``: summed in the input's dtype in row-major
        order, divided by the window's size in float64, rounded once. With
        ``output_size=1`` (global average pooling) this is a plain reduction.
""" + _SHAPE

_AVG_BACKWARD_DOC = """Gradient of :func:`{forward}` with respect to ``x``.

    Parameters
    ----------
    grad_output : array
        The forward output's shape and ``x``'s dtype.
    x : array
        The forward input (its shape).
    output_size
        The forward's argument.
    device : {{"cpu", "cuda", "auto"}}, optional

    Returns
    -------
    grad_input : array
        ``x``'s shape, dtype and memory format: each element sums ``grad / window
        size`` of the windows holding it, in output order.
""" + _SHAPE

_MAX_DOC = """{rank}-D adaptive max pooling: ``output_size`` windows per axis that
    together cover the input (PyTorch's windows).

    Parameters
    ----------
    x : array of float16, bfloat16, float32 or float64
        Input; any strides (channels-last strides are kept).
    """ + _OUTPUT_SIZE + """
    return_indices : bool, default False
        Also return the int64 argmax of each window as flat {flat} positions inside
        its ``(n, c)`` volume (PyTorch's convention).
    device : {{"cpu", "cuda", "auto"}}, optional

    Returns
    -------
    y : array
        Window maxima; the first maximum in row-major window order wins ties, and a
        window holding NaN outputs NaN (its index is the first NaN).
    indices : int64 array
        Only with ``return_indices=True``.
""" + _SHAPE

_MAX_BACKWARD_DOC = """Gradient of :func:`{forward}` with respect to ``x``.

    Parameters
    ----------
    grad_output : array
        The forward output's shape and ``x``'s dtype.
    x : array
        The forward input (its shape; its values when ``indices`` is None).
    output_size
        The forward's argument.
    indices : int array, optional
        The forward's ``indices``; recomputed from ``x`` when None. Values outside the
        ``(n, c)`` volume raise ``ValueError`` (on the GPU, so do values outside their
        own window); nothing is written out of bounds.
    device : {{"cpu", "cuda", "auto"}}, optional

    Returns
    -------
    grad_input : array
        ``x``'s shape, dtype and memory format: each window's gradient goes to its
        argmax; overlapping windows add up in output order.
""" + _SHAPE


_STOCHASTIC_DOC = """{rank}-D adaptive stochastic pooling: stochastic pooling's sampling
    (Zeiler & Fergus) inside adaptive pooling's windows, which no framework has.

    Parameters
    ----------
    x : array of float16, bfloat16, float32 or float64
        Finite, non-negative input (e.g. after ReLU); a negative, NaN or infinite value
        in a window raises ``ValueError``, as does, in training, a window whose float64
        sum overflows. Any strides (channels-last kept).
    """ + _OUTPUT_SIZE + """
    training : bool, default True
        True: sample one element per window with probability ``a_i / sum(a)``; False:
        output the probability-weighted average ``sum(a_i**2) / sum(a_i)``.
    seed : int, numpy.random.Generator or None
        As for :func:`stochastic_pool{rank}d`: window ``(n, c, *o)`` draws from the
        counter-based generator keyed by ``(seed, n, c)`` and its output position, so a
        seed gives the same picks at any thread count and on both devices.
    return_indices : bool, default False
        Also return the picks (training only) as flat {flat} positions.
    device : {{"cpu", "cuda", "auto"}}, optional

    Returns
    -------
    y : array
        Same dtype as ``x``. A zero-sum window outputs 0 (its index: its first element).
    indices : int64 array
        Only with ``return_indices=True``.
""" + _SHAPE

_STOCHASTIC_BACKWARD_DOC = """Gradient of :func:`{forward}` with respect to ``x``.

    Parameters
    ----------
    grad_output : array
        The forward output's shape and ``x``'s dtype.
    x : array
        The forward input.
    output_size
        The forward's argument.
    training : bool, default True
        Training: each window's gradient goes to its pick (``indices`` required).
        Inference: the derivative of ``S2 / S1``, ``(2 a_i S1 - S2) / S1**2``.
    indices : int array, optional
        The forward's picks (training only).
    device : {{"cpu", "cuda", "auto"}}, optional

    Returns
    -------
    grad_input : array
        ``x``'s shape, dtype and memory format.
""" + _SHAPE


def _adaptive_stochastic_pool(rank: int) -> _types.AdaptiveStochasticPool:
    def adaptive_stochastic_pool(x: ArrayLike, output_size: AdaptiveSize,
                                 return_indices: bool = False, *, training: bool = True,
                                 seed: Optional[int] = None,
                                 device: Device = None) -> Any:
        x, window = _params.adaptive_window(x, rank, output_size)
        training, return_indices, seed = _params.stochastic_forward_flags(
            training, return_indices, seed)
        y, indices = _dispatch.backend(device, x).adaptive_stochastic_pool_forward(
            x, window, training, seed, return_indices)
        return (y, indices) if return_indices else y
    return _public(adaptive_stochastic_pool, f"adaptive_stochastic_pool{rank}d",
                   _STOCHASTIC_DOC, rank)


def _adaptive_stochastic_pool_backward(rank: int) -> _types.AdaptiveStochasticPoolBackward:
    def adaptive_stochastic_pool_backward(grad_output: ArrayLike, x: ArrayLike,
                                          output_size: AdaptiveSize, *,
                                          training: bool = True,
                                          indices: Optional[ArrayLike] = None,
                                          device: Device = None) -> Any:
        x, window = _params.adaptive_window(x, rank, output_size)
        grad_output = _params.check_grad_output(grad_output, x, window)
        training, indices = _params.stochastic_backward_indices(
            training, indices, window, f"adaptive_stochastic_pool{rank}d")
        backend = _dispatch.backend(device, grad_output, x, indices)
        # Training reads only the indices: x is not copied to the GPU either.
        return backend.adaptive_stochastic_pool_backward(
            grad_output, None if training else x, window, training, indices)
    return _public(adaptive_stochastic_pool_backward,
                   f"adaptive_stochastic_pool{rank}d_backward",
                   _STOCHASTIC_BACKWARD_DOC.replace(
                       "{forward}", f"adaptive_stochastic_pool{rank}d"), rank)


def _adaptive_avg_pool(rank: int) -> _types.AdaptiveAvgPool:
    def adaptive_avg_pool(x: ArrayLike, output_size: AdaptiveSize, *,
                          device: Device = None) -> Any:
        x, window = _params.adaptive_window(x, rank, output_size)
        return _dispatch.backend(device, x).adaptive_avg_pool_forward(x, window)
    return _public(adaptive_avg_pool, f"adaptive_avg_pool{rank}d", _AVG_DOC, rank)


def _adaptive_avg_pool_backward(rank: int) -> _types.AdaptiveAvgPoolBackward:
    def adaptive_avg_pool_backward(grad_output: ArrayLike, x: ArrayLike,
                                   output_size: AdaptiveSize, *,
                                   device: Device = None) -> Any:
        x, window = _params.adaptive_window(x, rank, output_size)
        grad_output = _params.check_grad_output(grad_output, x, window)
        backend = _dispatch.backend(device, grad_output, x)
        return backend.adaptive_avg_pool_backward(grad_output, window)
    return _public(adaptive_avg_pool_backward, f"adaptive_avg_pool{rank}d_backward",
                   _AVG_BACKWARD_DOC.replace("{forward}", f"adaptive_avg_pool{rank}d"),
                   rank)


def _adaptive_max_pool(rank: int) -> _types.AdaptiveMaxPool:
    def adaptive_max_pool(x: ArrayLike, output_size: AdaptiveSize,
                          return_indices: bool = False, *,
                          device: Device = None) -> Any:
        x, window = _params.adaptive_window(x, rank, output_size)
        return_indices = _params.check_bool("return_indices", return_indices)
        y, indices = _dispatch.backend(device, x).adaptive_max_pool_forward(
            x, window, return_indices)
        return (y, indices) if return_indices else y
    return _public(adaptive_max_pool, f"adaptive_max_pool{rank}d", _MAX_DOC, rank)


def _adaptive_max_pool_backward(rank: int) -> _types.AdaptiveMaxPoolBackward:
    def adaptive_max_pool_backward(grad_output: ArrayLike, x: ArrayLike,
                                   output_size: AdaptiveSize, *,
                                   indices: Optional[ArrayLike] = None,
                                   device: Device = None) -> Any:
        x, window = _params.adaptive_window(x, rank, output_size)
        grad_output = _params.check_grad_output(grad_output, x, window)
        if indices is not None:
            indices = _params.check_indices(indices, window)
        backend = _dispatch.backend(device, grad_output, x, indices)
        # Given the indices, x is not read: not copied to the GPU either.
        return backend.adaptive_max_pool_backward(
            grad_output, x if indices is None else None, window, indices)
    return _public(adaptive_max_pool_backward, f"adaptive_max_pool{rank}d_backward",
                   _MAX_BACKWARD_DOC.replace("{forward}", f"adaptive_max_pool{rank}d"),
                   rank)


adaptive_avg_pool1d, adaptive_avg_pool2d, adaptive_avg_pool3d = (
    _adaptive_avg_pool(r) for r in (1, 2, 3))
adaptive_avg_pool1d_backward, adaptive_avg_pool2d_backward, adaptive_avg_pool3d_backward = (
    _adaptive_avg_pool_backward(r) for r in (1, 2, 3))
adaptive_max_pool1d, adaptive_max_pool2d, adaptive_max_pool3d = (
    _adaptive_max_pool(r) for r in (1, 2, 3))
adaptive_max_pool1d_backward, adaptive_max_pool2d_backward, adaptive_max_pool3d_backward = (
    _adaptive_max_pool_backward(r) for r in (1, 2, 3))
adaptive_stochastic_pool1d, adaptive_stochastic_pool2d, adaptive_stochastic_pool3d = (
    _adaptive_stochastic_pool(r) for r in (1, 2, 3))
(adaptive_stochastic_pool1d_backward, adaptive_stochastic_pool2d_backward,
 adaptive_stochastic_pool3d_backward) = (_adaptive_stochastic_pool_backward(r)
                                         for r in (1, 2, 3))
