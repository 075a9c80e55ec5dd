"""16-bit floats inside the CPU kernels: float16 and bfloat16 read and written as such.

Numba's CPU target has no 16-bit float type, so a half-precision array reaches a kernel
as its bit patterns (``bits``): float16 as ``uint16`` and bfloat16 as ``int16`` -- two
integer types, so that a kernel specialises on which one it reads. Kernels load every
element through ``wide`` (float32: exact for both types), compute in float32, and store
through ``narrow`` (rounded once to nearest even). For float32 and float64 arrays every
helper here is the identity, so those kernels compile to what they were.

The helpers are ``overload``-ed on the array's element type rather than branched on a
flag: the unused conversions are never typed, and a kernel holding them stays
cacheable on disk.

Scratch for results that accumulate (a gradient plane that several windows add into)
goes through ``scratch``/``target``/``flush``: a float32 buffer for half precision,
rounded into the 16-bit array once at the end; the array itself for float32/float64,
so those kernels write in place exactly as before.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from fastpool import _half

# The integer type whose bits stand for each half-precision dtype inside the kernels.
_BITS = {"float16": np.uint16, "bfloat16": np.int16}
_FLOAT16, _BFLOAT16 = types.uint16, types.int16


def bits(array):
    """``array`` as the kernels see it: a ``uint16``/``int16`` view of a float16 /
    bfloat16 array (same strides, no copy); any other array unchanged."""
    if array.dtype.itemsize != 2:  # every call passes here: dtype.name is Python code
        return array
    kind = _BITS.get(array.dtype.name)
    return array if kind is None else array.view(kind)


def kernel_views(x, out):
    """``(bits(x), bits(out))`` for arrays of one dtype, checked once."""
    if x.dtype.itemsize != 2:
        return x, out
    return bits(x), bits(out)


def compute_dtype(dtype):
    """The dtype a kernel computes in for arrays of ``dtype`` (float32 for half)."""
    return np.dtype(np.float32) if _half.is_half(dtype) else np.dtype(dtype)


def scalars(dtype, zero, divisor):
    """``(scalar(dtype, zero), scalar(dtype, divisor))`` in one lookup."""
    key = (dtype, zero, divisor)
    found = _SCALARS.get(key)
    if found is None:
        if len(_SCALARS) >= 1024:
            _SCALARS.clear()
        found = _SCALARS[key] = (scalar(dtype, zero), scalar(dtype, divisor))
    return found


def scalar(dtype, value):
    """``value`` as a scalar of ``compute_dtype(dtype)`` (a kernel's ``zero``, divisor),
    remembered: calls ask for the same few, and building one costs half a microsecond."""
    key = (dtype, value)
    found = _SCALARS.get(key)
    if found is None:
        if len(_SCALARS) >= 1024:
            _SCALARS.clear()
        found = _SCALARS[key] = compute_dtype(dtype).type(value)
    return found


_SCALARS = {}


# ----------------------------------------------------------------------------- scalars

@intrinsic
def _f16_to_f32(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_f16(typingctx, value):
    def codegen(context, builder, signature, args):
        # LLVM's fptrunc rounds to nearest even (F16C's vcvtps2ph where the CPU has it).
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def _u32_as_f32(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_u32(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@njit
def _bf16_to_f32(value):
    return _u32_as_f32(np.uint32(np.uint16(value)) << np.uint32(16))


@njit
def _f32_to_bf16(value):
    u = _f32_as_u32(value)
    if value != value:  # a quiet NaN keeping the sign, as ml_dtypes and PyTorch give
        return np.int16(np.uint16(((u >> np.uint32(16)) & np.uint32(0x8000))
                                  | np.uint32(0x7FC0)))
    # round to nearest even on the 16 bits dropped
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.int16(np.uint16(rounded))


def wide(value):
    """An element of a kernel array as the value computed with (float32 for half)."""
    raise NotImplementedError("used inside Numba kernels only")


def narrow(value, array):
    """``value`` as an element of ``array``: rounded once to float16 / bfloat16 (from
    float32; a float64 value is first rounded to float32, as a float32 kernel would
    store it), unchanged for float arrays (the store converts as before)."""
    raise NotImplementedError("used inside Numba kernels only")


@overload(wide, inline="always")
def _wide(value):
    if value == _FLOAT16:
        return lambda value: _f16_to_f32(value)
    if value == _BFLOAT16:
        return lambda value: _bf16_to_f32(value)
    if isinstance(value, types.Float):
        return lambda value: value
    return None


@overload(narrow, inline="always")
def _narrow(value, array):
    kind = array.dtype
    if kind == _FLOAT16:
        return lambda value, array: _f32_to_f16(np.float32(value))
    if kind == _BFLOAT16:
        return lambda value, array: _f32_to_bf16(np.float32(value))
    if isinstance(kind, types.Float):
        return lambda value, array: value
    return None


# ----------------------------------------------------------------------------- buffers

def wide_empty(n, array):
    """A new 1-D buffer of ``n`` elements of the dtype ``array`` computes in."""
    raise NotImplementedError("used inside Numba kernels only")


def scratch(array, n):
    """Per-thread scratch for ``target``: ``n`` float32 elements for a half-precision
    ``array``; a one-element placeholder for float arrays (which are written in place)."""
    raise NotImplementedError("used inside Numba kernels only")


def target(array, buffer):
    """Where a kernel accumulates results meant for ``array``:
    ``array`` itself for float arrays, else the first ``array.size`` elements of the
    float32 ``buffer`` (from ``scratch``) in ``array``'s shape; ``flush`` then rounds
    them into ``array``."""
    raise NotImplementedError("used inside Numba kernels only")


def accumulator(array):
    """``array`` itself for float arrays, else a new float32 array of its shape (to be
    rounded into ``array`` by ``flush``): ``target`` for a kernel that needs the scratch
    once per task rather than once per thread."""
    raise NotImplementedError("used inside Numba kernels only")


def widen_into(array, buffer):
    """The elements of the 1-D ``array`` as computed with: converted into the float32
    ``buffer`` (from ``scratch``) for half precision, in one pass that vectorises
    (converting element by element inside a scatter loop, which cannot vectorise, cost
    as much as the scatter itself); ``array`` itself otherwise."""
    raise NotImplementedError("used inside Numba kernels only")


def flush(array, result):
    """Round the accumulated ``result`` (from ``target``) into ``array`` (nothing to
    do for float arrays: ``result`` is ``array``)."""
    raise NotImplementedError("used inside Numba kernels only")


def _is_half(array):
    return array.dtype in (_FLOAT16, _BFLOAT16)


@overload(wide_empty, inline="always")
def _wide_empty(n, array):
    if _is_half(array):
        return lambda n, array: np.empty(n, np.float32)
    return lambda n, array: np.empty(n, array.dtype)


@overload(scratch, inline="always")
def _scratch(array, n):
    if _is_half(array):
        return lambda array, n: np.empty(n, np.float32)
    return lambda array, n: np.empty(1, array.dtype)


@overload(target, inline="always")
def _target(array, buffer):
    if _is_half(array):
        return lambda array, buffer: buffer[:array.size].reshape(array.shape)
    return lambda array, buffer: array


@overload(accumulator, inline="always")
def _accumulator(array):
    if _is_half(array):
        return lambda array: np.empty(array.shape, np.float32)
    return lambda array: array


@overload(widen_into, inline="always")
def _widen_into(array, buffer):
    if _is_half(array):
        def widen(array, buffer):
            for k in range(array.size):
                buffer[k] = wide(array[k])
            return buffer
        return widen
    return lambda array, buffer: array


@overload(flush, inline="always")
def _flush(array, result):
    if _is_half(array) and array.layout == "C":
        def flush_half(array, result):
            a = array.reshape(-1)
            r = result.reshape(-1)
            for k in range(a.size):
                a[k] = narrow(r[k], a)
        return flush_half
    if _is_half(array) and array.ndim == 2:  # channels-last scatter: a channel range
        def flush_rows(array, result):
            for i in range(array.shape[0]):
                for j in range(array.shape[1]):
                    array[i, j] = narrow(result[i, j], array)
        return flush_rows
    if _is_half(array):
        def flush_strided(array, result):
            for index in np.ndindex(array.shape):
                array[index] = narrow(result[index], array)
        return flush_strided
    return lambda array, result: None
