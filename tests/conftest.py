"""Shared fixtures: tolerances per dtype, random generators, and the kernel geometries.

Every distinct (kernel, stride, dilation) is a separately compiled kernel, so tests draw
geometries from the short ``GEOMETRIES`` list (compiled once, then cached on disk) and
vary everything that is a runtime argument: shapes, padding, ceil_mode, flags, dtype.
"""

import ctypes
import hashlib
import os
import sys


def _cuda_gpu_present():
    """Ask the CUDA driver (through ctypes, so Numba is not imported yet) for a GPU."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return (driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0
            and count.value > 0)


# GPU tests run in every test run: on the real GPU when there is one, else under Numba's
# CUDA simulator, which must be switched on before Numba is first imported. An explicit
# NUMBA_ENABLE_CUDASIM (0 or 1) wins, e.g. to run the simulator on a GPU machine.
if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _cuda_gpu_present():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# A failing hypothesis test prints its example and a @reproduce_failure blob.
settings.register_profile("fastpool", print_blob=True)
settings.load_profile("fastpool")

sys.path.insert(0, os.path.dirname(__file__))

# Per-dtype tolerances for comparing kernels with the float64 references.
TOLERANCES = {
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6),
    np.dtype(np.float64): dict(rtol=1e-12, atol=1e-12),
    # Half precision is computed in float32 and rounded once: half an ulp (2**-11 for
    # float16, 2**-8 for bfloat16) relative, with room for the float32 sum before it.
    np.dtype(np.float16): dict(rtol=1e-3, atol=1e-5),
}
try:
    import ml_dtypes

    TOLERANCES[np.dtype(ml_dtypes.bfloat16)] = dict(rtol=8e-3, atol=1e-5)
except ImportError:  # the test extra installs it; without it bfloat16 tests skip
    ml_dtypes = None

# Sums of many products (convolution) are compared against a bound: the same sum over
# absolute values. Its error is at most about (terms * eps) * bound; these are that
# factor with room for a few hundred terms.
SUM_TOLERANCES = {
    np.dtype(np.float32): 2e-5,
    np.dtype(np.float64): 1e-13,
}

DTYPES = (np.float32, np.float64)

# (kernel_size, stride, dilation); stride None means kernel_size.
GEOMETRIES = (
    (1, 1, 1),
    (2, None, 1),
    (3, 2, 1),
    (3, 1, 1),
    ((2, 3), (1, 2), 1),
    (3, 2, 2),
    ((3, 2), (2, 1), (1, 2)),
    (4, 3, 1),
)


def dtypes_for(index, common=2):
    """The dtypes a test draws with geometry number ``index`` of its list: both for the
    first ``common`` (the shapes networks use), then one each, alternating. dtype and
    geometry are separate specialisations of a kernel, so this covers each of them, and
    both together on the common geometries, without compiling every pair (each pair is
    seconds of Numba compilation on a cold run)."""
    return DTYPES if index < common else (DTYPES[index % 2],)


def assert_close(actual, expected, dtype):
    np.testing.assert_allclose(actual, expected, **TOLERANCES[np.dtype(dtype)])


def assert_close_to_sum(actual, expected, bound, dtype):
    """``|actual - expected| <= SUM_TOLERANCES[dtype] * bound`` elementwise, where
    ``bound`` is the sum of the absolute values of the summed terms."""
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == np.shape(expected)
    excess = np.abs(actual - expected) - SUM_TOLERANCES[np.dtype(dtype)] * np.asarray(bound)
    if excess.size and excess.max() > 0:
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        raise AssertionError(
            f"{int((excess > 0).sum())} of {excess.size} elements differ by more than "
            f"{SUM_TOLERANCES[np.dtype(dtype)]} x bound; worst at {worst}: "
            f"{actual[worst]} vs {expected[worst]} (bound {np.asarray(bound)[worst]})")


def numeric_gradient(f, x, grad_output, eps=1e-6):
    """d <grad_output, f(x)> / dx by central differences (float64)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        plus = np.sum(f(x) * grad_output)
        flat[i] = saved - eps
        minus = np.sum(f(x) * grad_output)
        flat[i] = saved
        gflat[i] = (plus - minus) / (2 * eps)
    return g


CUDA_SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


@pytest.fixture
def small_launches():
    """GPU launches of 32 threads and at most 3 blocks: several blocks run and the
    grid-stride loops turn more than once even on small shapes."""
    from fastpool.cuda._launch import launch_limits
    with launch_limits(threads_per_block=32, max_blocks=3):
        yield


def seed_for(*parts):
    """A 32-bit seed fixed by ``parts`` (their ``repr``) in every process. Python's
    ``hash()`` of a string is salted per process, so it cannot seed a test."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


@pytest.fixture
def rng(request):
    """A different, reproducible stream per test, seeded from the test's id; a failing
    test reports the seed."""
    seed = seed_for(request.node.nodeid)
    request.node.user_properties.append(("rng seed", seed))
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [value for key, value in item.user_properties if key == "rng seed"]
        if seeds:
            report.sections.append(
                ("random streams", f"rng fixture seed: {seeds[0]} "
                                   f"(conftest.seed_for({item.nodeid!r}))"))


def at_one_and_two_threads(call):
    """``[call(), call()]``, run on 1 and then 2 Numba threads (as many as Numba has,
    where it has fewer), the thread count restored after."""
    import numba

    saved = numba.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            runs.append(call())
        return runs
    finally:
        numba.set_num_threads(saved)


@pytest.fixture(scope="module")
def one_numba_thread():
    """Run the kernels on one Numba thread in this module. These tests make thousands
    of calls on tiny tensors (gradcheck perturbs one element at a time); on a small,
    busy machine every parallel region can then wait milliseconds for a descheduled
    worker, which made this file take minutes. The torch layer does not depend on the
    thread count; the kernels' thread-count independence is tested elsewhere."""
    import numba

    saved = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(saved)


# ----------------------------------------------------------------------------- warm-up

_WARMING = []


def pytest_collection_finish(session):
    """On a full run (a first one is almost all Numba compilation, on one core), start
    tests/warm_kernels.py beside the suite: it compiles the kernels the later files
    need into the disk cache on the other core. FASTPOOL_TEST_WARMUP=0 turns it off."""
    if (len(session.items) < 1000 or os.environ.get("FASTPOOL_TEST_WARMUP") == "0"
            or getattr(session.config, "workerinput", None) is not None):
        return
    import subprocess
    command, env = warmup_command()
    _WARMING.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL))


def warmup_command(*extra):
    """The warm-up process's command line and environment. It must import the same
    fastpool files as the suite, or it fills a disk cache the suite never reads: Numba
    keys the cache by the kernel's source file. ``python -m pytest`` puts the working
    directory first on ``sys.path`` (a source checkout) while a script run gets only its
    own directory, which found the installed copy in site-packages instead (CI: the
    warm-up compiled for nothing)."""
    import importlib.util
    package = os.path.dirname(importlib.util.find_spec("fastpool").origin)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(package)] + [p for p in [env.get("PYTHONPATH")] if p])
    script = os.path.join(os.path.dirname(__file__), "warm_kernels.py")
    return [sys.executable, script, *extra], env


def pytest_sessionfinish(session):
    for process in _WARMING:
        if process.poll() is None:
            process.kill()
        process.wait()
