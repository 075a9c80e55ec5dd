"""Public convolution functions: validate once, dispatch once, call one backend kernel.

Argument names and meanings follow ``torch.nn.functional.conv2d``; the semantics are in
docs/design.md section 2 and docs/site/semantics.md (Convolution).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import numpy as np

from fastpool import _dispatch, _docs, _geometry, _params, _reproducible
from fastpool._types import ArrayLike, Device, Padding, Size


class Conv2dGrads(NamedTuple):
    """Gradients of :func:`conv2d`; a field is None when ``output_mask`` did not ask
    for it."""

    grad_input: Optional[Any]
    grad_weight: Optional[Any]
    grad_bias: Optional[Any]


_SHAPE_DOC = """
    Shape
    -----
    - Input: ``(N, C_in, H_in, W_in)`` or ``(C_in, H_in, W_in)``.
    - Weight: ``(C_out, C_in / groups, k_h, k_w)``; bias: ``(C_out,)``.
    - Output: ``(N, C_out, H_out, W_out)`` or ``(C_out, H_out, W_out)``, where

      .. math::
          H_{out} = \\left\\lfloor \\frac{H_{in} + p_{top} + p_{bottom}
                    - d_h (k_h - 1) - 1}{s_h} \\right\\rfloor + 1

      (``W_out`` likewise). An int or pair padding ``p`` puts ``p`` on both sides;
      ``'valid'`` is no padding; ``'same'`` (stride 1 only) pads ``d (k - 1)`` in total,
      ``d (k - 1) // 2`` at the top/left and the rest at the bottom/right, so
      ``H_out = H_in``.
