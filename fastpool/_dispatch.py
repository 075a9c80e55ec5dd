"""Device resolution and backend selection (DESIGN.md section 3).

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

DEVICES = ("cpu", "cuda", "auto")
ENV_VAR = "FASTPOOL_DEVICE"


class CudaUnavailableError(RuntimeError):
    """Raised when ``device="cuda"`` is asked for and no usable GPU backend exists."""


_global_device = None
_local = threading.local()


def _check_device(device, source):
    if not isinstance(device, str) or device.lower() not in DEVICES:
        raise ValueError(f"{source} must be one of {DEVICES}, got {device!r}")
    return device.lower()


def set_device(device):
    """Set the process-wide default device (``"cpu"``, ``"cuda"``, ``"auto"`` or ``None``).

    ``None`` clears it, so ``FASTPOOL_DEVICE`` and then ``"auto"`` apply again.
    """
    global _global_device
    _global_device = None if device is None else _check_device(device, "device")


@contextlib.contextmanager
def use_device(device):
    """Context manager: use ``device`` for calls made by this thread inside the block."""
    device = _check_device(device, "device")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(device)
    try:
        yield device
    finally:
        stack.pop()


def get_device(device=None):
    """The device a call with ``device=device`` would be configured for, before ``"auto"``
    looks at the inputs: one of ``"cpu"``, ``"cuda"``, ``"auto"``."""
    if device is not None:
        return _check_device(device, "device")
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if _global_device is not None:
        return _global_device
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_device(env, f"environment variable {ENV_VAR}")
    return "auto"


def is_device_array(value):
    """Whether ``value`` lives on the GPU (numba device array, CuPy, torch CUDA tensor)."""
    return value is not None and hasattr(value, "__cuda_array_interface__")


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


def cuda_available():
    """Whether a usable CUDA GPU (or Numba's CUDA simulator) is available."""
    return _probe_cuda()[0]


def resolve(device, *arrays):
    """Resolve the device for one call: ``"cpu"`` or ``"cuda"``.

    Raises ``ValueError`` for a bad device name or for GPU data with ``device="cpu"``,
    ``CudaUnavailableError`` when ``"cuda"`` cannot be served.
    """
    configured = get_device(device)
    on_gpu = any(is_device_array(a) for a in arrays)
    if configured == "auto":
        configured = "cuda" if on_gpu else "cpu"
    if configured == "cpu" and on_gpu:
        raise ValueError(
            "device='cpu' was asked for but an input lives on the GPU; move it to the "
            "host first or use device='cuda'")
    return configured


def backend(device, *arrays):
    """Resolve the device and return the kernel module for it (``fastpool.cpu``)."""
    resolved = resolve(device, *arrays)
    if resolved == "cpu":
        from fastpool import cpu
        return cpu
    available, reason = _probe_cuda()
    if not available:
        raise CudaUnavailableError(f"device='cuda' was asked for but {reason}")
    raise CudaUnavailableError(
        "device='cuda': a GPU is available but this version of fastpool has no CUDA "
        "kernels yet; use device='cpu'")
