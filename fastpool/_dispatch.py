"""Device resolution and backend selection (docs/design.md section 4).

Resolution order: the call's ``device=`` argument, then the innermost
``with use_device(...)`` block of the calling thread, then ``set_device(...)``, then the
environment variable ``FASTPOOL_DEVICE``, then ``"auto"``. ``"auto"`` means ``"cuda"``
when an input already lives on the GPU (it exposes ``__cuda_array_interface__``), else
``"cpu"``.

Importing this module never touches the GPU: ``numba.cuda`` is imported only when a
call asks for CUDA or for ``cuda_available()``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Any, ContextManager, Iterator, List, Optional

import numpy as np

DEVICES = ("cpu", "cuda", "auto")
ENV_VAR = "FASTPOOL_DEVICE"


class CudaUnavailableError(RuntimeError):
    """Raised when ``device="cuda"`` is asked for and no usable GPU backend exists."""


_global_device = None


class _Local(threading.local):
    # A class default: looking up a missing attribute of a thread-local raises and
    # catches an AttributeError (0.6 us a call).
    stack = None


_local = _Local()

# ``os.environ.get`` costs a microsecond when the variable is unset (it raises and
# catches a KeyError); its bytes dict answers in 50 ns, and stays the live environment
# (``os.environ[...] = ...`` and ``monkeypatch.setenv`` write through it).
try:
    _ENV_DATA, _ENV_KEY = os.environ._data, os.environ.encodekey(ENV_VAR)
except AttributeError:  # pragma: no cover - not CPython's os._Environ
    _ENV_DATA = _ENV_KEY = None


def _environment():
    """``FASTPOOL_DEVICE``'s value, or None when it is unset."""
    if _ENV_DATA is None or getattr(os.environ, "_data", None) is not _ENV_DATA:
        return os.environ.get(ENV_VAR)  # os.environ replaced (a test's dict, say)
    raw = _ENV_DATA.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def _check_device(device, source):
    if not isinstance(device, str) or device.lower() not in DEVICES:
        raise ValueError(f"{source} must be one of {DEVICES}, got {device!r}")
    return device.lower()


def set_device(device: Optional[str]) -> None:
    """Set the process-wide default device (``"cpu"``, ``"cuda"``, ``"auto"`` or ``None``).

    ``None`` clears it, so ``FASTPOOL_DEVICE`` and then ``"auto"`` apply again.
    """
    global _global_device
    _global_device = None if device is None else _check_device(device, "device")


@contextlib.contextmanager
def _pushed(local, value):
    """``value`` on top of the thread-local ``local.stack`` for the block."""
    stack = local.__dict__.setdefault("stack", [])
    stack.append(value)
    try:
        yield value
    finally:
        stack.pop()


def use_device(device: Optional[str]) -> ContextManager[str]:
    """Context manager: use ``device`` for calls made by this thread inside the block."""
    return _pushed(_local, _check_device(device, "device"))


class _Streams(threading.local):
    stack = None


_streams = _Streams()


def use_stream(stream: object) -> ContextManager[object]:
    """Context manager: queue the GPU work of calls made by this thread inside the block
    on ``stream`` (a Numba, CuPy or PyTorch stream, anything with ``__cuda_stream__``,
    or a raw handle; 0 is Numba's default stream) instead of the caller's current
    stream. ``None`` goes back to following the caller. Nestable."""
    if stream is not None:
        from fastpool.cuda._stream import stream_handle
        stream_handle(stream)  # a TypeError/ValueError naming `stream` now, not later
    return _pushed(_streams, stream)


class _Deferred(threading.local):
    stack = None


