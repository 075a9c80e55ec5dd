"""Where a GPU call's work goes: the CUDA stream its kernels and copies are queued on,
and the allocator its outputs and scratch come from (docs/site/devices.md, "Streams
and memory").

A call follows its caller, as a CuPy or PyTorch operation does:

- the stream is the one named by the innermost ``fastpool.use_stream(...)`` block of
  the calling thread; else, for torch tensors, PyTorch's current stream on the
  tensor's device; for CuPy arrays, CuPy's current stream; for anything else Numba's
  default stream;
- inputs queued on a stream that the call's stream is not ordered with are waited for
  on the GPU (an event recorded there, waited on by the call's stream), never on the
  host: the stream an input's ``__cuda_array_interface__`` names (CuPy's arrays name
  one; Numba's device arrays are bound to one or none), and, for torch and CuPy calls,
  that library's current stream (PyTorch's interface names no stream at all);
- when a torch or CuPy call ran on another stream than that library's current one
  (inside ``fastpool.use_stream``), the library's current stream is made to wait for
  the call (an event), so the library's own later work sees the results;
- outputs and scratch of torch and CuPy calls come from that library's allocator
  (``torch.empty``, ``cupy.empty``: its caching allocator and memory pool, counted in
  its statistics and never freed with a device-wide ``cuMemFree``) when the call runs
  on that library's current stream, which that allocator orders its blocks with.
  Numba's allocator otherwise.

``call(...)`` sets this up for the duration of one launcher call (thread-local), and
the kernel modules read it through ``current``, ``empty``, ``zeros`` and ``upload``.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import numpy as np
from numba import config, cuda


class _Call(threading.local):
    stream = 0        # a Numba stream, or 0 for Numba's default stream
    handle = 0        # its raw handle (0: the default stream)
    allocate = None   # (shape, dtype) -> (Numba view, library array), or None
    owners = None     # pointer -> (weak reference to the library array, shape, strides)


_call = _Call()

# The CUDA Array Interface's names for the legacy and the per-thread default stream.
_LEGACY, _PER_THREAD = 1, 2
_DEFAULTS = (0, _LEGACY, _PER_THREAD)


class SimulatedStream:
    """What a raw stream handle becomes under Numba's CUDA simulator, which has no
    external streams (its execution is synchronous): a stream object that remembers
    the handle, so tests can see which stream a launch was given."""

    def __init__(self, handle):
        self.handle = handle

    def synchronize(self):
        pass

    def __repr__(self):
        return f"SimulatedStream({self.handle:#x})"


_streams = {}
_STREAMS_KEPT = 256


def numba_stream(handle):
    """The Numba stream object for a raw CUDA stream ``handle`` (0 for Numba's default
    stream), memoised per GPU: wrapping a handle costs no driver call, but a Python
    object per call."""
    if handle == 0:
        return 0
    if config.ENABLE_CUDASIM:
        key = (None, handle)
    else:
        key = (cuda.get_current_device().id, handle)
    found = _streams.get(key)
    if found is None:
        if config.ENABLE_CUDASIM:
            found = SimulatedStream(handle)
        elif handle == _LEGACY:
            found = cuda.legacy_default_stream()
        elif handle == _PER_THREAD:
            found = cuda.per_thread_default_stream()
        else:
            found = cuda.external_stream(handle)
        if len(_streams) >= _STREAMS_KEPT:  # wrappers own nothing: drop, not leak
            _streams.clear()
        _streams[key] = found
    return found


def raw_handle(stream):
    """The raw handle of a Numba stream (0: the default stream); under the simulator,
    whose streams have none, the object's identity stands for one."""
    if isinstance(stream, SimulatedStream):
        return stream.handle
    if config.ENABLE_CUDASIM:
        return id(stream)
    return int(stream.handle or 0)


def _numba_stream_class():
    if config.ENABLE_CUDASIM:
        from numba.cuda.simulator.api import stream
        return stream
    from numba.cuda.cudadrv.driver import Stream
    return Stream


def stream_handle(stream):
    """The raw handle of a stream given to ``fastpool.use_stream``: an int handle, a
    Numba stream, anything with ``__cuda_stream__`` (CUDA's stream protocol: CuPy,
    PyTorch, cuda-python), a ``torch.cuda.Stream`` (``cuda_stream``) or a CuPy stream
    (``ptr``). ``TypeError`` for anything else."""
    if isinstance(stream, SimulatedStream):
        return stream.handle
    if isinstance(stream, _numba_stream_class()):
        return raw_handle(stream)
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
        if stream < 0:
            raise ValueError(f"stream must be a CUDA stream or a handle >= 0, got {stream}")
        return int(stream)
    protocol = getattr(stream, "__cuda_stream__", None)
    if callable(protocol):
        return int(protocol()[1])
    for attribute in ("cuda_stream", "ptr"):
        value = getattr(stream, attribute, None)
        if isinstance(value, int):
            return value
    raise TypeError(
        "stream must be a CUDA stream (a Numba, CuPy or PyTorch stream, or anything "
        f"with __cuda_stream__) or an int handle, got {type(stream).__name__}")


def _library_stream(kind, like):
    """The raw handle of the current stream of ``like``'s library (0 for none)."""
    if kind == "torch":
        import torch
        return torch.cuda.current_stream(like.device).cuda_stream
    if kind == "cupy":
        import cupy
        with like.device:  # CuPy's current device may be another GPU than the array's
            return cupy.cuda.get_current_stream().ptr
    return 0


_TORCH_DTYPES = ("float16", "float32", "float64", "int32", "int64")


