"""Hostile-input fuzzing of every public function (run by ``test_fuzz.py`` in a child
process, so that a crash fails the test instead of killing pytest).

Each example takes a valid call of one public function (NumPy API, ``fastpool.torch``
functions and modules) and replaces one or two of its arguments by hostile values:
wrong types (str, float, bool, None, lists, nested tuples, NumPy scalars, objects),
negative / zero / huge ints, wrong ranks, zero sizes, empty batches, wrong or mismatched
dtypes, non-contiguous, Fortran-order, read-only and big-endian arrays, NaN / inf,
negative values, mismatched shapes, corrupted indices. The call must then

* return a result equal to ``tests/reference.py`` on the same (converted) arguments
  (values compared when every input is finite and modest, shapes and dtypes always),
* or raise ``ValueError`` / ``TypeError`` whose message names an argument of the call
  (the replaced one, or for a mismatch between arrays any of them),
* and leave its inputs, and guard cells on both sides of every input array, unchanged.

A replacement that only spells a valid value differently (a big-endian, read-only,
Fortran-order or non-contiguous copy of an array, a NumPy int for an int) must
succeed: such inputs are converted once, as NumPy would, never refused.

``MemoryError`` (NumPy's answer to an output too large to allocate) and
``CudaUnavailableError`` (``device="cuda"`` on a machine without a GPU) are accepted
too. Every other exception is a finding. Geometry arguments are mutated to invalid
values only, so the kernels compiled stay those of the base calls (the fuzz's time goes
to examples, not compilation).

Reproduce a failure from the printed example, or rerun with the same
``FASTPOOL_FUZZ_SEED``; ``FASTPOOL_FUZZ_EXAMPLES`` sets the examples per function.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import traceback

import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import fastpool
import reference as ref

EXAMPLES = int(os.environ.get("FASTPOOL_FUZZ_EXAMPLES", "150"))
SEED = int(os.environ.get("FASTPOOL_FUZZ_SEED", "2026"))
GUARD = 7  # guard cells on each side of every input array
GUARD_VALUE = -12345.0

try:
    import torch
    import fastpool.torch as fpt
except ImportError:  # the NumPy API is fuzzed without it
    torch = fpt = None


# ----------------------------------------------------------------------------- values

class Opaque:
    def __repr__(self):
        return "Opaque()"


def _same_spellings(base, rank):
    """Valid spellings of the int ``base`` for an argument of ``rank`` axes."""
    return [np.int64(base), np.uint8(base), (np.int32(base),) + (base,) * (rank - 1),
            [base] * rank]


def _int_hostiles(base, rank):
    """Invalid replacements for an int-or-tuple geometry argument whose valid value is
    ``base``, and a few valid spellings of ``base`` itself."""
    return [None, "2", 2.5, True, False, -1, 0, 2**31, 2**63, -2**63, 10**30,
            np.float64(2.0), np.bool_(True), [], [base] * (rank + 1),
            ((base, base), (base, base)), (base,) * (rank - 1) + (-1,),
            (0,) + (base,) * (rank - 1), Opaque(), np.array([base] * rank),
            float("nan"), 1 + 2j, b"2"] + _same_spellings(base, rank)


BOOL_HOSTILES = [None, 0, 1, "True", 1.0, [], np.bool_(True), Opaque()]
DEVICE_HOSTILES = ["gpu", "CPU", 0, None, "cuda", "tpu", ["cpu"], b"cpu"]
SEED_HOSTILES = [-1, 2**64, 1.5, "1", None, np.random.default_rng(1),
                 np.random.RandomState(0), np.uint64(7), True, [1]]
MASK_HOSTILES = [(True,), [True, True, True], (1, 1, 1), None, "TTT",
                 (True, False, None), (np.bool_(True),) * 3, (True,) * 4]
CONV_PADDING_HOSTILES = ["same", "valid", "SAME", "full", b"same", -1, (1, -1),
                         (1, 1, 1), 2**63, None, 1.0, [1, 1], np.int16(1)]


def _array_hostiles(a):
    """Replacements for an array argument with (valid) value ``a``."""
    out = {
        "scalar": np.float32(1.0),
        "rank-1": a.reshape(-1),
        "rank+1": a[None],
        "rank-0": np.array(1.0, a.dtype),
        "drop-axis-0": a[0],
        "int32": a.astype(np.int32),
        "bool": a.astype(bool),
        "float16": a.astype(np.float16),
        "complex64": a.astype(np.complex64),
        "object": a.astype(object),
        "other-float": a.astype(np.float64 if a.dtype == np.float32 else np.float32),
        "big-endian": a.astype(a.dtype.newbyteorder(">")),
        "fortran": np.asfortranarray(a),
        "non-contiguous": np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
        if a.ndim >= 2 else a[::1],
        "strided": a[..., ::2] if a.ndim else a,
        "read-only": _read_only(a),
        "zero-axis-1": a[:, :0] if a.ndim >= 2 else a[:0],
        "zero-last": a[..., :0] if a.ndim else a,
        "empty-batch": a[:0] if a.ndim else a,
        "nan": _filled(a, np.nan),
        "inf": _filled(a, np.inf),
        "-inf": _filled(a, -np.inf),
        "negative": -np.abs(a) - 1 if a.dtype.kind == "f" else a,
        "huge": _filled(a, 1e38),
        "list": a.tolist(),
        "none": None,
        "str": "x",
        "float": 3.0,
        "one-more-row": np.concatenate([a, a[..., :1, :]], axis=-2) if a.ndim >= 2 else a,
    }
    if torch is not None and a.dtype.kind == "f":
        out["tensor"] = torch.from_numpy(np.array(a))
        out["tensor-requires-grad"] = torch.from_numpy(np.array(a)).requires_grad_()
    return out


def _read_only(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


def _filled(a, value):
    if a.dtype.kind != "f" or a.size == 0:
        return a
    b = np.array(a)
    b.flat[b.size // 2] = value
    return b


def _index_hostiles(idx, plane_size):
    out = {
        "out-of-range": _set_flat(idx, plane_size),
        "negative": _set_flat(idx, -1),
        "huge": _set_flat(idx, 2**40),
        "min-int64": _set_flat(idx, -2**63),
        "float": idx.astype(np.float64),
        "bool": idx.astype(bool),
        "int32": idx.astype(np.int32),
        "uint64-huge": _set_flat(idx.astype(np.uint64), 2**64 - 1),
        "other-window": _set_flat(idx, 0),
        "wrong-shape": idx[..., :1],
        "big-endian": idx.astype(">i8"),
        "list": idx.tolist(),
        "none": None,
    }
    return out


def _set_flat(a, value):
    b = np.array(a)
    b.flat[b.size - 1] = value
    return b


# ----------------------------------------------------------------------------- base calls

RNG = np.random.default_rng(SEED)
X = RNG.random((2, 3, 7, 6)).astype(np.float32) + np.float32(0.01)  # > 0: stochastic
POOL = dict(kernel_size=3, stride=2, padding=1)
OUT = (2, 3, 4, 3)
GO = RNG.standard_normal(OUT).astype(np.float32)
IDX = fastpool.max_pool2d(X, **POOL, return_indices=True)[1]
PICKS = fastpool.stochastic_pool2d(X, **POOL, seed=9, return_indices=True)[1]
X1 = RNG.random((2, 3, 9)).astype(np.float32) + np.float32(0.01)
X3 = RNG.random((2, 3, 4, 5, 6)).astype(np.float32) + np.float32(0.01)
GO3 = RNG.standard_normal((2, 3, 2, 3, 3)).astype(np.float32)
IDX3 = fastpool.max_pool3d(X3, **POOL, return_indices=True)[1]
XC = RNG.standard_normal((2, 4, 7, 6)).astype(np.float32)
WC = RNG.standard_normal((6, 2, 3, 3)).astype(np.float32)
BC = RNG.standard_normal(6).astype(np.float32)
GOC = RNG.standard_normal((2, 6, 7, 6)).astype(np.float32)
CONV = dict(stride=1, padding=1, dilation=1, groups=2)
XC1 = RNG.standard_normal((2, 4, 9)).astype(np.float32)
XC3 = RNG.standard_normal((1, 4, 3, 4, 3)).astype(np.float32)
WC3 = RNG.standard_normal((6, 2, 2, 3, 3)).astype(np.float32)
WC1 = RNG.standard_normal((6, 2, 3)).astype(np.float32)
ADAPT = (3, 2)  # adaptive output size on X
GA = RNG.standard_normal((2, 3) + ADAPT).astype(np.float32)
IA = fastpool.adaptive_max_pool2d(X, ADAPT, return_indices=True)[1]
Y_POOL = fastpool.max_pool2d(X, **POOL)  # what max_unpool2d takes, with IDX
WT = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)  # transposed: (C_in, C_out/g, k)
BT = RNG.standard_normal(6).astype(np.float32)
TRANSPOSE = dict(stride=2, padding=1, output_padding=1, groups=2, dilation=1)


class Call:
    """A public function, its valid keyword arguments, and which are arrays."""

    def __init__(self, name, function, kwargs, kinds, reference=None, torch_api=False,
                 implied=None):
        self.implied = implied or {}  # arguments the function fixes (for the reference)
        self.name = name
        base = kwargs.get("x", kwargs.get("input"))
        self.rank = len(base.shape) - 2  # spatial axes
        self.function = function
        self.kwargs = kwargs
        self.kinds = kinds  # argument name -> "array", "indices", "int", "bool", ...
        self.reference = reference
        self.torch_api = torch_api


def _pool_kinds(extra=()):
    kinds = dict(x="array", kernel_size="int", stride="int", padding="int",
                 dilation="int", ceil_mode="bool", device="device")
    kinds.update(extra)
    return kinds


def _numpy_calls():
    avg = dict(kernel_size=3, stride=2, padding=1)
    return [
        Call("max_pool2d", fastpool.max_pool2d, dict(x=X, **POOL, return_indices=True),
             _pool_kinds({"return_indices": "bool"}), "max"),
        Call("max_pool2d_backward", fastpool.max_pool2d_backward,
             dict(grad_output=GO, x=X, **POOL, indices=IDX),
             _pool_kinds({"grad_output": "array", "indices": "indices"}), "max_backward"),
        Call("avg_pool2d", fastpool.avg_pool2d,
             dict(x=X, **avg, count_include_pad=False, divisor_override=None),
             dict(x="array", kernel_size="int", stride="int", padding="int",
                  ceil_mode="bool", count_include_pad="bool", divisor_override="int",
                  device="device"), "avg"),
        Call("avg_pool2d_backward", fastpool.avg_pool2d_backward,
             dict(grad_output=GO, x=X, **avg, divisor_override=None),
             dict(grad_output="array", x="array", kernel_size="int", stride="int",
                  padding="int", ceil_mode="bool", count_include_pad="bool",
                  divisor_override="int", device="device"), "avg_backward"),
        Call("stochastic_pool2d", fastpool.stochastic_pool2d,
             dict(x=X, **POOL, training=True, seed=5, return_indices=True),
             _pool_kinds({"training": "bool", "seed": "seed", "return_indices": "bool"}),
             "stochastic"),
        Call("stochastic_pool2d inference", fastpool.stochastic_pool2d,
             dict(x=X, **POOL, training=False), _pool_kinds({"training": "bool"}),
             "stochastic"),
        Call("stochastic_pool2d_backward", fastpool.stochastic_pool2d_backward,
             dict(grad_output=GO, x=X, **POOL, training=True, indices=PICKS),
             _pool_kinds({"grad_output": "array", "training": "bool",
                          "indices": "indices"}), "stochastic_backward"),
        Call("stochastic_pool2d_backward inference", fastpool.stochastic_pool2d_backward,
             dict(grad_output=GO, x=X, **POOL, training=False),
             _pool_kinds({"grad_output": "array", "training": "bool"}),
             "stochastic_backward"),
        Call("max_pool3d", fastpool.max_pool3d, dict(x=X3, **POOL, return_indices=True),
             _pool_kinds({"return_indices": "bool"}), "max"),
        Call("max_pool3d_backward", fastpool.max_pool3d_backward,
             dict(grad_output=GO3, x=X3, **POOL, indices=IDX3),
             _pool_kinds({"grad_output": "array", "indices": "indices"}), "max_backward"),
        Call("avg_pool1d", fastpool.avg_pool1d, dict(x=X1, **avg, count_include_pad=False),
             dict(x="array", kernel_size="int", stride="int", padding="int",
                  ceil_mode="bool", count_include_pad="bool", divisor_override="int",
                  device="device"), "avg"),
        Call("stochastic_pool3d inference", fastpool.stochastic_pool3d,
             dict(x=X3, **POOL, training=False), _pool_kinds({"training": "bool"}),
             "stochastic"),
        Call("conv2d", fastpool.conv2d, dict(x=XC, weight=WC, bias=BC, **CONV),
             dict(x="array", weight="array", bias="array", stride="int",
                  padding="conv_padding", dilation="int", groups="int",
                  device="device"), "conv"),
        Call("conv1d", fastpool.conv1d, dict(x=XC1, weight=WC1, bias=BC, **CONV),
             dict(x="array", weight="array", bias="array", stride="int",
                  padding="conv_padding", dilation="int", groups="int",
                  device="device"), "conv"),
        Call("conv3d", fastpool.conv3d, dict(x=XC3, weight=WC3, bias=BC, **CONV),
             dict(x="array", weight="array", bias="array", stride="int",
                  padding="conv_padding", dilation="int", groups="int",
                  device="device"), "conv"),
        Call("adaptive_avg_pool2d", fastpool.adaptive_avg_pool2d,
             dict(x=X, output_size=ADAPT), dict(x="array", output_size="int",
                                                device="device"), "adaptive_avg"),
        Call("adaptive_max_pool2d_backward", fastpool.adaptive_max_pool2d_backward,
             dict(grad_output=GA, x=X, output_size=ADAPT, indices=IA),
             dict(grad_output="array", x="array", output_size="int", indices="indices",
                  device="device"), "adaptive_max_backward"),
        Call("max_unpool2d", fastpool.max_unpool2d,
             dict(x=Y_POOL, indices=IDX, **POOL, output_size=X.shape[2:]),
             dict(x="array", indices="indices", kernel_size="int", stride="int",
                  padding="int", output_size="int", device="device"), "unpool"),
        Call("conv_transpose2d", fastpool.conv_transpose2d,
             dict(x=XC, weight=WT, bias=BT, **TRANSPOSE),
             dict(x="array", weight="array", bias="array", stride="int", padding="int",
                  output_padding="int", groups="int", dilation="int", device="device"),
             "conv_transpose"),
        Call("conv2d_backward", fastpool.conv2d_backward,
             dict(grad_output=GOC, x=XC, weight=WC, **CONV, output_mask=(True, True, True)),
             dict(grad_output="array", x="array", weight="array", stride="int",
                  padding="conv_padding", dilation="int", groups="int",
                  output_mask="mask", device="device"), "conv_backward"),
    ]


MODULE = [None]


def _module(cls, input, kwargs, eval=False):
    """Build the module (PyTorch's constructor converts some arguments itself, e.g.
    bytes to a tuple of ints), remember it for the reference, and call it."""
    module = cls(**kwargs)
    MODULE[0] = module
    return (module.eval() if eval else module)(input)


def _module_arguments(kw):
    """The geometry the last module built really holds."""
    module = MODULE[0]
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
             "count_include_pad", "divisor_override")
    return {**kw, **{n: getattr(module, n) for n in names if hasattr(module, n)}}


def _torch_calls():
    if torch is None:
        return []
    t = torch.from_numpy
    pool = dict(kernel_size="int", stride="int", padding="int", dilation="int",
                ceil_mode="bool")
    return [
        Call("torch max_pool2d", fpt.max_pool2d, dict(input=t(X), **POOL),
             dict(input="array", return_indices="bool", **pool), "max", torch_api=True),
        Call("torch avg_pool2d", fpt.avg_pool2d, dict(input=t(X), **POOL),
             dict(input="array", kernel_size="int", stride="int", padding="int",
                  ceil_mode="bool", count_include_pad="bool", divisor_override="int"),
             "avg", torch_api=True),
        Call("torch stochastic_pool2d", fpt.stochastic_pool2d,
             dict(input=t(X), **POOL, training=False),
             dict(input="array", training="bool", seed="seed", return_indices="bool",
                  **pool), "stochastic",
             torch_api=True),
        Call("torch conv2d", fpt.conv2d, dict(input=t(XC), weight=t(WC), bias=t(BC), **CONV),
             dict(input="array", weight="array", bias="array", stride="int",
                  padding="conv_padding", dilation="int", groups="int"), "conv",
             torch_api=True),
        Call("torch max_pool3d", fpt.max_pool3d, dict(input=t(X3), **POOL),
             dict(input="array", return_indices="bool", **pool), "max", torch_api=True),
        Call("torch AvgPool1d", lambda input, **kw: _module(fpt.AvgPool1d, input, kw),
             dict(input=t(X1), kernel_size=3, stride=2, padding=1),
             dict(input="array", kernel_size="int", stride="int", padding="int"), "avg",
             torch_api=True),
        Call("torch MaxPool2d", lambda input, **kw: _module(fpt.MaxPool2d, input, kw),
             dict(input=t(X), **POOL), dict(input="array", **pool), "max", torch_api=True),
        Call("torch AvgPool2d", lambda input, **kw: _module(fpt.AvgPool2d, input, kw),
             dict(input=t(X), kernel_size=3, stride=2, padding=1),
             dict(input="array", kernel_size="int", stride="int", padding="int"), "avg",
             torch_api=True),
        Call("torch StochasticPool2d",
             lambda input, **kw: _module(fpt.StochasticPool2d, input, kw, eval=True),
             dict(input=t(X), **POOL), dict(input="array", **pool), "stochastic",
             torch_api=True, implied={"training": False}),
    ]


CALLS = _numpy_calls() + _torch_calls()


def hostiles_for(call, name):
    """(label, value) replacements for argument ``name`` of ``call``."""
    kind = call.kinds[name]
    value = call.kwargs.get(name)
    if kind == "array":
        base = value.numpy() if torch is not None and isinstance(value, torch.Tensor) else (
            value if value is not None else BC)
        items = list(_array_hostiles(base).items())
        if call.torch_api:  # the torch API takes tensors: convert what converts
            items = [(label, _as_tensor(v)) for label, v in items]
        return items
    if kind == "indices":
        x = call.kwargs["x"]
        return list(_index_hostiles(value, int(np.prod(x.shape[2:]))).items())
    pools = {"int": _int_hostiles(value if isinstance(value, int) else 2, call.rank),
             "bool": BOOL_HOSTILES, "device": DEVICE_HOSTILES, "seed": SEED_HOSTILES,
             "mask": MASK_HOSTILES, "conv_padding": CONV_PADDING_HOSTILES}[kind]
    return [(repr(v), v) for v in pools]


def _as_tensor(value):
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub" and value.dtype.isnative:
        return torch.from_numpy(np.array(value))
    return value


# ----------------------------------------------------------------------------- oracle

class Finding(Exception):
    pass


def _guarded(value):
    """A copy of ``value`` placed between guard cells of a larger buffer (and the
    buffer), for NumPy arrays; ``value`` itself otherwise."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu" or \
            not value.flags.c_contiguous or value.dtype.hasobject:
        return value, None
    buffer = np.full(value.size + 2 * GUARD, GUARD_VALUE, value.dtype)
    inner = buffer[GUARD:GUARD + value.size].reshape(value.shape)
    inner[...] = value
    inner.flags.writeable = value.flags.writeable
    return inner, buffer


