"""Channels-last convolutions of two fastpool builds and PyTorch ``channels_last`` in one
process, calls interleaved (the sixteenth session's figures, 2026-12-06, in
docs/site/performance.md): Winograd on channels-last buffers (conv3d and conv2d 3x3)
and first layers of 3 channels (the im2col gather from a channels-first copy).

    git worktree add /tmp/old <old revision>
    python docs/measure_channels_last_conv.py /tmp/old 2      # 2 threads
    python docs/measure_channels_last_conv.py /tmp/old 1      # 1 thread

Each row checks that both builds give the same bits, then prints the medians of
interleaved rounds (``fastpool._bench_layers.interleaved_medians``: a settling pause
and an untimed call before each timed one), in ms. The old build is imported as
``fastpool_old`` (``measure_builds_interleaved._old_package``); clear the new tree's
Numba caches after changing inline helpers (``find fastpool -name '*.nb[ic]'
-delete``)."""
import os
import sys


def _cases():
    """``(label, x shape as (N, C, *spatial), weight shape, stride, padding, rounds)``."""
    return [
        ("conv3d 3x3x3 32->32", (4, 32, 16, 56, 56), (32, 32, 3, 3, 3), 1, 1, 7),
        ("conv2d 3x3 64->64@56 b1", (1, 64, 56, 56), (64, 64, 3, 3), 1, 1, 9),
        ("conv2d 3x3 128->128@28 b1", (1, 128, 28, 28), (128, 128, 3, 3), 1, 1, 9),
        ("conv2d 3x3 64->64@56 b8", (8, 64, 56, 56), (64, 64, 3, 3), 1, 1, 9),
        ("conv2d 3x3 64->64@56 b32", (32, 64, 56, 56), (64, 64, 3, 3), 1, 1, 5),
        ("conv2d 3x3 3->64@224 b1", (1, 3, 224, 224), (64, 3, 3, 3), 1, 1, 15),
        ("conv2d 7x7 s2 3->64@224 b1 (stem)", (1, 3, 224, 224), (64, 3, 7, 7), 2, 3, 15),
        ("conv2d 3x3 s2 3->32@224 b1", (1, 3, 224, 224), (32, 3, 3, 3), 2, 1, 15),
        ("conv2d 7x7 s2 3->64@224 b8 (stem)", (8, 3, 224, 224), (64, 3, 7, 7), 2, 3, 9),
    ]


def main(tree, threads):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from measure_builds_interleaved import _old_package
    sys.path.insert(0, _old_package(tree))
    import numpy as np
    import torch

    import fastpool
    import fastpool_old
    from fastpool import _bench, _bench_layers as bl

    rng = np.random.default_rng(0)
    with _bench.pinned_threads(threads):
        for label, shape, w_shape, s, p, rounds in _cases():
            buffer = rng.standard_normal((shape[0],) + shape[2:] + (shape[1],))
            x = np.moveaxis(buffer.astype(np.float32), -1, 1)  # channels-last view
            w = rng.standard_normal(w_shape).astype(np.float32)
            rank = len(shape) - 2
            op = {2: "conv2d", 3: "conv3d"}[rank]
            fmt = {2: torch.channels_last, 3: torch.channels_last_3d}[rank]
            xt = torch.from_numpy(x)
            wt = torch.from_numpy(w).contiguous(memory_format=fmt)
            peer = getattr(torch.nn.functional, op)

            def old():
                return getattr(fastpool_old, op)(x, w, stride=s, padding=p)

            def new():
                return getattr(fastpool, op)(x, w, stride=s, padding=p)

            def theirs():
                return peer(xt, wt, stride=s, padding=p)

            if not np.array_equal(old(), new()):
                raise SystemExit(f"{label}: the builds give different bits")
            times = bl.interleaved_medians([old, new, theirs], rounds)
            o, n, t = (v * 1e3 for v in times)
            print(f"{label:36s} old {o:8.3f}  new {n:8.3f}  PyTorch channels_last "
                  f"{t:8.3f}  old/new {o / n:5.2f}  PyTorch/new {t / n:5.2f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
