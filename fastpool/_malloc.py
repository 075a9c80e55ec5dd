"""Fixed glibc malloc thresholds, so that kernels' scratch buffers are not handed back
to the system and faulted in again on every call.

The CPU kernels allocate their scratch (Winograd transforms, gathered columns, partial
sums) inside each call, through Numba's runtime, i.e. ``malloc``. glibc serves blocks
of at least ``M_MMAP_THRESHOLD`` (128 KiB at start) with fresh ``mmap`` pages and trims
the heap's top back to the system past ``M_TRIM_THRESHOLD``, raising both only as the
process happens to free large blocks. So the same call's speed depended on the
process's history: a 3x3 conv of (4, 16, 32, 32) float64 took 0.22 ms in a process
that had compiled its kernels (LLVM's large frees had raised the thresholds) and 0.78
ms in one that loaded them from Numba's disk cache, paying 489 page faults a call for
its 4 MB of scratch (2026-12-07, Intel Xeon, one thread 0.36 against 0.81 ms).

``tune()`` sets the two thresholds to what glibc's own adjustment reaches at most (32
MiB for ``mmap``, twice that for trimming): blocks under 32 MiB come from the heap and
up to 64 MiB of freed heap stays mapped. It changes nothing where the C library is not
glibc, where the user set glibc's malloc parameters (``MALLOC_*_`` environment
variables or ``glibc.malloc`` tunables), or where ``FASTPOOL_MALLOC_TUNING=0``. Where
another allocator is preloaded (jemalloc, tcmalloc) glibc's ``mallopt`` is still
found and called, and does nothing to that allocator.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading

import numpy as np

# glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# glibc's ceiling for its own dynamic threshold on 64-bit systems
# (``DEFAULT_MMAP_THRESHOLD_MAX``), and the trim threshold it pairs with it.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "MALLOC_MMAP_MAX_")

_lock = threading.Lock()
_state = None


def _reason_not_to(environ):
    """Why the thresholds are left alone, or None."""
    if environ.get("FASTPOOL_MALLOC_TUNING", "1") == "0":
        return "FASTPOOL_MALLOC_TUNING=0"
    if not sys.platform.startswith("linux"):
        return f"platform {sys.platform}"
    for name in _USER_SETTINGS:
        if name in environ:
            return f"{name} is set"
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    return None


def tune(environ=None):
    """Set glibc's thresholds once per process; returns what was done (a string)."""
    global _state
    with _lock:
        if _state is not None:
            return _state
        reason = _reason_not_to(os.environ if environ is None else environ)
        if reason is None:
            try:
                libc = ctypes.CDLL(None)
                libc.gnu_get_libc_version  # glibc only (musl has no such function)
                mallopt = libc.mallopt
            except (OSError, AttributeError):
                reason = "not glibc"
            else:
                mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
                mallopt.restype = ctypes.c_int
                refused = [name for name, parameter, value in (
                    ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                    ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD))
                    if mallopt(parameter, value) != 1]
                reason = f"mallopt refused {', '.join(refused)}" if refused else None
        _state = "tuned" if reason is None else f"left alone: {reason}"
        return _state


class _Kept(threading.local):
    # class defaults: a thread-local's missing attribute raises and catches on lookup
    buffer = None
    idle = 0  # ``buffer``'s reference count in ``kept_empty`` with no array from it


_kept = _Kept()


def kept_empty(shape, dtype):
    """An uninitialised array of ``shape`` and ``dtype`` for scratch that lives only
    during one call: blocks of at least ``MMAP_THRESHOLD`` bytes come from one buffer
    kept per calling thread (grown as needed, never shrunk), smaller ones from
    ``np.empty``. glibc maps such blocks afresh on every call, and the kernel zeroes
    each page the call touches: a float64 512x512 3x3 weight's Winograd transform (33.5
    MB) took 9.2 ms fresh against 1.45 ms in a reused buffer, batch 32 of a float32 3x3
    stride-2 256->512 weight gradient on 14x14 (61 MB of partial sums) 27-33 against
    22-23 ms (2026-12-07, Intel Xeon, 2 threads). While an array from the buffer is
    alive (any view of it), a second request gets fresh memory, so two scratch arrays
    never share memory; the array must not outlive the call (the next call in the
    same thread reuses the buffer)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MMAP_THRESHOLD:
        return np.empty(shape, dtype)
    buffer = _kept.buffer
    # more references than when it was made here (the thread-local's, this name's and
    # whatever the interpreter counts for the call, measured then, not assumed: Python
    # 3.14 may lend a local to a call without a reference) are arrays from it
    if buffer is not None and sys.getrefcount(buffer) > _kept.idle:
        return np.empty(shape, dtype)
    if buffer is None or buffer.nbytes < nbytes:
        _kept.buffer = buffer = None  # the old buffer freed before the larger one
        buffer = _kept.buffer = np.empty(nbytes, np.uint8)
        _kept.idle = sys.getrefcount(buffer)
    return buffer[:nbytes].view(dtype).reshape(shape)


def release_kept():
    """Unmap this thread's ``kept_empty`` buffer (tests; a long-lived thread that has
    finished with large layers)."""
    _kept.buffer = None