def _snapshot(value):
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().numpy().copy()
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return value.copy()
    return None


def _names_an_argument(message, call):
    """Whether ``message`` names an argument of the call: the one at fault, or for a
    broken rule between arguments (a gradient that does not fit the forward's shape,
    dtypes that differ) one of those it involves."""
    names = set(call.kinds) | set(call.kwargs)
    if call.torch_api:
        names |= {"x"}  # fastpool's own name for the input, quoted by its messages
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", message)
               for n in names)


def _as_numpy(value):
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().numpy()
    return value


def _modest(*arrays):
    for a in arrays:
        a = _as_numpy(a)
        if a is None:
            continue
        a = np.asarray(a)
        if a.dtype.kind not in "fiu" or not np.all(np.isfinite(a)) or (
                a.size and np.abs(a).max() > 1e6):
            return False
    return True


def _torch_size(name, value, rank):
    """A size argument as torch.nn.functional reads it: a one-element sequence means
    every axis, an empty stride means the kernel size."""
    if isinstance(value, (list, tuple, np.ndarray)):
        value = tuple(value)
        if name == "stride" and not value:
            return None
        if len(value) == 1:
            return (value[0],) * rank
    return value


def _expected(call, kw):
    """The reference result for a call that returned, or None when the values cannot
    be compared (non-finite inputs, a seed drawn from a Generator)."""
    x = _as_numpy(kw.get("x", kw.get("input")))
    x = np.asarray(x, dtype=np.float64)
    batched = x.ndim == call.rank + 2
    x4 = x if batched else x[None]

    def unbatch(a):
        return a if batched or a is None else a[0]

    def spelled(v):
        return tuple(v) if isinstance(v, (list, np.ndarray)) else v

    if call.reference.startswith("adaptive"):
        size = spelled(kw["output_size"])
        if call.reference == "adaptive_avg":
            return unbatch(ref.adaptive_pool(x4, size, "avg"))
        go = np.asarray(_as_numpy(kw["grad_output"]), dtype=np.float64)
        idx = kw.get("indices")
        idx = (ref.adaptive_pool(x4, size, "max")[1] if idx is None
               else np.asarray(idx).astype(np.int64))
        return unbatch(ref.scatter_to_indices(go if batched else go[None],
                                              idx if batched or idx.ndim == 4 else idx[None],
                                              x4.shape))
    if call.reference == "unpool":
        idx = np.asarray(kw["indices"]).astype(np.int64)
        size = kw.get("output_size")
        size = (ref.unpool_output_size(x4.shape[2:], spelled(kw["kernel_size"]),
                                       spelled(kw.get("stride")), spelled(kw.get("padding", 0)))
                if size is None else tuple(int(v) for v in spelled(size))[-call.rank:])
        return unbatch(ref.max_unpool(x4, idx if batched else idx[None], size))
    if call.reference == "conv_transpose":
        b = kw.get("bias")
        b = None if b is None else np.asarray(_as_numpy(b), dtype=np.float64)
        args = {k: spelled(kw[k]) for k in ("stride", "padding", "output_padding", "groups",
                                           "dilation") if k in kw}
        return unbatch(ref.conv_transpose(x4, np.asarray(_as_numpy(kw["weight"]),
                                                         dtype=np.float64), b, **args))
    geo = {k: kw[k] for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
           if k in kw}
    geo = {k: _torch_size(k, v, call.rank) if call.torch_api else
           (tuple(v) if isinstance(v, (list, np.ndarray)) else v) for k, v in geo.items()}
    if call.reference == "max":
        y, i = ref.max_pool2d(x4, **geo)
        return (unbatch(y), unbatch(i)) if kw.get("return_indices") else unbatch(y)
    if call.reference == "avg":
        cip = kw.get("count_include_pad", True)
        return unbatch(ref.avg_pool2d(x4, **geo, count_include_pad=cip,
                                      divisor_override=kw.get("divisor_override")))
    if call.reference == "stochastic":
        training = kw.get("training", True)
        s = kw.get("seed") if training else 0  # inference draws nothing
        if not isinstance(s, (int, np.integer)):
            return None
        y, i = ref.stochastic_pool2d(x4, **geo, training=training, seed=int(s))
        return (unbatch(y), unbatch(i)) if kw.get("return_indices") else unbatch(y)
    go = np.asarray(_as_numpy(kw.get("grad_output")), dtype=np.float64)
    go4 = go if batched else go[None]
    if call.reference == "max_backward":
        if kw.get("indices") is None:  # recomputed from x
            return unbatch(ref.max_pool2d_backward(go4, x4, **geo))
        idx = np.asarray(kw["indices"]).astype(np.int64)
        return unbatch(ref.scatter_to_indices(go4, idx if batched else idx[None], x4.shape))
    if call.reference == "avg_backward":
        return unbatch(ref.avg_pool2d_backward(
            go4, x4, **geo, count_include_pad=kw.get("count_include_pad", True),
            divisor_override=kw.get("divisor_override")))
    if call.reference == "stochastic_backward":
        if kw.get("training", True):
            idx = np.asarray(kw["indices"]).astype(np.int64)
            return unbatch(ref.scatter_to_indices(go4, idx if batched else idx[None],
                                                  x4.shape))
        return unbatch(ref.stochastic_pool2d_backward(go4, x4, **geo, training=False))
    conv = {k: kw[k] for k in ("stride", "padding", "dilation", "groups") if k in kw}
    conv = {k: _torch_size(k, v, call.rank) if call.torch_api else
            (tuple(v) if isinstance(v, (list, np.ndarray)) else v) for k, v in conv.items()}
    w = np.asarray(_as_numpy(kw["weight"]), dtype=np.float64)
    if call.reference == "conv":
        b = kw.get("bias")
        b = None if b is None else np.asarray(_as_numpy(b), dtype=np.float64)
        return unbatch(ref.conv(x4, w, b, **conv))
    gx, gw, gb = ref.conv_backward(go4, x4, w, **conv)
    mask = kw.get("output_mask", (True, True, True))
    return tuple(v if m else None for v, m in zip((unbatch(gx), gw, gb), mask))


