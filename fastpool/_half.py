"""Half precision (float16, and bfloat16 through ``ml_dtypes``) at the NumPy level.

The kernels compute in float32 or float64 (Numba's CPU target has no 16-bit float
type). A call on half-precision arrays therefore runs the float32 kernels: its
half-precision array arguments are widened to float32 (exact: every float16 and
bfloat16 value is a float32 value), the kernel runs, and its floating results are
rounded once, to nearest even, back to the input's dtype -- what PyTorch's CPU kernels
do for these dtypes (they accumulate in float32 too). Integer arguments and results
(indices) pass through. Memory formats are kept: the widened copies and the rounded
results have the strides of the arrays they come from (docs/design.md section 2).

This costs a float32 copy of each half-precision input and output. The launchers a
backend names in its ``HALF_NATIVE`` (per dtype) skip it: their kernels read and write
the 16-bit arrays themselves with the same results, so ``HalfPrecision`` hands them the
arrays unchanged. On the CPU: max, average and stochastic pooling in float16 and
bfloat16 (``fastpool.cpu._half_bits``); on the GPU: the same in float16 (Numba's CUDA
target has float16, not bfloat16).
"""

from __future__ import annotations

import contextlib

import numpy as np

from fastpool._dispatch import _host_to_device, array_kind, current_stream, to_device

HALF_NAMES = ("float16", "bfloat16")


def is_half(dtype):
    """Whether ``dtype`` (a NumPy dtype, or anything with a ``dtype`` name) is one of the
    16-bit float types fastpool computes in float32."""
    if isinstance(dtype, np.dtype) and dtype.itemsize != 2:
        return False  # every call asks: dtype.name and str(dtype) are Python code
    return getattr(dtype, "name", None) in HALF_NAMES or str(dtype) in (
        "torch.float16", "torch.bfloat16")


def _dtype(array):
    if isinstance(array, np.ndarray):
        return array.dtype
    kind = array_kind(array)
    if kind in ("cupy", "torch", "numba"):
        return array.dtype
    if kind is not None and kind != "host":  # another __cuda_array_interface__ object
        return np.dtype(array.__cuda_array_interface__["typestr"])
    return None


def half_array(arrays):
    """The first half-precision array among ``arrays`` (None when there is none)."""
    for array in arrays:
        if array is not None and is_half(_dtype(array)):
            return array
    return None


def _widen(array):
    if array is None or not is_half(_dtype(array)):
        return array
    kind = array_kind(array)
    if kind == "host":
        return array.astype(np.float32, order="K")
    if kind == "torch":
        return array.float()
    if kind == "cupy":
        import cupy
        return array.astype(cupy.float32)
    # Numba device arrays (and other interface objects, viewed as one): through the
    # host, as Numba arrays have no dtype conversion (on the call's stream).
    from fastpool.cuda._stream import download
    return _host_to_device(download(to_device(array)).astype(np.float32, order="K"))


def _narrow(result, like):
    """``result`` (an array, a tuple or named tuple of them, or None) with its float32
    arrays rounded to ``like``'s dtype."""
    if result is None:
        return None
    if isinstance(result, tuple):
        narrowed = [_narrow(r, like) for r in result]
        return type(result)(*narrowed) if hasattr(result, "_fields") else tuple(narrowed)
    kind = array_kind(result)
    if kind is None or str(result.dtype) not in ("float32", "torch.float32"):
        return result
    if kind == "host":
        return result.astype(like.dtype, order="K")
    if kind == "torch":
        return result.to(like.dtype)
    if kind == "cupy":
        return result.astype(like.dtype)
    from fastpool.cuda._stream import download
    return _host_to_device(download(result).astype(like.dtype, order="K"))


class HalfPrecision:
    """A backend module (``fastpool.cpu`` or ``fastpool.cuda``) seen through float32:
    each of its kernels widens its half-precision array arguments, runs, and rounds
    its floating results to the dtype of ``like`` (the call's half-precision array)."""

    def __init__(self, module, like):
        self._module = module
        self._like = like

    def __getattr__(self, name):
        kernel = getattr(self._module, name)
        native = getattr(self._module, "HALF_NATIVE", {}).get(str(_dtype(self._like)), ())
        if not callable(kernel) or name in native:
            return kernel  # a launcher that reads and writes 16-bit floats itself
        like = self._like
        gpu = self._module.__name__ == "fastpool.cuda"

        def run(*args, **kwargs):
            # On the GPU the copies go to the call's stream too (fastpool.cuda._stream).
            with _gpu_call(like) if gpu else contextlib.nullcontext():
                args = [_widen(a) for a in args]
                kwargs = {k: _widen(v) for k, v in kwargs.items()}
                return _narrow(kernel(*args, **kwargs), like)
        return run


def _gpu_call(like):
    from fastpool.cuda import _stream
    return _stream.call(array_kind(like), like, current_stream())
