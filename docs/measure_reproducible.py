"""Reproducible (reproducible=True) vs default weight+bias gradients: the two calls
alternating, minimum of 5, THREADS threads (default 2); OUT=file.json writes the rows.
Run from a checkout: python docs/measure_reproducible.py"""
import os, time, sys, json
import numpy as np, numba
import fastpool as fp
numba.set_num_threads(int(os.environ.get("THREADS", "2")))
rng = np.random.default_rng(0)
CASES = [
    ("conv2d 3x3 64->64 @56 b8", 2, (8, 64, 56, 56), (64, 64, 3, 3), dict(padding=1)),
    ("conv2d 3x3 256->256 @14 b8", 2, (8, 256, 14, 14), (256, 256, 3, 3), dict(padding=1)),
    ("conv2d 5x5 6->16 @14 b32 (LeNet)", 2, (32, 6, 14, 14), (16, 6, 5, 5), dict()),
    ("conv2d 1x1 256->64 @56 b1", 2, (1, 256, 56, 56), (64, 256, 1, 1), dict()),
    ("conv1d k5 64->64 L=1024 b8", 1, (8, 64, 1024), (64, 64, 5), dict(padding=2)),
    ("conv3d 3x3x3 16->16 (2,16,16,32,32)", 3, (2, 16, 16, 32, 32), (16, 16, 3, 3, 3), dict(padding=1)),
]
out = []
for name, rank, xs, ws, args in CASES:
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    y = getattr(fp, f"conv{rank}d")(x, w, **args)
    g = rng.standard_normal(y.shape).astype(np.float32)
    b = getattr(fp, f"conv{rank}d_backward")
    f0 = lambda: b(g, x, w, **args, output_mask=(False, True, True))
    f1 = lambda: b(g, x, w, **args, output_mask=(False, True, True), reproducible=True)
    f0(); f1()
    t = {0: [], 1: []}
    for rep in range(5):
        for k, f in ((0, f0), (1, f1)):
            s = time.perf_counter(); f(); t[k].append(time.perf_counter() - s)
    d, r = min(t[0]) * 1e3, min(t[1]) * 1e3
    terms = np.prod(y.shape) // y.shape[1] * np.prod(ws)   # products
    print(f"{name:40s} default {d:8.2f} ms  reproducible {r:8.2f} ms  x{r/d:5.1f}  {terms/r/1e6:5.2f} Gproducts/s", flush=True)
    out.append(dict(case=name, default_ms=d, reproducible_ms=r))
if os.environ.get("OUT"):
    json.dump(out, open(os.environ["OUT"], "w"), indent=1)
