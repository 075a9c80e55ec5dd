"""CuPy arrays and PyTorch CUDA tensors through the dispatcher: what goes in, what comes
back, and on which GPU.

With a GPU and the library installed, the real round trips run (``test_real_*``; the
torch one lives in ``test_torch.py``). Under Numba's CUDA simulator, where neither
library can exist and Numba has no ``as_cuda_array``, host-backed stand-ins play
CuPy and torch: they expose ``__cuda_array_interface__`` and live in a module named
``cupy`` or ``torch``, which is all the dispatcher looks at, and fake ``cupy.asarray`` /
``torch.as_tensor`` receive the results. That checks fastpool's side of the hand-over
(kind detection, zero-copy views in and out, the result kind of every output, the
device passed to torch, the device check); the libraries' side needs a real GPU.
"""

import sys
import types

import numpy as np
import pytest
from numba import config

import fastpool
from fastpool import _dispatch

SIMULATOR = bool(config.ENABLE_CUDASIM)
simulator_only = pytest.mark.skipif(
    not SIMULATOR, reason="host-backed stand-ins only work where device memory is host "
                          "memory (the simulator)")


class _Device(types.SimpleNamespace):
    """A library's device object: ``index`` (torch), ``id`` and a context (CuPy)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _HostBackedGpuArray:
    """A GPU array as the dispatcher sees one: ``__cuda_array_interface__`` (here over
    host memory, which is what simulated device memory is) and a ``device``."""

    def __init__(self, host, ordinal=0, stream=None):
        self.host = host
        self.device = _Device(index=ordinal, id=ordinal)
        self.stream = stream

    @property
    def shape(self):
        return self.host.shape

    @property
    def dtype(self):
        return self.host.dtype

    def as_strided(self, shape, strides):
        """torch's ``Tensor.as_strided`` (strides in elements), from the first element."""
        view = np.lib.stride_tricks.as_strided(
            self.host, shape, tuple(s * self.host.itemsize for s in strides))
        return type(self)(view, self.device.index)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.host.shape, "typestr": self.host.dtype.str,
                "data": (self.host.ctypes.data, False), "version": 3,
                "strides": self.host.strides, "stream": self.stream}


# The dispatcher tells libraries apart by the module of the array's type.
CupyArray = type("ndarray", (_HostBackedGpuArray,), {"__module__": "cupy._core.core"})
TorchTensor = type("Tensor", (_HostBackedGpuArray,), {"__module__": "torch"})
OtherGpuArray = type("Array", (_HostBackedGpuArray,), {"__module__": "somelib"})
KINDS = {"cupy": CupyArray, "torch": TorchTensor}


def test_kinds_are_told_apart_by_module():
    host = np.zeros((1, 1, 2, 2), np.float32)
    assert _dispatch.array_kind(CupyArray(host)) == "cupy"
    assert _dispatch.array_kind(TorchTensor(host)) == "torch"
    assert _dispatch.array_kind(OtherGpuArray(host)) == "cuda"
    assert _dispatch.array_kind(host) == "host"


def test_gpu_ordinal_is_read_from_cupy_and_torch_only():
    host = np.zeros((1, 1, 2, 2), np.float32)
    assert _dispatch.gpu_ordinal(CupyArray(host, 3)) == 3
    assert _dispatch.gpu_ordinal(TorchTensor(host, 2)) == 2
    # The array interface carries no device; nothing else is guessed.
    assert _dispatch.gpu_ordinal(OtherGpuArray(host, 2)) is None
    assert _dispatch.gpu_ordinal(host) is None


