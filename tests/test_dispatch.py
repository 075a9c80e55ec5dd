"""Device selection (docs/design.md section 4) and process-level guarantees.

Resolution order: the call's ``device=`` argument, then ``with use_device(...)``
(thread-local, nestable), then ``set_device(...)``, then ``FASTPOOL_DEVICE``, then
``"auto"`` (``"cuda"`` when an input exposes ``__cuda_array_interface__``, else
``"cpu"``). ``"cuda"`` without a usable GPU raises ``CudaUnavailableError`` (a
``RuntimeError``), never a silent fall-back. Importing fastpool never imports
``numba.cuda`` and compiles nothing; compiled kernels are cached on disk.
"""

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastpool
from fastpool import _dispatch

ENV_VAR = "FASTPOOL_DEVICE"
BAD_NAMES = ["gpu", "", "cuda:0", "cpu ", "CPUs", 0, 1.0, ("cpu",)]


@pytest.fixture(autouse=True)
def clean_device_state(monkeypatch):
    """Each test starts and ends with no set_device and no FASTPOOL_DEVICE."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    fastpool.set_device(None)
    yield
    fastpool.set_device(None)


class FakeGpuArray:
    """Just enough of a GPU array for the dispatcher: the CUDA array interface of a
    float32 ``(1, 1, 4, 4)`` array (the pointer is never dereferenced)."""

    def __init__(self, shape=(1, 1, 4, 4), typestr="<f4"):
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (0, False),
            "version": 3,
            "strides": None,
        }


def _x():
    return np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)


def _expected_max(x):
    return x.reshape(1, 1, 2, 2, 2, 2).max(axis=(3, 5))


def _gpu_driver_present():
    from conftest import _cuda_gpu_present
    return _cuda_gpu_present()


needs_no_gpu_driver = pytest.mark.skipif(
    _gpu_driver_present(), reason="a CUDA GPU is present; this checks the no-GPU error")


# ----------------------------------------------------------------------------- order

def test_default_is_auto():
    assert fastpool.get_device() == "auto"
    assert _dispatch.resolve(None, _x()) == "cpu"


@pytest.mark.parametrize("name", ["cpu", "cuda", "auto"])
def test_env_var(monkeypatch, name):
    monkeypatch.setenv(ENV_VAR, name)
    assert fastpool.get_device() == name


def test_empty_env_var_means_unset(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "")
    assert fastpool.get_device() == "auto"


def test_set_device_beats_env_var(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert fastpool.get_device() == "cpu"
    fastpool.set_device("cuda")
    assert fastpool.get_device() == "cuda"
    assert _dispatch.resolve(None, _x()) == "cuda"
    fastpool.set_device("auto")
    assert fastpool.get_device() == "auto"
    assert _dispatch.resolve(None, _x()) == "cpu"


def test_set_device_none_clears(monkeypatch):
    fastpool.set_device("cuda")
    fastpool.set_device(None)
    assert fastpool.get_device() == "auto"
    monkeypatch.setenv(ENV_VAR, "cuda")
    fastpool.set_device("cpu")
    assert fastpool.get_device() == "cpu"
    fastpool.set_device(None)
    assert fastpool.get_device() == "cuda"  # the env var applies again


def test_use_device_beats_set_device(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "auto")
    fastpool.set_device("cpu")
    with fastpool.use_device("cuda"):
        assert fastpool.get_device() == "cuda"
        assert _dispatch.resolve(None, _x()) == "cuda"
    assert fastpool.get_device() == "cpu"
    assert _dispatch.resolve(None, _x()) == "cpu"


def test_call_beats_use_device():
    fastpool.set_device("cuda")
    with fastpool.use_device("cuda"):
        assert fastpool.get_device("cpu") == "cpu"
        assert _dispatch.resolve("cpu", _x()) == "cpu"
        assert _dispatch.resolve("auto", _x()) == "cpu"
        # A real call: runs on the CPU although the context says cuda.
        y = fastpool.max_pool2d(_x(), 2, device="cpu")
        np.testing.assert_array_equal(y, _expected_max(_x()))
    with fastpool.use_device("cpu"):
        assert fastpool.get_device("cuda") == "cuda"
        assert _dispatch.resolve("cuda", _x()) == "cuda"


def test_full_chain(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    assert fastpool.get_device() == "cuda"
    fastpool.set_device("auto")
    assert fastpool.get_device() == "auto"
    with fastpool.use_device("cpu"):
        assert fastpool.get_device() == "cpu"
        assert fastpool.get_device("cuda") == "cuda"
    assert fastpool.get_device() == "auto"
    fastpool.set_device(None)
    assert fastpool.get_device() == "cuda"
    monkeypatch.delenv(ENV_VAR)
    assert fastpool.get_device() == "auto"


def test_names_are_case_insensitive():
    assert fastpool.get_device("CPU") == "cpu"
    fastpool.set_device("Cuda")
    assert fastpool.get_device() == "cuda"


# ----------------------------------------------------------------------------- use_device

def test_use_device_nests():
    fastpool.set_device("auto")
    with fastpool.use_device("cpu") as outer:
        assert outer == "cpu"
        with fastpool.use_device("cuda"):
            assert fastpool.get_device() == "cuda"
            with fastpool.use_device("auto"):
                assert fastpool.get_device() == "auto"
            assert fastpool.get_device() == "cuda"
        assert fastpool.get_device() == "cpu"
    assert fastpool.get_device() == "auto"


def test_use_device_restores_after_exception():
    with pytest.raises(KeyError):
        with fastpool.use_device("cuda"):
            with fastpool.use_device("cpu"):
                raise KeyError("boom")
    assert fastpool.get_device() == "auto"


def test_use_device_is_thread_local():
    fastpool.set_device("cpu")
    seen = {}

    def other():
        seen["other"] = fastpool.get_device()
        with fastpool.use_device("auto"):
            seen["other-inside"] = fastpool.get_device()
            inner_ready.set()
            main_checked.wait(10)

    inner_ready, main_checked = threading.Event(), threading.Event()
    with fastpool.use_device("cuda"):
        thread = threading.Thread(target=other)
        thread.start()
        assert inner_ready.wait(10)
        # The other thread's own use_device block is open now; ours is unaffected.
        assert fastpool.get_device() == "cuda"
        main_checked.set()
        thread.join(10)
    assert seen == {"other": "cpu", "other-inside": "auto"}
    assert fastpool.get_device() == "cpu"


def test_set_device_is_process_wide():
    fastpool.set_device("cuda")
    seen = []
    thread = threading.Thread(target=lambda: seen.append(fastpool.get_device()))
    thread.start()
    thread.join(10)
    assert seen == ["cuda"]


# ----------------------------------------------------------------------------- bad names

@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_name_per_call(name):
    with pytest.raises(ValueError, match="device"):
        fastpool.get_device(name)
    with pytest.raises(ValueError, match="device"):
        _dispatch.resolve(name, _x())


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_name_set_device(name):
    fastpool.set_device("cpu")
    with pytest.raises(ValueError, match="device"):
        fastpool.set_device(name)
    assert fastpool.get_device() == "cpu"  # unchanged


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_name_use_device(name):
    with pytest.raises(ValueError, match="device"):
        with fastpool.use_device(name):
            pass  # pragma: no cover
    assert fastpool.get_device() == "auto"


@pytest.mark.parametrize("name", ["gpu", "cuda:0", "none"])
def test_bad_env_var(monkeypatch, name):
    monkeypatch.setenv(ENV_VAR, name)
    with pytest.raises(ValueError, match=ENV_VAR):
        fastpool.get_device()
    with pytest.raises(ValueError, match=ENV_VAR):
        fastpool.max_pool2d(_x(), 2)
    # Anything earlier in the order wins without reading the variable.
    assert fastpool.get_device("cpu") == "cpu"
    with fastpool.use_device("cpu"):
        assert fastpool.get_device() == "cpu"
    fastpool.set_device("cpu")
    np.testing.assert_array_equal(fastpool.max_pool2d(_x(), 2), _expected_max(_x()))


def _all_calls(device, x=None):
    x = _x() if x is None else x
    grad = np.ones((1, 1, 2, 2), dtype=np.float32)
    indices = np.zeros((1, 1, 2, 2), dtype=np.int64)
    return [
        lambda: fastpool.max_pool2d(x, 2, device=device),
        lambda: fastpool.max_pool2d_backward(grad, x, 2, device=device),
        lambda: fastpool.avg_pool2d(x, 2, device=device),
        lambda: fastpool.avg_pool2d_backward(grad, x, 2, device=device),
        lambda: fastpool.stochastic_pool2d(x, 2, seed=0, device=device),
        lambda: fastpool.stochastic_pool2d_backward(grad, x, 2, indices=indices,
                                                    device=device),
    ]


@pytest.mark.parametrize("i", range(6), ids=["max", "max_backward", "avg", "avg_backward",
                                             "stochastic", "stochastic_backward"])
def test_bad_device_in_every_public_function(i):
    with pytest.raises(ValueError, match="device"):
        _all_calls("gpu")[i]()
    # ...and "cpu" works with every one of them.
    assert isinstance(_all_calls("cpu")[i](), np.ndarray)


# ----------------------------------------------------------------------------- auto / cpu

def test_auto_with_numpy_runs_on_cpu():
    x = _x()
    for device in (None, "auto"):
        y = fastpool.max_pool2d(x, 2, device=device)
        assert type(y) is np.ndarray
        np.testing.assert_array_equal(y, _expected_max(x))
    fastpool.set_device("auto")
    with fastpool.use_device("auto"):
        np.testing.assert_array_equal(fastpool.max_pool2d(x, 2), _expected_max(x))
    assert _dispatch.resolve("auto", x, None, x) == "cpu"


def test_auto_with_numpy_does_not_probe_cuda(monkeypatch):
    def probe():
        raise AssertionError("auto with host inputs looked for a GPU")

    monkeypatch.setattr(_dispatch, "_probe_cuda", probe)
    np.testing.assert_array_equal(fastpool.avg_pool2d(_x(), 2, device="auto"),
                                  _x().reshape(1, 1, 2, 2, 2, 2).mean(axis=(3, 5)))


def test_fake_gpu_array_is_seen_as_gpu():
    fake = FakeGpuArray()
    assert _dispatch.is_device_array(fake)
    assert not _dispatch.is_device_array(_x())
    assert _dispatch.resolve(None, fake) == "cuda"
    assert _dispatch.resolve("auto", fake, None, fake) == "cuda"
    with pytest.raises(ValueError, match="mix host"):
        _dispatch.resolve("auto", _x(), fake)
    with fastpool.use_device("auto"):
        assert _dispatch.resolve(None, None, fake) == "cuda"


def test_fake_gpu_array_with_cpu_device_raises():
    fake = FakeGpuArray()
    with pytest.raises(ValueError, match="(?i)cpu.*gpu|gpu.*cpu"):
        _dispatch.resolve("cpu", fake)
    with pytest.raises(ValueError, match="(?i)cpu.*gpu|gpu.*cpu"):
        fastpool.max_pool2d(fake, 2, device="cpu")
    fastpool.set_device("cpu")
    with pytest.raises(ValueError, match="(?i)cpu.*gpu|gpu.*cpu"):
        fastpool.avg_pool2d(fake, 2)
    fastpool.set_device(None)
    with fastpool.use_device("cpu"):
        with pytest.raises(ValueError, match="(?i)cpu.*gpu|gpu.*cpu"):
            fastpool.stochastic_pool2d(fake, 2)
    # Mixed host and GPU inputs with device="cpu".
    with pytest.raises(ValueError, match="(?i)cpu.*gpu|gpu.*cpu"):
        fastpool.max_pool2d_backward(FakeGpuArray((1, 1, 2, 2)), _x(), 2, device="cpu")


def test_fake_gpu_array_is_validated_like_host_input():
    with pytest.raises(TypeError, match="x"):
        fastpool.max_pool2d(FakeGpuArray(typestr="<i4"), 2, device="cpu")
    with pytest.raises(ValueError, match="x"):
        fastpool.max_pool2d(FakeGpuArray(shape=(4, 4)), 2, device="cuda")
    with pytest.raises(ValueError, match="kernel_size"):
        fastpool.max_pool2d(FakeGpuArray(), 5, device="auto")
    with pytest.raises(ValueError, match="grad_output"):
        fastpool.avg_pool2d_backward(FakeGpuArray((1, 1, 3, 3)), FakeGpuArray(), 2)


# ----------------------------------------------------------------------------- no GPU

def test_cuda_unavailable_error_is_runtime_error():
    assert issubclass(fastpool.CudaUnavailableError, RuntimeError)
    assert fastpool.CudaUnavailableError is _dispatch.CudaUnavailableError
    assert isinstance(fastpool.cuda_available(), bool)


_NO_GPU_SCRIPT = """
    # Runs with the CUDA simulator off, on a machine without a GPU.
    import json, re, sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    import fastpool
    from test_dispatch import FakeGpuArray, _all_calls, _x

    NO_GPU = re.compile(r"(?i)cuda.*(driver|gpu)")
    failures = []

    def expect(error, call, what):
        try:
            call()
        except error as exc:
            if error is fastpool.CudaUnavailableError and not NO_GPU.search(str(exc)):
                failures.append(f"{{what}}: unclear message {{exc}}")
        except Exception as exc:
            failures.append(f"{{what}}: {{type(exc).__name__}}: {{exc}}")
        else:
            failures.append(f"{{what}}: no error")

    unavailable = fastpool.CudaUnavailableError
    assert not fastpool.cuda_available()
    for device in ("auto", "cuda", None):
        for i, call in enumerate(_all_calls(device, x=FakeGpuArray())[0::2]):
            expect(unavailable, call, f"GPU x, device={{device}}, forward {{i}}")
    for i, call in enumerate(_all_calls("cuda")):
        expect(unavailable, call, f"host x, device='cuda', call {{i}}")
    # Every way of asking for cuda gives the same clear error, never a fall-back.
    with fastpool.use_device("cuda"):
        expect(unavailable, lambda: fastpool.max_pool2d(_x(), 2), "use_device")
    fastpool.set_device("cuda")
    expect(unavailable, lambda: fastpool.conv2d(_x(), np.ones((1, 1, 2, 2), np.float32)),
           "set_device")
    fastpool.set_device(None)
    # Argument errors come first, whatever the device.
    expect(ValueError, lambda: fastpool.max_pool2d(_x(), 0, device="cuda"), "kernel_size")
    expect(TypeError, lambda: fastpool.avg_pool2d(_x().astype(np.int32), 2, device="cuda"),
           "dtype")
    # Mixed host and GPU arrays are a ValueError before any GPU is looked for.
    expect(ValueError, lambda: fastpool.avg_pool2d_backward(
        FakeGpuArray((1, 1, 2, 2)), _x(), 2), "mixed")
    print(json.dumps(failures))
