"""The tenth session's (2026-12-06) measurements, docs/site/performance.md.

``convs``: fastpool alone, best of 40 calls (each after an untimed one), 2 threads,
float32, batch 1, on the layers the stride-2 reads and the channels-last 1x1 blocks
changed. Run it once per build, alternating, in separate processes:

    git worktree add /tmp/old d3f5c26
    for i in 1 2 3; do
        PYTHONPATH=/tmp/old python docs/measure_2026_12_06.py convs
        PYTHONPATH=.        python docs/measure_2026_12_06.py convs
    done

``pool``: NCHW max pooling against ONNX Runtime, interleaved in one process with the
layer suite's timing (``fastpool._bench_layers.interleaved_medians``, 40 rounds).

``depthwise`` (the eleventh session, later that day): channels-first depthwise 3x3
forwards of small planes, fastpool alone, best of 40 calls, 2 threads, float32, as
``convs`` (old build 60897b3, before ``_Problem.depthwise_by_channels``).
"""
import sys
import time

import numpy as np


def _best(f, calls=40):
    f()
    times = []
    for _ in range(calls):
        f()
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def convs():
    import fastpool
    from fastpool import _bench
    from fastpool._geometry import channels_last_copy
    rng = np.random.default_rng(0)
    # (label, C, size, O, kernel, stride, groups, channels-last)
    cases = [("dw 3x3 s2 96@112", 96, 112, 96, 3, 2, 96, False),
             ("dw 3x3 s2 144@56", 144, 56, 144, 3, 2, 144, False),
             ("dw 3x3 s2 576@14", 576, 14, 576, 3, 2, 576, False),
             ("3x3 s2 128->128@56", 128, 56, 128, 3, 2, 1, False),
             ("3x3 s2 3->32@224", 3, 224, 32, 3, 2, 1, False),
             ("7x7 s2 3->64@224", 3, 224, 64, 7, 2, 1, False),
             ("3x3 s2 256->512@14", 256, 14, 512, 3, 2, 1, False),
             ("NHWC 1x1 1024->512@14", 1024, 14, 512, 1, 1, 1, True),
             ("NHWC 1x1 1024->256@14", 1024, 14, 256, 1, 1, 1, True),
             ("NHWC 1x1 256->1024@14", 256, 14, 1024, 1, 1, 1, True)]
    print(fastpool.__file__)
    with _bench.pinned_threads(2):
        for label, c, size, o, k, s, g, last in cases:
            x = rng.standard_normal((1, c, size, size)).astype(np.float32)
            if last:
                x = channels_last_copy(x, 1)
            w = rng.standard_normal((o, c // g, k, k)).astype(np.float32)
            ms = _best(lambda: fastpool.conv2d(x, w, stride=s, padding=k // 2, groups=g))
            print(f"{label:24} {ms:.3f} ms")


def pool():
    import fastpool
    from fastpool import _bench, _bench_layers as layers
    with _bench.pinned_threads(2):
        ort = [p for p in layers.available_peers(2) if p.name == "ONNX Runtime"][0]
        for c, size, k, s, p in [(256, 28, 3, 2, 1), (512, 14, 2, 2, 0), (512, 28, 2, 2, 0),
                                 (64, 112, 3, 2, 1)]:
            layer = layers._pool("max", c, size, k, s, p)
            data = layers.make_data(layer, 1, "nchw", np.float32)
            peer = ort.prepare(layer, data, False)[0]
            ours, theirs = layers.interleaved_medians(
                [lambda: fastpool.max_pool2d(data.x, k, s, p), peer], 40)
            print(f"{layer.label:24} fastpool {ours * 1e6:.0f} us, ONNX Runtime "
                  f"{theirs * 1e6:.0f} us, ratio {theirs / ours:.2f}")


def depthwise():
    import fastpool
    from fastpool import _bench
    rng = np.random.default_rng(0)
    # (batch, channels, size, stride)
    cases = [(1, 576, 14, 2), (1, 960, 7, 1), (1, 1280, 7, 1), (8, 576, 14, 2),
             (16, 960, 7, 1), (1, 384, 14, 1)]
    print(fastpool.__file__)
    with _bench.pinned_threads(2):
        for n, c, size, s in cases:
            x = rng.standard_normal((n, c, size, size)).astype(np.float32)
            w = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
            b = rng.standard_normal(c).astype(np.float32)
            ms = _best(lambda: fastpool.conv2d(x, w, b, stride=s, padding=1, groups=c))
            print(f"dw 3x3 s{s} {c}@{size} batch {n:<3} {ms:.3f} ms")


def blocks():
    """The fourteenth session's ``_depthwise_blocks``: an old build against this one in
    one process, their calls interleaved (``interleaved_medians``, 25 rounds), forward
    and (stride 1) input gradient, checking the bits match:

        git worktree add /tmp/old 6035867
        python docs/measure_2026_12_06.py blocks /tmp/old float32
    """
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import measure_builds_interleaved
    sys.path.insert(0, measure_builds_interleaved._old_package(sys.argv[2]))
    import fastpool
    import fastpool_old
    from fastpool import _bench, _bench_layers as layers
    dtype = np.dtype(sys.argv[3])
    rng = np.random.default_rng(0)
    cases = [(1, 576, 14, 1), (1, 576, 14, 2), (1, 960, 7, 1), (1, 384, 14, 1),
             (1, 192, 28, 1), (1, 192, 28, 2), (1, 144, 56, 2), (1, 144, 56, 1),
             (1, 96, 112, 2), (1, 32, 112, 1), (8, 576, 14, 1), (8, 960, 7, 1),
             (32, 144, 56, 2)]
    with _bench.pinned_threads(2):
        for n, c, s, st in cases:
            x = rng.standard_normal((n, c, s, s)).astype(dtype)
            w = rng.standard_normal((c, 1, 3, 3)).astype(dtype)
            b = rng.standard_normal(c).astype(dtype)
            out = (s - 1) // st + 1
            g = rng.standard_normal((n, c, out, out)).astype(dtype)
            args = dict(stride=st, padding=1, groups=c)
            line = []
            for part in ("forward", "input grad") if st == 1 else ("forward",):
                if part == "forward":
                    calls = [lambda m=m: m.conv2d(x, w, b, **args)
                             for m in (fastpool_old, fastpool)]
                else:
                    calls = [lambda m=m: m.conv2d_backward(
                        g, x, w, output_mask=(True, False, False), **args).grad_input
                        for m in (fastpool_old, fastpool)]
                same = np.array_equal(calls[0](), calls[1]())
                old, new = layers.interleaved_medians(calls, 25)
                line.append(f"{part} {old * 1e3:.3f} -> {new * 1e3:.3f} "
                            f"({old / new:.2f}x{'' if same else ', bits differ'})")
            print(f"batch {n:2} 3x3 s{st} {c}@{s}: " + "   ".join(line), flush=True)


def pairs():
    """The fifteenth session's 2x2 stride-2 max rows (``_pool_pairs``): an old build
    against this one and ONNX Runtime in one process, interleaved
    (``interleaved_medians``, 40 rounds), channels-first forward without indices,
    batch 1 unless said, at 1 and 2 threads, checking the bits match:

        git worktree add /tmp/old 27ef498
        python docs/measure_2026_12_06.py pairs /tmp/old float32
    """
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import measure_builds_interleaved
    sys.path.insert(0, measure_builds_interleaved._old_package(sys.argv[2]))
    import fastpool
    import fastpool_old
    from fastpool import _bench, _bench_layers as layers
    dtype = np.dtype(sys.argv[3])
    cases = [(1, 512, 14), (1, 512, 28), (1, 256, 56), (1, 128, 112), (1, 64, 224),
             (32, 6, 28), (8, 64, 56)]
    for threads in (1, 2):
        ort = layers.OrtPeer(threads)
        with _bench.pinned_threads(threads):
            for n, c, s in cases:
                layer = layers._pool("max", c, s, 2, 2)
                data = layers.make_data(layer, n, "nchw", dtype)
                x = data.x
                calls = [lambda m=m: m.max_pool2d(x, 2, 2) for m in (fastpool_old, fastpool)]
                prepared = ort.prepare(layer, data, False)
                if prepared is not None:
                    calls.append(prepared[0])
                same = np.array_equal(calls[0](), calls[1]())
                times = layers.interleaved_medians(calls, 40)
                peer = (f", ONNX Runtime {times[2] * 1e3:.4f} ({times[2] / times[1]:.2f}x "
                        "new)" if len(times) > 2 else "")
                print(f"{threads} threads, batch {n:2} max 2x2 s2 {c}@{s}: "
                      f"{times[0] * 1e3:.4f} -> {times[1] * 1e3:.4f} ms "
                      f"({times[0] / times[1]:.2f}x{'' if same else ', bits differ'})"
                      + peer, flush=True)


if __name__ == "__main__":
    {"convs": convs, "pool": pool, "depthwise": depthwise,
     "blocks": blocks, "pairs": pairs}[sys.argv[1]]()
