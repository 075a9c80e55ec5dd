"""Two fastpool builds in one process, their calls interleaved: every conv layer of the
layer suite's five networks, fastpool alone, 2 threads, float32, best of at least 6
calls each (about a second a layer), old and new taking turns.

This project's machine switches between a fast and a slow state for minutes at a time
(the same call 1.5 ms, then 2.3), so builds timed in alternating processes can each
land in either state; interleaved in one process they see the same. The old build is
copied under another package name (``fastpool_old``) so both import side by side:

    git worktree add /tmp/old <old revision>
    python docs/measure_builds_interleaved.py /tmp/old 1 nchw forward
    python docs/measure_builds_interleaved.py /tmp/old 1 channels_last forward
    python docs/measure_builds_interleaved.py /tmp/old 8 nchw backward

(arguments: the old source tree, batch, layout, ``forward`` or ``backward``, i.e. the
input and weight gradients). Each row compares the builds' bits; where they differ (the
builds chose different algorithms) the row says so, with the largest difference. One
channels-first forward of any shape, 12 interleaved rounds (an old build may round
differently: the largest relative difference is printed instead):

    python docs/measure_builds_interleaved.py /tmp/old layer 32,64,56,56 64 3 1 float64

(input shape, output channels, kernel size, padding, dtype). The new
build is the ``fastpool`` this Python imports. After changing constants or inline
helpers that other modules' kernels compile in (``fastpool/cpu/_microkernel.py``'s
``padded`` or ``MR``, ``fastpool/cpu/conv/_planner.py``), clear the new tree's Numba
caches first (``find fastpool -name '*.nb[ic]' -delete``): the disk cache checks only
the file of the kernel it loads. (Before 2026-12-06 kernels also linked in
``gemm_batch``'s code; builds from before then need their caches cleared after any
change to the tile.) Figures in docs/site/performance.md."""
import os
import re
import shutil
import sys
import tempfile
import time


def _old_package(tree):
    """A copy of ``tree``'s ``fastpool`` package renamed ``fastpool_old``, in a fresh
    directory (returned) to put on ``sys.path``."""
    root = tempfile.mkdtemp(prefix="fastpool-old-")
    target = os.path.join(root, "fastpool_old")
    shutil.copytree(os.path.join(tree, "fastpool"), target,
                    ignore=shutil.ignore_patterns("__pycache__"))
    pattern = re.compile(r"\bfastpool\b(?=[.\s,]|$)", re.M)
    for folder, _, files in os.walk(target):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(pattern.sub("fastpool_old", text))
    return root


def main(tree, batch, layout, direction):
    sys.path.insert(0, _old_package(tree))
    import numba
    import numpy as np

    import fastpool
    import fastpool_old
    from fastpool import _bench_layers as bl
    numba.set_num_threads(2)
    ratios = []
    for layer, _ in bl.unique_layers(list(bl.NETWORKS)):
        if layer.kind != "conv":
            continue
        data = bl.make_data(layer, batch, layout, np.dtype("float32"))
        x, w, g = data.x, data.weight, data.grad
        s, p, groups = layer.stride, layer.padding, layer.groups
        if direction == "forward":
            calls = [lambda m=m: m.conv2d(x, w, stride=s, padding=p, groups=groups)
                     for m in (fastpool_old, fastpool)]
        else:
            calls = [lambda m=m: m.conv2d_backward(g, x, w, stride=s, padding=p,
                                                   groups=groups,
                                                   output_mask=(True, True, False))
                     for m in (fastpool_old, fastpool)]
        old, new = calls[0](), calls[1]()
        note = ""
        for a, b in zip(old if isinstance(old, tuple) else (old,),
                        new if isinstance(new, tuple) else (new,)):
            if not np.array_equal(a, b):
                # allowed where the builds choose different algorithms (the bits are
                # each algorithm's); the difference is printed
                assert a.shape == b.shape, f"{layer.label}: the builds' shapes differ"
                note = (f"  (bits differ: largest relative difference "
                        f"{np.max(np.abs(a - b)) / np.max(np.abs(a)):.1g})")
        best = [float("inf")] * 2
        deadline = time.perf_counter() + 1.0
        rounds = 0
        while rounds < 6 or (time.perf_counter() < deadline and rounds < 40):
            for i in ((0, 1) if rounds % 2 == 0 else (1, 0)):
                start = time.perf_counter()
                calls[i]()
                best[i] = min(best[i], time.perf_counter() - start)
            rounds += 1
        ratios.append(best[0] / best[1])
        print(f"{layer.label:30} old {best[0] * 1e3:8.3f} ms  new {best[1] * 1e3:8.3f} ms"
              f"  {best[0] / best[1]:5.2f}x{note}", flush=True)
    print(f"geometric mean {np.exp(np.mean(np.log(ratios))):.3f}x, "
          f"range {min(ratios):.2f}x-{max(ratios):.2f}x over {len(ratios)} layers")


def one_layer(tree, shape, out_channels, kernel, padding, dtype):
    sys.path.insert(0, _old_package(tree))
    import numba
    import numpy as np

    import fastpool
    import fastpool_old
    numba.set_num_threads(2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((out_channels, shape[1], kernel, kernel)).astype(dtype)
    calls = [lambda m=m: m.conv2d(x, w, padding=padding) for m in (fastpool_old, fastpool)]
    old, new = calls[0](), calls[1]()
    print(f"largest relative difference {np.max(np.abs(old - new)) / np.max(np.abs(old)):.2g}")
    best = [float("inf")] * 2
    for rounds in range(12):
        for i in ((0, 1) if rounds % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            calls[i]()
            best[i] = min(best[i], time.perf_counter() - start)
    print(f"{shape} -> {out_channels}, {kernel}x{kernel} p{padding} {dtype}: old "
          f"{best[0] * 1e3:.2f} ms  new {best[1] * 1e3:.2f} ms  {best[0] / best[1]:.2f}x")


if __name__ == "__main__":
    if sys.argv[2] == "layer":
        one_layer(sys.argv[1], tuple(int(v) for v in sys.argv[3].split(",")),
                  int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7])
    else:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
