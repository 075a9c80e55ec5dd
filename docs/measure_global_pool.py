"""Global average pooling, fastpool against PyTorch in the same memory format, from
cache (each call after one untimed call) and from DRAM (each call after a 64 MiB write
that evicts the input): medians of 100 interleaved calls each, 2 threads, float32,
(32, 2048, 7, 7) -> 1. Run: ``python docs/measure_global_pool.py`` (needs torch).
Figures in docs/site/performance.md."""
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import time, numpy as np, numba, torch, fastpool
numba.set_num_threads(2); torch.set_num_threads(2)
F = torch.nn.functional
x = np.random.default_rng(0).random((32, 2048, 7, 7), dtype=np.float32)
xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
junk = np.ones(64 << 20, np.uint8)
def flush():
    junk[::64] += 1
res = {}
for name, a in (("cf", x), ("cl", xl)):
    ta = torch.from_numpy(a)
    fastpool.adaptive_avg_pool2d(a, 1); F.adaptive_avg_pool2d(ta, 1)
    for mode in ("warm", "cold"):
        ours, theirs = [], []
        for _ in range(100):
            for fn, bucket in ((lambda: fastpool.adaptive_avg_pool2d(a, 1), ours),
                               (lambda: F.adaptive_avg_pool2d(ta, 1), theirs)):
                if mode == "cold":
                    flush()
                else:
                    fn()
                s = time.perf_counter(); fn(); bucket.append(time.perf_counter() - s)
        m, p = np.median(ours) * 1e3, np.median(theirs) * 1e3
        print(f"{name} {mode}: fastpool {m:.3f} ms, torch {p:.3f} ms, ratio {p/m:.2f}, "
              f"{(a.nbytes + a.nbytes/49)/m/1e6:.1f} GB/s")
