"""Public pooling functions for 1, 2 and 3 spatial axes: validate once, dispatch once,
call one backend launcher.

Argument names and meanings follow ``torch.nn.functional``; the exact semantics are in
docs/design.md section 2 and the semantics table in docs/site/semantics.md. Each public function is
made for its rank by one factory per op (``max_pool1d``, ``max_pool2d`` and
``max_pool3d`` are one function, bound to ranks 1, 2 and 3), with its docstring
written for that rank.
"""

from __future__ import annotations

from typing import Any, Optional

from fastpool import _dispatch, _docs, _params, _types
from fastpool._types import ArrayLike, Device, Size

_RANK = {
    1: dict(spatial="L", shape_in="(N, C, L_in)", shape_in_u="(C, L_in)",
            shape_out="(N, C, L_out)", shape_out_u="(C, L_out)", tuple="(int,)",
            flat="``l``", axes="``L_out``", first="L"),
    2: dict(spatial="H, W", shape_in="(N, C, H_in, W_in)", shape_in_u="(C, H_in, W_in)",
            shape_out="(N, C, H_out, W_out)", shape_out_u="(C, H_out, W_out)",
            tuple="(int, int)", flat="``h * W + w``", axes="``H_out``, ``W_out``",
            first="H"),
    3: dict(spatial="D, H, W", shape_in="(N, C, D_in, H_in, W_in)",
            shape_in_u="(C, D_in, H_in, W_in)", shape_out="(N, C, D_out, H_out, W_out)",
            shape_out_u="(C, D_out, H_out, W_out)", tuple="(int, int, int)",
            flat="``(d * H + h) * W + w``", axes="``D_out``, ``H_out``, ``W_out``",
            first="D"),
}

_SHAPE_DOC = """
    Shape
    -----
    - Input: ``{shape_in}`` or unbatched ``{shape_in_u}``, in either memory format:
      an input with channels-last strides gives channels-last results.
    - Output: ``{shape_out}`` or ``{shape_out_u}``; per spatial axis

      .. math::
          out = \\left\\lfloor \\frac{{in + 2p - d (k - 1) - 1
                + (s - 1 \\text{{ if ceil\\_mode}})}}{{s}} \\right\\rfloor + 1

      and with ``ceil_mode`` the last window is dropped when it would start at or
      beyond ``in + p`` (PyTorch's rule). Average pooling has ``d = 1``.
"""


def _public(function: _docs.F, name: str, doc: str, rank: int) -> _docs.F:
    """Bind the generic ``function`` to ``rank`` under its public ``name``."""
    function.__name__ = function.__qualname__ = name
    function.__module__ = "fastpool"
    if _docs.DOCSTRINGS:  # python -OO strips docstrings; so do we
        words = dict(_RANK[rank], rank=rank, name=name)
        function.__doc__ = (doc.replace("    Shape-section\n", _SHAPE_DOC)
                            .format(**words))
    return function


# ----------------------------------------------------------------------------- max

_MAX_DOC = """{rank}-D max pooling over a ``{shape_in}`` or ``{shape_in_u}`` array.

    Parameters
    ----------
    x : array of float16, bfloat16, float32 or float64
        Input; any strides (channels-last strides are kept; other non-contiguous input
        is copied once).
    kernel_size : int or {tuple}
        Window size ``k``.
    stride : int or {tuple}, optional
        Window step ``s``; ``None`` (default) means ``kernel_size``.
    padding : int or {tuple}, default 0
        Implicit ``-inf`` padding ``p`` on both sides; ``0 <= p <= ek // 2`` where
        ``ek = d * (k - 1) + 1``.
    dilation : int or {tuple}, default 1
        Spacing ``d`` between window elements.
    ceil_mode : bool, default False
        Use ceil instead of floor for the output size.
    return_indices : bool, default False
        Also return the int64 argmax of each window as flat {flat} positions inside
        its ``(n, c)`` volume (PyTorch's convention).
    device : {{"cpu", "cuda", "auto"}}, optional
        Overrides ``use_device``/``set_device``/``FASTPOOL_DEVICE`` for this call.

    Returns
    -------
    y : array
        Window maxima, same dtype as ``x``. The first maximum in row-major window order
        wins ties; a window holding NaN outputs NaN and its index is the first NaN.
    indices : int64 array
        Only with ``return_indices=True``.

    Shape-section
    """