@pytest.fixture
def stand_ins(monkeypatch):
    """Numba's ``as_cuda_array`` and the libraries' side of the hand-over, over host
    memory: their constructors (``cupy.asarray``, ``torch.as_tensor``), allocators
    (``cupy.empty``, ``torch.empty``) and current streams (``streams["cupy"]``,
    ``streams["torch"]``: raw handles, 0 = the default stream). Returns the log of what
    each was called with."""
    from numba import cuda
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    calls = {"as_cuda_array": [], "sync": [], "asarray": [], "as_tensor": [],
             "empty": [], "as_strided": [], "streams": {"cupy": 0, "torch": 0}}

    def as_cuda_array(obj, sync=True):
        calls["as_cuda_array"].append(obj)
        calls["sync"].append(sync)
        view = FakeCUDAArray(obj.host)  # a view: no copy, as Numba's is
        return view

    def cupy_asarray(result):
        calls["asarray"].append(result)
        return CupyArray(result._ary)

    def cupy_empty(shape, dtype):
        array = CupyArray(np.empty(shape, dtype))
        calls["empty"].append(array)
        return array

    def torch_as_tensor(result, device=None):
        calls["as_tensor"].append((result, device))
        return TorchTensor(result._ary, device.index)

    def torch_empty(shape, dtype=None, device=None):
        tensor = TorchTensor(np.empty(shape, dtype), device.index)
        calls["empty"].append(tensor)
        return tensor

    def torch_current_stream(device=None):
        return types.SimpleNamespace(cuda_stream=calls["streams"]["torch"])

    def cupy_current_stream():
        return types.SimpleNamespace(ptr=calls["streams"]["cupy"])

    monkeypatch.setattr(cuda, "as_cuda_array", as_cuda_array, raising=False)
    def cupy_as_strided(array, shape, strides):
        calls["as_strided"].append(array)
        return CupyArray(np.lib.stride_tricks.as_strided(array.host, shape, strides))

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
        asarray=cupy_asarray, empty=cupy_empty,
        cuda=types.SimpleNamespace(get_current_stream=cupy_current_stream),
        lib=types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
            as_strided=cupy_as_strided))))
    # torch's dtypes bear NumPy's names; the stand-in's are NumPy's.
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(
        as_tensor=torch_as_tensor, empty=torch_empty,
        cuda=types.SimpleNamespace(current_stream=torch_current_stream),
        **{name: np.dtype(name) for name in
           ("float16", "float32", "float64", "int32", "int64")}))
    return calls


def _calls(x, w, gy_pool, gy_conv, idx):
    """A call of each public function, with every output that can come back."""
    return {
        "max": lambda: fastpool.max_pool2d(x, 2, return_indices=True),
        "max_backward": lambda: fastpool.max_pool2d_backward(gy_pool, x, 2, indices=idx),
        "avg_backward": lambda: fastpool.avg_pool2d_backward(gy_pool, x, 2),
        "stochastic": lambda: fastpool.stochastic_pool2d(x, 2, seed=5,
                                                         return_indices=True),
        "conv": lambda: fastpool.conv2d(x, w, padding=1),
        "conv_backward": lambda: tuple(fastpool.conv2d_backward(gy_conv, x, w, padding=1)),
    }


def _host_inputs():
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 4, 4)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    gy_pool = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    gy_conv = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    idx = fastpool.max_pool2d(x, 2, return_indices=True, device="cpu")[1]
    return x, w, gy_pool, gy_conv, idx


