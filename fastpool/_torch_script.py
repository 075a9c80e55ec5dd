"""TorchScript twins of ``fastpool.torch``'s modules, for ``torch.jit.script``.

The modules' own forwards normalise PyTorch's many argument forms in Python, which
TorchScript cannot compile. ``torch.jit.script(module)`` first asks a module for
``__prepare_scriptable__()``; fastpool's modules answer with one of these twins: the
same parameters (shared, not copied), the arguments normalised once into the lists the
operators take, and a forward that calls ``torch.ops.fastpool.*`` directly, so the
scripted graph holds the custom operators, their autograd included, and can be saved
and loaded wherever ``fastpool.torch`` is imported (docs/design.md section 1).

PyTorch's protocol also puts the twins in place of the modules inside the module
being scripted (they compute the same results in eager mode too).

What a scripted module does not do: seeds come from PyTorch's default generator (a
module's ``generator`` is not scriptable), ``ConvTranspose*d.forward`` takes no
``output_size``, and autocast casts are not applied (TorchScript has no autocast
state to read); the eager modules have all three.
"""

from typing import List, Optional, Tuple

import torch
from torch.nn import functional as F

from fastpool import _params


def _ints(value, rank):
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = tuple(value) * rank
    return list(_params.ntuple("size", value, rank))


class _Stochastic(torch.nn.Module):
    """The seed of a stochastic call, as the eager modules draw it: from PyTorch's
    default generator in training, none in inference (which samples nothing)."""

    def __init__(self, module):
        super().__init__()
        self.return_indices = bool(getattr(module, "return_indices", False))
        self.train(module.training)

    def seed(self) -> torch.Tensor:
        if not self.training:
            if self.return_indices:
                raise ValueError("return_indices=True needs training=True: inference "
                                 "samples nothing")
            return torch.zeros([1], dtype=torch.int64)
        return torch.randint(-9223372036854775807 - 1, 9223372036854775807, [1],
                             dtype=torch.int64)


# ----------------------------------------------------------------------------- conv

class ScriptedConv(torch.nn.Module):
    """``Conv*d`` and ``ConvTranspose*d`` (``transposed``)."""

    bias: Optional[torch.Tensor]

    def __init__(self, module, rank, transposed):
        super().__init__()
        self.weight = module.weight
        self.bias = module.bias
        self.rank = rank
        self.transposed = transposed
        self.stride = _ints(module.stride, rank)
        self.dilation = _ints(module.dilation, rank)
        self.groups = int(module.groups)
        self.padding_mode = module.padding_mode
        self.pad: List[int] = [int(p) for p in getattr(
            module, "_reversed_padding_repeated_twice", [])]
        padding = module.padding
        # 'same' with another padding mode: F.pad above already pads (as the eager
        # module does), and the convolution itself pads nothing.
        self.same = padding == "same" and self.padding_mode == "zeros"
        if isinstance(padding, str) or self.padding_mode != "zeros":
            padding = 0
        self.padding = _ints(padding, rank)
        self.output_padding = _ints(getattr(module, "output_padding", 0), rank)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self.pad, mode=self.padding_mode)
        w, b = self.weight, self.bias
        if self.transposed:
            if self.rank == 1:
                return torch.ops.fastpool.conv_transpose1d(
                    input, w, b, self.stride, self.padding, self.output_padding,
                    self.groups, self.dilation)
            if self.rank == 2:
                return torch.ops.fastpool.conv_transpose2d(
                    input, w, b, self.stride, self.padding, self.output_padding,
                    self.groups, self.dilation)
            return torch.ops.fastpool.conv_transpose3d(
                input, w, b, self.stride, self.padding, self.output_padding, self.groups,
                self.dilation)
        if self.rank == 1:
            return torch.ops.fastpool.conv1d(input, w, b, self.stride, self.padding,
                                             self.dilation, self.groups, self.same)
        if self.rank == 2:
            return torch.ops.fastpool.conv2d(input, w, b, self.stride, self.padding,
                                             self.dilation, self.groups, self.same)
        return torch.ops.fastpool.conv3d(input, w, b, self.stride, self.padding,
                                         self.dilation, self.groups, self.same)


# ----------------------------------------------------------------------------- window pools