def _torch_allocator(like):
    import torch
    device = like.device

    def allocate(shape, dtype):
        name = np.dtype(dtype).name  # torch's dtypes bear NumPy's names
        if name not in _TORCH_DTYPES:
            return None
        return torch.empty(shape, dtype=getattr(torch, name), device=device)

    return allocate


def _cupy_allocator(like):
    import cupy
    device = like.device

    def allocate(shape, dtype):
        with device:
            return cupy.empty(shape, dtype)

    return allocate


_ALLOCATORS = {"torch": _torch_allocator, "cupy": _cupy_allocator}


@contextlib.contextmanager
def call(kind, like, explicit=None):
    """Run one launcher call on the caller's stream (see the module docstring):
    ``kind`` and ``like`` are the call's first array and its kind, ``explicit`` the
    stream of an enclosing ``fastpool.use_stream`` block, or None."""
    library = _library_stream(kind, like) if kind in _ALLOCATORS else None
    handle = (library or 0) if explicit is None else stream_handle(explicit)
    saved = (_call.stream, _call.handle, _call.allocate, _call.owners)
    if isinstance(explicit, _numba_stream_class()):
        _call.stream = explicit
    else:
        _call.stream = numba_stream(handle)
    _call.handle = handle
    _call.allocate = None
    _call.owners = None
    try:
        if library is not None:
            if _same_stream(handle, library):
                _call.allocate = _ALLOCATORS[kind](like)
                _call.owners = {}
            else:  # its inputs were queued on the library's current stream
                wait_for(library)
        yield
        if library is not None and not ordered(handle, library):
            _join(_call.stream, numba_stream(library))
    finally:
        _call.stream, _call.handle, _call.allocate, _call.owners = saved


def _same_stream(a, b):
    return a == b or (a in (0, _LEGACY) and b in (0, _LEGACY))


def ordered(producer, consumer):
    """Whether work queued on stream handle ``consumer`` runs after work queued before
    it on ``producer`` (interface handles: None for "no stream", 1 legacy default, 2
    per-thread default; 0 here is Numba's default, the legacy stream): the same stream,
    or two default streams (each synchronises with the other)."""
    if producer is None:
        return True
    if _same_stream(producer, consumer):
        return True
    return producer in _DEFAULTS and consumer in _DEFAULTS


def current():
    """The stream the call in progress queues its work on (0: Numba's default)."""
    return _call.stream


def wait_for(producer):
    """Make the call's stream wait, on the GPU, for the work queued so far on the
    stream with interface handle ``producer`` (no host wait); nothing when they are
    already ordered."""
    if ordered(producer, _call.handle):
        return False
    _join(numba_stream(producer), _call.stream)
    return True


def wait_for_stream(producer):
    """``wait_for`` given a Numba stream object (a device array's bound stream)."""
    if ordered(raw_handle(producer), _call.handle):
        return False
    _join(producer, _call.stream)
    return True


def _join(producer, consumer):
    """Make Numba stream ``consumer`` wait, on the GPU, for the work queued so far on
    ``producer``."""
    # The simulator's events take no arguments; real ones skip timing (cheaper).
    event = cuda.event() if config.ENABLE_CUDASIM else cuda.event(timing=False)
    event.record(producer)
    event.wait(consumer)


def _pointer(view):
    if config.ENABLE_CUDASIM:
        return view._ary.ctypes.data
    return view.device_ctypes_pointer.value


def empty(shape, dtype):
    """An uninitialised device array: from the caller's library when the call takes
    one (its result is handed back as that library's own array), else Numba's."""
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
    allocate = _call.allocate
    if allocate is not None and 0 not in shape:
        owned = allocate(shape, dtype)
        if owned is not None:
            view = cuda.as_cuda_array(owned, sync=False)
            _call.owners[_pointer(view)] = (_reference(owned), view.shape, view.strides)
            return view
    return cuda.device_array(shape, dtype, stream=0)


def upload(host):
    """A device copy of the NumPy array ``host``, queued on the call's stream."""
    host = np.ascontiguousarray(host)
    target = empty(host.shape, host.dtype)
    if host.size:
        target.copy_to_device(host, stream=_call.stream)
    return target


def zeros(shape, dtype):
    """A zero-filled device array, filled on the call's stream."""
    return upload(np.zeros(shape, dtype))


def download(array):
    """``array`` copied to a NumPy array, waiting for the call's stream: the one place
    a call waits on the host (a result asked for on the host, a flag read back)."""
    stream = _call.stream or array.stream  # a copy with stream 0 uses the array's
    host = array.copy_to_host(stream=stream)
    if stream != 0:  # an asynchronous copy: wait for it
        stream.synchronize()
    return host


def _reference(owned):
    # Weak: scratch arrays die with the call's locals, not at its end.
    try:
        return weakref.ref(owned)
    except TypeError:  # a type without weak references
        return lambda: owned


def owner(result):
    """The library array that ``empty`` allocated at ``result``'s memory, or a view of
    it with ``result``'s shape and strides (a reshaped or axis-permuted result); None
    for memory the library did not allocate in this call."""
    owners = _call.owners
    found = owners.get(_pointer(result)) if owners else None
    owned = found[0]() if found else None
    if owned is None:
        return None
    if (found[1], found[2]) == (result.shape, result.strides):
        return owned
    return library_view(owned, result.shape, result.strides, result.dtype.itemsize)


def library_view(owned, shape, strides, itemsize):
    """A view of the torch tensor or CuPy array ``owned``, from its first element, with
    ``shape`` and byte ``strides``."""
    if hasattr(owned, "as_strided"):  # torch counts strides in elements
        return owned.as_strided(shape, tuple(s // itemsize for s in strides))
    import cupy
    return cupy.lib.stride_tricks.as_strided(owned, shape, strides)
