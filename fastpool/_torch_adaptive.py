"""Adaptive pooling for ``fastpool.torch``: autograd Functions, the functional drop-ins
for ``torch.nn.functional.adaptive_{avg,max}_pool{1,2,3}d`` and the
``AdaptiveAvgPool*d``/``AdaptiveMaxPool*d`` modules (PyTorch's classes with fastpool's
forward). ``fastpool.torch`` re-exports every public name here."""

import torch

import fastpool as _fp
from fastpool import _params
from fastpool.torch import _check_tensor, _device_for, _draw_seed, _to_array, _to_tensor


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


class _AdaptiveStochasticPoolFunction(torch.autograd.Function):
    """Adaptive stochastic pooling: training returns ``(y, picks)`` and sends each
    window's gradient to its pick; inference returns ``y`` and differentiates it."""

    @staticmethod
    def forward(ctx, input, rank, output_size, training, seed):
        device = _device_for([input])
        ctx.rank, ctx.output_size, ctx.training, ctx.device = (rank, output_size,
                                                               training, device)
        ctx.set_materialize_grads(False)
        forward = _op("stochastic", rank)
        if training:
            y, picks = forward(_to_array(input), output_size, training=True, seed=seed,
                               return_indices=True, device=device)
            y, picks = _to_tensor(y), _to_tensor(picks)
            ctx.mark_non_differentiable(picks)
            ctx.save_for_backward(input, picks)
            return y, picks
        ctx.save_for_backward(input)
        return _to_tensor(forward(_to_array(input), output_size, training=False,
                                  device=device))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, *_grad_picks):
        if grad_output is None:
            return (None,) * 5
        backward = _op("stochastic", ctx.rank, backward=True)
        saved = ctx.saved_tensors
        picks = {"indices": _to_array(saved[1])} if ctx.training else {}
        grad_input = backward(_to_array(grad_output), _to_array(saved[0]), ctx.output_size,
                              training=ctx.training, device=ctx.device, **picks)
        return (_to_tensor(grad_input),) + (None,) * 4


def _adaptive_stochastic(rank, input, output_size, return_indices, training, generator,
                         seed):
    _check_tensor("input", input)
    training = _params.check_bool("training", training)
    return_indices = _params.check_bool("return_indices", return_indices)
    _params.check_seed(seed)
    if return_indices and not training:
        raise ValueError("return_indices=True needs training=True: inference samples nothing")
    if training and seed is None:
        seed = _draw_seed(generator)
    outputs = _AdaptiveStochasticPoolFunction.apply(
        input, rank, _output_size(output_size, rank), training, seed if training else 0)
    if not training:
        return outputs
    return outputs if return_indices else outputs[0]


def adaptive_stochastic_pool1d(input, output_size, return_indices=False, *, training=True,
                               generator=None, seed=None):
    """Adaptive stochastic pooling (:func:`fastpool.adaptive_stochastic_pool1d`) with
    autograd; seeds as for :func:`stochastic_pool2d`."""
    return _adaptive_stochastic(1, input, output_size, return_indices, training, generator,
                                seed)


def adaptive_stochastic_pool2d(input, output_size, return_indices=False, *, training=True,
                               generator=None, seed=None):
    """Adaptive stochastic pooling (:func:`fastpool.adaptive_stochastic_pool2d`) with
    autograd; seeds as for :func:`stochastic_pool2d`."""
    return _adaptive_stochastic(2, input, output_size, return_indices, training, generator,
                                seed)


def adaptive_stochastic_pool3d(input, output_size, return_indices=False, *, training=True,
                               generator=None, seed=None):
    """Adaptive stochastic pooling (:func:`fastpool.adaptive_stochastic_pool3d`) with
    autograd; seeds as for :func:`stochastic_pool2d`."""
    return _adaptive_stochastic(3, input, output_size, return_indices, training, generator,
                                seed)


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


class AdaptiveStochasticPool2d(torch.nn.Module):
    """Adaptive stochastic pooling layer: samples inside adaptive windows in training
    mode, outputs the probability-weighted average in eval mode (as
    :class:`StochasticPool2d`). ``AdaptiveStochasticPool1d``/``3d`` likewise.

    Parameters
    ----------
    output_size : int or tuple (entries may be None)
    return_indices : bool, default False
    generator : torch.Generator, optional
        Source of the per-call seed (None: PyTorch's default generator).
    """

    _rank = 2

    def __init__(self, output_size, return_indices=False, generator=None):
        super().__init__()
        self.output_size = output_size
        self.return_indices = return_indices
        self.generator = generator

    def forward(self, input):
        return _adaptive_stochastic(self._rank, input, self.output_size,
                                    self.return_indices, self.training, self.generator,
                                    None)

    def extra_repr(self):
        return f"output_size={self.output_size}" + (
            ", return_indices=True" if self.return_indices else "")


class AdaptiveStochasticPool1d(AdaptiveStochasticPool2d):
    """Adaptive stochastic pooling over ``(N, C, L)``; see
    :class:`AdaptiveStochasticPool2d`."""

    _rank = 1


class AdaptiveStochasticPool3d(AdaptiveStochasticPool2d):
    """Adaptive stochastic pooling over ``(N, C, D, H, W)``; see
    :class:`AdaptiveStochasticPool2d`."""

    _rank = 3
