"""Adaptive pooling for ``fastpool.torch``: autograd Functions, the functional drop-ins
for ``torch.nn.functional.adaptive_{avg,max}_pool{1,2,3}d`` and the
``AdaptiveAvgPool*d``/``AdaptiveMaxPool*d`` modules (PyTorch's classes with fastpool's
forward). ``fastpool.torch`` re-exports every public name here."""

import torch

import fastpool as _fp
from fastpool import _params
from fastpool.torch import _check_tensor, _device_for, _to_array, _to_tensor


def _op(op, rank, backward=False):
    """``fastpool.adaptive_{op}_pool{rank}d`` (or its ``_backward``)."""
    return getattr(_fp, f"adaptive_{op}_pool{rank}d" + ("_backward" if backward else ""))


def _output_size(output_size, rank):
    """``output_size`` as a hashable value fastpool accepts (torch.Size and lists are
    tuples; entries may be None)."""
    if isinstance(output_size, (tuple, list, torch.Size)):
        return tuple(None if o is None else int(o) for o in output_size)
    return output_size


class _AdaptiveAvgPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rank, output_size):
        device = _device_for([input])
        y = _op("avg", rank)(_to_array(input), output_size, device=device)
        ctx.save_for_backward(input)
        ctx.rank, ctx.output_size, ctx.device = rank, output_size, device
        return _to_tensor(y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        grad_input = _op("avg", ctx.rank, backward=True)(
            _to_array(grad_output), _to_array(input), ctx.output_size, device=ctx.device)
        return _to_tensor(grad_input), None, None


class _AdaptiveMaxPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rank, output_size):
        device = _device_for([input])
        y, indices = _op("max", rank)(_to_array(input), output_size, return_indices=True,
                                      device=device)
        y, indices = _to_tensor(y), _to_tensor(indices)
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, indices)
        ctx.rank, ctx.output_size, ctx.device = rank, output_size, device
        return y, indices

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, _grad_indices):
        if grad_output is None:
            return None, None, None
        input, indices = ctx.saved_tensors
        grad_input = _op("max", ctx.rank, backward=True)(
            _to_array(grad_output), _to_array(input), ctx.output_size,
            indices=_to_array(indices), device=ctx.device)
        return _to_tensor(grad_input), None, None


def _adaptive_avg(rank, input, output_size):
    _check_tensor("input", input)
    return _AdaptiveAvgPoolFunction.apply(input, rank, _output_size(output_size, rank))


def _adaptive_max(rank, input, output_size, return_indices):
    _check_tensor("input", input)
    return_indices = _params.check_bool("return_indices", return_indices)
    y, indices = _AdaptiveMaxPoolFunction.apply(input, rank,
                                                _output_size(output_size, rank))
    return (y, indices) if return_indices else y


def adaptive_avg_pool1d(input, output_size):
    """Drop-in for ``torch.nn.functional.adaptive_avg_pool1d`` (fastpool kernels,
    :func:`fastpool.adaptive_avg_pool1d`; autograd; channels-last kept)."""
    return _adaptive_avg(1, input, output_size)


def adaptive_avg_pool2d(input, output_size):
    """Drop-in for ``torch.nn.functional.adaptive_avg_pool2d`` (fastpool kernels,
    :func:`fastpool.adaptive_avg_pool2d`; autograd; channels-last kept)."""
    return _adaptive_avg(2, input, output_size)


def adaptive_avg_pool3d(input, output_size):
    """Drop-in for ``torch.nn.functional.adaptive_avg_pool3d`` (fastpool kernels,
    :func:`fastpool.adaptive_avg_pool3d`; autograd; channels-last kept)."""
    return _adaptive_avg(3, input, output_size)


def adaptive_max_pool1d(input, output_size, return_indices=False):
    """Drop-in for ``torch.nn.functional.adaptive_max_pool1d`` (fastpool kernels,
    :func:`fastpool.adaptive_max_pool1d`); indices are int64 and non-differentiable."""
    return _adaptive_max(1, input, output_size, return_indices)


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """Drop-in for ``torch.nn.functional.adaptive_max_pool2d`` (fastpool kernels,
    :func:`fastpool.adaptive_max_pool2d`); indices are int64 and non-differentiable."""
    return _adaptive_max(2, input, output_size, return_indices)


def adaptive_max_pool3d(input, output_size, return_indices=False):
    """Drop-in for ``torch.nn.functional.adaptive_max_pool3d`` (fastpool kernels,
    :func:`fastpool.adaptive_max_pool3d`); indices are int64 and non-differentiable."""
    return _adaptive_max(3, input, output_size, return_indices)


class _AdaptiveAvgPoolNd:
    _rank = 2

    def forward(self, input):
        return _adaptive_avg(self._rank, input, self.output_size)


class _AdaptiveMaxPoolNd:
    _rank = 2

    def forward(self, input):
        """Pool ``input``; returns ``(output, indices)`` when ``return_indices``."""
        return _adaptive_max(self._rank, input, self.output_size, self.return_indices)


class AdaptiveAvgPool1d(_AdaptiveAvgPoolNd, torch.nn.AdaptiveAvgPool1d):
    """``torch.nn.AdaptiveAvgPool1d`` whose forward runs fastpool's kernels."""

    _rank = 1


class AdaptiveAvgPool2d(_AdaptiveAvgPoolNd, torch.nn.AdaptiveAvgPool2d):
    """``torch.nn.AdaptiveAvgPool2d`` whose forward runs fastpool's kernels
    (``output_size=1``: global average pooling, a plain reduction)."""

    _rank = 2


class AdaptiveAvgPool3d(_AdaptiveAvgPoolNd, torch.nn.AdaptiveAvgPool3d):
    """``torch.nn.AdaptiveAvgPool3d`` whose forward runs fastpool's kernels."""

    _rank = 3


class AdaptiveMaxPool1d(_AdaptiveMaxPoolNd, torch.nn.AdaptiveMaxPool1d):
    """``torch.nn.AdaptiveMaxPool1d`` whose forward runs fastpool's kernels."""

    _rank = 1


class AdaptiveMaxPool2d(_AdaptiveMaxPoolNd, torch.nn.AdaptiveMaxPool2d):
    """``torch.nn.AdaptiveMaxPool2d`` whose forward runs fastpool's kernels."""

    _rank = 2


class AdaptiveMaxPool3d(_AdaptiveMaxPoolNd, torch.nn.AdaptiveMaxPool3d):
    """``torch.nn.AdaptiveMaxPool3d`` whose forward runs fastpool's kernels."""

    _rank = 3
