"""Argument normalisation, validation and output-size rules: the one place for them.

Every public function calls into this module before any kernel runs, and both devices
use the geometry it returns, so the rules of docs/design.md sections 2-3 live here only.
Errors name the parameter and the rule it broke.
"""

from __future__ import annotations

import numbers
import operator

import numpy as np

from fastpool import _geometry, _half
from fastpool._dispatch import is_device_array

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INT_LIMIT = 2**62  # sizes and geometry stay far from int64 overflow in index arithmetic


def _as_int(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    value = operator.index(value)
    if abs(value) >= _INT_LIMIT:
        raise ValueError(f"{name} must be smaller than 2**62 in magnitude, got {value}")
    return value


def pair(name, value):
    """Normalise an int or an ``(h, w)`` pair to a tuple of two Python ints."""
    return ntuple(name, value, 2)


_TUPLE_WORDS = {1: "a 1-tuple (l,)", 2: "a pair (h, w)", 3: "a triple (d, h, w)"}


def ntuple(name, value, rank):
    """Normalise an int or a ``rank``-tuple of ints to a tuple of ``rank`` Python ints."""
    if type(value) is int and -_INT_LIMIT < value < _INT_LIMIT:  # the common case, fast
        return (value,) * rank
    if isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(
                f"{name} must be an int or {_TUPLE_WORDS[rank]}, got {value!r}")
        return tuple(_as_int(name, v) for v in value)
    v = _as_int(name, value)
    return (v,) * rank


def as_float_array(name, value):
    """Return ``value`` as a NumPy array of a supported float dtype (no copy if possible)."""
    if type(value) is np.ndarray and value.dtype in SUPPORTED_DTYPES:
        return value  # the common case, without the duck-typing checks below (1 us)
    if getattr(value, "requires_grad", False) is True:
        # Checked before anything reads the data: torch refuses both __array__ and
        # __cuda_array_interface__ for such tensors, with errors that name neither
        # the argument nor the way out.
        raise TypeError(
            f"{name} is a tensor that requires grad; fastpool's functions do not record "
            f"autograd. Use fastpool.torch (autograd Functions) or pass {name}.detach()")
    if is_device_array(value):
        # GPU data stays where it is; only its metadata is validated here.
        array = _DeviceArrayInfo(value)
    else:
        array = np.asarray(value)
        if (array.dtype.kind == "f" and not array.dtype.isnative
                and (array.dtype.newbyteorder("=") in SUPPORTED_DTYPES
                     or array.dtype.newbyteorder("=") == np.float16)):
            # Byte-swapped (e.g. big-endian on a little-endian machine): one copy into
            # native order, as NumPy's own ufuncs would convert it.
            array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype not in SUPPORTED_DTYPES and array.dtype.name not in _half.HALF_NAMES:
        raise TypeError(f"{name} must have dtype float16, bfloat16, float32 or float64, "
                        f"got {array.dtype}")
    return array


class _DeviceArrayInfo:
    """Shape and dtype of a GPU array, read from ``__cuda_array_interface__`` (or from
    a Numba device array itself: the simulator's have no interface)."""

    def __init__(self, value):
        self.array = value
        if getattr(value, "__cuda_ndarray__", False):
            self.shape = tuple(int(s) for s in value.shape)
            self.dtype = np.dtype(value.dtype)
            self.strides = tuple(int(s) for s in value.strides)
        else:
            interface = value.__cuda_array_interface__
            self.shape = tuple(interface["shape"])
            self.dtype = np.dtype(interface["typestr"])
            strides = interface.get("strides")
            self.strides = None if strides is None else tuple(strides)
        self.ndim = len(self.shape)


def _dtype_of(array):
    """NumPy dtype of a host array or of a GPU array."""
    if type(array) is np.ndarray:
        return array.dtype
    if is_device_array(array):
        return _DeviceArrayInfo(array).dtype
    return array.dtype


def _unwrap(array):
    return array.array if isinstance(array, _DeviceArrayInfo) else array


_RANK_SHAPES = {1: "(N, C, L) or 2-D (C, L)", 2: "(N, C, H, W) or 3-D (C, H, W)",
                3: "(N, C, D, H, W) or 4-D (C, D, H, W)"}


def check_pool_input(name, x, rank=2):
    """Validate a pooling input's rank and sizes; return ``(array, batched)``."""
    x = as_float_array(name, x)
    if x.ndim not in (rank + 1, rank + 2):
        raise ValueError(
            f"{name} must be {rank + 2}-D {_RANK_SHAPES[rank]}, got shape {x.shape}")
    if any(s == 0 for s in x.shape[-rank - 1:]):
        raise ValueError(
            f"{name} must have non-zero channel and spatial sizes (only the batch may be "
            f"empty), got shape {x.shape}")
    return x, x.ndim == rank + 2


def layout_of(array, batched):
    """The memory format an input is computed in (``_geometry.memory_format``): from
    its strides, for NumPy arrays and GPU arrays that state theirs."""
    shape, strides = array.shape, array.strides
    if strides is None:
        return _geometry.CHANNELS_FIRST
    if not batched:
        shape = (1,) + tuple(shape)
        strides = (int(np.prod(shape)) * array.dtype.itemsize,) + tuple(strides)
    return _geometry.memory_format(tuple(shape), tuple(strides), array.dtype.itemsize)


def _check_axis_covered(size, out, kernel, stride, padding, dilation):
    """Reject geometries where a dilated window holds padding cells only."""
    if dilation == 1:
        return True  # padding <= ek // 2 already guarantees an input cell per window
    starts = np.arange(out, dtype=np.int64) * stride - padding
    # First tap at or after 0: start + ceil(-start / d) * d for negative starts.
    first = np.where(starts < 0, starts + (-starts + dilation - 1) // dilation * dilation,
                     starts)
    last = starts + dilation * (kernel - 1)
    return bool(np.all((first < size) & (first <= last)))


_MEMO_SIZE = 1024


def _types(value):
    """The type of ``value``, and of its items for a tuple: ``(True, 2) == (1, 2)``, but
    only one of them is valid."""
    return tuple(map(type, value)) if type(value) is tuple else type(value)


def memoised(n_arrays):
    """Decorate a validator ``f(*arrays, *arguments, **keywords)`` returning
    ``(*arrays, geometry)``: a call repeating an earlier one's argument values and
    types, with NumPy arrays of the same shapes, strides and dtypes, returns the
    earlier geometry without validating again (a network calls each layer's geometry
    over and over; validating costs several microseconds). Only calls whose arrays came
    back unchanged (no conversion or copy) are remembered; anything else, GPU arrays
    and unhashable arguments included, is validated in full every time."""
    def decorate(validate):
        memo = {}

        def miss(key, args, keywords, arrays):
            result = validate(*args, **keywords)
            if all(r is a for r, a in zip(result, arrays)):
                if len(memo) >= _MEMO_SIZE:
                    memo.clear()
                memo[key] = result[-1]
            return result

        def run_one(*args, **keywords):  # one array: spelt out (each step counts)
            a = args[0] if args else None
            if type(a) is not np.ndarray:  # not NumPy, or passed by keyword: no memo
                return validate(*args, **keywords)
            rest = args[1:]
            kinds = tuple(map(type, rest))
            if tuple in kinds:
                kinds = tuple(map(_types, rest))
            key = (a.shape, a.strides, a.dtype, rest, kinds,
                   tuple(keywords.items()) if keywords else ())
            try:
                found = memo.get(key)
            except TypeError:  # an unhashable argument (a list): no memo
                return validate(*args, **keywords)
            return (a, found) if found is not None else miss(key, args, keywords, (a,))

        def run(*args, **keywords):
            arrays = args[:n_arrays]
            if len(arrays) < n_arrays:  # an array passed by keyword: no memo
                return validate(*args, **keywords)
            described = []
            for a in arrays:
                if a is None:
                    described.append(None)
                elif type(a) is np.ndarray:
                    described.append((a.shape, a.strides, a.dtype))
                else:
                    return validate(*args, **keywords)
            rest = args[n_arrays:]
            kinds = tuple(map(type, rest))
            if tuple in kinds:
                kinds = tuple(map(_types, rest))
            key = (tuple(described), rest, kinds,
                   tuple(keywords.items()) if keywords else ())
            try:
                found = memo.get(key)
            except TypeError:  # an unhashable argument (a list): no memo
                return validate(*args, **keywords)
            if found is not None:
                return (*arrays, found)
            return miss(key, args, keywords, arrays)

        if n_arrays == 1:
            run = run_one
        run.__wrapped__ = validate
        return run
    return decorate


@memoised(1)
def pool_window(x, rank, kernel_size, stride, padding, dilation, ceil_mode, *,
                x_name="x"):
    """Validate pooling arguments against input ``x`` of spatial rank ``rank``; return
    ``(x, Window)``."""
    x, batched = check_pool_input(x_name, x, rank)
    kernel = ntuple("kernel_size", kernel_size, rank)
    stride = kernel if stride is None else ntuple("stride", stride, rank)
    padding = ntuple("padding", padding, rank)
    dilation = ntuple("dilation", dilation, rank)
    if not isinstance(ceil_mode, (bool, np.bool_)):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    ceil_mode = bool(ceil_mode)
    if min(kernel) < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel}")
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    effective = tuple([d * (k - 1) + 1 for k, d in zip(kernel, dilation)])
    if not all([0 <= p <= e // 2 for p, e in zip(padding, effective)]):
        raise ValueError(
            f"padding must satisfy 0 <= padding <= effective_kernel // 2 per axis "
            f"(effective kernel {effective}), got {padding}")
    in_size = tuple(x.shape[-rank:])
    out_size = tuple([_geometry.output_size(n, k, s, p, p, d, ceil_mode)
                      for n, k, s, p, d in zip(in_size, kernel, stride, padding, dilation)])
    if min(out_size) < 1:
        raise ValueError(
            f"kernel_size {kernel} with dilation {dilation} (effective kernel "
            f"{effective}) is larger than the padded input "
            f"{tuple(n + 2 * p for n, p in zip(in_size, padding))}: output size would be "
            f"{out_size}")
    if max(dilation) > 1 and not all(
            _check_axis_covered(n, o, k, s, p, d) for n, o, k, s, p, d in
            zip(in_size, out_size, kernel, stride, padding, dilation)):
        raise ValueError(
            f"dilation {dilation} with padding {padding} places a window entirely in the "
            f"padding of an input of size {in_size}; every window must cover at least "
            f"one input element")
    channels = int(x.shape[-rank - 1])
    window = _geometry.Window(
        rank=rank, batch=int(x.shape[0]) if batched else 1, channels=channels,
        out_channels=channels, batched=batched, layout=layout_of(x, batched),
        in_size=in_size, out_size=out_size, kernel=kernel, stride=stride, pad_lo=padding,
        pad_hi=padding, dilation=dilation, ceil_mode=ceil_mode)
    return _unwrap(x), window


_ADAPTIVE_LIMIT = 2**31 - 1


@memoised(1)
def adaptive_window(x, rank, output_size, *, x_name="x"):
    """Validate adaptive pooling's arguments against input ``x`` of spatial rank
    ``rank``; return ``(x, AdaptiveWindow)``. ``output_size``: an int, or one int or
    None (keep that axis's size) per spatial axis; sizes >= 1 (larger than the input
    is allowed: windows then overlap, as PyTorch's do)."""
    x, batched = check_pool_input(x_name, x, rank)
    in_size = tuple(int(n) for n in x.shape[-rank:])
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != rank:
            raise ValueError(
                f"output_size must be an int or {_TUPLE_WORDS[rank]} (entries may be "
                f"None), got {output_size!r}")
        out_size = tuple(n if o is None else _as_int("output_size", o)
                         for n, o in zip(in_size, output_size))
    else:
        out_size = (_as_int("output_size", output_size),) * rank
    if min(out_size) < 1 or max(out_size) > _ADAPTIVE_LIMIT:
        raise ValueError(f"output_size must be in [1, 2**31) per axis, got {output_size!r}")
    channels = int(x.shape[-rank - 1])
    window = _geometry.AdaptiveWindow(
        rank=rank, batch=int(x.shape[0]) if batched else 1, channels=channels,
        out_channels=channels, batched=batched, layout=layout_of(x, batched),
        in_size=in_size, out_size=out_size)
    return _unwrap(x), window


def check_grad_output(grad_output, x, geometry):
    """Validate ``grad_output`` of a pooling backward against the forward geometry."""
    grad_output = as_float_array("grad_output", grad_output)
    if grad_output.shape != geometry.output_shape:
        raise ValueError(
            f"grad_output must have the forward output's shape {geometry.output_shape} "
            f"(what x's shape and the window arguments give), got {grad_output.shape}")
    if grad_output.dtype != _dtype_of(x):
        raise TypeError(
            f"grad_output dtype {grad_output.dtype} must match x dtype {_dtype_of(x)}")
    return _unwrap(grad_output)


def check_indices(indices, geometry):
    """Validate the ``indices`` of a forward pass; values are range-checked in the kernel."""
    return check_index_array(
        indices, geometry.output_shape,
        "the forward output's shape {shape} (what x's shape and the window arguments give)")


def check_index_array(indices, shape, what="shape {shape}"):
    """``indices`` as an int64 array of ``shape`` (GPU arrays as they are: their values
    are range-checked in the kernels)."""
    if is_device_array(indices):
        indices = _DeviceArrayInfo(indices)
    else:
        indices = np.asarray(indices)
    if indices.dtype.kind not in "iu" or indices.dtype == np.bool_:
        raise TypeError(f"indices must be an integer array (int64), got {indices.dtype}")
    if indices.shape != tuple(shape):
        raise ValueError(f"indices must have {what.format(shape=tuple(shape))}, got "
                         f"{indices.shape}")
    if isinstance(indices, _DeviceArrayInfo):
        return indices.array
    return indices.astype(np.int64, copy=False)


def unpool_volume(x, indices, rank, kernel_size, stride, padding, output_size):
    """Validate max unpooling's arguments (``torch.nn.functional.max_unpool{rank}d``'s);
    return ``(x, indices, Volume)``: ``in_size`` is ``x``'s, ``out_size`` the
    unpooled one, by default ``(in - 1) * stride - 2 * padding + kernel_size``."""
    x, batched = check_pool_input("x", x, rank)
    indices = check_index_array(indices, x.shape, "x's shape {shape}")
    kernel = ntuple("kernel_size", kernel_size, rank)
    stride = kernel if stride is None else ntuple("stride", stride, rank)
    padding = ntuple("padding", padding, rank)
    if min(kernel) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"kernel_size and stride must be >= 1 and padding >= 0, got "
                         f"{kernel}, {stride}, {padding}")
    in_size = tuple(int(n) for n in x.shape[-rank:])
    default = tuple((n - 1) * s - 2 * p + k
                    for n, k, s, p in zip(in_size, kernel, stride, padding))
    if output_size is None:
        out_size = default
    else:
        if not isinstance(output_size, (tuple, list)) or len(output_size) not in (
                rank, rank + 1, rank + 2):
            raise ValueError(f"output_size must be a sequence of {rank} spatial sizes "
                             f"(or a whole shape), got {output_size!r}")
        out_size = tuple(_as_int("output_size", o) for o in output_size[-rank:])
        lo = tuple(d - s for d, s in zip(default, stride))
        hi = tuple(d + s for d, s in zip(default, stride))
        if not all(a < o < b for a, o, b in zip(lo, out_size, hi)):
            raise ValueError(
                f"output_size {out_size} must lie strictly between {lo} and {hi} (the "
                f"default {default} -/+ stride), as in PyTorch")
    if min(out_size) < 1:
        raise ValueError(f"the unpooled size {out_size} must be >= 1 per axis")
    channels = int(x.shape[-rank - 1])
    volume = _geometry.Volume(
        rank=rank, batch=int(x.shape[0]) if batched else 1, channels=channels,
        out_channels=channels, batched=batched, layout=layout_of(x, batched),
        in_size=in_size, out_size=out_size)
    return _unwrap(x), indices, volume


def stochastic_forward_flags(training, return_indices, seed):
    """Validate a stochastic pooling forward's flags; return ``(training,
    return_indices, seed)`` with the seed resolved (validated even when inference
    ignores it)."""
    training = check_bool("training", training)
    return_indices = check_bool("return_indices", return_indices)
    if return_indices and not training:
        raise ValueError("return_indices=True needs training=True: inference picks nothing")
    return training, return_indices, resolve_seed(seed)


def stochastic_backward_indices(training, indices, geometry, forward_name):
    """Validate a stochastic pooling backward's ``training`` and ``indices`` (required
    in training, refused in inference); return ``(training, indices)``."""
    training = check_bool("training", training)
    if training:
        if indices is None:
            raise ValueError(
                "indices is required when training=True: pass the indices returned by "
                f"{forward_name}(..., return_indices=True)")
        return training, check_indices(indices, geometry)
    if indices is not None:
        raise ValueError("indices must be None when training=False")
    return training, None


def invalid_stochastic_input():
    """The error both devices raise when a stochastic-pooling kernel flags its input."""
    return ValueError(
        "stochastic pooling needs finite, non-negative inputs (e.g. after ReLU); "
        "x holds a negative, NaN or infinite value inside a pooling window, or (in "
        "training) a window's sum overflows")


def check_divisor_override(divisor_override):
    if divisor_override is None:
        return 0
    if isinstance(divisor_override, (bool, np.bool_)) or not isinstance(
            divisor_override, numbers.Integral):
        raise TypeError(f"divisor_override must be None or an int, got {divisor_override!r}")
    if not 0 < abs(divisor_override) < _INT_LIMIT:
        raise ValueError(
            f"divisor_override must be non-zero and below 2**62, got {divisor_override}")
    return int(divisor_override)


def check_bool(name, value):
    if value is False or value is True:
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_seed(seed):
    """Validate a seed (None, a ``numpy.random.Generator`` or an int in [0, 2**64))
    without drawing from it."""
    if seed is None or isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            f"seed must be None, an int or a numpy.random.Generator, got {seed!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)


def resolve_seed(seed):
    """``None`` -> fresh entropy; ``numpy.random.Generator`` -> one draw; int in [0, 2**64)."""
    seed = check_seed(seed)
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0])
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**64, dtype=np.uint64))
    return seed


