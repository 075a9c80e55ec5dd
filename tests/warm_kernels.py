"""Compile kernels the test suite uses, in a second process, into Numba's disk cache,
while the suite itself runs (conftest.py starts this at the beginning of a full run).

Nearly all of a first test run's time is Numba compiling kernel specialisations, one at
a time on one core. This process compiles the ones the suite's later files need (the channels-last
depthwise convolution, test_conv_nd.py's kernels by running that file, test_half.py's
16-bit kernels, the N-D pooling geometries of test_pooling_nd.py in both layouts, the
2-D geometries of ``conftest.GEOMETRIES``, then the rest of test_pooling_nd.py by
running it), in the order those files reach them, so that by then the suite loads them
from the disk cache instead. It checks nothing: if it is slower than
the suite, or not running at all, the suite compiles what it needs itself, as before.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from conftest import GEOMETRIES, dtypes_for  # noqa: E402  (first: it sets up Numba)
import fastpool  # noqa: E402
from test_pooling_nd import GEOMETRIES as ND_GEOMETRIES  # noqa: E402


def channels_last(a):
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def pool_calls(rank, kernel, stride, dilation, dtype, layout):
    """Every pooling kernel of one geometry, dtype and layout (run once each)."""
    k = np.broadcast_to(kernel, (rank,))
    d = np.broadcast_to(dilation, (rank,))
    size = tuple(int(di * (ki - 1) + 1 + 4) for ki, di in zip(k, d))
    x = np.random.default_rng(0).random((2, 3) + size).astype(dtype)
    x = channels_last(x) if layout == "last" else x
    ops = {m: getattr(fastpool, f"{m}_pool{rank}d") for m in ("max", "avg", "stochastic")}
    back = {m: getattr(fastpool, f"{m}_pool{rank}d_backward") for m in ops}
    window = dict(kernel_size=kernel, stride=stride, dilation=dilation)
    y, indices = ops["max"](x, **window, return_indices=True)
    ops["max"](x, **window)
    g = np.ones_like(y)
    g = channels_last(g) if layout == "last" else g
    back["max"](g, x, **window, indices=indices)
    back["max"](g, x, **window)
    s, picks = ops["stochastic"](x, **window, seed=1, return_indices=True)
    back["stochastic"](g, x, **window, indices=picks)
    ops["stochastic"](x, **window, training=False)
    back["stochastic"](g, x, **window, training=False)
    a = ops["avg"](x, kernel, stride)  # average pooling has no dilation
    ga = np.ones_like(a)
    back["avg"](channels_last(ga) if layout == "last" else ga, x, kernel, stride)


def plan():
    """(rank, kernel, stride, dilation, dtype, layout), latest-needed first."""
    out = []
    for rank in (3, 1, 2):
        for i, (kernel, stride, dilation) in enumerate(ND_GEOMETRIES[rank]):
            for dtype in dtypes_for(i, 1):
                for layout in ("last", "first"):
                    out.append((rank, kernel, stride, dilation, dtype, layout))
    for i, (kernel, stride, dilation) in enumerate(GEOMETRIES):
        for dtype in dtypes_for(i):
            out.append((2, kernel, stride, dilation, dtype, "first"))
    # test_torch_ops.py's stochastic operators: 2-wide windows in float64, every rank.
    for rank in (1, 3):
        for layout in ("last", "first"):
            out.append((rank, 2, None, 1, np.float64, layout))
    return out


def half_calls():
    """test_half.py's calls of the 16-bit pooling kernels (about 90 specialisations of
    larger kernels: 6 of a cold run's 25 minutes went to compiling them in that file),
    in the file's order: its own test functions with their parameters, run here only
    for what they compile (their assertions are the suite's business)."""
    import test_half as th
    calls = [(th.test_half_is_float32_rounded_once, (d,)) for d in th.HALF]
    calls += [(th.test_native_half_pooling_is_float32_rounded_once, case)
              for case in th.NATIVE_CASES]
    calls += [(th.test_native_half_pooling_moves_16_bit_values, (d,)) for d in th.HALF]
    calls += [(th.test_half_keeps_channels_last, (d,)) for d in th.HALF]
    if th.torch is not None:
        calls += [(th.test_torch_half_matches_pytorch, (d, layout))
                  for d in th.TORCH_HALF for layout in ("channels_first", "channels_last")]
        calls += [(th.test_autocast_follows_pytorch, (d, "same")) for d in th.TORCH_HALF]
    return calls


def depthwise_channels_last_calls():
    """test_bench_layers.py's channels-last depthwise layer, forward and backward in
    both dtypes: its forward kernel is the suite's longest single compile (about 50 s
    each, a parallel kernel), and that file comes third."""
    from fastpool import _bench_layers as layers
    layer = layers.Layer("conv", 6, 8, 6, 3, 1, 1, groups=6)
    for dtype in (np.float32, np.float64):
        data = layers.make_data(layer, 2, "channels_last", np.dtype(dtype))
        forward, backward = layers._ours(layer, data.x, data.weight)
        forward()
        backward(data.grad)()


def test_file(name):
    """Run one test file here, for what it compiles (about all of its time on a cold
    run); the suite runs it again and loads the kernels from the disk cache."""
    import pytest
    os.environ["FASTPOOL_TEST_WARMUP"] = "0"  # no warm-up process of its own
    pytest.main(["-q", "-p", "no:cacheprovider", "-x", os.path.join(
        os.path.dirname(__file__), name)])


def main():
    # In the suite's order of need: test_bench_layers.py's depthwise kernels (third
    # file), test_conv_nd.py (sixth), test_half.py's kernels, the pooling geometries,
    # then the rest of test_pooling_nd.py (about two thirds of the way through).
    work = ([(depthwise_channels_last_calls, ()), (test_file, ("test_conv_nd.py",))]
            + half_calls() + [(pool_calls, case) for case in plan()]
            + [(test_file, ("test_pooling_nd.py",))])
    for function, args in work:
        try:
            function(*args)
        except Exception as exc:  # the suite reports real failures; this only warms
            print(f"warm_kernels: {function.__name__}{args}: {exc!r}", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:] == ["--which"]:  # the fastpool this process compiles for
        print(fastpool.__file__)
    else:
        main()