_MAX_BACKWARD_DOC = """Gradient of :func:`{forward}` with respect to ``x``.

    Parameters
    ----------
    grad_output : array
        Gradient of the loss with respect to the forward output; the forward output's
        shape and ``x``'s dtype.
    x : array
        The forward input (its shape; its values when ``indices`` is None).
    kernel_size, stride, padding, dilation, ceil_mode
        The forward's arguments.
    indices : int array, optional
        The forward's ``indices``. When None they are recomputed from ``x``. Every value
        must be a flat position inside the ``(n, c)`` volume (``ValueError`` otherwise;
        nothing is written out of bounds).
    device : {{"cpu", "cuda", "auto"}}, optional

    Returns
    -------
    grad_input : array
        ``x``'s shape and dtype: each window's gradient goes to its argmax; overlapping
        windows add up (in output order, so results are deterministic).

    Shape-section
    """


def _max_pool(rank: int) -> _types.MaxPool:
    def max_pool(x: ArrayLike, kernel_size: Size, stride: Optional[Size] = None,
                 padding: Size = 0, dilation: Size = 1, ceil_mode: bool = False,
                 return_indices: bool = False, *, device: Device = None) -> Any:
        x, window = _params.pool_window(x, rank, kernel_size, stride, padding, dilation,
                                        ceil_mode)
        return_indices = _params.check_bool("return_indices", return_indices)
        backend = _dispatch.backend(device, x)
        y, indices = backend.max_pool_forward(x, window, return_indices)
        return (y, indices) if return_indices else y
    return _public(max_pool, f"max_pool{rank}d", _MAX_DOC, rank)


def _max_pool_backward(rank: int) -> _types.MaxPoolBackward:
    def max_pool_backward(grad_output: ArrayLike, x: ArrayLike, kernel_size: Size,
                          stride: Optional[Size] = None, padding: Size = 0,
                          dilation: Size = 1, ceil_mode: bool = False, *,
                          indices: Optional[ArrayLike] = None,
                          device: Device = None) -> Any:
        x, window = _params.pool_window(x, rank, kernel_size, stride, padding, dilation,
                                        ceil_mode)
        grad_output = _params.check_grad_output(grad_output, x, window)
        if indices is not None:
            indices = _params.check_indices(indices, window)
        backend = _dispatch.backend(device, grad_output, x, indices)
        # Given the indices, x is not read: not copied to the GPU either.
        return backend.max_pool_backward(grad_output, x if indices is None else None,
                                         window, indices)
    return _public(max_pool_backward, f"max_pool{rank}d_backward",
                   _MAX_BACKWARD_DOC.replace("{forward}", f"max_pool{rank}d"), rank)


# ----------------------------------------------------------------------------- average

_AVG_DOC = """{rank}-D average pooling over a ``{shape_in}`` or ``{shape_in_u}`` array.

    Parameters
    ----------
    x : array of float16, bfloat16, float32 or float64
    kernel_size : int or {tuple}
    stride : int or {tuple}, optional
        ``None`` (default) means ``kernel_size``.
    padding : int or {tuple}, default 0
        Zero padding, ``0 <= p <= k // 2``.
    ceil_mode : bool, default False
    count_include_pad : bool, default True
        Divide by the window's size including padding cells (per axis the window is
        ``[x0, min(x0 + k, X + p))`` with ``x0 = o * s - p``); when False, by the
        number of input cells in it.
    divisor_override : int, optional
        Divide every window's sum by this non-zero int instead.
    device : {{"cpu", "cuda", "auto"}}, optional

    Returns
    -------
    y : array
        Window averages, same dtype as ``x`` (summed in that dtype, row-major, as
        PyTorch does).

    Shape-section
    """

_AVG_BACKWARD_DOC = """Gradient of :func:`{forward}` with respect to ``x``.

    Parameters
    ----------
    grad_output : array
        The forward output's shape, ``x``'s dtype.
    x : array
        The forward input (only its shape and dtype are used).
    kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        The forward's arguments.
    device : {{"cpu", "cuda", "auto"}}, optional

    Returns
    -------
    grad_input : array
        Each window's gradient divided by its divisor, added to every input cell of it.

    Shape-section
    """