_deferred = _Deferred()


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """Context manager: GPU calls made by this thread inside the block do not wait to
    report bad input (stochastic pooling's negative values, ``indices`` outside their
    windows): they queue their checks, and the block's end reads them all back (one
    wait per stream) and raises the first call's error. Results computed from bad
    input in between are wrong but never out of bounds. CPU calls check at once."""
    pending: List[Any] = []
    with _pushed(_deferred, pending):
        yield
    if pending:  # not reached when the block raised: its exception goes on
        from fastpool.cuda._launch import check_deferred
        check_deferred(pending)


def deferred_checks_pending() -> Optional[List[Any]]:
    """The list the innermost ``deferred_checks`` block collects into, or None."""
    stack = _deferred.stack
    return stack[-1] if stack else None


def current_stream() -> object:
    """The stream of this thread's innermost ``use_stream`` block, or None."""
    stack = _streams.stack
    return stack[-1] if stack else None


def get_device(device: Optional[str] = None) -> str:
    """The device a call with ``device=device`` would be configured for, before ``"auto"``
    looks at the inputs: one of ``"cpu"``, ``"cuda"``, ``"auto"``."""
    if device is not None:
        return _check_device(device, "device")
    stack = _local.stack
    if stack:
        return stack[-1]
    if _global_device is not None:
        return _global_device
    env = _environment()
    if env:
        return _check_device(env, f"environment variable {ENV_VAR}")
    return "auto"


def _has_cuda_interface(value):
    try:
        return hasattr(value, "__cuda_array_interface__")
    except Exception:  # e.g. torch CPU tensors raise TypeError from the property
        return False


def array_kind(value):
    """What kind of array ``value`` is, by duck typing (nothing is imported):

    ``"numba"`` for Numba device arrays (real or simulated: ``__cuda_ndarray__``),
    ``"cupy"`` or ``"torch"`` for their GPU arrays, ``"cuda"`` for any other object with
    ``__cuda_array_interface__``, ``"host"`` for everything else (NumPy arrays, lists,
    CPU tensors), ``None`` for None.
    """
    if value is None:
        return None
    if getattr(value, "__cuda_ndarray__", False):
        return "numba"
    if _has_cuda_interface(value):
        library = type(value).__module__.partition(".")[0]
        return library if library in ("cupy", "torch") else "cuda"
    return "host"


def is_device_array(value):
    """Whether ``value`` lives on the GPU (numba device array, CuPy, torch CUDA tensor)."""
    return array_kind(value) not in (None, "host")


@functools.lru_cache(maxsize=1)
def _probe_cuda():
    """Return ``(available, reason)``; imports numba.cuda on first use only."""
    try:
        from numba import cuda
    except Exception as exc:  # pragma: no cover - numba-cuda is a hard dependency
        return False, f"importing numba.cuda failed: {exc}"
    try:
        if cuda.is_available():
            return True, ""
    except Exception as exc:  # driver present but broken
        return False, f"numba.cuda.is_available() raised {exc!r}"
    return False, ("numba.cuda.is_available() is False: no CUDA driver/GPU was found "
                   "(and NUMBA_ENABLE_CUDASIM is not set)")


def cuda_available() -> bool:
    """Whether a usable CUDA GPU (or Numba's CUDA simulator) is available."""
    return _probe_cuda()[0]


def resolve(device, *arrays):
    """Resolve the device for one call: ``"cpu"`` or ``"cuda"``.

    Raises ``ValueError`` for a bad device name or for GPU data with ``device="cpu"``,
    ``CudaUnavailableError`` when ``"cuda"`` cannot be served.
    """
    configured = get_device(device)
    places = {is_device_array(a) for a in arrays if a is not None}
    if len(places) > 1:
        raise ValueError(
            "the array arguments mix host (NumPy/CPU) and GPU arrays; pass all of them "
            "on the host or all of them on the GPU")
    on_gpu = True in places
    if configured == "auto":
        configured = "cuda" if on_gpu else "cpu"
    if configured == "cpu" and on_gpu:
        raise ValueError(
            "device='cpu' was asked for but an input lives on the GPU; move it to the "
            "host first or use device='cuda'")
    return configured