"""


_with_shape_doc = _docs.with_section(_SHAPE_DOC)


@_with_shape_doc
def conv2d(x: ArrayLike, weight: ArrayLike, bias: Optional[ArrayLike] = None,
           stride: Size = 1, padding: Padding = 0, dilation: Size = 1, groups: int = 1,
           *, device: Device = None) -> Any:
    """2-D convolution (cross-correlation, like every framework) with zero padding.

    ``y[n, o, oh, ow] = bias[o] + sum over c, i, j of
    weight[o, c, i, j] * x[n, g*C_in/groups + c, oh*s_h - p_top + i*d_h,
    ow*s_w - p_left + j*d_w]`` with ``g = o // (C_out/groups)``; cells outside the input
    are zero.

    Parameters
    ----------
    x : array of float16, bfloat16, float32 or float64
        Input; any strides (non-contiguous input is copied once). The batch may be
        empty.
    weight : array
        ``(C_out, C_in / groups, k_h, k_w)``, ``x``'s dtype.
    bias : array, optional
        ``(C_out,)``, ``x``'s dtype.
    stride : int or (int, int), default 1
    padding : int, (int, int), 'valid' or 'same', default 0
        Zero padding, see Shape. ``'same'`` requires stride 1.
    dilation : int or (int, int), default 1
        Spacing between kernel taps.
    groups : int, default 1
        Splits the channels into ``groups`` independent convolutions; it must divide
        ``C_in`` and ``C_out``. ``groups == C_in`` is a depthwise convolution.
    device : {"cpu", "cuda", "auto"}, optional
        Overrides ``use_device``/``set_device``/``FASTPOOL_DEVICE`` for this call.

    Returns
    -------
    y : array
        Same dtype as ``x``.

    Notes
    -----
    On the CPU the algorithm is chosen per problem (docs/site/semantics.md, "Convolution"): GEMMs on
    gathered columns for ordinary convolutions, direct loops for depthwise ones.
    Results are identical at any thread count.

    Shape-section
    """
    x, weight, bias, window = _params.conv_window(x, weight, bias, 2, stride, padding,
                                                  dilation, groups)
    backend = _dispatch.backend(device, x, weight, bias)
    y = backend.conv2d_forward(x, weight, bias, window)
    return _like_input(y, x, window)


def _like_input(result, x, window):
    """``result`` in the call's memory format: the CPU kernels compute channels-first,
    so a channels-last call gets one copy (the GPU launchers return results in the
    call's layout already)."""
    if (result is None or not isinstance(result, np.ndarray)
            or window.layout != _geometry.CHANNELS_LAST
            or _params.layout_of(result, window.batched) == _geometry.CHANNELS_LAST):
        return result
    from fastpool.cpu._arrays import channels_last  # host arrays: the CPU's copy
    return channels_last(result, 1 if window.batched else 0)


def _reproducible_backward(launcher, backend, grad_output, x, weight, window, output_mask):
    """The backward with ``fastpool._reproducible``'s weight and bias gradients."""
    grad_input = None
    if output_mask[0]:
        grad_input = launcher(grad_output, x, weight, window, (True, False, False))[0]
    grad_weight, grad_bias = _reproducible.parameter_grads(
        backend, _reproducible.Roles(grad_output, x, grad_output), window, output_mask)
    return Conv2dGrads(_like_input(grad_input, x, window), grad_weight, grad_bias)


@_with_shape_doc
def conv2d_backward(grad_output: ArrayLike, x: ArrayLike, weight: ArrayLike,
                    stride: Size = 1, padding: Padding = 0, dilation: Size = 1,
                    groups: int = 1, *,
                    output_mask: Tuple[bool, bool, bool] = (True, True, True),
                    reproducible: bool = False, device: Device = None) -> Conv2dGrads:
    """Gradients of :func:`conv2d` with respect to ``x``, ``weight`` and the bias.

    Parameters
    ----------
    grad_output : array
        Gradient of the loss with respect to the forward output: its shape and ``x``'s
        dtype.
    x, weight : array
        The forward's inputs (``x`` for its values: the weight gradient needs them).
    stride, padding, dilation, groups
        The forward's arguments.
    output_mask : (bool, bool, bool), default (True, True, True)
        Which of ``(grad_input, grad_weight, grad_bias)`` to compute; the others are
        returned as None and cost nothing.
    reproducible : bool, default False
        Weight and bias gradients whose bits do not depend on how their sums are split
        or ordered: the same from this call, from ``fastpool.dask`` under any chunking,
        at any thread count and on either device. Each product is cut into four
        pieces on power-of-two grids fixed by the whole problem, whose sums are exact in
        any order (docs/site/semantics.md): within 1-2 ulps of the exact sum except
        where the sum is tiny next to ``T * max|x| * max|grad_output|`` (the error
        bound). Slower (about a dozen float64 operations a product, no GEMM), and it
        reads ``max |x|`` and ``max |grad_output|`` first (on the GPU, a wait for
        them). ``grad_input`` is the default one.
    device : {"cpu", "cuda", "auto"}, optional

    Returns
    -------
    Conv2dGrads
        ``(grad_input, grad_weight, grad_bias)``: ``x``'s shape, ``weight``'s shape and
        ``(C_out,)``; ``grad_bias`` is ``grad_output`` summed over N, H and W. Sums run
        in a fixed order, so results are identical at any thread count.

    Shape-section
    """
    _params.check_backward_geometry("conv2d_backward", stride)
    x, weight, _, window = _params.conv_window(x, weight, None, 2, stride, padding,
                                               dilation, groups)
    grad_output = _params.check_grad_output(grad_output, x, window)
    output_mask = _params.check_output_mask(output_mask)
    backend = _dispatch.backend(device, grad_output, x, weight)
    if _params.check_bool("reproducible", reproducible) and any(output_mask[1:]):
        return _reproducible_backward(backend.conv2d_backward, backend, grad_output, x,
                                      weight, window, output_mask)
    grad_input, grad_weight, grad_bias = backend.conv2d_backward(grad_output, x, weight,
                                                                 window, output_mask)
    return Conv2dGrads(_like_input(grad_input, x, window), grad_weight, grad_bias)


# ----------------------------------------------------------------------------- 1-D

def _conv1d_as_2d(x, weight, stride, padding, dilation):
    """Check what is particular to a 1-D convolution, then view it as the 2-D one
    with a height of 1 (the same kernels, no copy of host arrays): ``(x, weight,
    stride, padding, dilation)`` of the 2-D call."""
    info = _params.as_float_array("x", x)
    if info.ndim not in (2, 3):
        raise ValueError(f"x must be 3-D (N, C, L) or 2-D (C, L), got shape {info.shape}")
    info = _params.as_float_array("weight", weight)
    if info.ndim != 3:
        raise ValueError(
            f"weight must be 3-D (C_out, C_in // groups, k), got shape {info.shape}")
    (s,) = _params.ntuple("stride", stride, 1)
    (d,) = _params.ntuple("dilation", dilation, 1)
    if isinstance(padding, str):
        padding2 = padding
    else:
        (p,) = _params.ntuple("padding", padding, 1)
        padding2 = (0, p)
    return (_dispatch.unsqueeze(x, -2), _dispatch.unsqueeze(weight, -2), (1, s), padding2,
            (1, d))


def conv1d(x: ArrayLike, weight: ArrayLike, bias: Optional[ArrayLike] = None,
           stride: Size = 1, padding: Padding = 0, dilation: Size = 1, groups: int = 1,
           *, device: Device = None) -> Any:
    """1-D convolution (cross-correlation) with zero padding, as
    ``torch.nn.functional.conv1d``.

    ``y[n, o, ol] = bias[o] + sum over c, j of weight[o, c, j] *
    x[n, g*C_in/groups + c, ol*s - p_left + j*d]``; cells outside the input are zero.
    It runs the 2-D kernels on the input viewed with a height of 1 (no copy).

    Parameters
    ----------
    x : array of float16, bfloat16, float32 or float64
        ``(N, C_in, L)`` or unbatched ``(C_in, L)``.
    weight : array
        ``(C_out, C_in / groups, k)``, ``x``'s dtype.
    bias : array, optional
        ``(C_out,)``.
    stride, dilation : int or (int,), default 1
    padding : int, (int,), 'valid' or 'same', default 0
        ``'same'`` (stride 1 only) pads ``d (k - 1)`` in all, the odd one on the right.
    groups : int, default 1
    device : {"cpu", "cuda", "auto"}, optional

    Returns
    -------
    y : array
        ``(N, C_out, L_out)`` (or unbatched), ``L_out = floor((L + p_left + p_right -
        d (k - 1) - 1) / s) + 1``, ``x``'s dtype.
    """
    x2, w2, stride2, padding2, dilation2 = _conv1d_as_2d(x, weight, stride, padding,
                                                         dilation)
    return _dispatch.squeeze(conv2d(x2, w2, bias, stride2, padding2, dilation2, groups,
                                    device=device), -2)


def conv1d_backward(grad_output: ArrayLike, x: ArrayLike, weight: ArrayLike,
                    stride: Size = 1, padding: Padding = 0, dilation: Size = 1,
                    groups: int = 1, *,
                    output_mask: Tuple[bool, bool, bool] = (True, True, True),
                    reproducible: bool = False, device: Device = None) -> Conv2dGrads:
    """Gradients of :func:`conv1d` with respect to ``x``, ``weight`` and the bias, as a
    ``Conv2dGrads`` named tuple of ``x``'s, ``weight``'s and ``(C_out,)`` shapes (None
    where ``output_mask`` did not ask). Arguments as for :func:`conv2d_backward`."""
    _params.check_backward_geometry("conv1d_backward", stride)
    x2, w2, stride2, padding2, dilation2 = _conv1d_as_2d(x, weight, stride, padding,
                                                         dilation)
    info = _params.as_float_array("grad_output", grad_output)
    if info.ndim not in (2, 3):
        raise ValueError(
            f"grad_output must be 3-D (N, C_out, L_out) or 2-D, got shape {info.shape}")
    grads = conv2d_backward(_dispatch.unsqueeze(grad_output, -2), x2, w2, stride2,
                            padding2, dilation2, groups, output_mask=output_mask,
                            reproducible=reproducible, device=device)
    return Conv2dGrads(_dispatch.squeeze(grads.grad_input, -2),
                       _dispatch.squeeze(grads.grad_weight, -2), grads.grad_bias)


# ----------------------------------------------------------------------------- 3-D

def conv3d(x: ArrayLike, weight: ArrayLike, bias: Optional[ArrayLike] = None,
           stride: Size = 1, padding: Padding = 0, dilation: Size = 1, groups: int = 1,
           *, device: Device = None) -> Any:
    """3-D convolution (cross-correlation) with zero padding, as
    ``torch.nn.functional.conv3d``.

    ``y[n, o, od, oh, ow] = bias[o] + sum over c, a, i, j of weight[o, c, a, i, j] *
    x[n, g*C_in/groups + c, od*s_d - p_front + a*d_d, oh*s_h - p_top + i*d_h,
    ow*s_w - p_left + j*d_w]``; cells outside the input are zero. It runs as 2-D
    convolutions on the 2-D algorithms (``fastpool._conv3d``): of the depth taps
    stacked as channels, or tap by tap where each group has one channel.

    Parameters
    ----------
    x : array of float16, bfloat16, float32 or float64
        ``(N, C_in, D, H, W)`` or unbatched ``(C_in, D, H, W)``; channels-last strides
        give channels-last results.
    weight : array
        ``(C_out, C_in / groups, k_d, k_h, k_w)``, ``x``'s dtype.
    bias : array, optional
        ``(C_out,)``.
    stride, dilation : int or (int, int, int), default 1
    padding : int, (int, int, int), 'valid' or 'same', default 0
        ``'same'`` (stride 1 only) pads ``d (k - 1)`` per axis, the odd one after.
    groups : int, default 1
    device : {"cpu", "cuda", "auto"}, optional

    Returns
    -------
    y : array
        ``(N, C_out, D_out, H_out, W_out)`` (or unbatched), each axis
        ``floor((in + p_before + p_after - d (k - 1) - 1) / s) + 1``, ``x``'s dtype.
    """
    x, weight, bias, window = _params.conv_window(x, weight, bias, 3, stride, padding,
                                                  dilation, groups)
    backend = _dispatch.backend(device, x, weight, bias)
    return _like_input(backend.conv3d_forward(x, weight, bias, window), x, window)


def conv3d_backward(grad_output: ArrayLike, x: ArrayLike, weight: ArrayLike,
                    stride: Size = 1, padding: Padding = 0, dilation: Size = 1,
                    groups: int = 1, *,
                    output_mask: Tuple[bool, bool, bool] = (True, True, True),
                    reproducible: bool = False, device: Device = None) -> Conv2dGrads:
    """Gradients of :func:`conv3d` with respect to ``x``, ``weight`` and the bias, as a
    ``Conv2dGrads`` named tuple of ``x``'s, ``weight``'s and ``(C_out,)`` shapes (None
    where ``output_mask`` did not ask). Arguments as for :func:`conv2d_backward`."""
    _params.check_backward_geometry("conv3d_backward", stride)
    x, weight, _, window = _params.conv_window(x, weight, None, 3, stride, padding,
                                               dilation, groups)
    grad_output = _params.check_grad_output(grad_output, x, window)
    output_mask = _params.check_output_mask(output_mask)
    backend = _dispatch.backend(device, grad_output, x, weight)
    if _params.check_bool("reproducible", reproducible) and any(output_mask[1:]):
        return _reproducible_backward(backend.conv3d_backward, backend, grad_output, x,
                                      weight, window, output_mask)
    grad_input, grad_weight, grad_bias = backend.conv3d_backward(grad_output, x, weight,
                                                                 window, output_mask)
    return Conv2dGrads(_like_input(grad_input, x, window), grad_weight, grad_bias)
