"""PyTorch integration: autograd functions and ``torch.nn`` modules backed by fastpool.

``import fastpool`` never imports PyTorch; ``import fastpool.torch`` does (it needs it).

Functional API (signatures of ``torch.nn.functional``)::

    conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)
    max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False)
    avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None)
    stochastic_pool2d(input, kernel_size, stride=None, padding=0, dilation=1,
                      ceil_mode=False, return_indices=False, *, training=True,
                      generator=None, seed=None)

The pools also come as ``max_pool1d``/``max_pool3d``, ``avg_pool1d``/``avg_pool3d`` and
``stochastic_pool1d``/``stochastic_pool3d`` with the same arguments.

Modules: :class:`Conv2d`, :class:`MaxPool1d`/:class:`MaxPool2d`/:class:`MaxPool3d`,
:class:`AvgPool1d`/:class:`AvgPool2d`/:class:`AvgPool3d` (subclasses of their
``torch.nn`` namesakes: same parameters, initialisation, attributes, ``repr`` and
``state_dict``; only ``forward`` runs fastpool) and :class:`StochasticPool1d`,
:class:`StochasticPool2d`, :class:`StochasticPool3d`. Channels-last tensors
(``torch.channels_last``, ``torch.channels_last_3d``) go in and come out channels-last,
without copies on the CPU.

Each function runs a PyTorch custom operator, ``torch.ops.fastpool.<name>`` (with a
``<name>_backward`` operator for its gradient): ``torch.compile(fullgraph=True)``,
``torch.export``, ``torch.jit.trace``, ``torch.func.vmap`` and ``torch.func.grad`` see
real operators with fakes, autograd formulas and vmap rules.

Devices
-------
Computation happens where the tensors live, as in PyTorch, whatever
``fastpool.set_device``, ``fastpool.use_device`` or ``FASTPOOL_DEVICE`` say: CPU tensors
run fastpool's CPU kernels (``device="cpu"``), CUDA tensors its GPU kernels
(``device="cuda"``). All tensor arguments of a call must be on one device. Other
devices (MPS, XLA, meta, ...) raise ``ValueError``. CUDA tensors are handed to fastpool
as they are (through ``__cuda_array_interface__``) and results come back as CUDA
tensors without a host round trip; the kernels run on Numba's current CUDA device and
default stream, so keep the tensors on that device (normally ``cuda:0``). Without a
usable GPU, CUDA tensors raise ``fastpool.CudaUnavailableError``.

Memory
------
CPU tensors cross into fastpool without a copy (``tensor.detach().numpy()``, any
strides) and results come back without a copy (``torch.from_numpy``). fastpool itself
makes one contiguous copy of a non-contiguous input (and of expanded, stride-0
gradients such as the ones ``y.sum().backward()`` produces).

Dtypes
------
float32 and float64, and float16 and bfloat16 (computed in float32, rounded once to
the input's dtype); other dtypes raise ``TypeError``. Conv needs ``input``, ``weight``
and ``bias`` of one dtype. Under ``torch.autocast`` each function casts as the PyTorch
op it mirrors.

Autograd
--------
Gradients are available for every input that requires them (conv: ``input``,
``weight``, ``bias``; pools: ``input``), and backward is itself differentiable (double
backward: gradient penalties, Hessian-vector products), except stochastic pooling in
inference. Indices returned by the pools are int64 and non-differentiable.
"""

import functools

from typing import Any, Callable, Optional

import torch

from fastpool import _docs, _params
from fastpool._types import Padding, Size
from fastpool._torch_library import draw_seed as _draw_seed
from fastpool._torch_library import seed_tensor as _seed_tensor
from fastpool._torch_ops_conv import CALLS as _CONV_OPS
from fastpool._torch_ops_pool import CALLS as _POOL_OPS

