"""Adaptive pooling for ``fastpool.torch``: the functional drop-ins
for ``torch.nn.functional.adaptive_{avg,max}_pool{1,2,3}d`` and the
``AdaptiveAvgPool*d``/``AdaptiveMaxPool*d`` modules (PyTorch's classes with fastpool's
forward). ``fastpool.torch`` re-exports every public name here."""

from typing import Any, Optional

import torch

from fastpool import _params
from fastpool._types import AdaptiveSize
from fastpool._torch_ops_pool import CALLS as OPS
from fastpool.torch import _check_tensor, _draw_seed, _seed_tensor


def _output_size(input, output_size, rank):
    """``output_size`` as the operators take it: one int per spatial axis, ``-1`` for
    a ``None`` entry (keep that axis; the operator reads the size off its input, so no
    size computed from a traced shape crosses into it); torch.Size and lists are
    sequences; an int means every axis."""
    if isinstance(output_size, (tuple, list, torch.Size)):
        if len(output_size) != rank:
            raise ValueError(
                f"output_size must be an int or {rank} sizes (entries may be None), got "
                f"{output_size!r}")
        given = [None if o is None else _params.ntuple("output_size", o, 1)[0]
                 for o in output_size]
    else:
        given = list(_params.ntuple("output_size", output_size, rank))
    if any(o is not None and o < 1 for o in given):
        raise ValueError(f"output_size must be in [1, 2**31) per axis, got {output_size!r}")
    return [-1 if o is None else o for o in given]


def _adaptive_stochastic(rank, input, output_size, return_indices, training, generator,
                         seed):
    _check_tensor("input", input)
    training = _params.check_bool("training", training)
    return_indices = _params.check_bool("return_indices", return_indices)
    _params.check_seed(seed)
    if return_indices and not training:
        raise ValueError("return_indices=True needs training=True: inference samples nothing")
    if training and seed is None:
        seed = _draw_seed(generator)  # a tensor
    seed = _seed_tensor(seed) if isinstance(seed, int) else seed
    y, picks = OPS[f"adaptive_stochastic_pool{rank}d"](
        input, _output_size(input, output_size, rank), training,
        seed if training else _seed_tensor(0))
    return (y, picks) if return_indices else y


def adaptive_stochastic_pool1d(input: torch.Tensor, output_size: AdaptiveSize,
                               return_indices: bool = False, *, training: bool = True,
                               generator: Optional[torch.Generator] = None,
                               seed: Optional[int] = None) -> Any:
    """Adaptive stochastic pooling (:func:`fastpool.adaptive_stochastic_pool1d`) with
    autograd; seeds as for :func:`stochastic_pool2d`."""
    return _adaptive_stochastic(1, input, output_size, return_indices, training, generator,
                                seed)


def adaptive_stochastic_pool2d(input: torch.Tensor, output_size: AdaptiveSize,
                               return_indices: bool = False, *, training: bool = True,
                               generator: Optional[torch.Generator] = None,
                               seed: Optional[int] = None) -> Any:
    """Adaptive stochastic pooling (:func:`fastpool.adaptive_stochastic_pool2d`) with
    autograd; seeds as for :func:`stochastic_pool2d`."""
    return _adaptive_stochastic(2, input, output_size, return_indices, training, generator,
                                seed)


def adaptive_stochastic_pool3d(input: torch.Tensor, output_size: AdaptiveSize,
                               return_indices: bool = False, *, training: bool = True,
                               generator: Optional[torch.Generator] = None,
                               seed: Optional[int] = None) -> Any:
    """Adaptive stochastic pooling (:func:`fastpool.adaptive_stochastic_pool3d`) with
    autograd; seeds as for :func:`stochastic_pool2d`."""
    return _adaptive_stochastic(3, input, output_size, return_indices, training, generator,
                                seed)


def _adaptive_avg(rank, input, output_size):
    _check_tensor("input", input)
    return OPS[f"adaptive_avg_pool{rank}d"](input, _output_size(input, output_size, rank))


def _adaptive_max(rank, input, output_size, return_indices):
    _check_tensor("input", input)
    return_indices = _params.check_bool("return_indices", return_indices)
    y, indices = OPS[f"adaptive_max_pool{rank}d"](input,
                                                  _output_size(input, output_size, rank))
    return (y, indices) if return_indices else y


def adaptive_avg_pool1d(input: torch.Tensor, output_size: AdaptiveSize) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.adaptive_avg_pool1d`` (fastpool kernels,
    :func:`fastpool.adaptive_avg_pool1d`; autograd; channels-last kept)."""
    return _adaptive_avg(1, input, output_size)


def adaptive_avg_pool2d(input: torch.Tensor, output_size: AdaptiveSize) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.adaptive_avg_pool2d`` (fastpool kernels,
    :func:`fastpool.adaptive_avg_pool2d`; autograd; channels-last kept)."""
    return _adaptive_avg(2, input, output_size)


def adaptive_avg_pool3d(input: torch.Tensor, output_size: AdaptiveSize) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.adaptive_avg_pool3d`` (fastpool kernels,
    :func:`fastpool.adaptive_avg_pool3d`; autograd; channels-last kept)."""
    return _adaptive_avg(3, input, output_size)


def adaptive_max_pool1d(input: torch.Tensor, output_size: AdaptiveSize,
                        return_indices: bool = False) -> Any:
    """Drop-in for ``torch.nn.functional.adaptive_max_pool1d`` (fastpool kernels,
    :func:`fastpool.adaptive_max_pool1d`); indices are int64 and non-differentiable."""
    return _adaptive_max(1, input, output_size, return_indices)


def adaptive_max_pool2d(input: torch.Tensor, output_size: AdaptiveSize,
                        return_indices: bool = False) -> Any:
    """Drop-in for ``torch.nn.functional.adaptive_max_pool2d`` (fastpool kernels,
    :func:`fastpool.adaptive_max_pool2d`); indices are int64 and non-differentiable."""
    return _adaptive_max(2, input, output_size, return_indices)


def adaptive_max_pool3d(input: torch.Tensor, output_size: AdaptiveSize,
                        return_indices: bool = False) -> Any:
    """Drop-in for ``torch.nn.functional.adaptive_max_pool3d`` (fastpool kernels,
    :func:`fastpool.adaptive_max_pool3d`); indices are int64 and non-differentiable."""
    return _adaptive_max(3, input, output_size, return_indices)


class _AdaptiveAvgPoolNd:
    _rank = 2

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _adaptive_avg(self._rank, input, self.output_size)

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` compiles instead (``fastpool._torch_script``)."""
        from fastpool import _torch_script
        return _torch_script.adaptive_pool(self, self._rank, "avg")


class _AdaptiveMaxPoolNd:
    _rank = 2

    def forward(self, input: torch.Tensor) -> Any:
        """Pool ``input``; returns ``(output, indices)`` when ``return_indices``."""
        return _adaptive_max(self._rank, input, self.output_size, self.return_indices)

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` compiles instead (``fastpool._torch_script``)."""
        from fastpool import _torch_script
        return _torch_script.adaptive_pool(self, self._rank, "max")


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

    def __init__(self, output_size: AdaptiveSize, return_indices: bool = False,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.output_size = output_size
        self.return_indices = return_indices
        self.generator = generator

    def forward(self, input: torch.Tensor) -> Any:
        return _adaptive_stochastic(self._rank, input, self.output_size,
                                    self.return_indices, self.training, self.generator,
                                    None)

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` compiles instead (``fastpool._torch_script``)."""
        from fastpool import _torch_script
        return _torch_script.adaptive_pool(self, self._rank, "stochastic")

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