@simulator_only
@pytest.mark.parametrize("op", list(_calls(*[None] * 5)))
@pytest.mark.parametrize("kind", list(KINDS))
def test_library_arrays_in_library_arrays_out(stand_ins, kind, op):
    host = _host_inputs()
    ordinal = 0
    wrapped = [KINDS[kind](a, ordinal) if a.dtype.kind == "f" else a for a in host]
    # Indices are int64 and stay host-side in the CPU call; on the GPU they must be the
    # same kind as the rest.
    wrapped[4] = KINDS[kind](host[4], ordinal)
    expected = _calls(*host)[op]()
    result = _calls(*wrapped)[op]()
    expected = expected if isinstance(expected, tuple) else (expected,)
    result = result if isinstance(result, tuple) else (result,)
    for got, want in zip(result, expected):
        assert type(got) is KINDS[kind]  # every output comes back as the input's kind
        np.testing.assert_allclose(got.host, want, rtol=2e-5, atol=2e-6)
    # Inputs went in as zero-copy views of the library's memory (so did the arrays the
    # library allocated for the call) ...
    viewed = {id(a) for a in stand_ins["as_cuda_array"]}
    inputs = {id(a) for a in wrapped}
    assert viewed & inputs
    assert viewed <= inputs | {id(a) for a in stand_ins["empty"]}
    # ... and each output is an array the library allocated itself, on the input's
    # device (with the library's allocator, on its current stream: the call's).
    allocated = {id(a) for a in stand_ins["empty"]}
    assert all(id(got) in allocated for got in result)
    assert stand_ins["asarray"] == stand_ins["as_tensor"] == []
    assert {a.device.index for a in stand_ins["empty"]} == {ordinal}


@simulator_only
@pytest.mark.parametrize("kind", list(KINDS))
def test_array_on_another_gpu_is_refused_before_any_kernel(stand_ins, kind):
    x, w, gy_pool, gy_conv, idx = _host_inputs()
    with pytest.raises(ValueError, match=r"device\(s\) \[1\].*current device is 0"):
        fastpool.max_pool2d(KINDS[kind](x, 1), 2)
    # One argument on another GPU is enough.
    with pytest.raises(ValueError, match=r"device\(s\) \[0, 1\]"):
        fastpool.conv2d(KINDS[kind](x, 0), KINDS[kind](w, 1))
    assert stand_ins["as_cuda_array"] == []  # nothing reached Numba, let alone a kernel


def test_library_array_with_host_array_is_refused():
    x, w, *_ = _host_inputs()
    for kind in KINDS.values():
        with pytest.raises(ValueError, match="mix host"):
            fastpool.conv2d(kind(x), w)


@pytest.mark.skipif(SIMULATOR, reason="needs a real GPU")
def test_real_cupy_round_trip():
    cupy = pytest.importorskip("cupy")
    x, w, gy_pool, gy_conv, idx = _host_inputs()
    y, indices = fastpool.max_pool2d(cupy.asarray(x), 2, return_indices=True)
    assert isinstance(y, cupy.ndarray) and isinstance(indices, cupy.ndarray)
    expected_y, expected_idx = fastpool.max_pool2d(x, 2, return_indices=True, device="cpu")
    np.testing.assert_array_equal(cupy.asnumpy(y), expected_y)
    np.testing.assert_array_equal(cupy.asnumpy(indices), expected_idx)
    grads = fastpool.conv2d_backward(cupy.asarray(gy_conv), cupy.asarray(x),
                                     cupy.asarray(w), padding=1)
    expected = fastpool.conv2d_backward(gy_conv, x, w, padding=1, device="cpu")
    for got, want in zip(grads, expected):
        assert isinstance(got, cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=2e-5, atol=2e-5)




# ----------------------------------------------------------------------------- streams

