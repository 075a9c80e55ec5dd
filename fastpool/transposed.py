"""Public transposed convolutions (1-D to 3-D): ``torch.nn.functional.conv_transpose
{1,2,3}d``'s arguments and results, and their backwards. Validate once
(``_params.conv_transpose_window``), dispatch once; the kernels are the convolution's
(``fastpool._conv_transpose``)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

from fastpool import _dispatch, _docs, _params, _reproducible, _types
from fastpool._types import ArrayLike, Device, Size
from fastpool.conv import Conv2dGrads, _like_input

_SHAPES = {1: ("(N, C_in, L_in)", "(C_in, C_out / groups, k)", "(N, C_out, L_out)"),
           2: ("(N, C_in, H_in, W_in)", "(C_in, C_out / groups, k_h, k_w)",
               "(N, C_out, H_out, W_out)"),
           3: ("(N, C_in, D_in, H_in, W_in)", "(C_in, C_out / groups, k_d, k_h, k_w)",
               "(N, C_out, D_out, H_out, W_out)")}

_DOC = """{rank}-D transposed convolution ("deconvolution"), as
    ``torch.nn.functional.conv_transpose{rank}d``: the gradient of ``conv{rank}d`` with
    respect to its input, plus a bias. It runs the convolution's input-gradient
    algorithms (no separate col2im path), on either device.

    Parameters
    ----------
    x : array of float16, bfloat16, float32 or float64
        ``{x}`` or unbatched; channels-last strides give channels-last results.
    weight : array
        ``{w}``, ``x``'s dtype (PyTorch's layout for transposed convolutions).
    bias : array, optional
        ``(C_out,)``.
    stride, padding, dilation : int or tuple, defaults 1, 0, 1
        Those of the convolution this transposes: ``padding`` trims that many
        elements from both ends of each axis of the result.
    output_padding : int or tuple, default 0
        Extra size added at the end of each axis; smaller than ``stride`` or
        ``dilation`` (PyTorch's rule).
    groups : int, default 1
    device : {{"cpu", "cuda", "auto"}}, optional

    Returns
    -------
    y : array
        ``{y}`` (or unbatched), each spatial axis
        ``(in - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding
        + 1`` long, ``x``'s dtype.
"""

_BACKWARD_DOC = """Gradients of :func:`conv_transpose{rank}d` with respect to ``x``,
    ``weight`` and the bias, as a ``Conv2dGrads`` named tuple (None where
    ``output_mask`` did not ask): ``grad_x = conv{rank}d(grad_output, weight)``, the
    weight gradient is the convolution's with ``x`` as its output gradient, and the
    bias gradient sums ``grad_output`` over N and space.

    Parameters
    ----------
    grad_output : array
        The forward result's shape and ``x``'s dtype.
    x, weight
        The forward's arrays (``x`` is read only for the weight gradient).
    stride, padding, output_padding, groups, dilation
        The forward's arguments.
    output_mask : three bools, default (True, True, True)
    reproducible : bool, default False
        Weight and bias gradients whose bits do not depend on how their sums are split
        or ordered, as :func:`conv2d_backward`'s.
    device : {{"cpu", "cuda", "auto"}}, optional
"""


def _named(function: _docs.F, name: str, doc: Optional[str], rank: int) -> _docs.F:
    function.__name__ = function.__qualname__ = name
    function.__module__ = "fastpool"
    if function.__doc__ is None and doc is not None:
        x, w, y = _SHAPES[rank]
        function.__doc__ = doc.format(rank=rank, x=x, w=w, y=y)
    return function


def _forward(rank: int) -> _types.ConvTranspose:
    def conv_transpose(x: ArrayLike, weight: ArrayLike,
                       bias: Optional[ArrayLike] = None, stride: Size = 1,
                       padding: Size = 0, output_padding: Size = 0, groups: int = 1,
                       dilation: Size = 1, *, device: Device = None) -> Any:
        x, weight, bias, window = _params.conv_transpose_window(
            x, weight, bias, rank, stride, padding, output_padding, groups, dilation)
        backend = _dispatch.backend(device, x, weight, bias)
        return _like_input(backend.conv_transpose_forward(x, weight, bias, window), x,
                           window)
    return conv_transpose


def _backward(rank: int) -> _types.ConvTransposeBackward:
    def conv_transpose_backward(grad_output: ArrayLike, x: ArrayLike, weight: ArrayLike,
                                stride: Size = 1, padding: Size = 0,
                                output_padding: Size = 0, groups: int = 1,
                                dilation: Size = 1, *,
                                output_mask: Tuple[bool, bool, bool] = (True, True, True),
                                reproducible: bool = False,
                                device: Device = None) -> Conv2dGrads:
        _params.check_backward_geometry(f"conv_transpose{rank}d_backward", stride)
        x, weight, _, window = _params.conv_transpose_window(
            x, weight, None, rank, stride, padding, output_padding, groups, dilation)
        grad_output = _params.check_grad_output(grad_output, x, _ResultShape(window))
        output_mask = _params.check_output_mask(output_mask)
        backend = _dispatch.backend(device, grad_output, x, weight)
        reproducible = _params.check_bool("reproducible", reproducible)
        mask = (output_mask[0], *(m and not reproducible for m in output_mask[1:]))
        grad_x = grad_weight = grad_bias = None
        if any(mask):
            grad_x, grad_weight, grad_bias = backend.conv_transpose_backward(
                grad_output, x, weight, window, mask)
        if reproducible and any(output_mask[1:]):
            # the convolution's weight gradient with x as its output gradient
            grad_weight, grad_bias = _reproducible.parameter_grads(
                backend, _reproducible.Roles(x, grad_output, grad_output), window,
                output_mask)
        return Conv2dGrads(_like_input(grad_x, x, window), grad_weight, grad_bias)
    return conv_transpose_backward


class _ResultShape:
    """What ``check_grad_output`` reads: the forward result's shape, which is the
    transposed convolution's ``Window.input_shape``."""

    def __init__(self, window):
        self.output_shape = window.input_shape


def _docstring(template):
    from fastpool import _docs
    return template if _docs.DOCSTRINGS else None


conv_transpose1d, conv_transpose2d, conv_transpose3d = (
    _named(_forward(r), f"conv_transpose{r}d", _docstring(_DOC), r) for r in (1, 2, 3))
conv_transpose1d_backward, conv_transpose2d_backward, conv_transpose3d_backward = (
    _named(_backward(r), f"conv_transpose{r}d_backward", _docstring(_BACKWARD_DOC), r)
    for r in (1, 2, 3))
