"""Time fastpool's CPU pooling against PyTorch in one run, interleaved, and print ratios.

    python asv_benchmarks/compare_torch.py [--threads 2] [--repeats 15] [--warmup 3]
                                           [--dtype float32]
                                           [--shape 32,64,112,112] [--json out.json]

Each repeat times fastpool and then the peer on the same data, so both see the same
machine state; the table reports medians. Thread pools are pinned (Numba and PyTorch to
``--threads``, OpenBLAS to 1) and idle OpenMP workers sleep (OMP_WAIT_POLICY=PASSIVE),
so only one pool runs at a time. Kernels are called once before timing, so compile
time is excluded. Ratio > 1 means fastpool is faster.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def _median_times(pairs, repeats):
    """``pairs``: list of (name, ours, peer) callables; returns {name: (ours_s, peer_s)}."""
    samples = {name: ([], []) for name, _, _ in pairs}
    for _ in range(repeats):
        for name, ours, peer in pairs:
            for fn, bucket in ((ours, samples[name][0]), (peer, samples[name][1])):
                start = time.perf_counter()
                fn()
                bucket.append(time.perf_counter() - start)
    return {name: (float(np.median(a)), float(np.median(b)))
            for name, (a, b) in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--shape", default="32,64,112,112")
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--padding", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    import numba
    import torch

    import fastpool

    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    k, s, p = args.kernel, args.stride, args.padding
    rng = np.random.default_rng(0)
    x = rng.random(shape, dtype=np.float64).astype(args.dtype)
    tx = torch.from_numpy(x)
    F = torch.nn.functional
    aten = torch.ops.aten

    y, idx = fastpool.max_pool2d(x, k, s, p, return_indices=True)
    grad = rng.standard_normal(y.shape).astype(args.dtype)
    tgrad, tidx = torch.from_numpy(grad), torch.from_numpy(idx)
    _, sidx = fastpool.stochastic_pool2d(x, k, s, p, seed=1, return_indices=True)
    cases = [
        ("max_pool2d forward", lambda: fastpool.max_pool2d(x, k, s, p),
         lambda: F.max_pool2d(tx, k, s, p), x.nbytes + y.nbytes),
        ("max_pool2d forward+indices",
         lambda: fastpool.max_pool2d(x, k, s, p, return_indices=True),
         lambda: F.max_pool2d(tx, k, s, p, return_indices=True),
         x.nbytes + y.nbytes + idx.nbytes),
        ("avg_pool2d forward", lambda: fastpool.avg_pool2d(x, k, s, p),
         lambda: F.avg_pool2d(tx, k, s, p), x.nbytes + y.nbytes),
        ("max_pool2d backward (indices)",
         lambda: fastpool.max_pool2d_backward(grad, x, k, s, p, indices=idx),
         lambda: aten.max_pool2d_with_indices_backward(tgrad, tx, [k, k], [s, s], [p, p],
                                                       [1, 1], False, tidx),
         x.nbytes + grad.nbytes + idx.nbytes),
        ("avg_pool2d backward",
         lambda: fastpool.avg_pool2d_backward(grad, x, k, s, p),
         lambda: aten.avg_pool2d_backward(tgrad, tx, [k, k], [s, s], [p, p], False, True,
                                          None),
         x.nbytes + grad.nbytes),
    ]
    own = [
        # Stochastic pooling has no PyTorch peer: its budget is our own max+indices time.
        ("stochastic_pool2d train forward+indices",
         lambda: fastpool.stochastic_pool2d(x, k, s, p, seed=1, return_indices=True),
         lambda: fastpool.max_pool2d(x, k, s, p, return_indices=True),
         x.nbytes + y.nbytes + idx.nbytes),
        ("stochastic_pool2d inference forward",
         lambda: fastpool.stochastic_pool2d(x, k, s, p, training=False),
         lambda: fastpool.max_pool2d(x, k, s, p), x.nbytes + y.nbytes),
        ("stochastic_pool2d train backward",
         lambda: fastpool.stochastic_pool2d_backward(grad, x, k, s, p, indices=sidx),
         lambda: fastpool.max_pool2d_backward(grad, x, k, s, p, indices=idx),
         x.nbytes + grad.nbytes + idx.nbytes),
        ("stochastic_pool2d inference backward",
         lambda: fastpool.stochastic_pool2d_backward(grad, x, k, s, p, training=False),
         lambda: fastpool.avg_pool2d_backward(grad, x, k, s, p),
         2 * x.nbytes + grad.nbytes),
    ]
    pairs = [(n, a, b) for n, a, b, _ in cases + own]
    # Compile, and let the OS settle its page allocation (the first large allocations
    # of a process can stall on memory compaction), outside the timed region.
    _median_times(pairs, args.warmup)
    times = _median_times(pairs, args.repeats)

    print(f"fastpool {fastpool.__version__} vs torch {torch.__version__}; x={shape} "
          f"{args.dtype}, k={k} s={s} p={p}; threads={args.threads} "
          f"(numba layer {numba.threading_layer()}); median of {args.repeats}")
    header = f"{'op':42s} {'fastpool ms':>11s} {'peer ms':>9s} {'ratio':>7s} {'GB/s':>6s}"
    rows = []
    for title, group in (("peer: PyTorch", cases), ("peer: fastpool (budget)", own)):
        print(f"\n{title}\n{header}")
        for name, _, _, nbytes in group:
            ours, peer = times[name]
            rows.append(dict(op=name, peer=title, fastpool_ms=ours * 1e3, peer_ms=peer * 1e3,
                             ratio=peer / ours, gbps=nbytes / ours / 1e9))
            print(f"{name:42s} {ours * 1e3:11.2f} {peer * 1e3:9.2f} {peer / ours:7.2f} "
                  f"{nbytes / ours / 1e9:6.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(shape=shape, dtype=args.dtype, threads=args.threads,
                           torch=torch.__version__, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