__all__ = [
    "AdaptiveStochasticPool1d",
    "AdaptiveStochasticPool2d",
    "AdaptiveStochasticPool3d",
    "adaptive_stochastic_pool1d",
    "adaptive_stochastic_pool2d",
    "adaptive_stochastic_pool3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "MaxUnpool1d",
    "MaxUnpool2d",
    "MaxUnpool3d",
    "max_unpool1d",
    "max_unpool2d",
    "max_unpool3d",
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d",
    "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d",
    "AdaptiveMaxPool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "StochasticPool1d",
    "StochasticPool2d",
    "StochasticPool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "conv1d",
    "conv2d",
    "conv3d",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "stochastic_pool1d",
    "stochastic_pool2d",
    "stochastic_pool3d",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- helpers

def _check_tensor(name, tensor):
    """Reject what fastpool's kernels cannot take, with a message naming ``name``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype fastpool supports (torch.float16, "
            f"torch.bfloat16, torch.float32 or torch.float64), got {tensor.dtype}")
    if tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"{name} is on device {tensor.device}; fastpool.torch supports CPU and CUDA "
            f"tensors only")


def _size_arg(value, rank=2):
    """Accept what ``torch.nn.functional`` accepts for a size argument: an int, a
    ``rank``-tuple, or a one-element sequence (meaning every axis)."""
    if isinstance(value, (tuple, list, torch.Size)):
        value = tuple(value)
        if len(value) == 1:
            return value * rank
    return value


def _stride_arg(stride, rank=2):
    """``None`` and an empty sequence both mean ``stride = kernel_size`` in PyTorch."""
    if stride is None or (isinstance(stride, (tuple, list, torch.Size)) and not stride):
        return None
    return _size_arg(stride, rank)


def _ints(name, value, rank):
    """A size argument as the per-axis list of ints fastpool's operators take."""
    return list(_params.ntuple(name, _size_arg(value, rank), rank))


def _window(rank, kernel_size, stride, padding):
    """``(kernel_size, stride, padding)`` as operator arguments; no stride means the
    kernel size."""
    kernel = _ints("kernel_size", kernel_size, rank)
    stride = _stride_arg(stride, rank)
    return kernel, kernel if stride is None else _ints("stride", stride, rank), _ints(
        "padding", padding, rank)


_POOL_SHAPE_DOC = """
    Shape
    -----
    - Input: ``(N, C, H_in, W_in)`` or ``(C, H_in, W_in)``.
    - Output: ``(N, C, H_out, W_out)`` or ``(C, H_out, W_out)``, per spatial axis

      ``out = floor((in + 2p - d*(k-1) - 1 + (s-1 if ceil_mode else 0)) / s) + 1``

      and with ``ceil_mode`` the last window is dropped when it would start at or
      beyond ``in + p`` (PyTorch's rule; see :func:`fastpool.max_pool2d`).{extra}
"""


def _pool_shape_doc(extra: str = "") -> Callable[[_docs.F], _docs.F]:
    return _docs.with_section(_POOL_SHAPE_DOC.format(extra=extra))


# ----------------------------------------------------------------------------- functions

def conv2d(input: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None, stride: Size = 1, padding: Padding = 0,
           dilation: Size = 1, groups: int = 1) -> torch.Tensor:
    """2-D convolution (cross-correlation), a drop-in for ``torch.nn.functional.conv2d``.

    Runs :func:`fastpool.conv2d` forward and :func:`fastpool.conv2d_backward` backward
    (computing only the gradients autograd asks for), on the device the tensors live on.

    Parameters
    ----------
    input : Tensor
        ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``, float16, bfloat16, float32
        or float64 (half precision is computed in float32), on the CPU or a CUDA
        device; any strides.
    weight : Tensor
        ``(C_out, C_in / groups, kH, kW)``, ``input``'s dtype and device.
    bias : Tensor, optional
        ``(C_out,)``, ``input``'s dtype and device.
    stride : int or (int, int), default 1
    padding : int, (int, int), 'valid' or 'same', default 0
        Zero padding. ``'same'`` needs stride 1; it pads ``d*(k-1)`` in total,
        ``d*(k-1) // 2`` at the top/left and the rest at the bottom/right.
    dilation : int or (int, int), default 1
    groups : int, default 1
        Must divide ``C_in`` and ``C_out``.

    Returns
    -------
    Tensor
        The output, ``input``'s dtype and device.

    Raises
    ------
    TypeError
        For non-floating dtypes or mixed dtypes.
    ValueError
        For bad shapes or arguments (from fastpool), tensors on different devices, or
        devices other than CPU and CUDA.

    Notes
    -----
    Backward is differentiable again (double backward).

    Shape
    -----
    - Input: ``(N, C_in, H_in, W_in)`` or ``(C_in, H_in, W_in)``.
    - Output: ``(N, C_out, H_out, W_out)`` or ``(C_out, H_out, W_out)``, per spatial axis
      ``out = floor((in + p_begin + p_end - d*(k-1) - 1) / s) + 1`` (see
      :func:`fastpool.conv2d`).
    """
    return _conv(2, input, weight, bias, stride, padding, dilation, groups)


def _conv(rank, input, weight, bias, stride, padding, dilation, groups):
    _check_tensor("input", input)
    _check_tensor("weight", weight)
    if bias is not None:
        _check_tensor("bias", bias)
    same = isinstance(padding, str) and padding == "same"
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(
                f"padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
        padding = 0
    return _CONV_OPS[f"conv{rank}d"](
        input, weight, bias, _ints("stride", stride, rank), _ints("padding", padding, rank),
        _ints("dilation", dilation, rank), _params.ntuple("groups", groups, 1)[0], same)


def conv3d(input: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None, stride: Size = 1, padding: Padding = 0,
           dilation: Size = 1, groups: int = 1) -> torch.Tensor:
    """3-D convolution, a drop-in for ``torch.nn.functional.conv3d``: the same
    arguments, semantics and autograd as :func:`conv2d` on ``(N, C_in, D, H, W)`` input
    and ``(C_out, C_in / groups, k_d, k_h, k_w)`` weight (a sum of fastpool's 2-D
    convolutions over the depth taps)."""
    return _conv(3, input, weight, bias, stride, padding, dilation, groups)


def conv1d(input: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None, stride: Size = 1, padding: Padding = 0,
           dilation: Size = 1, groups: int = 1) -> torch.Tensor:
    """1-D convolution, a drop-in for ``torch.nn.functional.conv1d``: the same
    arguments, semantics and autograd as :func:`conv2d` on ``(N, C_in, L)`` input and
    ``(C_out, C_in / groups, k)`` weight (fastpool runs it on its 2-D kernels)."""
    return _conv(1, input, weight, bias, stride, padding, dilation, groups)


@_pool_shape_doc()
def max_pool2d(input: torch.Tensor, kernel_size: Size, stride: Optional[Size] = None,
               padding: Size = 0, dilation: Size = 1, ceil_mode: bool = False,
               return_indices: bool = False) -> Any:
    """2-D max pooling, a drop-in for ``torch.nn.functional.max_pool2d``.

    Runs :func:`fastpool.max_pool2d` forward (always recording the argmax) and
    :func:`fastpool.max_pool2d_backward` with those indices backward.

    Parameters
    ----------
    input : Tensor
        ``(N, C, H, W)`` or ``(C, H, W)``, float16, bfloat16, float32 or float64, CPU
        or CUDA; any strides.
    kernel_size : int or (int, int)
        Window size ``k``.
    stride : int or (int, int), optional
        Window step ``s``; None (default) means ``kernel_size``.
    padding : int or (int, int), default 0
        Implicit ``-inf`` padding ``p``, at most half the effective kernel
        ``d*(k-1) + 1``.
    dilation : int or (int, int), default 1
        Spacing ``d`` between window elements.
    ceil_mode : bool, default False
        Use ceil instead of floor for the output size.
    return_indices : bool, default False
        Also return the argmax of each window.

    Returns
    -------
    output : Tensor
        Window maxima, ``input``'s dtype and device. Ties go to the first maximum in
        row-major window order; NaN propagates.
    indices : Tensor
        Only with ``return_indices=True``: int64, non-differentiable, flat positions
        ``h * W + w`` inside each ``(n, c)`` plane (PyTorch's convention).

    Notes
    -----
    Backward is differentiable again (double backward).

    Shape-section
    """
    return _max_pool(2, input, kernel_size, stride, padding, dilation, ceil_mode,
                     return_indices)


@_pool_shape_doc(" Average pooling has ``d = 1``.")
def avg_pool2d(input: torch.Tensor, kernel_size: Size, stride: Optional[Size] = None,
               padding: Size = 0, ceil_mode: bool = False,
               count_include_pad: bool = True,
               divisor_override: Optional[int] = None) -> torch.Tensor:
    """2-D average pooling, a drop-in for ``torch.nn.functional.avg_pool2d``.

    Runs :func:`fastpool.avg_pool2d` forward and :func:`fastpool.avg_pool2d_backward`
    backward.

    Parameters
    ----------
    input : Tensor
        ``(N, C, H, W)`` or ``(C, H, W)``, float16, bfloat16, float32 or float64, CPU
        or CUDA; any strides.
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        None (default) means ``kernel_size``.
    padding : int or (int, int), default 0
        Zero padding, at most ``k // 2``.
    ceil_mode : bool, default False
    count_include_pad : bool, default True
        Divide by the window's area including padding cells; when False by the number
        of input cells in the window.
    divisor_override : int, optional
        Divide every window's sum by this non-zero int instead.

    Returns
    -------
    Tensor
        Window averages, ``input``'s dtype and device (matches PyTorch's divisors
        exactly).

    Notes
    -----
    Backward is differentiable again (double backward).

    Shape-section
    """
    return _avg_pool(2, input, kernel_size, stride, padding, ceil_mode,
                     count_include_pad, divisor_override)


@_pool_shape_doc()
def stochastic_pool2d(input: torch.Tensor, kernel_size: Size,
                      stride: Optional[Size] = None, padding: Size = 0,
                      dilation: Size = 1, ceil_mode: bool = False,
                      return_indices: bool = False, *, training: bool = True,
                      generator: Optional[torch.Generator] = None,
                      seed: Optional[int] = None) -> Any:
    """2-D stochastic pooling (Zeiler & Fergus, ICLR 2013) with autograd.

    Runs :func:`fastpool.stochastic_pool2d` forward and
    :func:`fastpool.stochastic_pool2d_backward` backward.

    Parameters
    ----------
    input : Tensor
        ``(N, C, H, W)`` or ``(C, H, W)``, float16, bfloat16, float32 or float64, CPU
        or CUDA, finite and non-negative (e.g. after ReLU); a negative, NaN or infinite
        value inside a window raises ``ValueError``, as does, in training, a window whose
        float64 sum overflows.
    kernel_size, stride, padding, dilation, ceil_mode
        As for :func:`max_pool2d`; padding cells have weight 0 and are never chosen.
    return_indices : bool, default False
        Also return the sampled element of each window (training only; ``ValueError``
        with ``training=False``).
    training : bool, default True
        True: in each window sample element ``i`` with probability ``a_i / sum(a)``
        and output it; the gradient flows to the sampled element. False: output the
        probability-weighted average ``sum(a_i**2) / sum(a_i)`` (0 when the sum is
        0), deterministic, and differentiate that.
    generator : torch.Generator, optional
        Where the seed is drawn from when ``seed`` is None (one 64-bit draw per call);
        None means PyTorch's default CPU generator, so ``torch.manual_seed(k)`` makes
        runs reproducible. Ignored when ``seed`` is given, and in inference.
    seed : int, optional
        An explicit fastpool seed in ``[0, 2**64)``; it wins over ``generator``. The
        same seed gives the same samples on the CPU and the GPU and at any thread
        count.

    Returns
    -------
    output : Tensor
        ``input``'s dtype and device.
    indices : Tensor
        Only with ``return_indices=True``: int64, non-differentiable, flat positions
        ``h * W + w`` inside each ``(n, c)`` plane.

    Notes
    -----
    Backward is differentiable again (double backward).

    Shape-section
    """
    return _stochastic_pool(2, input, kernel_size, stride, padding, dilation, ceil_mode,
                            return_indices, training, generator, seed)


def _max_pool(rank, input, kernel_size, stride, padding, dilation, ceil_mode,
              return_indices):
    _check_tensor("input", input)
    return_indices = _params.check_bool("return_indices", return_indices)
    y, indices = _POOL_OPS[f"max_pool{rank}d"](
        input, *_window(rank, kernel_size, stride, padding), _ints("dilation", dilation, rank),
        _params.check_bool("ceil_mode", ceil_mode))
    return (y, indices) if return_indices else y


def _avg_pool(rank, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
              divisor_override):
    _check_tensor("input", input)
    if divisor_override is not None:
        divisor_override = _params.check_divisor_override(divisor_override)
    return _POOL_OPS[f"avg_pool{rank}d"](
        input, *_window(rank, kernel_size, stride, padding),
        _params.check_bool("ceil_mode", ceil_mode),
        _params.check_bool("count_include_pad", count_include_pad), divisor_override)


def _stochastic_pool(rank, input, kernel_size, stride, padding, dilation, ceil_mode,
                     return_indices, training, generator, seed):
    _check_tensor("input", input)
    training = _params.check_bool("training", training)
    return_indices = _params.check_bool("return_indices", return_indices)
    _params.check_seed(seed)  # checked in inference too, as fastpool does
    if return_indices and not training:
        raise ValueError(
            "return_indices=True needs training=True: inference samples nothing")
    if not training:
        seed = _seed_tensor(0)  # inference draws nothing; do not advance the generator
    elif seed is None:
        seed = _draw_seed(generator)
    else:
        seed = _seed_tensor(seed)
    y, indices = _POOL_OPS[f"stochastic_pool{rank}d"](
        input, *_window(rank, kernel_size, stride, padding), _ints("dilation", dilation, rank),
        _params.check_bool("ceil_mode", ceil_mode), training, seed)
    if not training:
        return y
    return (y, indices) if return_indices else y


_NOTE_ND = """

    Same arguments, semantics and autograd as the 2-D version (:func:`{name2}`), on
    ``{shape}`` or unbatched inputs; indices are flat positions ``{flat}`` inside each
    ``(n, c)`` volume. Channels-last inputs give channels-last results.
    """


def _nd(function: _docs.F, name2: str, shape: str, flat: str) -> _docs.F:
    if function.__doc__ is not None and _docs.DOCSTRINGS:
        function.__doc__ += _NOTE_ND.format(name2=name2, shape=shape, flat=flat)
    return function


@functools.partial(_nd, name2="max_pool2d", shape="(N, C, L)", flat="l")
def max_pool1d(input: torch.Tensor, kernel_size: Size, stride: Optional[Size] = None,
               padding: Size = 0, dilation: Size = 1, ceil_mode: bool = False,
               return_indices: bool = False) -> Any:
    """1-D max pooling, a drop-in for ``torch.nn.functional.max_pool1d``."""
    return _max_pool(1, input, kernel_size, stride, padding, dilation, ceil_mode,
                     return_indices)


@functools.partial(_nd, name2="max_pool2d", shape="(N, C, D, H, W)",
                   flat="(d * H + h) * W + w")
def max_pool3d(input: torch.Tensor, kernel_size: Size, stride: Optional[Size] = None,
               padding: Size = 0, dilation: Size = 1, ceil_mode: bool = False,
               return_indices: bool = False) -> Any:
    """3-D max pooling, a drop-in for ``torch.nn.functional.max_pool3d``."""
    return _max_pool(3, input, kernel_size, stride, padding, dilation, ceil_mode,
                     return_indices)


@functools.partial(_nd, name2="avg_pool2d", shape="(N, C, L)", flat="l")
def avg_pool1d(input: torch.Tensor, kernel_size: Size, stride: Optional[Size] = None,
               padding: Size = 0, ceil_mode: bool = False,
               count_include_pad: bool = True,
               divisor_override: Optional[int] = None) -> torch.Tensor:
    """1-D average pooling, a drop-in for ``torch.nn.functional.avg_pool1d`` (which
    has no ``divisor_override``; this one does)."""
    return _avg_pool(1, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


@functools.partial(_nd, name2="avg_pool2d", shape="(N, C, D, H, W)",
                   flat="(d * H + h) * W + w")
def avg_pool3d(input: torch.Tensor, kernel_size: Size, stride: Optional[Size] = None,
               padding: Size = 0, ceil_mode: bool = False,
               count_include_pad: bool = True,
               divisor_override: Optional[int] = None) -> torch.Tensor:
    """3-D average pooling, a drop-in for ``torch.nn.functional.avg_pool3d``."""
    return _avg_pool(3, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


@functools.partial(_nd, name2="stochastic_pool2d", shape="(N, C, L)", flat="l")
def stochastic_pool1d(input: torch.Tensor, kernel_size: Size,
                      stride: Optional[Size] = None, padding: Size = 0,
                      dilation: Size = 1, ceil_mode: bool = False,
                      return_indices: bool = False, *, training: bool = True,
                      generator: Optional[torch.Generator] = None,
                      seed: Optional[int] = None) -> Any:
    """1-D stochastic pooling with autograd (no PyTorch counterpart)."""
    return _stochastic_pool(1, input, kernel_size, stride, padding, dilation, ceil_mode,
                            return_indices, training, generator, seed)


@functools.partial(_nd, name2="stochastic_pool2d", shape="(N, C, D, H, W)",
                   flat="(d * H + h) * W + w")
def stochastic_pool3d(input: torch.Tensor, kernel_size: Size,
                      stride: Optional[Size] = None, padding: Size = 0,
                      dilation: Size = 1, ceil_mode: bool = False,
                      return_indices: bool = False, *, training: bool = True,
                      generator: Optional[torch.Generator] = None,
                      seed: Optional[int] = None) -> Any:
    """3-D stochastic pooling with autograd (no PyTorch counterpart)."""
    return _stochastic_pool(3, input, kernel_size, stride, padding, dilation, ceil_mode,
                            return_indices, training, generator, seed)


# ----------------------------------------------------------------------------- modules

class _ConvNd:
    """``forward`` of the ``Conv*d`` modules (mixed into torch's classes):
    ``padding_mode`` other than ``'zeros'`` pads with ``torch.nn.functional.pad``
    first, as PyTorch does."""

    _rank = 2

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Convolve ``input`` with fastpool's kernels."""
        return self._conv_forward(input, self.weight, self.bias)

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` compiles instead (``fastpool._torch_script``)."""
        from fastpool import _torch_script
        return _torch_script.ScriptedConv(self, self._rank, transposed=False)

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            padded = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                             mode=self.padding_mode)
            return _conv(self._rank, padded, weight, bias, self.stride, 0, self.dilation,
                         self.groups)
        return _conv(self._rank, input, weight, bias, self.stride, self.padding,
                     self.dilation, self.groups)


class Conv2d(_ConvNd, torch.nn.Conv2d):
    """``torch.nn.Conv2d`` whose forward runs fastpool's kernels.

    Same constructor, parameters, initialisation, attributes, ``repr`` and
    ``state_dict`` as ``torch.nn.Conv2d`` (it is a subclass; ``load_state_dict``
    works both ways). ``padding_mode`` other than ``'zeros'`` pads with
    ``torch.nn.functional.pad`` first, as PyTorch does. Dtypes and devices fastpool
    cannot serve (anything but float16/bfloat16/float32/float64 on CPU/CUDA) are
    rejected at forward time.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation, groups
        As for ``torch.nn.Conv2d``.
    bias, padding_mode, device, dtype
        As for ``torch.nn.Conv2d``.

    Shape
    -----
    See :func:`conv2d`.
    """

    _rank = 2


class Conv1d(_ConvNd, torch.nn.Conv1d):
    """``torch.nn.Conv1d`` whose forward runs :func:`conv1d` (fastpool kernels); the
    constructor, parameters, initialisation, ``repr`` and ``state_dict`` are
    PyTorch's."""

    _rank = 1


class Conv3d(_ConvNd, torch.nn.Conv3d):
    """``torch.nn.Conv3d`` whose forward runs :func:`conv3d` (fastpool kernels); the
    constructor, parameters, initialisation, ``repr`` and ``state_dict`` are
    PyTorch's."""

    _rank = 3


class _MaxPoolNd:
    """``forward`` of the ``MaxPool*d`` modules (mixed into torch's classes)."""

    _rank = 2

    def forward(self, input: torch.Tensor) -> Any:
        """Pool ``input``; returns ``(output, indices)`` when ``return_indices``."""
        return _max_pool(self._rank, input, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.ceil_mode, self.return_indices)

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` compiles instead (``fastpool._torch_script``)."""
        from fastpool import _torch_script
        return _torch_script.window_pool(self, self._rank, "max")


class MaxPool1d(_MaxPoolNd, torch.nn.MaxPool1d):
    """``torch.nn.MaxPool1d`` whose forward runs :func:`max_pool1d` (fastpool kernels);
    constructor, attributes and ``repr`` are PyTorch's."""

    _rank = 1


class MaxPool2d(_MaxPoolNd, torch.nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` whose forward runs :func:`max_pool2d` (fastpool kernels).

    Parameters
    ----------
    kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False
        As for ``torch.nn.MaxPool2d``.

    Shape
    -----
    See :func:`max_pool2d`.
    """

    _rank = 2


class MaxPool3d(_MaxPoolNd, torch.nn.MaxPool3d):
    """``torch.nn.MaxPool3d`` whose forward runs :func:`max_pool3d` (fastpool kernels);
    constructor, attributes and ``repr`` are PyTorch's."""

    _rank = 3


class _AvgPoolNd:
    """``forward`` of the ``AvgPool*d`` modules (mixed into torch's classes)."""

    _rank = 2

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Average-pool ``input``."""
        return _avg_pool(self._rank, input, self.kernel_size, self.stride, self.padding,
                         self.ceil_mode, self.count_include_pad,
                         getattr(self, "divisor_override", None))

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` compiles instead (``fastpool._torch_script``)."""
        from fastpool import _torch_script
        return _torch_script.window_pool(self, self._rank, "avg")


class AvgPool1d(_AvgPoolNd, torch.nn.AvgPool1d):
    """``torch.nn.AvgPool1d`` whose forward runs :func:`avg_pool1d` (fastpool kernels);
    constructor, attributes and ``repr`` are PyTorch's."""

    _rank = 1


class AvgPool2d(_AvgPoolNd, torch.nn.AvgPool2d):
    """``torch.nn.AvgPool2d`` whose forward runs :func:`avg_pool2d` (fastpool kernels).

    Parameters
    ----------
    kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        As for ``torch.nn.AvgPool2d``.

    Shape
    -----
    See :func:`avg_pool2d`.
    """

    _rank = 2


class AvgPool3d(_AvgPoolNd, torch.nn.AvgPool3d):
    """``torch.nn.AvgPool3d`` whose forward runs :func:`avg_pool3d` (fastpool kernels);
    constructor, attributes and ``repr`` are PyTorch's."""

    _rank = 3


class StochasticPool2d(torch.nn.Module):
    """Stochastic pooling layer (Zeiler & Fergus, ICLR 2013).

    In training mode (``module.train()``, the default) each window outputs one of its
    elements, sampled with probability proportional to its value; in eval mode
    (``module.eval()``) it outputs the probability-weighted average
    ``sum(a_i**2) / sum(a_i)``. Inputs must be non-negative (put it after a ReLU).
    ``StochasticPool1d`` and ``StochasticPool3d`` are the same for 1 and 3 spatial axes.

    Parameters
    ----------
    kernel_size : int or tuple
    stride : int or tuple, optional
        None (default) means ``kernel_size``.
    padding : int or tuple, default 0
        At most half the effective kernel; padding cells are never chosen.
    dilation : int or tuple, default 1
    ceil_mode : bool, default False
    return_indices : bool, default False
        In training mode also return the sampled indices (int64, flat positions per
        ``(n, c)`` volume). In eval mode nothing is sampled and ``ValueError`` is
        raised.
    generator : torch.Generator, optional
        Source of the per-call 64-bit seed; None means PyTorch's default CPU generator,
        so ``torch.manual_seed`` makes training reproducible.

    Shape
    -----
    See :func:`stochastic_pool2d`.
    """

    _rank = 2

    def __init__(self, kernel_size: Size, stride: Optional[Size] = None,
                 padding: Size = 0, dilation: Size = 1, ceil_mode: bool = False,
                 return_indices: bool = False,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding
        self.dilation = dilation
        self.ceil_mode = ceil_mode
        self.return_indices = return_indices
        self.generator = generator

    def forward(self, input: torch.Tensor) -> Any:
        """Sample (training) or weight (eval) each window of ``input``."""
        return _stochastic_pool(self._rank, input, self.kernel_size, self.stride,
                                self.padding, self.dilation, self.ceil_mode,
                                self.return_indices, self.training, self.generator, None)

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` compiles instead (``fastpool._torch_script``)."""
        from fastpool import _torch_script
        return _torch_script.window_pool(self, self._rank, "stochastic")

    def extra_repr(self):
        text = (f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, "
                f"ceil_mode={self.ceil_mode}")
        if self.return_indices:
            text += ", return_indices=True"
        return text


class StochasticPool1d(StochasticPool2d):
    """Stochastic pooling over ``(N, C, L)`` inputs; see :class:`StochasticPool2d`."""

    _rank = 1


class StochasticPool3d(StochasticPool2d):
    """Stochastic pooling over ``(N, C, D, H, W)`` inputs; see
    :class:`StochasticPool2d`."""

    _rank = 3


# Adaptive pooling, unpooling and transposed convolution live in their own modules;
# their names are this module's.
from fastpool._torch_adaptive import (  # noqa: E402  (needs the helpers above)
    AdaptiveStochasticPool1d,
    AdaptiveStochasticPool2d,
    AdaptiveStochasticPool3d,
    adaptive_stochastic_pool1d,
    adaptive_stochastic_pool2d,
    adaptive_stochastic_pool3d,
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AdaptiveAvgPool3d,
    AdaptiveMaxPool1d,
    AdaptiveMaxPool2d,
    AdaptiveMaxPool3d,
    adaptive_avg_pool1d,
    adaptive_avg_pool2d,
    adaptive_avg_pool3d,
    adaptive_max_pool1d,
    adaptive_max_pool2d,
    adaptive_max_pool3d,
)
from fastpool._torch_unpool import (  # noqa: E402
    MaxUnpool1d,
    MaxUnpool2d,
    MaxUnpool3d,
    max_unpool1d,
    max_unpool2d,
    max_unpool3d,
)
from fastpool._torch_transposed import (  # noqa: E402
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    conv_transpose1d,
    conv_transpose2d,
    conv_transpose3d,
)
