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


class _HostBackedGpuArray:
    """A GPU array as the dispatcher sees one: ``__cuda_array_interface__`` (here over
    host memory, which is what simulated device memory is) and a ``device``."""

    def __init__(self, host, ordinal=0, stream=None):
        self.host = host
        self.device = types.SimpleNamespace(index=ordinal, id=ordinal)
        self.stream = stream

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
    """Numba's ``as_cuda_array`` and the libraries' constructors, over host memory.
    Returns the log of what each was called with."""
    from numba import cuda
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    calls = {"as_cuda_array": [], "sync": [], "asarray": [], "as_tensor": []}

    def as_cuda_array(obj, sync=True):
        calls["as_cuda_array"].append(obj)
        calls["sync"].append(sync)
        view = FakeCUDAArray(obj.host)  # a view: no copy, as Numba's is
        return view

    def cupy_asarray(result):
        calls["asarray"].append(result)
        return CupyArray(result._ary)

    def torch_as_tensor(result, device=None):
        calls["as_tensor"].append((result, device))
        return TorchTensor(result._ary, device.index)

    monkeypatch.setattr(cuda, "as_cuda_array", as_cuda_array, raising=False)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(asarray=cupy_asarray))
    monkeypatch.setitem(sys.modules, "torch",
                        types.SimpleNamespace(as_tensor=torch_as_tensor))
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
    # Inputs went in as zero-copy views of the library's memory ...
    viewed = {id(a) for a in stand_ins["as_cuda_array"]}
    assert viewed and viewed <= {id(a) for a in wrapped}
    # ... and each output came back through the library's own zero-copy constructor,
    # torch's on the input tensor's device.
    if kind == "cupy":
        assert len(stand_ins["asarray"]) == len(result)
    else:
        assert len(stand_ins["as_tensor"]) == len(result)
        input_devices = {id(a.device) for a in wrapped}
        assert all(id(device) in input_devices for _, device in stand_ins["as_tensor"])


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


@simulator_only
@pytest.mark.parametrize("stream, waits", [(None, False), (1, False), (2, False),
                                           (0x7F00_1234, True)],
                         ids=["none", "legacy-default", "per-thread-default", "side"])
def test_the_host_waits_only_for_streams_the_kernels_are_not_ordered_with(
        stand_ins, stream, waits):
    """A torch tensor or CuPy array queued on a default stream (CUDA Array Interface
    stream 1 or 2) is taken without a host wait: fastpool's launches on the legacy
    default stream are ordered with it. Only a side stream is synchronised first."""
    host = np.random.default_rng(0).random((1, 2, 4, 4)).astype(np.float32)
    for kind in (CupyArray, TorchTensor):
        stand_ins["sync"].clear()
        y = fastpool.max_pool2d(kind(host, stream=stream), 2)
        assert stand_ins["sync"] == [waits]
        np.testing.assert_array_equal(y.host, fastpool.max_pool2d(host, 2))
