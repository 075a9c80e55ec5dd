"""Time fastpool's CPU pooling and convolution against PyTorch in one run, interleaved.

    python asv_benchmarks/compare_torch.py [--ops all|pool|conv] [--threads 2]
                                           [--repeats 15] [--warmup 3] [--dtype float32]
                                           [--shape 32,64,112,112] [--json out.json]

Pooling runs on ``--shape`` with ``--kernel/--stride/--padding``; convolution on the
three shapes of issue 3: 3x3 64->64 on (32,64,56,56) padding 1, 1x1 256->512 on
(32,256,28,28), and depthwise 3x3 on (32,128,56,56) padding 1. Convolution backward is
the input and weight gradients (no bias), as PyTorch's ``convolution_backward`` with
output_mask (True, True, False).

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


def _pool_groups(args, fastpool, torch):
    """Pooling cases as ``(title, unit, [(name, ours, peer, bytes moved)])`` groups."""
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
    where = f"x={shape} k={k} s={s} p={p}"
    return [(f"pooling vs PyTorch, {where}", "GB/s", cases),
            (f"pooling vs fastpool's own budget, {where}", "GB/s", own)]


def _conv_groups(args, fastpool, torch):
    """Convolution cases as ``(title, unit, [(name, ours, peer, flop)])`` groups."""
    rng = np.random.default_rng(1)
    aten = torch.ops.aten
    F = torch.nn.functional
    cases = []
    for label, x_shape, w_shape, padding, groups in CONV_SHAPES:
        x = rng.standard_normal(x_shape).astype(args.dtype)
        w = (rng.standard_normal(w_shape) * 0.1).astype(args.dtype)
        y = fastpool.conv2d(x, w, padding=padding, groups=groups)
        grad = rng.standard_normal(y.shape).astype(args.dtype)
        tx, tw, tgrad = (torch.from_numpy(a) for a in (x, w, grad))
        flop = 2 * y.size * w_shape[1] * w_shape[2] * w_shape[3]
        cases.append((
            f"conv2d {label} forward",
            lambda x=x, w=w, p=padding, g=groups: fastpool.conv2d(x, w, padding=p, groups=g),
            lambda x=tx, w=tw, p=padding, g=groups: F.conv2d(x, w, padding=p, groups=g),
            flop))
        cases.append((
            f"conv2d {label} backward (input+weight)",
            lambda x=x, w=w, dy=grad, p=padding, g=groups: fastpool.conv2d_backward(
                dy, x, w, padding=p, groups=g, output_mask=(True, True, False)),
            lambda x=tx, w=tw, dy=tgrad, p=padding, g=groups: aten.convolution_backward(
                dy, x, w, None, [1, 1], [p, p], [1, 1], False, [0, 0], g,
                [True, True, False]),
            2 * flop))
    return [("convolution vs PyTorch", "GFLOP/s", cases)]


# (label, x shape, weight shape, padding, groups): the speed targets of issue 3.
CONV_SHAPES = [
    ("3x3 64->64 (32,64,56,56)", (32, 64, 56, 56), (64, 64, 3, 3), 1, 1),
    ("1x1 256->512 (32,256,28,28)", (32, 256, 28, 28), (512, 256, 1, 1), 0, 1),
    ("depthwise 3x3 (32,128,56,56)", (32, 128, 56, 56), (128, 1, 3, 3), 1, 128),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="all", choices=["all", "pool", "conv"])
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
    groups = []
    if args.ops in ("all", "pool"):
        groups += _pool_groups(args, fastpool, torch)
    if args.ops in ("all", "conv"):
        groups += _conv_groups(args, fastpool, torch)
    pairs = [(n, a, b) for _, _, cases in groups for n, a, b, _ in cases]
    # Compile, and let the OS settle its page allocation (the first large allocations
    # of a process can stall on memory compaction), outside the timed region.
    _median_times(pairs, args.warmup)
    times = _median_times(pairs, args.repeats)

    print(f"fastpool {fastpool.__version__} vs torch {torch.__version__}; {args.dtype}; "
          f"threads={args.threads} (numba layer {numba.threading_layer()}); "
          f"median of {args.repeats}")
    rows = []
    for title, unit, cases in groups:
        print(f"\n{title}\n{'op':50s} {'fastpool ms':>11s} {'peer ms':>9s} {'ratio':>7s} "
              f"{unit:>8s}")
        for name, _, _, amount in cases:
            ours, peer = times[name]
            rate = amount / ours / 1e9
            rows.append(dict(op=name, group=title, fastpool_ms=ours * 1e3,
                             peer_ms=peer * 1e3, ratio=peer / ours, unit=unit, rate=rate))
            print(f"{name:50s} {ours * 1e3:11.2f} {peer * 1e3:9.2f} {peer / ours:7.2f} "
                  f"{rate:8.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(pool_shape=args.shape, dtype=args.dtype, threads=args.threads,
                           torch=torch.__version__, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