# ----------------------------------------------------------------------------- conv

def check_backward_geometry(function, stride):
    """A conv backward called like its forward (``f(grad_output, x, weight, bias,
    ...)``) puts the bias where ``stride`` goes: say what the backward takes instead of
    rejecting the bias as a stride."""
    if hasattr(stride, "shape") or hasattr(stride, "__array_interface__") or hasattr(
            stride, "__cuda_array_interface__"):
        raise TypeError(
            f"{function}(grad_output, x, weight, stride, padding, ...) takes no bias: its "
            f"4th argument is stride, got an array of shape {tuple(stride.shape)}; the "
            f"bias gradient comes back as grads.grad_bias (grad_output summed over every "
            f"axis but the channels)")


def check_output_mask(output_mask):
    if (not isinstance(output_mask, (tuple, list)) or len(output_mask) != 3
            or not all(isinstance(m, (bool, np.bool_)) for m in output_mask)):
        raise TypeError(
            f"output_mask must be three bools (grad_input, grad_weight, grad_bias), got "
            f"{output_mask!r}")
    return tuple(bool(m) for m in output_mask)


def _conv_arrays(x, weight, bias, rank, groups, transposed=False):
    """Validate the arrays of a convolution (``transposed``: weight ``(C_in, C_out //
    groups, *kernel)``, else ``(C_out, C_in // groups, *kernel)``); return ``(x,
    weight, bias, batched, c_in, c_out, kernel, groups)`` with ``c_in``/``c_out`` the
    channels of ``x`` and of the result."""
    x = as_float_array("x", x)
    if x.ndim not in (rank + 1, rank + 2):
        raise ValueError(
            f"x must be {rank + 2}-D {_RANK_SHAPES[rank]}, got shape {x.shape}")
    if any(s == 0 for s in x.shape[-rank - 1:]):
        raise ValueError(
            f"x must have non-zero channel and spatial sizes (only the batch may be "
            f"empty), got shape {x.shape}")
    weight = as_float_array("weight", weight)
    layout = ("(C_in, C_out // groups, *kernel)" if transposed
              else "(C_out, C_in // groups, *kernel)")
    if weight.ndim != rank + 2:
        raise ValueError(f"weight must be {rank + 2}-D {layout}, got shape {weight.shape}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    groups = _as_int("groups", groups)
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    c_in = int(x.shape[-rank - 1])
    kernel = tuple(int(k) for k in weight.shape[2:])
    if int(weight.shape[0]) == 0 or int(weight.shape[1]) == 0 or min(kernel) == 0:
        raise ValueError(f"weight must have non-zero sizes, got shape {weight.shape}")
    if transposed:
        if int(weight.shape[0]) != c_in:
            raise ValueError(f"weight shape {weight.shape} needs dim 0 = in_channels = "
                             f"{c_in} (a transposed convolution's weight is {layout})")
        c_out = int(weight.shape[1]) * groups
    else:
        c_out = int(weight.shape[0])
    if c_in % groups or c_out % groups:
        raise ValueError(
            f"groups={groups} must divide both in_channels={c_in} and "
            f"out_channels={c_out}")
    if not transposed and int(weight.shape[1]) != c_in // groups:
        raise ValueError(
            f"weight shape {weight.shape} needs dim 1 = in_channels // groups = "
            f"{c_in // groups}")
    if bias is not None:
        bias = as_float_array("bias", bias)
        if bias.shape != (c_out,):
            raise ValueError(f"bias must have shape ({c_out},), got {bias.shape}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match x dtype {x.dtype}")
    return x, weight, bias, x.ndim == rank + 2, c_in, c_out, kernel, groups


@memoised(3)
def conv_window(x, weight, bias, rank, stride=1, padding=0, dilation=1, groups=1):
    """Validate the arguments of a convolution of ``rank`` spatial axes (the N-D rules
    of conv2d); return ``(x, weight, bias, Window)``."""
    x, weight, bias, batched, c_in, c_out, kernel, groups = _conv_arrays(
        x, weight, bias, rank, groups)
    stride = ntuple("stride", stride, rank)
    dilation = ntuple("dilation", dilation, rank)
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if isinstance(padding, str):
        if padding == "valid":
            lo = hi = (0,) * rank
        elif padding == "same":
            if max(stride) != 1:
                raise ValueError(
                    f"padding='same' is only supported with stride 1, got stride {stride}")
            totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
            lo = tuple(t // 2 for t in totals)
            hi = tuple(t - t // 2 for t in totals)
        else:
            raise ValueError(
                f"padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
    else:
        lo = hi = ntuple("padding", padding, rank)
        if min(lo) < 0:
            raise ValueError(f"padding must be >= 0, got {lo}")
    in_size = tuple(int(s) for s in x.shape[-rank:])
    effective = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    padded = tuple(n + a + b for n, a, b in zip(in_size, lo, hi))
    if any(p < e for p, e in zip(padded, effective)):
        raise ValueError(
            f"weight's kernel size {kernel} with dilation {dilation} (effective "
            f"{effective}) is larger than the padded input {padded}")
    out_size = tuple(_geometry.output_size(n, k, s, a, b, d) for n, k, s, a, b, d in
                     zip(in_size, kernel, stride, lo, hi, dilation))
    window = _geometry.Window(
        rank=rank, batch=int(x.shape[0]) if batched else 1, channels=c_in,
        out_channels=c_out, batched=batched, layout=layout_of(x, batched),
        in_size=in_size, out_size=out_size, kernel=kernel, stride=stride, pad_lo=lo,
        pad_hi=hi, dilation=dilation, groups=groups)
    return _unwrap(x), _unwrap(weight), _unwrap(bias) if bias is not None else None, window


def conv_transpose_window(x, weight, bias, rank, stride=1, padding=0, output_padding=0,
                          groups=1, dilation=1):
    """Validate the arguments of a transposed convolution
    (``torch.nn.functional.conv_transpose{rank}d``'s); return ``(x, weight, bias,
    Window)`` where the ``Window`` is that of the convolution it transposes: from the
    result (``in_size``, ``channels``) to ``x`` (``out_size``, ``out_channels``), whose
    input gradient the forward is. Per axis the result has ``(in - 1) * stride - 2 *
    padding + dilation * (kernel - 1) + output_padding + 1`` elements."""
    x, weight, bias, batched, c_in, c_out, kernel, groups = _conv_arrays(
        x, weight, bias, rank, groups, transposed=True)
    stride = ntuple("stride", stride, rank)
    dilation = ntuple("dilation", dilation, rank)
    padding = ntuple("padding", padding, rank)
    output_padding = ntuple("output_padding", output_padding, rank)
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"stride and dilation must be >= 1, got {stride}, {dilation}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if not all(0 <= o < max(s, d) for o, s, d in zip(output_padding, stride, dilation)):
        raise ValueError(
            f"output_padding {output_padding} must be >= 0 and smaller than stride "
            f"{stride} or dilation {dilation} per axis (PyTorch's rule)")
    in_size = tuple(int(n) for n in x.shape[-rank:])
    size = tuple((n - 1) * s - 2 * p + d * (k - 1) + o + 1 for n, s, p, d, k, o in
                 zip(in_size, stride, padding, dilation, kernel, output_padding))
    if min(size) < 1:
        raise ValueError(
            f"the transposed convolution's output size {size} must be >= 1 per axis "
            f"(input {in_size}, stride {stride}, padding {padding}, dilation "
            f"{dilation}, kernel {kernel}, output_padding {output_padding})")
    window = _geometry.Window(
        rank=rank, batch=int(x.shape[0]) if batched else 1, channels=c_out,
        out_channels=c_in, batched=batched, layout=layout_of(x, batched), in_size=size,
        out_size=in_size, kernel=kernel, stride=stride, pad_lo=padding,
        pad_hi=tuple(p - o for p, o in zip(padding, output_padding)), dilation=dilation,
        groups=groups)
    return _unwrap(x), _unwrap(weight), _unwrap(bias) if bias is not None else None, window