class _Pool(_Stochastic):
    def __init__(self, module, rank, kind):
        super().__init__(module)
        self.rank = rank
        self.kind = kind
        self.kernel_size = _ints(module.kernel_size, rank)
        stride = module.stride
        if stride is None or (isinstance(stride, (tuple, list)) and not stride):
            stride = module.kernel_size
        self.stride = _ints(stride, rank)
        self.padding = _ints(module.padding, rank)
        self.dilation = _ints(getattr(module, "dilation", 1), rank)
        self.ceil_mode = bool(module.ceil_mode)
        self.count_include_pad = bool(getattr(module, "count_include_pad", True))
        self.divisor_override: Optional[int] = getattr(module, "divisor_override", None)

    def pool(self, input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        if self.kind == "avg":
            if self.rank == 1:
                y = torch.ops.fastpool.avg_pool1d(input, k, s, p, self.ceil_mode,
                                                  self.count_include_pad,
                                                  self.divisor_override)
            elif self.rank == 2:
                y = torch.ops.fastpool.avg_pool2d(input, k, s, p, self.ceil_mode,
                                                  self.count_include_pad,
                                                  self.divisor_override)
            else:
                y = torch.ops.fastpool.avg_pool3d(input, k, s, p, self.ceil_mode,
                                                  self.count_include_pad,
                                                  self.divisor_override)
            return y, y
        if self.kind == "max":
            if self.rank == 1:
                return torch.ops.fastpool.max_pool1d(input, k, s, p, d, self.ceil_mode)
            if self.rank == 2:
                return torch.ops.fastpool.max_pool2d(input, k, s, p, d, self.ceil_mode)
            return torch.ops.fastpool.max_pool3d(input, k, s, p, d, self.ceil_mode)
        seed = self.seed()
        if self.rank == 1:
            return torch.ops.fastpool.stochastic_pool1d(input, k, s, p, d, self.ceil_mode,
                                                        self.training, seed)
        if self.rank == 2:
            return torch.ops.fastpool.stochastic_pool2d(input, k, s, p, d, self.ceil_mode,
                                                        self.training, seed)
        return torch.ops.fastpool.stochastic_pool3d(input, k, s, p, d, self.ceil_mode,
                                                    self.training, seed)


class ScriptedPool(_Pool):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.pool(input)[0]


class ScriptedPoolWithIndices(_Pool):
    def forward(self, input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.pool(input)


def window_pool(module, rank, kind):
    indices = getattr(module, "return_indices", False)
    return (ScriptedPoolWithIndices if indices else ScriptedPool)(module, rank, kind)


# ----------------------------------------------------------------------------- adaptive

class _Adaptive(_Stochastic):
    def __init__(self, module, rank, kind):
        super().__init__(module)
        from fastpool._torch_adaptive import _output_size
        self.rank = rank
        self.kind = kind
        self.output_size = _output_size(None, module.output_size, rank)  # -1: keep

    def pool(self, input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        size = self.output_size
        if self.kind == "avg":
            if self.rank == 1:
                y = torch.ops.fastpool.adaptive_avg_pool1d(input, size)
            elif self.rank == 2:
                y = torch.ops.fastpool.adaptive_avg_pool2d(input, size)
            else:
                y = torch.ops.fastpool.adaptive_avg_pool3d(input, size)
            return y, y
        if self.kind == "max":
            if self.rank == 1:
                return torch.ops.fastpool.adaptive_max_pool1d(input, size)
            if self.rank == 2:
                return torch.ops.fastpool.adaptive_max_pool2d(input, size)
            return torch.ops.fastpool.adaptive_max_pool3d(input, size)
        seed = self.seed()
        if self.rank == 1:
            return torch.ops.fastpool.adaptive_stochastic_pool1d(input, size,
                                                                 self.training, seed)
        if self.rank == 2:
            return torch.ops.fastpool.adaptive_stochastic_pool2d(input, size,
                                                                 self.training, seed)
        return torch.ops.fastpool.adaptive_stochastic_pool3d(input, size, self.training,
                                                             seed)


class ScriptedAdaptive(_Adaptive):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.pool(input)[0]


class ScriptedAdaptiveWithIndices(_Adaptive):
    def forward(self, input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.pool(input)


def adaptive_pool(module, rank, kind):
    indices = getattr(module, "return_indices", False)
    return (ScriptedAdaptiveWithIndices if indices else ScriptedAdaptive)(module, rank,
                                                                          kind)


# ----------------------------------------------------------------------------- unpool

class ScriptedUnpool(torch.nn.Module):
    def __init__(self, module, rank):
        super().__init__()
        self.rank = rank
        self.kernel_size = _ints(module.kernel_size, rank)
        stride = module.stride if module.stride is not None else module.kernel_size
        self.stride = _ints(stride, rank)
        self.padding = _ints(module.padding, rank)

    def forward(self, input: torch.Tensor, indices: torch.Tensor,
                output_size: Optional[List[int]] = None) -> torch.Tensor:
        size: Optional[List[int]] = None
        if output_size is not None:
            size = output_size[len(output_size) - self.rank:]
        k, s, p = self.kernel_size, self.stride, self.padding
        if self.rank == 1:
            return torch.ops.fastpool.max_unpool1d(input, indices, k, s, p, size)
        if self.rank == 2:
            return torch.ops.fastpool.max_unpool2d(input, indices, k, s, p, size)
        return torch.ops.fastpool.max_unpool3d(input, indices, k, s, p, size)

