"""What a second thread costs on this machine, per Numba threading layer: a parallel
loop of two workers, each spinning ``n / 2`` steps of a serial chain, against one
thread doing ``n`` steps; medians of 400 back-to-back calls and of 100 calls each
after a 5 ms sleep (the second thread asleep). Run once per layer, each in its own
process::

    for L in tbb omp workqueue; do NUMBA_THREADING_LAYER=$L NUMBA_NUM_THREADS=2 \
        python docs/measure_thread_wake.py; done

(fastpool is imported first: it loads the ``tbb`` wheel's library so that Numba finds
it.) Figures in docs/site/performance.md ("Why small calls stay on one thread")."""
import time

import numpy as np

import fastpool  # noqa: F401  (loads libtbb for Numba)
import numba
from numba import njit, prange


@njit(nogil=True)
def spin(n):
    s = 0.0
    for _ in range(n):
        s = s * 0.999999 + 1.0
    return s


@njit(parallel=True, nogil=True)
def split(n, workers):
    out = np.zeros(workers)
    for i in prange(workers):
        out[i] = spin(n)
    return out


def median_us(call, repeats=400, pause=0.0):
    times = []
    for _ in range(repeats):
        if pause:
            time.sleep(pause)
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return np.median(times) * 1e6


split(10, 2)
spin(10)
print(numba.threading_layer())
for n in (2500, 10000, 40000):
    one = median_us(lambda: spin(n))
    two = median_us(lambda: split(n // 2, 2))
    paused = median_us(lambda: split(n // 2, 2), repeats=100, pause=0.005)
    print(f"work {one:.1f} us on one thread: two threads back to back {two:.1f} us, "
          f"after a 5 ms pause {paused:.1f} us")