_HOST_TYPES = (np.ndarray, type(None))
_backends = {}


def _cpu_backend():
    found = _backends.get("cpu")
    if found is None:
        from fastpool import cpu
        found = _backends["cpu"] = cpu
    return found


def backend(device, *arrays):
    """Resolve the device and return the kernel module for it: ``fastpool.cpu``, or
    ``fastpool.cuda`` (whose launchers move host arrays to the GPU and back); for
    half-precision arrays, that module seen through float32 (``fastpool._half``)."""
    for a in arrays:  # the common case first: NumPy arrays of float32/float64, the CPU
        if a is not None and (type(a) is not np.ndarray or a.dtype.itemsize == 2):
            break
    else:
        if get_device(device) != "cuda":
            return _cpu_backend()
    module = _device_backend(device, arrays)
    for a in arrays:  # a loop, not any(...): a generator costs a microsecond a call
        if getattr(getattr(a, "dtype", None), "itemsize", 0) == 2:
            from fastpool import _half
            like = _half.half_array(arrays)
            if like is not None:
                return _half.HalfPrecision(module, like)
            break
    return module


def _all_host(arrays):
    for a in arrays:
        if type(a) not in _HOST_TYPES:
            return False
    return True


def _device_backend(device, arrays):
    if _all_host(arrays) and get_device(device) != "cuda":
        return _cpu_backend()  # the common case (NumPy arrays, no GPU asked for)
    resolved = resolve(device, *arrays)
    if resolved == "cpu":
        return _cpu_backend()
    available, reason = _probe_cuda()
    if not available:
        raise CudaUnavailableError(f"device='cuda' was asked for but {reason}")
    from fastpool import cuda
    return cuda


# ----------------------------------------------------------------------------- transfers

def to_device(value):
    """A Numba device array for ``value``: itself for Numba device arrays, a zero-copy
    view for other ``__cuda_array_interface__`` objects, a copy for host arrays (queued
    on the call's stream, ``fastpool.cuda._stream``).

    A view's producer stream (the interface's ``stream``) is waited for on the GPU when
    the call's stream is not ordered with it; the host never waits (Numba's
    ``as_cuda_array`` would synchronise the host with that stream)."""
    from numba import cuda
    kind = array_kind(value)
    if kind is None:
        return value
    if kind == "host":
        return _host_to_device(np.asarray(value))
    from fastpool.cuda import _stream
    if kind == "numba":
        if value.stream != 0:  # bound to a stream: its work on the array comes first
            _stream.wait_for_stream(value.stream)
        return value
    _stream.wait_for(value.__cuda_array_interface__.get("stream"))
    return cuda.as_cuda_array(value, sync=False)


def _host_to_device(array):
    """One copy to the GPU that keeps a channels-last (any dense permuted) layout, so
    the kernels see the memory format the call was validated in; other strides are
    made C-contiguous."""
    from fastpool.cuda._launch import dense_order, unpermuted
    from fastpool.cuda._stream import upload
    order = None
    if not array.flags.c_contiguous and array.size:
        order = dense_order(array.shape, array.strides, array.itemsize)
    if order is None:
        return upload(array)
    # array.transpose(order) is C-contiguous: no host copy
    return unpermuted(upload(array.transpose(order)), order)


def from_device(result, kind, like):
    """Hand a Numba device array back as ``kind`` (the kind of the call's first array,
    ``like``): NumPy for host input (the one copy back), the same GPU array for Numba
    device arrays, a zero-copy CuPy array or torch tensor for those."""
    if result is None or isinstance(result, (bool, int, float)):
        return result  # values read back on the host (reproducible gradients' maxima)
    from fastpool.cuda import _stream
    if kind == "host":
        return _stream.download(result)
    if kind not in ("cupy", "torch"):
        return result
    owner = _stream.owner(result)
    if owner is not None:  # allocated by the library itself: no interface round trip
        return owner
    # Unbound from the call's stream: a bound one would make the library wait on the
    # host for that stream (its own current one, or the caller's explicit stream).
    result = result.bind(0)
    if kind == "cupy":
        import cupy
        return cupy.asarray(result)
    import torch
    return torch.as_tensor(result, device=like.device)


