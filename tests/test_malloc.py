"""glibc's malloc thresholds (``fastpool._malloc``): a kernel's per-call scratch is not
faulted in again on every call of a process that loaded its kernels from the disk
cache."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastpool
from fastpool import _malloc

_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("environ, reason", [
    ({"FASTPOOL_MALLOC_TUNING": "0"}, "FASTPOOL_MALLOC_TUNING=0"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000"}, "MALLOC_TRIM_THRESHOLD_ is set"),
    ({"MALLOC_MMAP_THRESHOLD_": "1000"}, "MALLOC_MMAP_THRESHOLD_ is set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "GLIBC_TUNABLES sets glibc.malloc"),
])
def test_user_settings_are_left_alone(environ, reason):
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert _malloc._reason_not_to(environ) == reason


def test_other_settings_do_not_stop_it():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert _malloc._reason_not_to({"FASTPOOL_MALLOC_TUNING": "1", "GLIBC_TUNABLES":
                                   "glibc.pthread.rseq=0", "MALLOC_ARENA_MAX": "2"}) is None


_SCRIPT = textwrap.dedent("""
    import json, resource
    import numpy as np
    import numba
    import fastpool
    from fastpool import _malloc
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 32, 32))
    w = rng.standard_normal((16, 16, 3, 3))
    for _ in range(5):
        fastpool.conv2d(x, w, padding=1, device="cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        fastpool.conv2d(x, w, padding=1, device="cpu")
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40
    print(json.dumps({"state": _malloc._state, "faults": faults}))
""")


def _faults_per_call():
    # The child's malloc settings are the test's, not whatever this process holds
    # (Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in os.environ for its workers).
    env = {name: value for name, value in os.environ.items()
           if not (name.startswith("MALLOC_") or name in ("GLIBC_TUNABLES",
                                                          "FASTPOOL_MALLOC_TUNING"))}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _GLIBC, reason="glibc only")
def test_scratch_is_not_faulted_in_every_call():
    """A small float64 Winograd conv allocates 4 MB of scratch a call. In a fresh
    process that loads its kernels from the disk cache (warmed here first), glibc's
    start-up thresholds mapped and unmapped it on every call (489 page faults a call,
    0.78 against 0.22 ms): tuned, it stays mapped."""
    x = np.ones((4, 16, 32, 32))
    fastpool.conv2d(x, np.ones((16, 16, 3, 3)), padding=1, device="cpu")  # cache it
    result = _faults_per_call()
    assert result["state"] == "tuned"
    assert result["faults"] < 20, result


def test_kept_empty_reuses_one_buffer_per_thread(monkeypatch):
    """Scratch of at least ``MMAP_THRESHOLD`` bytes (here lowered) comes from one buffer
    kept per thread: the same memory on the next call, grown for a larger one, fresh
    memory while an array from the buffer is still alive, another buffer on another
    thread; smaller scratch is a fresh array."""
    import threading
    monkeypatch.setattr(_malloc, "MMAP_THRESHOLD", 4096)
    _malloc.release_kept()
    try:
        small = _malloc.kept_empty(100, np.float64)
        assert small.shape == (100,) and small.dtype == np.float64
        assert _malloc._kept.buffer is None
        first = _malloc.kept_empty((10, 110), np.float32)  # 4400 bytes
        assert first.shape == (10, 110) and first.dtype == np.float32
        assert first.base is not None and first.base is _malloc._kept.buffer
        busy = _malloc.kept_empty(1100, np.float32)  # ``first`` alive: fresh memory
        assert busy.base is None and not np.shares_memory(first, busy)
        first[:] = 1.5
        del first, busy
        again = _malloc.kept_empty(1100, np.float32)  # the same memory, not cleared
        assert again.base is _malloc._kept.buffer and np.all(again[:1000] == 1.5)
        view = again[3:]
        del again
        assert _malloc.kept_empty(1100, np.float32).base is None  # a view alive
        del view
        larger = _malloc.kept_empty(600, np.float64)  # 4800 bytes: a larger buffer
        assert larger.base is _malloc._kept.buffer
        assert larger.base.nbytes == 4800  # grown from 4400
        del larger  # this thread's buffer idle: another thread must not take it
        other = []

        def elsewhere():
            array = _malloc.kept_empty(1200, np.float32)
            other.append((array, array.base is _malloc._kept.buffer))
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        array, kept_there = other[0]
        assert kept_there and not np.shares_memory(array, _malloc._kept.buffer)
        assert _malloc.kept_empty(1200, np.float32).base is _malloc._kept.buffer
    finally:
        _malloc.release_kept()
    assert _malloc._kept.buffer is None
