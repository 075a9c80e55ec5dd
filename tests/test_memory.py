"""Peak memory of every op, forward and backward, on large calls in a child process.

Each op's peak resident memory during the call must stay within its outputs plus the
documented scratch bound (``memory.py``; docs/site/reliability.md) plus a fixed slack.
The child forces glibc to map every large allocation afresh
(``MALLOC_MMAP_THRESHOLD_``), so the rise of the peak is what the call allocated, and
the test also checks that the meter sees at least the outputs.
"""

import json
import os

import numpy as np
import pytest

import memory
from test_reliability import run_python

pytestmark = pytest.mark.skipif(not memory.available(), reason="needs Linux /proc")

MiB = memory.MiB

# (label, x shape, weight shape, stride, padding, groups): one case per CPU algorithm.
CONV_CASES = [
    ("winograd 3x3", (16, 64, 64, 64), (64, 64, 3, 3), 1, 1, 1),
    ("rows 5x5", (16, 32, 64, 64), (32, 32, 5, 5), 1, 2, 1),
    ("im2col 3x3 s2", (16, 64, 64, 64), (64, 64, 3, 3), 2, 1, 1),
    ("pointwise 1x1", (16, 64, 64, 64), (128, 64, 1, 1), 1, 0, 1),
    ("direct depthwise 3x3", (16, 64, 64, 64), (64, 1, 3, 3), 1, 1, 64),
    ("direct depthwise 3x3 s2", (16, 64, 64, 64), (64, 1, 3, 3), 2, 1, 64),
]
# (label, x shape, kernel, stride, padding, dilation)
POOL_CASES = [
    ("k3 s2 p1", (16, 64, 128, 128), 3, 2, 1, 1),
    ("k2 s2", (16, 64, 128, 128), 2, 2, 0, 1),
    ("k3 s2 p2 d2 (stochastic only)", (16, 64, 128, 128), 3, 2, 2, 2),
]