"""


@needs_no_gpu_driver
def test_cuda_unavailable_without_simulator():
    """Every way of asking for the GPU, without a GPU and without the simulator, raises
    CudaUnavailableError saying what was looked for (in a fresh process: this one may
    run the simulator)."""
    tests = os.path.dirname(__file__)
    failures = _run_python(_NO_GPU_SCRIPT.format(tests=tests),
                           {"NUMBA_ENABLE_CUDASIM": "0", ENV_VAR: "cuda"}, cwd=tests)
    assert failures == []


@needs_no_gpu_driver
def test_env_var_cuda_without_gpu_message(tmp_path):
    code = """
        import json, fastpool, numpy as np
        try:
            fastpool.max_pool2d(np.ones((1, 1, 2, 2)), 2)
        except fastpool.CudaUnavailableError as exc:
            print(json.dumps(str(exc)))
        else:
            print(json.dumps("ran"))
    """
    message = _run_python(code, {"NUMBA_ENABLE_CUDASIM": "0", ENV_VAR: "cuda"},
                          cwd=tmp_path)
    assert "is_available() is False" in message and "NUMBA_ENABLE_CUDASIM" in message


# ----------------------------------------------------------------------------- processes

def _run_python(code, env_extra=None, cwd=None):
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


_IMPORT_SCRIPT = """
    import json, sys
    import fastpool
    fastpool.get_device()
    fastpool.set_device("cpu")
    fastpool.set_device(None)
    with fastpool.use_device("auto"):
        pass

    from numba.core.dispatcher import Dispatcher
    cuda_modules = sorted(m for m in sys.modules
                          if m == "numba.cuda" or m.startswith(("numba.cuda.", "numba_cuda")))
    compiled = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("fastpool"):
            continue
        for attr, value in vars(module).items():
            if isinstance(value, Dispatcher) and value.overloads:
                compiled.append(f"{name}.{attr}")
            cache_info = getattr(value, "cache_info", None)
            if callable(cache_info) and attr.endswith("kernel") and cache_info().currsize:
                compiled.append(f"{name}.{attr}()")
    print(json.dumps({"cuda_modules": cuda_modules, "compiled": compiled}))
