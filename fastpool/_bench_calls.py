"""``python -m fastpool bench --suite calls``: the fixed cost of a call.

Every op on a tiny input (a (1, 1, 4, 4) float32 plane, a (1, 1, 16) row), where the
work itself takes well under a microsecond, so a call's time is its fixed cost:
validating the arguments, choosing the device and kernel, allocating the result and
entering the compiled code. Timed against the same call of PyTorch (``torch.nn.functional``
and the ``torch.ops.aten`` backward ops, given the same indices) in one interleaved
run: each repeat times ``number`` calls of each side, alternating which goes first;
medians of the per-call times are reported. PyTorch is timed on the benchmark's threads
and on one thread, and the faster counts (with ``OMP_WAIT_POLICY=PASSIVE``, which
``python -m fastpool`` set until 2026-12-07, its sleeping second thread cost a tiny
call tens of microseconds that one thread did not pay; the user's setting is kept
now). Issue 16's targets, for
forward calls: 6 µs for pooling, 10 µs for convolution.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

TARGET_US = {"pool": 6.0, "conv": 10.0}


def cases():
    """``[(name, kind, ours, peer)]``: zero-argument callables; ``peer`` is None
    without PyTorch."""
    import fastpool
    rng = np.random.default_rng(0)
    x = rng.random((1, 1, 4, 4), dtype=np.float32)
    row = rng.random((1, 1, 16), dtype=np.float32)
    w = rng.random((1, 1, 3, 3), dtype=np.float32)
    g = rng.random((1, 1, 2, 2), dtype=np.float32)
    gy = rng.random((1, 1, 4, 4), dtype=np.float32)
    _, indices = fastpool.max_pool2d(x, 2, return_indices=True)
    ours = [
        ("max_pool2d", "pool", lambda: fastpool.max_pool2d(x, 2)),
        ("avg_pool2d", "pool", lambda: fastpool.avg_pool2d(x, 2)),
        ("max_pool1d", "pool", lambda: fastpool.max_pool1d(row, 2)),
        ("adaptive_avg_pool2d", "pool", lambda: fastpool.adaptive_avg_pool2d(x, 1)),
        ("max_pool2d_backward", "pool",
         lambda: fastpool.max_pool2d_backward(g, x, 2, indices=indices)),
        ("avg_pool2d_backward", "pool", lambda: fastpool.avg_pool2d_backward(g, x, 2)),
        ("conv2d 3x3", "conv", lambda: fastpool.conv2d(x, w, padding=1)),
        ("conv2d_backward 3x3", "conv",
         lambda: fastpool.conv2d_backward(gy, x, w, padding=1,
                                          output_mask=(True, True, False))),
    ]
    peers = _torch_peers(x, row, w, g, gy, indices)
    return [(name, kind, fn, peers.get(name) if peers else None)
            for name, kind, fn in ours]


def _torch_peers(x, row, w, g, gy, indices):
    try:
        import torch
    except ImportError:
        return None
    import torch.nn.functional as F
    aten = torch.ops.aten
    xt, rt, wt, gt, gyt = (torch.from_numpy(a) for a in (x, row, w, g, gy))
    it = torch.from_numpy(indices)
    return {
        "max_pool2d": lambda: F.max_pool2d(xt, 2),
        "avg_pool2d": lambda: F.avg_pool2d(xt, 2),
        "max_pool1d": lambda: F.max_pool1d(rt, 2),
        "adaptive_avg_pool2d": lambda: F.adaptive_avg_pool2d(xt, 1),
        "max_pool2d_backward": lambda: aten.max_pool2d_with_indices_backward(
            gt, xt, [2, 2], [2, 2], [0, 0], [1, 1], False, it),
        "avg_pool2d_backward": lambda: aten.avg_pool2d_backward(
            gt, xt, [2, 2], [2, 2], [0, 0], False, True, None),
        "conv2d 3x3": lambda: F.conv2d(xt, wt, padding=1),
        "conv2d_backward 3x3": lambda: aten.convolution_backward(
            gyt, xt, wt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [True, True, False]),
    }


def _per_call(fn, number):
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def run(repeats, number, threads):
    """One row per case: ``name``, ``kind``, ``fastpool_us``, ``peer_us`` (the faster
    PyTorch setting; None without PyTorch), ``ratio`` (peer time / fastpool time),
    ``target_us`` (None for backward calls)."""
    import numba
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        return _run(repeats, number, threads)
    finally:
        numba.set_num_threads(before)  # a caller's other work keeps its threads


def _run(repeats, number, threads):
    torch = None
    try:
        import torch
    except ImportError:
        pass
    torch_before = None if torch is None else torch.get_num_threads()
    try:
        return _rows(torch, repeats, number, threads)
    finally:
        if torch is not None:
            torch.set_num_threads(torch_before)


def _rows(torch, repeats, number, threads):
    rows = []
    for name, kind, ours, peer in cases():
        # (callable, PyTorch threads to set first or None)
        sides = [(ours, None)]
        if peer is not None:
            sides += [(peer, threads)] + ([(peer, 1)] if threads > 1 else [])
        times = [[] for _ in sides]
        for fn, peer_threads in sides:
            if peer_threads is not None:
                torch.set_num_threads(peer_threads)
            fn()  # compiled and warm before any timing
        for r in range(repeats):
            order = list(range(len(sides)))
            for i in (order if r % 2 == 0 else order[::-1]):
                fn, peer_threads = sides[i]
                if peer_threads is not None:
                    torch.set_num_threads(peer_threads)
                times[i].append(_per_call(fn, number))
        us = [1e6 * statistics.median(t) for t in times]
        best = min(us[1:]) if peer is not None else None
        rows.append(dict(name=name, kind=kind, fastpool_us=us[0], peer_us=best,
                         ratio=best / us[0] if best is not None else None,
                         target_us=None if "backward" in name else TARGET_US[kind]))
    return rows


def format_table(rows, threads):
    lines = [f"fixed cost of a call on a tiny input (float32, {threads} thread(s); "
             "PyTorch: the faster of that and 1 thread; ratio = PyTorch time / "
             "fastpool time)",
             f"{'op':<22}{'fastpool us':>12}{'PyTorch us':>12}{'ratio':>8}{'target us':>11}"]
    for r in rows:
        peer = "-" if r["peer_us"] is None else f"{r['peer_us']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        target = r["target_us"]
        mark = "  (over)" if target is not None and r["fastpool_us"] > target else ""
        target = "-" if target is None else f"{target:.0f}"
        lines.append(f"{r['name']:<22}{r['fastpool_us']:>12.1f}{peer:>12}{ratio:>8}"
                     f"{target:>11}{mark}")
    return "\n".join(lines)