def child(dtype_name):
    """Measure every op; print one JSON list of rows."""
    import numba

    import fastpool

    dtype = np.dtype(dtype_name)
    rng = np.random.default_rng(0)
    threads = numba.get_num_threads()
    rows = []

    def record(op, label, call, inputs, scratch):
        small = call(small=True)  # compile or load the kernels first: code is not data
        del small
        result, peak = memory.measure(call)
        arrays = result if isinstance(result, tuple) else (result,)
        out_bytes = sum(a.nbytes for a in arrays if a is not None)
        rows.append(dict(op=op, case=label, dtype=dtype.name, input_mib=inputs / MiB,
                         output_mib=out_bytes / MiB, peak_mib=peak / MiB,
                         scratch_bound_mib=scratch / MiB))
        return result

    for label, shape, k, s, p, d in POOL_CASES:
        x = rng.random(shape).astype(dtype)
        small_x = x[:1, :2]
        geo = dict(kernel_size=k, stride=s, padding=p)
        pool_ops = ["stochastic"] if d > 1 else ["max", "avg", "stochastic"]
        out_hw = fastpool.stochastic_pool2d(x[:1, :1], **geo, dilation=d, seed=1).shape[2:]

        def scratch(op):
            return memory.pool_scratch(op, threads, shape[2:], out_hw, (k, k), (s, s),
                                       (d, d), dtype.itemsize, shape[0] * shape[1])

        def arg(small):
            return small_x if small else x

        go = rng.standard_normal((shape[0], shape[1]) + tuple(out_hw)).astype(dtype)

        def grad(small):
            return go[:1, :2] if small else go

        if "max" in pool_ops:
            _, idx = record("max_forward", label, lambda small=False: fastpool.max_pool2d(
                arg(small), **geo, return_indices=True), x.nbytes, scratch("max_forward"))
            record("max_backward", label, lambda small=False: fastpool.max_pool2d_backward(
                grad(small), arg(small), **geo, indices=idx[:1, :2] if small else idx),
                go.nbytes + idx.nbytes, scratch("max_backward"))
            del idx
            record("avg_forward", label, lambda small=False: fastpool.avg_pool2d(
                arg(small), **geo), x.nbytes, scratch("avg_forward"))
            record("avg_backward", label, lambda small=False: fastpool.avg_pool2d_backward(
                grad(small), arg(small), **geo), go.nbytes, scratch("avg_backward"))
        geo["dilation"] = d
        _, picks = record(
            "stochastic_train_forward", label,
            lambda small=False: fastpool.stochastic_pool2d(arg(small), **geo, seed=3,
                                                           return_indices=True),
            x.nbytes, scratch("stochastic_train_forward"))
        record("stochastic_train_backward", label,
               lambda small=False: fastpool.stochastic_pool2d_backward(
                   grad(small), arg(small), **geo, indices=picks[:1, :2] if small else picks),
               go.nbytes + picks.nbytes, scratch("stochastic_train_backward"))
        del picks
        record("stochastic_infer_forward", label,
               lambda small=False: fastpool.stochastic_pool2d(arg(small), **geo,
                                                              training=False),
               x.nbytes, scratch("stochastic_infer_forward"))
        record("stochastic_infer_backward", label,
               lambda small=False: fastpool.stochastic_pool2d_backward(
                   grad(small), arg(small), **geo, training=False),
               x.nbytes + go.nbytes, scratch("stochastic_infer_backward"))
        del x, go

    for label, x_shape, w_shape, s, p, groups in CONV_CASES:
        x = rng.standard_normal(x_shape).astype(dtype)
        w = rng.standard_normal(w_shape).astype(dtype)
        b = rng.standard_normal(w_shape[0]).astype(dtype)
        geo = dict(stride=s, padding=p, groups=groups)
        small_x = x[:1]
        out_hw = fastpool.conv2d(small_x, w, **geo).shape[2:]
        bound = memory.conv_scratch(threads, x_shape, w_shape, out_hw, (1, 1),
                                    dtype.itemsize, groups)

        def arg(small):
            return small_x if small else x

        y = record("conv_forward", label, lambda small=False: fastpool.conv2d(
            arg(small), w, b, **geo), x.nbytes + w.nbytes, bound)
        go = rng.standard_normal(y.shape).astype(dtype)
        del y
        record("conv_backward", label, lambda small=False: tuple(fastpool.conv2d_backward(
            go[:1] if small else go, arg(small), w, **geo)),
            x.nbytes + w.nbytes + go.nbytes, bound)
        del x, go

    x = rng.standard_normal((4, 32, 16, 32, 32)).astype(dtype)
    w = rng.standard_normal((32, 32, 3, 3, 3)).astype(dtype)
    y = fastpool.conv3d(x[:1, :, :4], w, padding=1)
    bound = memory.conv3d_scratch(threads, x.shape, w.shape, x.shape[2:], dtype.itemsize, 1)
    y = record("conv_forward", "conv3d 3x3x3", lambda small=False: fastpool.conv3d(
        x[:1, :, :4] if small else x, w, padding=1), x.nbytes + w.nbytes, bound)
    go = rng.standard_normal(y.shape).astype(dtype)
    del y
    record("conv_backward", "conv3d 3x3x3", lambda small=False: tuple(
        fastpool.conv3d_backward(go[:1, :, :4] if small else go,
                                 x[:1, :, :4] if small else x, w, padding=1)),
        x.nbytes + w.nbytes + go.nbytes, bound)
    print(json.dumps(rows))


def _rows(dtype_name):
    return run_python(f"import test_memory; test_memory.child({dtype_name!r})",
                      env={"MALLOC_MMAP_THRESHOLD_": "65536",
                           "MALLOC_TRIM_THRESHOLD_": "0"})


def format_rows(rows):
    lines = ["| op | case | dtype | input MiB | output MiB | peak rise MiB | "
             "scratch bound MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['input_mib']:.1f} | "
                     f"{r['output_mib']:.1f} | {r['peak_mib']:.1f} | "
                     f"{r['scratch_bound_mib']:.1f} |")
    return "\n".join(lines)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_peak_memory_within_outputs_plus_scratch_bound(dtype_name):
    rows = _rows(dtype_name)
    print("\n" + format_rows(rows))
    over = [r for r in rows if r["peak_mib"] * MiB
            > r["output_mib"] * MiB + r["scratch_bound_mib"] * MiB + memory.SLACK]
    assert over == [], format_rows(over)
    unseen = [r for r in rows if r["peak_mib"] < 0.9 * r["output_mib"]]
    assert unseen == [], "the meter missed outputs:\n" + format_rows(unseen)
    ops = {r["op"] for r in rows}
    assert len(ops) == 10, sorted(ops)
    if os.environ.get("FASTPOOL_MEMORY_TABLE"):
        with open(os.environ["FASTPOOL_MEMORY_TABLE"], "a") as f:
            f.write(format_rows(rows) + "\n")