@pytest.fixture
def launches(monkeypatch):
    """The stream each kernel launch was given (the simulator ignores it)."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    seen = []
    configure = FakeCUDAKernel.__getitem__

    def recording(self, configuration):
        seen.append(configuration[2] if len(configuration) > 2 else 0)
        return configure(self, configuration)

    monkeypatch.setattr(FakeCUDAKernel, "__getitem__", recording)
    return seen


@pytest.fixture
def events(monkeypatch):
    """``(recorded on, waited on by)`` for every CUDA event fastpool makes."""
    from numba import cuda
    made = []

    class Event:
        def __init__(self):
            made.append(self)
            self.on = self.by = None

        def record(self, stream=0):
            self.on = stream

        def wait(self, stream=0):
            self.by = stream

    monkeypatch.setattr(cuda, "event", Event)
    return made


def _handle(stream):
    return getattr(stream, "handle", stream)


SIDE, OTHER = 0x7F00_1000, 0x7F00_2000


@simulator_only
@pytest.mark.parametrize("current", [0, SIDE], ids=["default", "side"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_kernels_follow_the_librarys_current_stream(stand_ins, launches, events, kind,
                                                    current):
    """A torch tensor's call runs on PyTorch's current stream, a CuPy array's on CuPy's
    (``with torch.cuda.stream(s):`` / ``with cupy.cuda.Stream():``), with outputs from
    the library's allocator, and no wait anywhere: the inputs were queued on that
    same stream."""
    stand_ins["streams"][kind] = current
    x, w, gy_pool, gy_conv, idx = _host_inputs()
    # The array interface names the current stream (1 for the default one), as both
    # libraries' arrays do.
    named = current or 1
    y = fastpool.conv2d(KINDS[kind](x, stream=named), KINDS[kind](w, stream=named),
                        padding=1)
    np.testing.assert_allclose(y.host, fastpool.conv2d(x, w, padding=1), rtol=2e-5,
                               atol=2e-6)
    assert launches and {_handle(s) for s in launches} == {current}
    assert events == []
    assert stand_ins["sync"] and not any(stand_ins["sync"])  # no host wait either
    assert id(y) in {id(a) for a in stand_ins["empty"]}


@simulator_only
@pytest.mark.parametrize("producer, waits", [(None, False), (1, False), (2, False),
                                             (OTHER, True)],
                         ids=["none", "legacy-default", "per-thread-default", "side"])
def test_an_input_from_another_stream_is_waited_for_on_the_gpu(
        stand_ins, launches, events, producer, waits):
    """An input whose interface names a stream the call's is not ordered with: the
    call's stream waits for an event recorded there. Never the host: Numba's
    ``as_cuda_array`` is always asked not to synchronise."""
    host = np.random.default_rng(0).random((1, 2, 4, 4)).astype(np.float32)
    for kind in (CupyArray, TorchTensor):
        events.clear()
        y = fastpool.max_pool2d(kind(host, stream=producer), 2)
        np.testing.assert_array_equal(y.host, fastpool.max_pool2d(host, 2))
        assert [(_handle(e.on), _handle(e.by)) for e in events] == (
            [(OTHER, 0)] if waits else [])
    assert not any(stand_ins["sync"])


@simulator_only
def test_side_stream_input_on_a_side_stream_call(stand_ins, launches, events):
    """Both streams side streams: ordered only when they are the same one."""
    stand_ins["streams"]["torch"] = SIDE
    host = np.random.default_rng(1).random((1, 2, 4, 4)).astype(np.float32)
    fastpool.avg_pool2d(TorchTensor(host, stream=SIDE), 2)
    assert events == []
    fastpool.avg_pool2d(TorchTensor(host, stream=OTHER), 2)
    assert [(_handle(e.on), _handle(e.by)) for e in events] == [(OTHER, SIDE)]
    # The legacy default stream does not order a non-blocking side stream either.
    events.clear()
    fastpool.avg_pool2d(TorchTensor(host, stream=1), 2)
    assert [(_handle(e.on), _handle(e.by)) for e in events] == [(1, SIDE)]


class _TorchStream:
    def __init__(self, handle):
        self.cuda_stream = handle


class _CupyStream:
    def __init__(self, handle):
        self.ptr = handle


class _ProtocolStream:
    def __init__(self, handle):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


@simulator_only
@pytest.mark.parametrize("make", [int, _TorchStream, _CupyStream, _ProtocolStream],
                         ids=["handle", "torch", "cupy", "protocol"])
def test_use_stream_puts_every_launch_and_copy_on_that_stream(stand_ins, launches, events,
                                                             make):
    """``fastpool.use_stream`` beats the library's current stream; host inputs are
    copied in and out on it too (and the copy back waits for that stream only). A torch
    call there waits for torch's current stream first (PyTorch's array interface names
    no stream: its inputs were queued there), and torch's stream waits for the call's
    at the end, so torch's own later work sees the result."""
    host = np.random.default_rng(2).random((2, 3, 6, 6)).astype(np.float32)
    stand_ins["streams"]["torch"] = SIDE
    with fastpool.use_stream(make(OTHER)):
        y = fastpool.max_pool2d(host, 2, device="cuda")  # NumPy in, NumPy out
        assert events == []
        t = fastpool.max_pool2d(TorchTensor(host), 2)
    assert [(_handle(e.on), _handle(e.by)) for e in events] == [(SIDE, OTHER),
                                                                 (OTHER, SIDE)]
    np.testing.assert_array_equal(y, fastpool.max_pool2d(host, 2))
    assert {_handle(s) for s in launches} == {OTHER}
    # Not the caller's library stream: its allocator (ordered with that stream) is not
    # used; the result is a zero-copy view handed over unbound from any stream, so the
    # library does not wait on the host for it.
    assert stand_ins["empty"] == []
    (result, _), = stand_ins["as_tensor"]
    assert result.stream == 0 and type(t) is TorchTensor
    np.testing.assert_array_equal(t.host, y)


