"""Public pooling functions: validate once, dispatch once, call one backend kernel.

Argument names and meanings follow ``torch.nn.functional``. The exact semantics are in
docs/design.md section 2 and the README's semantics table.
"""

from __future__ import annotations

import numpy as np

from fastpool import _dispatch, _docs, _params

_SHAPE_DOC = """
    Shape
    -----
    - Input: ``(N, C, H_in, W_in)`` or ``(C, H_in, W_in)``.
    - Output: ``(N, C, H_out, W_out)`` or ``(C, H_out, W_out)``, where

      .. math::
          H_{out} = \\left\\lfloor \\frac{H_{in} + 2p_h - d_h (k_h - 1) - 1
                    + (s_h - 1 \\text{ if ceil\\_mode})}{s_h} \\right\\rfloor + 1

      (``W_out`` likewise); with ``ceil_mode`` the last window is dropped when it would
      start at or beyond ``H_in + p_h`` (PyTorch's rule). Average pooling has ``d = 1``.
"""


_with_shape_doc = _docs.with_section(_SHAPE_DOC)


@_with_shape_doc
def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False, *, device=None):
    """2-D max pooling over an ``(N, C, H, W)`` or ``(C, H, W)`` array.

    Parameters
    ----------
    x : array of float32 or float64
        Input; any strides (non-contiguous input is copied once).
    kernel_size : int or (int, int)
        Window size ``k``.
    stride : int or (int, int), optional
        Window step ``s``; ``None`` (default) means ``kernel_size``.
    padding : int or (int, int), default 0
        Implicit ``-inf`` padding ``p`` on both sides; ``0 <= p <= ek // 2`` where
        ``ek = d * (k - 1) + 1``.
    dilation : int or (int, int), default 1
        Spacing ``d`` between window elements.
    ceil_mode : bool, default False
        Use ceil instead of floor for the output size.
    return_indices : bool, default False
        Also return the int64 argmax of each window as flat ``h * W + w`` positions
        inside its ``(n, c)`` plane (PyTorch's convention).
    device : {"cpu", "cuda", "auto"}, optional
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
    x, geometry = _params.pool_geometry(x, kernel_size, stride, padding, dilation,
                                        ceil_mode)
    return_indices = _params.check_bool("return_indices", return_indices)
    backend = _dispatch.backend(device, x)
    y, indices = backend.max_pool2d_forward(x, geometry, return_indices)
    return (y, indices) if return_indices else y


@_with_shape_doc
def max_pool2d_backward(grad_output, x, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode=False, *, indices=None, device=None):
    """Gradient of :func:`max_pool2d` with respect to ``x``.

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
        must lie in ``[0, H * W)`` (``ValueError`` otherwise; nothing is written out of
        bounds).
    device : {"cpu", "cuda", "auto"}, optional

    Returns
    -------
    grad_input : array
        ``x``'s shape and dtype: each window's gradient goes to its argmax; overlapping
        windows add up (in output order, so results are deterministic).

    Shape-section
    """
    x, geometry = _params.pool_geometry(x, kernel_size, stride, padding, dilation,
                                        ceil_mode)
    grad_output = _params.check_grad_output(grad_output, x, geometry)
    if indices is not None:
        indices = _params.check_indices(indices, geometry)
    backend = _dispatch.backend(device, grad_output, x, indices)
    return backend.max_pool2d_backward(grad_output, x, geometry, indices)


def _avg_arguments(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                   divisor_override):
    x, geometry = _params.pool_geometry(x, kernel_size, stride, padding, 1, ceil_mode)
    count_include_pad = _params.check_bool("count_include_pad", count_include_pad)
    divisor = _params.check_divisor_override(divisor_override)
    return x, geometry, count_include_pad, divisor


@_with_shape_doc
def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None, *, device=None):
    """2-D average pooling over an ``(N, C, H, W)`` or ``(C, H, W)`` array.

    Parameters
    ----------
    x : array of float32 or float64
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        ``None`` (default) means ``kernel_size``.
    padding : int or (int, int), default 0
        Zero padding, ``0 <= p <= k // 2``.
    ceil_mode : bool, default False
    count_include_pad : bool, default True
        Divide by the window's area including padding cells (the window is
        ``[h0, min(h0 + k, H + p))`` with ``h0 = oh * s - p``); when False, by the
        number of input cells in it.
    divisor_override : int, optional
        Divide every window's sum by this non-zero int instead.
    device : {"cpu", "cuda", "auto"}, optional

    Returns
    -------
    y : array
        Window averages, same dtype as ``x`` (summed in that dtype, row-major, as
        PyTorch does).

    Shape-section
    """
    x, geometry, count_include_pad, divisor = _avg_arguments(
        x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    backend = _dispatch.backend(device, x)
    return backend.avg_pool2d_forward(x, geometry, count_include_pad, divisor)


@_with_shape_doc
def avg_pool2d_backward(grad_output, x, kernel_size, stride=None, padding=0,
                        ceil_mode=False, count_include_pad=True, divisor_override=None, *,
                        device=None):
    """Gradient of :func:`avg_pool2d` with respect to ``x``.

    Parameters
    ----------
    grad_output : array
        The forward output's shape, ``x``'s dtype.
    x : array
        The forward input (only its shape and dtype are used).
    kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        The forward's arguments.
    device : {"cpu", "cuda", "auto"}, optional

    Returns
    -------
    grad_input : array
        Each window's gradient divided by its divisor, added to every input cell of it.

    Shape-section
    """
    x, geometry, count_include_pad, divisor = _avg_arguments(
        x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    grad_output = _params.check_grad_output(grad_output, x, geometry)
    backend = _dispatch.backend(device, grad_output, x)
    return backend.avg_pool2d_backward(grad_output, geometry, count_include_pad, divisor)


@_with_shape_doc
def stochastic_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                      *, training=True, seed=None, return_indices=False, device=None):
    """2-D stochastic pooling (Zeiler & Fergus, ICLR 2013).

    Parameters
    ----------
    x : array of float32 or float64
        Finite, non-negative activations (e.g. after ReLU). A negative, NaN or infinite
        value inside a window raises ``ValueError`` (detected by the kernel itself).
    kernel_size, stride, padding, dilation, ceil_mode
        As for :func:`max_pool2d`; padding cells have weight 0 and are never chosen.
    training : bool, default True
        True: in each window pick element ``i`` with probability ``a_i / sum(a)`` and
        output it. False: output the probability-weighted average
        ``sum(a_i**2) / sum(a_i)`` (0 when the sum is 0).
    seed : int, numpy.random.Generator or None
        Key of the counter-based generator: window ``(n, c, oh, ow)`` draws
        ``u ~ U[0, 1)`` from ``(seed, n, c, oh, ow)`` alone, so a seed gives the same
        choices at any thread count and on both devices. ``None`` draws a fresh seed
        from the OS; a Generator is advanced by one draw. Pass a different seed each
        training step.
    return_indices : bool, default False
        Training only: also return the int64 flat index ``h * W + w`` of each chosen
        element (needed by :func:`stochastic_pool2d_backward`). A window whose sum is 0
        outputs 0 and records its first element inside the input.
    device : {"cpu", "cuda", "auto"}, optional

    Returns
    -------
    y : array
        Same dtype as ``x``. Sums, the threshold ``u * sum(a)`` and the running sum
        that picks the first element exceeding it are float64, in row-major order.
    indices : int64 array
        Only with ``return_indices=True`` (and ``training=True``).

    Shape-section
    """
    x, geometry = _params.pool_geometry(x, kernel_size, stride, padding, dilation,
                                        ceil_mode)
    training = _params.check_bool("training", training)
    return_indices = _params.check_bool("return_indices", return_indices)
    if return_indices and not training:
        raise ValueError("return_indices=True needs training=True: inference picks nothing")
    seed = _params.resolve_seed(seed)  # validated even when inference ignores it
    backend = _dispatch.backend(device, x)
    y, indices = backend.stochastic_pool2d_forward(x, geometry, training, seed,
                                                   return_indices)
    return (y, indices) if return_indices else y


@_with_shape_doc
def stochastic_pool2d_backward(grad_output, x, kernel_size, stride=None, padding=0,
                               dilation=1, ceil_mode=False, *, training=True, indices=None,
                               device=None):
    """Gradient of :func:`stochastic_pool2d` with respect to ``x``.

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
    device : {"cpu", "cuda", "auto"}, optional

    Returns
    -------
    grad_input : array
        ``x``'s shape and dtype.

    Shape-section
    """
    x, geometry = _params.pool_geometry(x, kernel_size, stride, padding, dilation,
                                        ceil_mode)
    grad_output = _params.check_grad_output(grad_output, x, geometry)
    training = _params.check_bool("training", training)
    if training:
        if indices is None:
            raise ValueError(
                "indices is required when training=True: pass the indices returned by "
                "stochastic_pool2d(..., return_indices=True)")
        indices = _params.check_indices(indices, geometry)
    elif indices is not None:
        raise ValueError("indices must be None when training=False")
    backend = _dispatch.backend(device, grad_output, x, indices)
    return backend.stochastic_pool2d_backward(grad_output, x, geometry, training, indices)
