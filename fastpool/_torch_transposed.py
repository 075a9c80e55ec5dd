"""Transposed convolutions for ``fastpool.torch``: drop-ins for
``torch.nn.functional.conv_transpose{1,2,3}d`` and ``ConvTranspose*d`` modules
(subclasses of PyTorch's, ``output_size=`` in ``forward`` as theirs).
``fastpool.torch`` re-exports the public names."""

from typing import Optional, Sequence

import torch

from fastpool import _params
from fastpool._types import Size
from fastpool._torch_ops_conv import CALLS as OPS
from fastpool.torch import _check_tensor, _ints


def _conv_transpose(rank, input, weight, bias, stride, padding, output_padding, groups,
                    dilation):
    _check_tensor("input", input)
    _check_tensor("weight", weight)
    if bias is not None:
        _check_tensor("bias", bias)
    return OPS[f"conv_transpose{rank}d"](
        input, weight, bias, _ints("stride", stride, rank), _ints("padding", padding, rank),
        _ints("output_padding", output_padding, rank), _params.ntuple("groups", groups, 1)[0],
        _ints("dilation", dilation, rank))


def conv_transpose1d(input: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, stride: Size = 1,
                     padding: Size = 0, output_padding: Size = 0, groups: int = 1,
                     dilation: Size = 1) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.conv_transpose1d``
    (:func:`fastpool.conv_transpose1d`, with autograd)."""
    return _conv_transpose(1, input, weight, bias, stride, padding, output_padding,
                           groups, dilation)


def conv_transpose2d(input: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, stride: Size = 1,
                     padding: Size = 0, output_padding: Size = 0, groups: int = 1,
                     dilation: Size = 1) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.conv_transpose2d``
    (:func:`fastpool.conv_transpose2d`, with autograd)."""
    return _conv_transpose(2, input, weight, bias, stride, padding, output_padding,
                           groups, dilation)


def conv_transpose3d(input: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, stride: Size = 1,
                     padding: Size = 0, output_padding: Size = 0, groups: int = 1,
                     dilation: Size = 1) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.conv_transpose3d``
    (:func:`fastpool.conv_transpose3d`, with autograd)."""
    return _conv_transpose(3, input, weight, bias, stride, padding, output_padding,
                           groups, dilation)


class _ConvTransposeNd:
    """``forward`` of the ``ConvTranspose*d`` modules (mixed into torch's classes)."""

    _rank = 2

    def forward(self, input: torch.Tensor,
                output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Transposed convolution of ``input``; ``output_size`` picks the
        ``output_padding`` that gives that size, as PyTorch's modules do."""
        if self.padding_mode != "zeros":
            raise ValueError(f"Only `zeros` padding mode is supported for "
                             f"{type(self).__name__}")
        output_padding = self._output_padding(input, output_size, self.stride,
                                              self.padding, self.kernel_size, self._rank,
                                              self.dilation)
        return _conv_transpose(self._rank, input, self.weight, self.bias, self.stride,
                               self.padding, output_padding, self.groups, self.dilation)

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` compiles instead (``fastpool._torch_script``)."""
        from fastpool import _torch_script
        return _torch_script.ScriptedConv(self, self._rank, transposed=True)


class ConvTranspose1d(_ConvTransposeNd, torch.nn.ConvTranspose1d):
    """``torch.nn.ConvTranspose1d`` whose forward runs fastpool's kernels."""

    _rank = 1


class ConvTranspose2d(_ConvTransposeNd, torch.nn.ConvTranspose2d):
    """``torch.nn.ConvTranspose2d`` whose forward runs fastpool's kernels (same
    constructor, parameters, initialisation and ``state_dict``)."""

    _rank = 2


class ConvTranspose3d(_ConvTransposeNd, torch.nn.ConvTranspose3d):
    """``torch.nn.ConvTranspose3d`` whose forward runs fastpool's kernels."""

    _rank = 3
