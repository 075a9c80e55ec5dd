"""Max unpooling for ``fastpool.torch``: the functional drop-ins for
``torch.nn.functional.max_unpool{1,2,3}d`` and the ``MaxUnpool*d`` modules (PyTorch's
classes with fastpool's forward). ``fastpool.torch`` re-exports the public names."""

import torch

import fastpool as _fp
from fastpool.torch import (
    _check_tensor,
    _device_for,
    _size_arg,
    _stride_arg,
    _to_array,
    _to_tensor,
)


def _spatial(output_size, rank):
    """PyTorch accepts a whole shape or the spatial sizes; fastpool takes either."""
    if output_size is None:
        return None
    return tuple(int(o) for o in output_size)[-rank:]


class _MaxUnpoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, indices, rank, kernel_size, stride, padding, output_size):
        device = _device_for([input, indices])
        geometry = (kernel_size, stride, padding, output_size)
        y = getattr(_fp, f"max_unpool{rank}d")(_to_array(input), _to_array(indices),
                                              *geometry, device=device)
        ctx.save_for_backward(input, indices)
        ctx.rank, ctx.geometry, ctx.device = rank, geometry, device
        ctx.mark_non_differentiable(indices)
        return _to_tensor(y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        input, indices = ctx.saved_tensors
        grad_input = getattr(_fp, f"max_unpool{ctx.rank}d_backward")(
            _to_array(grad_output), _to_array(input), _to_array(indices), *ctx.geometry,
            device=ctx.device)
        return (_to_tensor(grad_input),) + (None,) * 6


def _max_unpool(rank, input, indices, kernel_size, stride, padding, output_size):
    _check_tensor("input", input)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    return _MaxUnpoolFunction.apply(input, indices, rank, _size_arg(kernel_size, rank),
                                    _stride_arg(stride, rank), _size_arg(padding, rank),
                                    _spatial(output_size, rank))


def max_unpool1d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """Drop-in for ``torch.nn.functional.max_unpool1d`` (:func:`fastpool.max_unpool1d`;
    repeated indices: the last input wins, on every device)."""
    return _max_unpool(1, input, indices, kernel_size, stride, padding, output_size)


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """Drop-in for ``torch.nn.functional.max_unpool2d`` (:func:`fastpool.max_unpool2d`;
    repeated indices: the last input wins, on every device)."""
    return _max_unpool(2, input, indices, kernel_size, stride, padding, output_size)


def max_unpool3d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """Drop-in for ``torch.nn.functional.max_unpool3d`` (:func:`fastpool.max_unpool3d`;
    repeated indices: the last input wins, on every device)."""
    return _max_unpool(3, input, indices, kernel_size, stride, padding, output_size)


class _MaxUnpoolNd:
    _rank = 2

    def forward(self, input, indices, output_size=None):
        return _max_unpool(self._rank, input, indices, self.kernel_size, self.stride,
                           self.padding, output_size)


class MaxUnpool1d(_MaxUnpoolNd, torch.nn.MaxUnpool1d):
    """``torch.nn.MaxUnpool1d`` whose forward runs fastpool's kernels."""

    _rank = 1


class MaxUnpool2d(_MaxUnpoolNd, torch.nn.MaxUnpool2d):
    """``torch.nn.MaxUnpool2d`` whose forward runs fastpool's kernels."""

    _rank = 2


class MaxUnpool3d(_MaxUnpoolNd, torch.nn.MaxUnpool3d):
    """``torch.nn.MaxUnpool3d`` whose forward runs fastpool's kernels."""

    _rank = 3
