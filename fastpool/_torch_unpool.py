"""Max unpooling for ``fastpool.torch``: the functional drop-ins for
``torch.nn.functional.max_unpool{1,2,3}d`` and the ``MaxUnpool*d`` modules (PyTorch's
classes with fastpool's forward). ``fastpool.torch`` re-exports the public names."""

from typing import Optional, Sequence

import torch

from fastpool import _params
from fastpool._types import Size
from fastpool._torch_ops_pool import CALLS as OPS
from fastpool.torch import _check_tensor, _window


def _output_size(rank, output_size):
    """The unpooled spatial sizes as the operator takes them: PyTorch accepts a whole
    shape or the spatial sizes; None (the default size, ``(in - 1) * stride - 2 *
    padding + kernel_size``) stays None, so no size computed from the input's shape
    crosses into the operator (a traced graph keeps it symbolic)."""
    if output_size is None:
        return None
    if not isinstance(output_size, (tuple, list, torch.Size)) or len(output_size) not in (
            rank, rank + 1, rank + 2):
        raise ValueError(f"output_size must be a sequence of {rank} spatial sizes "
                         f"(or a whole shape), got {output_size!r}")
    return [_params.ntuple("output_size", o, 1)[0] for o in output_size[-rank:]]


def _max_unpool(rank, input, indices, kernel_size, stride, padding, output_size):
    _check_tensor("input", input)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    kernel, stride, padding = _window(rank, kernel_size, stride, padding)
    return OPS[f"max_unpool{rank}d"](
        input, indices, kernel, stride, padding, _output_size(rank, output_size))


def max_unpool1d(input: torch.Tensor, indices: torch.Tensor, kernel_size: Size,
                 stride: Optional[Size] = None, padding: Size = 0,
                 output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.max_unpool1d`` (:func:`fastpool.max_unpool1d`;
    repeated indices: the last input wins, on every device)."""
    return _max_unpool(1, input, indices, kernel_size, stride, padding, output_size)


def max_unpool2d(input: torch.Tensor, indices: torch.Tensor, kernel_size: Size,
                 stride: Optional[Size] = None, padding: Size = 0,
                 output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.max_unpool2d`` (:func:`fastpool.max_unpool2d`;
    repeated indices: the last input wins, on every device)."""
    return _max_unpool(2, input, indices, kernel_size, stride, padding, output_size)


def max_unpool3d(input: torch.Tensor, indices: torch.Tensor, kernel_size: Size,
                 stride: Optional[Size] = None, padding: Size = 0,
                 output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.max_unpool3d`` (:func:`fastpool.max_unpool3d`;
    repeated indices: the last input wins, on every device)."""
    return _max_unpool(3, input, indices, kernel_size, stride, padding, output_size)


class _MaxUnpoolNd:
    _rank = 2

    def forward(self, input: torch.Tensor, indices: torch.Tensor,
                output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        return _max_unpool(self._rank, input, indices, self.kernel_size, self.stride,
                           self.padding, output_size)

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` compiles instead (``fastpool._torch_script``)."""
        from fastpool import _torch_script
        return _torch_script.ScriptedUnpool(self, self._rank)


class MaxUnpool1d(_MaxUnpoolNd, torch.nn.MaxUnpool1d):
    """``torch.nn.MaxUnpool1d`` whose forward runs fastpool's kernels."""

    _rank = 1


class MaxUnpool2d(_MaxUnpoolNd, torch.nn.MaxUnpool2d):
    """``torch.nn.MaxUnpool2d`` whose forward runs fastpool's kernels."""

    _rank = 2


class MaxUnpool3d(_MaxUnpoolNd, torch.nn.MaxUnpool3d):
    """``torch.nn.MaxUnpool3d`` whose forward runs fastpool's kernels."""

    _rank = 3