def _compare(got, want, dtype, what):
    if want is None and got is None:
        return
    if isinstance(want, tuple):
        if not isinstance(got, tuple) or len(got) != len(want):
            raise Finding(f"{what}: expected {len(want)} results, got {type(got).__name__}")
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, dtype, f"{what}[{i}]")
        return
    got = _as_numpy(got)
    if not isinstance(got, np.ndarray):
        raise Finding(f"{what}: expected an array, got {type(got).__name__}")
    if got.shape != np.shape(want):
        raise Finding(f"{what}: shape {got.shape}, reference {np.shape(want)}")
    if np.asarray(want).dtype.kind == "i":
        if got.dtype != np.int64 or not np.array_equal(got, want):
            raise Finding(f"{what}: indices differ from the reference")
        return
    if got.dtype != dtype:
        raise Finding(f"{what}: dtype {got.dtype}, expected {dtype}")
    tol = {np.dtype(np.float16): dict(rtol=2e-3, atol=2e-3),  # computed in float32,
           np.dtype(np.float32): dict(rtol=2e-4, atol=2e-4),  # rounded once
           }.get(np.dtype(dtype), dict(rtol=1e-9, atol=1e-9))
    if not np.allclose(got, want, equal_nan=True, **tol):
        raise Finding(f"{what}: values differ from the reference by "
                      f"{np.nanmax(np.abs(got - want)):.3g}")