"""

_IMPORT_RECORDER_SCRIPT = """
    import json, sys
    import numba.core.event as event
    with event.install_recorder("numba:compile") as recorder:
        import fastpool
        import fastpool.cpu
        fastpool.get_device()
    print(json.dumps({"compile_events": len(recorder.buffer),
                      "numba_cuda": "numba.cuda" in sys.modules}))
"""


def test_import_does_not_touch_cuda_or_compile(tmp_path):
    # An empty cache dir: a compile on import could not hide behind a cache load.
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    result = _run_python(_IMPORT_SCRIPT, env, cwd=tmp_path)
    assert result == {"cuda_modules": [], "compiled": []}
    result = _run_python(_IMPORT_RECORDER_SCRIPT, env, cwd=tmp_path)
    assert result == {"compile_events": 0, "numba_cuda": False}


_CACHE_SCRIPT = """
    import json
    import numpy as np
    import fastpool
    import numba
    from fastpool.cpu import _parallel, pool_max

    x = np.arange(36, dtype=np.float64).reshape(1, 1, 6, 6)
    y = fastpool.max_pool2d(x, 3, stride=2)
    assert y.shape == (1, 1, 2, 2) and y[0, 0, 1, 1] == 28.0, y
    # Large enough for two threads (NUMBA_NUM_THREADS=2): the parallel loop too (a 2-D
    # forward splits from 250 us of estimated work: about 730 here).
    assert numba.get_num_threads() == 2
    fastpool.max_pool2d(np.zeros((2, 16, 128, 128)), 3, stride=2)
    result = {}
    for name, dispatcher in (("kernel", pool_max.max_forward(1, 3, 3, 1, 2, 2, 1, 1, 1,
                                                              False).body),
                             ("loop", _parallel._run)):
        stats = dispatcher.stats
        result[name] = {"hits": sum(stats.cache_hits.values()),
                        "misses": sum(stats.cache_misses.values()),
                        "cache_path": stats.cache_path,
                        "signatures": len(dispatcher.signatures)}
    print(json.dumps(result))