def _avg_arguments(rank, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                   divisor_override):
    x, window = _params.pool_window(x, rank, kernel_size, stride, padding, 1, ceil_mode)
    if count_include_pad is not True and count_include_pad is not False:
        count_include_pad = _params.check_bool("count_include_pad", count_include_pad)
    divisor = (0 if divisor_override is None
               else _params.check_divisor_override(divisor_override))
    return x, window, count_include_pad, divisor


def _avg_pool(rank: int) -> _types.AvgPool:
    def avg_pool(x: ArrayLike, kernel_size: Size, stride: Optional[Size] = None,
                 padding: Size = 0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override: Optional[int] = None,
                 *, device: Device = None) -> Any:
        # _avg_arguments spelt out: a call less on every forward
        x, window = _params.pool_window(x, rank, kernel_size, stride, padding, 1,
                                        ceil_mode)
        if count_include_pad is not True and count_include_pad is not False:
            count_include_pad = _params.check_bool("count_include_pad", count_include_pad)
        divisor = (0 if divisor_override is None
                   else _params.check_divisor_override(divisor_override))
        return _dispatch.backend(device, x).avg_pool_forward(x, window, count_include_pad,
                                                             divisor)
    return _public(avg_pool, f"avg_pool{rank}d", _AVG_DOC, rank)


def _avg_pool_backward(rank: int) -> _types.AvgPoolBackward:
    def avg_pool_backward(grad_output: ArrayLike, x: ArrayLike, kernel_size: Size,
                          stride: Optional[Size] = None, padding: Size = 0,
                          ceil_mode: bool = False, count_include_pad: bool = True,
                          divisor_override: Optional[int] = None, *,
                          device: Device = None) -> Any:
        x, window, count_include_pad, divisor = _avg_arguments(
            rank, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
            divisor_override)
        grad_output = _params.check_grad_output(grad_output, x, window)
        backend = _dispatch.backend(device, grad_output, x)
        return backend.avg_pool_backward(grad_output, window, count_include_pad, divisor)
    return _public(avg_pool_backward, f"avg_pool{rank}d_backward",
                   _AVG_BACKWARD_DOC.replace("{forward}", f"avg_pool{rank}d"), rank)


# ----------------------------------------------------------------------------- stochastic

_STOCHASTIC_DOC = """{rank}-D stochastic pooling (Zeiler & Fergus, ICLR 2013).

    Parameters
    ----------
    x : array of float16, bfloat16, float32 or float64
        Finite, non-negative activations (e.g. after ReLU). A negative, NaN or infinite
        value inside a window raises ``ValueError`` (detected by the kernel itself), as
        does, in training, a window whose float64 sum overflows. Inference is accurate
        for tiny and huge values alike.
    kernel_size, stride, padding, dilation, ceil_mode
        As for :func:`max_pool{rank}d`; padding cells have weight 0 and are never
        chosen.
    training : bool, default True
        True: in each window pick element ``i`` with probability ``a_i / sum(a)`` and
        output it. False: output the probability-weighted average
        ``sum(a_i**2) / sum(a_i)`` (0 when the sum is 0).
    seed : int, numpy.random.Generator or None
        Key of the counter-based generator: a window draws ``u ~ U[0, 1)`` from
        ``(seed, n, c)`` and its output position alone, so a seed gives the same
        choices at any thread count, on both devices and in either memory format
        (2-D windows are keyed by ``(oh, ow)``, 3-D ones by ``(od * H_out + oh, ow)``,
        1-D ones by ``(0, ol)``). ``None`` draws a fresh seed from the OS; a Generator
        is advanced by one draw. Pass a different seed each training step.
    return_indices : bool, default False
        Training only: also return the int64 flat {flat} index of each chosen element
        (needed by :func:`stochastic_pool{rank}d_backward`). A window whose sum is 0
        outputs 0 and records its first element inside the input.
    device : {{"cpu", "cuda", "auto"}}, optional

    Returns
    -------
    y : array
        Same dtype as ``x``. Sums, the threshold ``u * sum(a)`` and the running sum
        that picks the first element exceeding it are float64, in row-major order.
    indices : int64 array
        Only with ``return_indices=True`` (and ``training=True``).

    Shape-section
    """