@simulator_only
def test_use_stream_nests_and_none_follows_the_caller_again(stand_ins, launches):
    host = np.random.default_rng(3).random((1, 1, 4, 4)).astype(np.float32)
    stand_ins["streams"]["cupy"] = SIDE
    with fastpool.use_stream(OTHER):
        with fastpool.use_stream(None):
            fastpool.max_pool2d(CupyArray(host, stream=SIDE), 2)
        fastpool.max_pool2d(CupyArray(host, stream=SIDE), 2)
    fastpool.max_pool2d(CupyArray(host, stream=SIDE), 2)
    handles = [_handle(s) for s in launches]
    assert handles == [SIDE, OTHER, SIDE]


@simulator_only
def test_numba_device_arrays_use_numbas_default_stream_or_use_stream(launches):
    from numba import cuda
    host = np.random.default_rng(4).random((1, 1, 4, 4)).astype(np.float32)
    fastpool.max_pool2d(cuda.to_device(host), 2)
    stream = cuda.stream()
    with fastpool.use_stream(stream):
        fastpool.max_pool2d(cuda.to_device(host), 2)
    assert launches == [0, stream]


def test_use_stream_refuses_what_is_not_a_stream():
    with pytest.raises(TypeError, match="stream must be a CUDA stream"):
        with fastpool.use_stream("side"):
            pass
    with pytest.raises(ValueError, match="stream must be"):
        with fastpool.use_stream(-1):
            pass
    with pytest.raises(TypeError, match="stream must be"):
        with fastpool.use_stream(True):
            pass


@simulator_only
def test_host_inputs_the_kernels_do_not_read_are_not_copied(monkeypatch):
    """Given the indices, the max and stochastic-training backwards read no ``x``:
    NumPy inputs of such calls copy only ``grad_output`` and ``indices`` to the GPU."""
    from fastpool.cuda import _stream
    uploaded = []
    upload = _stream.upload

    def recording(host):
        uploaded.append(np.shape(host))
        return upload(host)

    monkeypatch.setattr(_stream, "upload", recording)
    rng = np.random.default_rng(5)
    x = rng.random((2, 3, 6, 6)).astype(np.float32)
    gy = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    _, idx = fastpool.max_pool2d(x, 2, return_indices=True)
    _, s_idx = fastpool.stochastic_pool2d(x, 2, seed=1, return_indices=True)
    calls = [
        (lambda d: fastpool.max_pool2d_backward(gy, x, 2, indices=idx, device=d)),
        (lambda d: fastpool.stochastic_pool2d_backward(gy, x, 2, indices=s_idx, device=d)),
        (lambda d: fastpool.adaptive_max_pool2d_backward(gy, x, 3, indices=idx,
                                                         device=d)),
    ]
    for call in calls:
        uploaded.clear()
        np.testing.assert_array_equal(call("cuda"), call("cpu"))
        assert uploaded and x.shape not in uploaded
    # Without the indices, x is read (and copied).
    uploaded.clear()
    fastpool.max_pool2d_backward(gy, x, 2, device="cuda")
    assert x.shape in uploaded


