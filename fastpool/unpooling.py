"""Public max unpooling for 1, 2 and 3 spatial axes (``torch.nn.functional.max_unpool
{1,2,3}d``'s arguments): validate once, dispatch once, call one backend launcher."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from fastpool import _dispatch, _params, _types
from fastpool._types import ArrayLike, Device, Size
from fastpool.pooling import _public

_SHAPE = """
    Shape
    -----
    - Input and ``indices``: ``{shape_in}`` or unbatched ``{shape_in_u}``, in either
      memory format (channels-last strides give channels-last results).
    - Output: ``{shape_out}`` or ``{shape_out_u}``; per spatial axis by default
      ``out = (in - 1) * stride - 2 * padding + kernel_size``, or ``output_size``.
"""

_DOC = """Partial inverse of :func:`max_pool{rank}d`: every input value goes to the
    position its index names, zeros elsewhere.

    Parameters
    ----------
    x : array of float16, bfloat16, float32 or float64
        The pooled values.
    indices : int array
        ``x``'s shape: flat {flat} positions inside each ``(n, c)`` volume of the
        output, as :func:`max_pool{rank}d` returns them. Values outside the volume
        raise ``ValueError``; nothing is written out of bounds. Where several inputs
        name the same position, the last one in row-major order wins (on both
        devices).
    kernel_size, stride, padding : int or {tuple}
        The pooling's arguments (``stride=None`` means ``kernel_size``); they give the
        default output size.
    output_size : sequence of ints, optional
        The output's spatial size (a whole shape is accepted; its last entries are
        used); each must lie strictly within ``stride`` of the default, as in PyTorch.
    device : {{"cpu", "cuda", "auto"}}, optional

    Returns
    -------
    y : array
        ``x``'s dtype, zeros except at the indexed positions.
""" + _SHAPE

_BACKWARD_DOC = """Gradient of :func:`max_unpool{rank}d` with respect to ``x``:
    ``grad_x = grad_y.flat[indices]`` per ``(n, c)`` volume.

    Parameters
    ----------
    grad_output : array
        The forward output's shape and ``x``'s dtype.
    x : array
        The forward input (its shape and dtype).
    indices, kernel_size, stride, padding, output_size
        The forward's arguments.
    device : {{"cpu", "cuda", "auto"}}, optional

    Returns
    -------
    grad_input : array
        ``x``'s shape, dtype and memory format.
""" + _SHAPE


def _max_unpool(rank: int) -> _types.MaxUnpool:
    def max_unpool(x: ArrayLike, indices: ArrayLike, kernel_size: Size,
                   stride: Optional[Size] = None, padding: Size = 0,
                   output_size: Optional[Sequence[int]] = None, *,
                   device: Device = None) -> Any:
        x, indices, volume = _params.unpool_volume(x, indices, rank, kernel_size, stride,
                                                   padding, output_size)
        return _dispatch.backend(device, x, indices).max_unpool_forward(x, indices, volume)
    return _public(max_unpool, f"max_unpool{rank}d", _DOC, rank)


def _max_unpool_backward(rank: int) -> _types.MaxUnpoolBackward:
    def max_unpool_backward(grad_output: ArrayLike, x: ArrayLike, indices: ArrayLike,
                            kernel_size: Size, stride: Optional[Size] = None,
                            padding: Size = 0,
                            output_size: Optional[Sequence[int]] = None, *,
                            device: Device = None) -> Any:
        x, indices, volume = _params.unpool_volume(x, indices, rank, kernel_size, stride,
                                                   padding, output_size)
        grad_output = _params.check_grad_output(grad_output, x, volume)
        backend = _dispatch.backend(device, grad_output, x, indices)
        return backend.max_unpool_backward(grad_output, indices, volume)
    return _public(max_unpool_backward, f"max_unpool{rank}d_backward", _BACKWARD_DOC,
                   rank)


max_unpool1d, max_unpool2d, max_unpool3d = (_max_unpool(r) for r in (1, 2, 3))
max_unpool1d_backward, max_unpool2d_backward, max_unpool3d_backward = (
    _max_unpool_backward(r) for r in (1, 2, 3))
