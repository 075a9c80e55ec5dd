"""Two fastpool builds' convolution layers, fastpool alone: every ungrouped conv layer
of the layer suite's five networks (float32, 2 threads, NCHW unless told), the best of
5 timed loops of about 50 ms each. Run it once per build, alternating, in separate
processes, and compare the JSON files:

    git worktree add /tmp/old <old revision>
    for i in 1 2; do
        PYTHONPATH=/tmp/old python docs/measure_conv_builds.py 1 nchw old$i.json
        PYTHONPATH=.        python docs/measure_conv_builds.py 1 nchw new$i.json
    done
    python docs/measure_conv_builds.py --compare old1.json,old2.json new1.json,new2.json

A fourth argument ``input-grad`` times the input gradient of the strided layers
instead (``conv2d_backward(..., output_mask=(True, False, False))``):

    PYTHONPATH=/tmp/old python docs/measure_conv_builds.py 1 nchw old1.json input-grad

Figures in docs/site/performance.md (2026-12-05, fastpool's own GEMM)."""
import json
import math
import sys
import time


def measure(batch, layout, out, what="forward"):
    import functools

    import numba
    import numpy as np

    import fastpool
    from fastpool import _bench_layers as bl
    numba.set_num_threads(2)
    result = {}
    for layer, _ in bl.unique_layers(list(bl.NETWORKS)):
        if layer.kind != "conv" or layer.groups != 1:
            continue
        if what == "input-grad" and layer.stride == 1:
            continue
        data = bl.make_data(layer, batch, layout, np.dtype("float32"))
        forward, _ = bl._ours(layer, data.x, data.weight)
        if what == "input-grad":
            forward = functools.partial(
                fastpool.conv2d_backward, data.grad, data.x, data.weight,
                stride=layer.stride, padding=layer.padding,
                output_mask=(True, False, False))
        forward()
        start = time.perf_counter()
        forward()
        calls = max(3, min(50, int(0.05 / (time.perf_counter() - start))))
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                forward()
            best = min(best, (time.perf_counter() - start) / calls)
        result[layer.label] = best * 1e3
    with open(out, "w") as f:
        json.dump(result, f)


def compare(old_files, new_files):
    old = [json.load(open(f)) for f in old_files.split(",")]
    new = [json.load(open(f)) for f in new_files.split(",")]
    logs = []
    for label in old[0]:
        a = min(run[label] for run in old)
        b = min(run[label] for run in new)
        logs.append(math.log(a / b))
        print(f"{label:32s} {a:8.3f} -> {b:8.3f} ms  {a / b:5.2f}x")
    print(f"geometric mean {math.exp(sum(logs) / len(logs)):.2f}x over {len(logs)} layers")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        measure(int(sys.argv[1]), sys.argv[2], sys.argv[3], *sys.argv[4:5])