def _is_array(value):
    return isinstance(value, np.ndarray) or is_device_array(value)


def gpu_ordinal(value):
    """The ordinal of the GPU a CuPy array (``.device.id``) or torch CUDA tensor
    (``.device.index``) lives on; None when the array does not say (Numba device
    arrays, other ``__cuda_array_interface__`` objects, host arrays)."""
    if array_kind(value) not in ("cupy", "torch"):
        return None
    device = getattr(value, "device", None)
    for attribute in ("index", "id"):
        ordinal = getattr(device, attribute, None)
        if isinstance(ordinal, int):
            return ordinal
    return None


def check_current_gpu(arrays):
    """Raise ``ValueError`` when a GPU array lives on another GPU than Numba's current
    device, where the kernels would run: the array interface carries no device, so
    its pointer would be read in the wrong context. CuPy raises the same way."""
    ordinals = {gpu_ordinal(a) for a in arrays} - {None}
    if not ordinals:
        return
    from numba import cuda
    current = getattr(cuda.get_current_device(), "id", 0)  # the simulator's has no id
    if ordinals != {current}:
        raise ValueError(
            f"the GPU arrays live on device(s) {sorted(ordinals)} but Numba's current "
            f"device is {current}; run the call inside `with numba.cuda.gpus[i]:` (or "
            f"after numba.cuda.select_device(i)) for the device i the arrays are on")


def _inserted(shape, axis):
    shape = list(shape)
    shape.insert(axis % (len(shape) + 1), 1)
    return tuple(shape)


def unsqueeze(value, axis):
    """``value`` (any array kind fastpool takes) with a new axis of size 1 at ``axis``:
    a view, whatever its strides."""
    kind = array_kind(value)
    if kind is None:
        return None
    if kind == "host":
        return np.expand_dims(np.asarray(value), axis)
    if kind == "torch":
        return value.unsqueeze(axis)
    if kind == "cupy":
        return value.reshape(_inserted(value.shape, axis))
    from fastpool.cuda._launch import strided_view
    value = to_device(value)
    axis = axis % (value.ndim + 1)
    strides = list(value.strides)
    # The stride a C-contiguous array would give the new axis: contiguous stays so.
    strides.insert(axis, strides[axis] * value.shape[axis] if axis < value.ndim
                   else value.dtype.itemsize)
    return strided_view(value, _inserted(value.shape, axis), strides)


def squeeze(value, axis):
    """Remove the size-1 ``axis`` that ``unsqueeze`` added (results keep their kind)."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return np.squeeze(value, axis)
    if array_kind(value) in ("torch", "cupy"):
        return value.squeeze(axis)
    from fastpool.cuda._launch import strided_view
    shape, strides = list(value.shape), list(value.strides)
    del shape[axis], strides[axis]
    return strided_view(value, shape, strides)


def on_device(launcher):
    """Wrap a CUDA launcher (which takes and returns Numba device arrays) so that it
    takes the arrays the public functions validated and returns results of the kind of
    its first array argument. Non-array arguments (geometry, flags, seeds) pass through.
    """
    @functools.wraps(launcher)
    def run(*args):
        from fastpool.cuda import _stream
        like = next(a for a in args if _is_array(a))
        kind = array_kind(like)
        check_current_gpu([a for a in args if _is_array(a)])
        with _stream.call(kind, like, current_stream()):
            result = launcher(*(to_device(a) if _is_array(a) else a for a in args))
            if isinstance(result, tuple):
                return tuple(from_device(r, kind, like) for r in result)
            return from_device(result, kind, like)

    return run