@simulator_only
def test_a_numba_array_bound_to_a_stream_is_waited_for(launches, events):
    from numba import cuda
    host = np.random.default_rng(6).random((1, 1, 4, 4)).astype(np.float32)
    producer = cuda.stream()
    bound = cuda.to_device(host).bind(producer)
    y = fastpool.max_pool2d(bound, 2)
    np.testing.assert_array_equal(y.copy_to_host(), fastpool.max_pool2d(host, 2))
    assert [(e.on, e.by) for e in events] == [(producer, 0)]
    events.clear()
    with fastpool.use_stream(producer):  # the same stream: nothing to wait for
        fastpool.max_pool2d(bound, 2)
    assert events == []


@simulator_only
@pytest.mark.parametrize("kind", list(KINDS))
def test_reshaped_and_permuted_results_are_views_of_the_librarys_arrays(stand_ins, kind):
    """A channels-last result is one (N, H, W, C) allocation viewed in (N, C, H, W)
    order: it comes back as the library's own view of that allocation, not through its
    interface constructor."""
    host = np.random.default_rng(7).random((2, 3, 6, 8)).astype(np.float32)
    nhwc = np.ascontiguousarray(host.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y = fastpool.max_pool2d(KINDS[kind](nhwc), 2)
    expected = fastpool.max_pool2d(nhwc, 2)
    assert type(y) is KINDS[kind] and y.host.strides == expected.strides
    np.testing.assert_array_equal(y.host, expected)
    assert stand_ins["asarray"] == stand_ins["as_tensor"] == []
    allocation, = stand_ins["empty"]
    assert np.shares_memory(y.host, allocation.host)


@simulator_only
def test_reproducible_gradients_read_their_maxima_on_the_callers_stream(
        stand_ins, launches):
    stand_ins["streams"]["torch"] = SIDE
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    grads = fastpool.conv2d_backward(TorchTensor(gy), TorchTensor(x), TorchTensor(w),
                                     reproducible=True)
    expected = fastpool.conv2d_backward(gy, x, w, reproducible=True)
    np.testing.assert_allclose(grads[0].host, expected[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads[1:], expected[1:]):  # the reproducible ones: bitwise
        np.testing.assert_array_equal(got.host, want)
    assert launches and {_handle(s) for s in launches} == {SIDE}


@simulator_only
def test_half_precision_copies_go_to_the_calls_stream(monkeypatch, launches):
    """float16 Numba arrays in a convolution (computed in float32): widened and rounded
    through the host, with the copies on the call's stream too."""
    from numba import cuda
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    copies = []
    to_host, to_device = FakeCUDAArray.copy_to_host, FakeCUDAArray.copy_to_device

    def recording_to_host(self, ary=None, stream=0):
        copies.append(stream)
        return to_host(self, ary, stream=stream)

    def recording_to_device(self, ary, stream=0):
        copies.append(stream)
        return to_device(self, ary, stream=stream)

    monkeypatch.setattr(FakeCUDAArray, "copy_to_host", recording_to_host)
    monkeypatch.setattr(FakeCUDAArray, "copy_to_device", recording_to_device)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float16)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float16)
    d_x, d_w = cuda.to_device(x), cuda.to_device(w)
    copies.clear()
    with fastpool.use_stream(OTHER):
        y = fastpool.conv2d(d_x, d_w)
    seen = list(copies)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y.copy_to_host(), fastpool.conv2d(x, w))
    assert launches and {_handle(s) for s in launches} == {OTHER}
    assert seen and {_handle(s) for s in seen} == {OTHER}