"""


def test_numba_disk_cache_is_used_by_a_second_process(tmp_path):
    cache_dir = tmp_path / "numba-cache"
    cache_dir.mkdir()
    env = {"NUMBA_CACHE_DIR": str(cache_dir), "NUMBA_NUM_THREADS": "2"}
    first = _run_python(_CACHE_SCRIPT, env, cwd=tmp_path)
    second = _run_python(_CACHE_SCRIPT, env, cwd=tmp_path)
    for name in ("kernel", "loop"):
        assert first[name]["signatures"] == second[name]["signatures"] == 1, name
        assert first[name]["misses"] >= 1 and first[name]["hits"] == 0, first
        assert second[name]["hits"] >= 1 and second[name]["misses"] == 0, second
        assert os.path.commonpath([second[name]["cache_path"],
                                   str(cache_dir)]) == str(cache_dir)
    assert any(p.suffix == ".nbi" for p in cache_dir.rglob("*"))


def test_the_warm_up_process_compiles_for_the_suites_fastpool(tmp_path):
    """tests/warm_kernels.py fills the disk cache of the very fastpool files this suite
    runs (Numba keys its cache by source file). Started as a plain script next to a
    source checkout with an installed copy, it once imported the copy in site-packages
    and compiled for nothing."""
    import conftest
    command, env = conftest.warmup_command("--which")
    proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    warmed = proc.stdout.strip().splitlines()[-1]
    assert os.path.realpath(warmed) == os.path.realpath(fastpool.__file__)
