"""Compile time: how long the first calls of an op family take in a fresh process.

fastpool compiles its kernels on first use (pooling once per geometry and dtype,
convolution once per dtype and algorithm) and caches them on disk (Numba's
``cache=True``). Two tracks per op family, each timing, inside a fresh
``sys.executable -c`` child process with ``time.perf_counter``, only the first calls
of the family's public functions (not the imports, not building the data):

- ``track_cold_compile``: ``NUMBA_CACHE_DIR`` is a new empty temporary directory, so
  every kernel the calls need is compiled (what a user's first run costs);
- ``track_cached_first_call``: a first child fills a new temporary cache directory,
  then a second fresh child makes the same calls, loading the kernels from that disk
  cache (what every later process costs).

Families, float32, tiny inputs: ``max_pool2d`` (forward with indices + backward with
indices), ``avg_pool2d`` (forward + backward), ``stochastic_pool2d`` (training
forward with indices, training backward, inference forward, inference backward), all
pools k=3 s=2 p=1 on (2,4,12,12); ``conv2d`` (forward without bias + backward for all
three gradients; 3x3 8->8 on (2,8,8,8) padding 1, the Winograd path of the 3x3
layers). On "cuda" the children pass host arrays with ``device="cuda"``. The child
uses ``common.THREADS`` Numba threads (``NUMBA_NUM_THREADS``).
"""

import os
import subprocess
import sys
import tempfile

from .common import THREADS, require_conv, require_device

MARK = "FASTPOOL_BENCH_FIRST_CALLS_SECONDS"

CHILD = r"""
import sys
import time

import numpy as np

import fastpool

family, device = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
spent = 0.0


def first(fn, *args, **kwargs):
    global spent
    start = time.perf_counter()
    out = fn(*args, device=device, **kwargs)
    spent += time.perf_counter() - start
    return out


x = rng.random((2, 4, 12, 12), dtype=np.float32)
g = rng.standard_normal((2, 4, 6, 6), dtype=np.float32)
if family == "max_pool2d":
    _, idx = first(fastpool.max_pool2d, x, 3, 2, 1, return_indices=True)
    first(fastpool.max_pool2d_backward, g, x, 3, 2, 1, indices=idx)
elif family == "avg_pool2d":
    first(fastpool.avg_pool2d, x, 3, 2, 1)
    first(fastpool.avg_pool2d_backward, g, x, 3, 2, 1)
elif family == "stochastic_pool2d":
    _, idx = first(fastpool.stochastic_pool2d, x, 3, 2, 1, training=True, seed=1,
                   return_indices=True)
    first(fastpool.stochastic_pool2d_backward, g, x, 3, 2, 1, training=True, indices=idx)
    first(fastpool.stochastic_pool2d, x, 3, 2, 1, training=False)
    first(fastpool.stochastic_pool2d_backward, g, x, 3, 2, 1, training=False)
elif family == "conv2d":
    cx = rng.standard_normal((2, 8, 8, 8), dtype=np.float32)
    cw = rng.standard_normal((8, 8, 3, 3), dtype=np.float32)
    cg = rng.standard_normal((2, 8, 8, 8), dtype=np.float32)
    first(fastpool.conv2d, cx, cw, None, 1, 1)
    first(fastpool.conv2d_backward, cg, cx, cw, 1, 1, output_mask=(True, True, True))
else:
    raise SystemExit(f"unknown family {family!r}")
print(MARK, repr(spent))
""".replace("MARK", repr(MARK))


def first_calls_seconds(family, device, cache_dir, timeout=500):
    """Run the child once with ``NUMBA_CACHE_DIR=cache_dir``; its first-call seconds."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, NUMBA_NUM_THREADS=str(THREADS))
    proc = subprocess.run([sys.executable, "-c", CHILD, family, device], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child for {family} on {device} failed "
                           f"({proc.returncode}):\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith(MARK + " "):
            return float(line.split()[1])
    raise RuntimeError(f"no {MARK} line in the child's output:\n{proc.stdout[-3000:]}")


class CompileTime:
    """Seconds of the first calls of each op family in a fresh process (see the
    module docstring): with an empty Numba cache, and from a filled disk cache."""

    params = [["cpu", "cuda"], ["max_pool2d", "avg_pool2d", "stochastic_pool2d", "conv2d"]]
    param_names = ["device", "op"]
    unit = "seconds"
    processes = 1
    repeat = 1
    number = 1
    timeout = 1200

    def setup(self, device, op):
        require_device(device)
        if op == "conv2d":
            require_conv()

    def track_cold_compile(self, device, op):
        """first calls with an empty NUMBA_CACHE_DIR (everything compiles)"""
        with tempfile.TemporaryDirectory(prefix="fastpool-bench-cache-") as cache:
            return first_calls_seconds(op, device, cache)

    def track_cached_first_call(self, device, op):
        """first calls in a second process, kernels loaded from the disk cache"""
        with tempfile.TemporaryDirectory(prefix="fastpool-bench-cache-") as cache:
            first_calls_seconds(op, device, cache)
            return first_calls_seconds(op, device, cache)