def judge(call, replaced, kw):
    """Run one call; raise ``Finding`` when it breaks a rule of the module docstring."""
    snapshots = {name: (value, _snapshot(value)) for name, value in kw.items()}
    guarded = {}
    for name, value in kw.items():
        inner, buffer = _guarded(value)
        guarded[name] = (inner, buffer, None if buffer is None else buffer.copy())
        kw[name] = inner
    try:
        result = call.function(**kw)
    except (ValueError, TypeError) as exc:
        LAST_ERROR[0] = f"{type(exc).__name__}: {exc}"
        if not _names_an_argument(str(exc), call):
            raise Finding(f"{type(exc).__name__} names no argument of the call: {exc}")
        result = None
    except fastpool.CudaUnavailableError:
        if kw.get("device") not in ("cuda", "CUDA"):
            raise Finding("CudaUnavailableError without device='cuda'")
        result = None
    except MemoryError:
        result = None  # NumPy's answer to an output too large to allocate
    for name, (inner, buffer, before) in guarded.items():
        if buffer is not None and not np.array_equal(buffer, before, equal_nan=True):
            raise Finding(f"the call wrote into its input {name!r} or its guard cells")
    for name, (value, before) in snapshots.items():
        if before is not None and not np.array_equal(_snapshot(value), before,
                                                      equal_nan=True):
            raise Finding(f"the call changed its input {name!r}")
    if result is None:
        return "error"
    if isinstance(result, fastpool.Conv2dGrads):
        result = tuple(result)
    inputs = [v for n, v in kw.items() if call.kinds.get(n) == "array"]
    dtype = next(np.asarray(_as_numpy(v)).dtype for n, v in kw.items()
                 if n in ("x", "input"))
    dtype = np.dtype(dtype).newbyteorder("=")
    if call.torch_api:
        result = tuple(result) if isinstance(result, tuple) else result
    if call.name.startswith("torch ") and call.name[6].isupper():
        kw = _module_arguments(kw)
    expected = _expected(call, {**call.implied, **kw}) if _modest(*inputs) else None
    if expected is None:
        _check_shapes(result, dtype)
    else:
        _compare(result, expected, dtype, call.name)
    return "ok"