_STOCHASTIC_BACKWARD_DOC = """Gradient of :func:`{forward}` with respect to ``x``.

    Parameters
    ----------
    grad_output : array
        The forward output's shape, ``x``'s dtype.
    x : array
        The forward input: its shape, and (inference) its values.
    kernel_size, stride, padding, dilation, ceil_mode
        The forward's arguments.
    training : bool, default True
        True: the gradient goes to the element recorded in ``indices`` (required).
        False: ``d y / d a_i = (2 a_i S1 - S2) / S1**2`` with ``S1 = sum(a)``,
        ``S2 = sum(a**2)`` over the window, 0 where ``S1 == 0``.
    indices : int array
        The forward's ``indices`` (``return_indices=True``); required when training.
    device : {{"cpu", "cuda", "auto"}}, optional

    Returns
    -------
    grad_input : array
        ``x``'s shape and dtype.

    Shape-section
    """


def _stochastic_pool(rank: int) -> _types.StochasticPool:
    def stochastic_pool(x: ArrayLike, kernel_size: Size, stride: Optional[Size] = None,
                        padding: Size = 0, dilation: Size = 1, ceil_mode: bool = False,
                        return_indices: bool = False, *, training: bool = True,
                        seed: Optional[int] = None, device: Device = None) -> Any:
        x, window = _params.pool_window(x, rank, kernel_size, stride, padding, dilation,
                                        ceil_mode)
        training, return_indices, seed = _params.stochastic_forward_flags(
            training, return_indices, seed)
        backend = _dispatch.backend(device, x)
        y, indices = backend.stochastic_pool_forward(x, window, training, seed,
                                                     return_indices)
        return (y, indices) if return_indices else y
    return _public(stochastic_pool, f"stochastic_pool{rank}d", _STOCHASTIC_DOC, rank)


def _stochastic_pool_backward(rank: int) -> _types.StochasticPoolBackward:
    def stochastic_pool_backward(grad_output: ArrayLike, x: ArrayLike,
                                 kernel_size: Size, stride: Optional[Size] = None,
                                 padding: Size = 0, dilation: Size = 1,
                                 ceil_mode: bool = False, *, training: bool = True,
                                 indices: Optional[ArrayLike] = None,
                                 device: Device = None) -> Any:
        x, window = _params.pool_window(x, rank, kernel_size, stride, padding, dilation,
                                        ceil_mode)
        grad_output = _params.check_grad_output(grad_output, x, window)
        training, indices = _params.stochastic_backward_indices(
            training, indices, window, f"stochastic_pool{rank}d")
        backend = _dispatch.backend(device, grad_output, x, indices)
        # Training reads only the indices: x is not copied to the GPU either.
        return backend.stochastic_pool_backward(grad_output, None if training else x,
                                                window, training, indices)
    return _public(stochastic_pool_backward, f"stochastic_pool{rank}d_backward",
                   _STOCHASTIC_BACKWARD_DOC.replace("{forward}", f"stochastic_pool{rank}d"),
                   rank)


max_pool1d, max_pool2d, max_pool3d = (_max_pool(r) for r in (1, 2, 3))
max_pool1d_backward, max_pool2d_backward, max_pool3d_backward = (
    _max_pool_backward(r) for r in (1, 2, 3))
avg_pool1d, avg_pool2d, avg_pool3d = (_avg_pool(r) for r in (1, 2, 3))
avg_pool1d_backward, avg_pool2d_backward, avg_pool3d_backward = (
    _avg_pool_backward(r) for r in (1, 2, 3))
stochastic_pool1d, stochastic_pool2d, stochastic_pool3d = (
    _stochastic_pool(r) for r in (1, 2, 3))
stochastic_pool1d_backward, stochastic_pool2d_backward, stochastic_pool3d_backward = (
    _stochastic_pool_backward(r) for r in (1, 2, 3))
