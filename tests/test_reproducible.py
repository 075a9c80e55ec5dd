"""Reproducible weight and bias gradients (``reproducible=True``, fastpool._reproducible):
the exact sums rounded (against math.fsum of the terms, tests/reference.py), and the
same bits however the sums are split: batch order, Dask chunks along any axis, thread
counts, layouts, the GPU kernels (on the simulator without a GPU), transposed
convolutions too."""

import math

import numba
import numpy as np
import pytest

import fastpool
import reference as ref

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
import fastpool.dask as fd  # noqa: E402

# (rank, x shape, weight shape, arguments); groups, strides, dilation, padding, depthwise
CASES = [
    (1, (3, 4, 11), (6, 2, 3), dict(stride=2, padding=1, groups=2)),
    (2, (2, 3, 7, 6), (4, 3, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    (2, (2, 4, 5, 5), (4, 1, 3, 3), dict(padding=1, groups=4)),
    (3, (2, 2, 4, 5, 4), (3, 2, 2, 3, 2), dict(padding=1, stride=(1, 2, 1))),
]
IDS = [f"{c[0]}d-{i}" for i, c in enumerate(CASES)]


def _data(rng, x_shape, weight_shape, args, dtype, spread=8.0):
    """x, weight, grad_output with magnitudes spread over ``2 * spread`` e-folds (sums
    whose rounding depends on their order)."""
    rank = len(x_shape) - 2
    x = rng.standard_normal(x_shape) * np.exp(rng.uniform(-spread, spread, x_shape))
    weight = rng.standard_normal(weight_shape)
    y = getattr(fastpool, f"conv{rank}d")(x, weight, **args)
    g = rng.standard_normal(y.shape) * np.exp(rng.uniform(-spread, spread, y.shape))
    return x.astype(dtype), weight.astype(dtype), g.astype(dtype)


def _backward(rank, g, x, w, args, **kw):
    return getattr(fastpool, f"conv{rank}d_backward")(g, x, w, **args, reproducible=True,
                                                      **kw)


def _within_ulps(actual, exact, dtype, ulps=1, slack=0.0):
    """``actual`` within ``ulps`` units in the last place (of ``dtype``) of ``exact``,
    plus ``slack``."""
    exact = np.asarray(exact, dtype=np.float64)
    step = np.spacing(np.abs(exact).astype(dtype)).astype(np.float64)
    np.testing.assert_array_less(np.abs(actual.astype(np.float64) - exact), ulps * step
                                 + slack + np.finfo(np.float64).smallest_subnormal)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rank, x_shape, weight_shape, args", CASES, ids=IDS)
def test_the_sums_are_exact_then_rounded(rank, x_shape, weight_shape, args, dtype, rng):
    x, w, g = _data(rng, x_shape, weight_shape, args, dtype)
    grads = _backward(rank, g, x, w, args)
    exact_w, exact_b = ref.conv_parameter_grads_exact(g, x, w.shape, **args)
    assert grads.grad_weight.dtype == dtype and grads.grad_weight.shape == w.shape
    # float64: two roundings of the folds' sum; float32: that float64, rounded again
    _within_ulps(grads.grad_weight, exact_w, dtype, ulps=2 if dtype == np.float64 else 1)
    _within_ulps(grads.grad_bias, exact_b, dtype, ulps=2 if dtype == np.float64 else 1)
    default = getattr(fastpool, f"conv{rank}d_backward")(g, x, w, **args)
    np.testing.assert_array_equal(grads.grad_input, default.grad_input)


@pytest.mark.parametrize("rank, x_shape, weight_shape, args", CASES, ids=IDS)
def test_any_split_gives_the_same_bits(rank, x_shape, weight_shape, args, rng,
                                       monkeypatch):
    """Batch order, thread count, channels-last layout and Dask chunks along every
    axis (uneven, smaller than the halo) all give the in-memory call's bits."""
    x, w, g = _data(rng, x_shape, weight_shape, args, np.float32)
    # every call on all threads (2 here), however small (else these shapes run on one)
    monkeypatch.setattr(fastpool._threading, "SMALL_WORK_NS", 0)
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        whole = _backward(rank, g, x, w, args)
        perm = np.array([1, 0] + list(range(2, x.shape[0])))
        permuted = _backward(rank, g[perm], x[perm], w, args)
        numba.set_num_threads(1)
        one_thread = _backward(rank, g, x, w, args)
    finally:
        numba.set_num_threads(saved)
    last = lambda a: fastpool._geometry.channels_last_copy(a, 1)  # noqa: E731
    channels_last = _backward(rank, last(g), last(x), w, args)
    for other in (permuted, one_thread, channels_last):
        np.testing.assert_array_equal(other.grad_weight, whole.grad_weight)
        np.testing.assert_array_equal(other.grad_bias, whole.grad_bias)
    dw = getattr(fd, f"conv{rank}d_backward")
    chunkings = [(1,) + x.shape[1:], (x.shape[0], x.shape[1]) + (2,) * rank,
                 (1, 1) + tuple(max(1, n // 2) for n in x.shape[2:])]
    with dask.config.set(scheduler="synchronous"):
        for chunks in chunkings:
            lazy = dw(da.from_array(g, chunks=(1, 2) + (3,) * rank),
                      da.from_array(x, chunks=chunks), w, **args, reproducible=True,
                      output_mask=(False, True, True))
            gw, gb = dask.compute(lazy.grad_weight, lazy.grad_bias)
            np.testing.assert_array_equal(gw, whole.grad_weight, err_msg=str(chunks))
            np.testing.assert_array_equal(gb, whole.grad_bias, err_msg=str(chunks))


@pytest.mark.parametrize("rank, x_shape, weight_shape, args", CASES, ids=IDS)
def test_the_gpu_kernels_give_the_cpu_bits(rank, x_shape, weight_shape, args, rng,
                                           small_launches):
    """Finite inputs (the CPU's fast path) and an infinity (its checked path), both
    dtypes: the GPU's folds and finish give the CPU's bits."""
    for dtype in (np.float32, np.float64):
        x, w, g = _data(rng, x_shape, weight_shape, args, dtype)
        for special in (False, True):
            if special:
                x.flat[3] = np.inf
            cpu = _backward(rank, g, x, w, args, device="cpu")
            gpu = _backward(rank, g, x, w, args, device="cuda",
                            output_mask=(False, True, True))
            np.testing.assert_array_equal(gpu.grad_weight, cpu.grad_weight)
            np.testing.assert_array_equal(gpu.grad_bias, cpu.grad_bias)


def test_infinities_and_nans_win_and_stay_split_proof(rng):
    rank, x_shape, weight_shape, args = CASES[1]
    x, w, g = _data(rng, x_shape, weight_shape, args, np.float64, spread=2.0)
    x[1, 2, 3, 3] = np.inf
    g[0, 1, 1, 1] = np.nan
    grads = _backward(rank, g, x, w, args)
    # which elements meet a NaN or an infinity: the plain float64 sums say
    _, plain_w, plain_b = ref.conv_backward(g, x, w, **args)
    np.testing.assert_array_equal(np.isnan(grads.grad_weight), np.isnan(plain_w))
    np.testing.assert_array_equal(np.isinf(grads.grad_weight), np.isinf(plain_w))
    np.testing.assert_array_equal(np.isnan(grads.grad_bias), np.isnan(plain_b))
    finite = np.isfinite(plain_w)
    assert finite.any() and not finite.all()
    np.testing.assert_allclose(grads.grad_weight[finite], plain_w[finite], rtol=1e-12)
    with dask.config.set(scheduler="synchronous"):
        lazy = fd.conv2d_backward(da.from_array(g, chunks=(1, 2, 2, 3)),
                                  da.from_array(x, chunks=(1, 3, 3, 2)), w, **args,
                                  reproducible=True)
        np.testing.assert_array_equal(lazy.grad_weight.compute(), grads.grad_weight)
        np.testing.assert_array_equal(lazy.grad_bias.compute(), grads.grad_bias)


@pytest.mark.parametrize("x_scale, g_scale", [(2.0**500, 2.0**498),
                                               (2.0**-520, 2.0**-478),
                                               (2.0**-510, 2.0**-511)])
def test_huge_and_tiny_float64_values(x_scale, g_scale, rng):
    """Products near the top of float64 (past 2**1000: the folds are scaled down and
    back) and near its bottom (grids at the least normal number, 2**-1022)."""
    rank, x_shape, weight_shape, args = CASES[1]
    x, w, g = _data(rng, x_shape, weight_shape, args, np.float64, spread=1.0)
    grads = _backward(rank, g * g_scale, x * x_scale, w, args)
    # the exact sums of the unscaled values, scaled by the powers of two
    exact_w, exact_b = ref.conv_parameter_grads_exact(g, x, w.shape, **args)
    assert np.isfinite(grads.grad_weight).all()
    # subnormal products are rounded on the subnormal grid, each on its own: slack
    terms = g.shape[0] * int(np.prod(g.shape[2:]))
    slack = terms * np.finfo(np.float64).smallest_subnormal
    _within_ulps(grads.grad_weight, exact_w * (x_scale * g_scale), np.float64, 3, slack)
    _within_ulps(grads.grad_bias, exact_b * g_scale, np.float64, 3, slack)
    permuted = _backward(rank, g[::-1] * g_scale, x[::-1] * x_scale, w, args)
    np.testing.assert_array_equal(permuted.grad_weight, grads.grad_weight)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_precision(name, rng):
    dtype = np.dtype(name) if name == "float16" else pytest.importorskip(
        "ml_dtypes").bfloat16
    rank, x_shape, weight_shape, args = CASES[0]
    x, w, g = _data(rng, x_shape, weight_shape, args, np.float32, spread=1.0)
    x, w, g = x.astype(dtype), w.astype(dtype), g.astype(dtype)
    grads = _backward(rank, g, x, w, args)
    assert grads.grad_weight.dtype == dtype and grads.grad_bias.dtype == dtype
    exact_w, exact_b = ref.conv_parameter_grads_exact(g.astype(np.float64),
                                                      x.astype(np.float64), w.shape, **args)
    _within_ulps(grads.grad_weight, exact_w, dtype)
    _within_ulps(grads.grad_bias, exact_b, dtype)
    permuted = _backward(rank, g[::-1], x[::-1], w, args)
    np.testing.assert_array_equal(permuted.grad_weight, grads.grad_weight)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_transposed_convolution(rank, rng):
    """The transposed convolution's weight gradient (the convolution's, roles
    swapped) and bias gradient: the exact sums rounded, and the same bits under batch
    chunks and batch order; groups and dilation too."""
    shape = (3, 4) + (5, 4, 3)[:rank]
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-6, 6, shape))
    w = rng.standard_normal((4, 3) + (3,) * rank)
    groups, dilation = (2, 2) if rank == 2 else (1, 1)
    args = dict(stride=2, padding=1, output_padding=1, groups=groups, dilation=dilation)
    f = getattr(fastpool, f"conv_transpose{rank}d_backward")
    y = getattr(fastpool, f"conv_transpose{rank}d")(x, w, **args)
    g = rng.standard_normal(y.shape)
    grads = f(g, x, w, **args, reproducible=True)
    default = f(g, x, w, **args)
    np.testing.assert_array_equal(grads.grad_input, default.grad_input)
    # the convolution from the result to x: x is its output gradient, g its input
    conv_args = dict(stride=2, padding=1, groups=groups, dilation=dilation)
    exact_w, _ = ref.conv_parameter_grads_exact(x, g, w.shape, **conv_args)
    exact_b = np.array([math.fsum(g[:, c].ravel()) for c in range(g.shape[1])])
    _within_ulps(grads.grad_weight, exact_w, np.float64, ulps=2)
    _within_ulps(grads.grad_bias, exact_b, np.float64, ulps=2)
    permuted = f(g[::-1], x[::-1], w, **args, reproducible=True)
    np.testing.assert_array_equal(permuted.grad_weight, grads.grad_weight)
    with dask.config.set(scheduler="synchronous"):
        lazy = getattr(fd, f"conv_transpose{rank}d_backward")(
            da.from_array(g, chunks=(1,) + g.shape[1:]),
            da.from_array(x, chunks=(2,) + x.shape[1:]), w, **args, reproducible=True)
        gw, gb = dask.compute(lazy.grad_weight, lazy.grad_bias)
    np.testing.assert_array_equal(gw, grads.grad_weight)
    np.testing.assert_array_equal(gb, grads.grad_bias)


def test_reproducible_must_be_a_bool(rng):
    x, w = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((2, 2, 3, 3))
    g = np.ones((1, 2, 3, 3))
    for call in (fastpool.conv2d_backward, fastpool.conv_transpose2d_backward):
        with pytest.raises(TypeError, match="reproducible"):
            call(g if call is fastpool.conv2d_backward else np.ones((1, 2, 7, 7)), x, w,
                 reproducible=1)
    with pytest.raises(TypeError, match="reproducible"):
        fd.conv2d_backward(da.from_array(g), da.from_array(x), w, reproducible="yes")


def test_unbatched_and_empty_batches(rng):
    rank, x_shape, weight_shape, args = CASES[1]
    x, w, g = _data(rng, x_shape, weight_shape, args, np.float64)
    one = _backward(rank, g[:1], x[:1], w, args)
    unbatched = _backward(rank, g[0], x[0], w, args)
    np.testing.assert_array_equal(unbatched.grad_weight, one.grad_weight)
    np.testing.assert_array_equal(unbatched.grad_bias, one.grad_bias)
    empty = _backward(rank, g[:0], x[:0], w, args)
    np.testing.assert_array_equal(empty.grad_weight, np.zeros(w.shape))
    np.testing.assert_array_equal(empty.grad_bias, np.zeros(w.shape[0]))


def test_dask_masks_return_none_for_what_was_not_asked(rng):
    rank, x_shape, weight_shape, args = CASES[1]
    x, w, g = _data(rng, x_shape, weight_shape, args, np.float32)
    whole = _backward(rank, g, x, w, args)
    dg, dx = da.from_array(g, chunks=(1, 2, 2, 3)), da.from_array(x, chunks=(1, 3, 3, 2))
    with dask.config.set(scheduler="synchronous"):
        only_w = fd.conv2d_backward(dg, dx, w, **args, output_mask=(False, True, False),
                                    reproducible=True)
        only_b = fd.conv2d_backward(dg, dx, w, **args, output_mask=(False, False, True),
                                    reproducible=True)
        assert only_w.grad_input is None and only_w.grad_bias is None
        assert only_b.grad_input is None and only_b.grad_weight is None
        np.testing.assert_array_equal(only_w.grad_weight.compute(), whole.grad_weight)
        np.testing.assert_array_equal(only_b.grad_bias.compute(), whole.grad_bias)