def _check_shapes(result, dtype):
    for r in (result if isinstance(result, tuple) else (result,)):
        r = _as_numpy(r)
        if r is not None and not isinstance(r, np.ndarray):
            raise Finding(f"returned {type(r).__name__}, not an array")


# ----------------------------------------------------------------------------- driver

OUTCOMES = {}
FINDINGS = []
LAST_ERROR = [None]


# Replacements that spell the valid value differently: the call must succeed.
SAME_ARRAY = {"big-endian", "fortran", "non-contiguous", "read-only"}


def _same_value(call, name, label):
    kind = call.kinds[name]
    if kind == "array":
        return not call.torch_api and label in SAME_ARRAY
    if kind == "indices":
        return label in ("int32", "big-endian", "list")
    if kind == "int":
        base = call.kwargs.get(name)
        return isinstance(base, int) and label in [
            repr(v) for v in _same_spellings(base, call.rank)]
    return False


@st.composite
def mutation(draw, call):
    names = sorted(call.kinds)
    count = draw(st.integers(1, 2))
    chosen = draw(st.lists(st.sampled_from(names), min_size=count, max_size=count,
                           unique=True))
    kw = dict(call.kwargs)
    labels = []
    same = []
    for name in chosen:
        label, value = draw(st.sampled_from(hostiles_for(call, name)))
        kw[name] = value
        labels.append(f"{name}={label}")
        same.append(_same_value(call, name, label))
    return chosen, kw, labels, all(same)


def fuzz(call):
    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        replaced, kw, labels, must_succeed = data.draw(mutation(call))
        try:
            outcome = judge(call, replaced, kw)
            if must_succeed and outcome != "ok":
                raise Finding("refused a valid value spelled differently: "
                              f"{LAST_ERROR[0]}")
        except Finding as finding:
            FINDINGS.append(f"{call.name}({', '.join(labels)}): {finding}")
            return
        except Exception as exc:  # any other exception type is a finding
            FINDINGS.append(f"{call.name}({', '.join(labels)}): {type(exc).__name__}: "
                            f"{exc}\n{traceback.format_exc(limit=4)}")
            return
        OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1

    run()


def main():
    for call in CALLS:
        fuzz(call)
    print(json.dumps({"findings": FINDINGS, "outcomes": OUTCOMES,
                      "functions": [c.name for c in CALLS], "examples": EXAMPLES}))


if __name__ == "__main__":
    sys.exit(main())
