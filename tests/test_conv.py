"""conv2d and conv2d_backward against the loop references, PyTorch and finite
differences; every CPU algorithm; layouts, empty batches, output_mask, determinism.

The convolution kernels take their geometry at run time, so the case sweeps below
compile nothing new per case. Results are sums of many products, so they are compared
with ``assert_close_to_sum``: the error bound scales with the same sum over absolute
values (computed by the reference, or by PyTorch in the PyTorch tests).
"""

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from threadpoolctl import threadpool_info, threadpool_limits

import fastpool
import fastpool.cpu.conv as cpu_conv
import fastpool.cpu.conv._planner as cpu_planner
import reference as ref
from conftest import DTYPES, assert_close_to_sum, numeric_gradient, seed_for
from fastpool import _params
from strategies import conv_cases

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the cross-checks are skipped; users never need torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _arrays(case, seed=None):
    rng = np.random.default_rng(seed_for(case) if seed is None else seed)
    dtype = case["dtype"]
    x = rng.standard_normal(case["x_shape"]).astype(dtype)
    w = rng.standard_normal(case["weight_shape"]).astype(dtype)
    b = rng.standard_normal(case["weight_shape"][0]).astype(dtype) if case["bias"] else None
    return rng, x, w, b


def _reference(x, w, b, gy, args):
    """Reference outputs and their bounds: ``(y, gi, gw, gb), (y_b, gi_b, gw_b, gb_b)``."""
    y = ref.conv2d(x, w, b, **args)
    absolute_b = None if b is None else np.abs(b)
    y_bound = ref.conv2d(np.abs(x), np.abs(w), absolute_b, **args)
    grads = ref.conv2d_backward(gy, x, w, **args)
    bounds = ref.conv2d_backward(np.abs(gy), np.abs(x), np.abs(w), **args)
    return (y, *grads), (y_bound, *bounds)


def _check_all(results, expected, bounds, dtype):
    for got, want, bound in zip(results, expected, bounds):
        if got is not None:
            assert got.dtype == dtype
            assert_close_to_sum(got, want, bound, dtype)


# ----------------------------------------------------------------------------- reference

@SETTINGS
@given(case=conv_cases())
def test_conv_matches_reference(case):
    rng, x, w, b = _arrays(case)
    args = case["args"]
    y = fastpool.conv2d(x, w, b, **args)
    gy = rng.standard_normal(y.shape).astype(x.dtype)
    expected, bounds = _reference(x, w, b, gy, args)
    assert y.shape == expected[0].shape
    grads = fastpool.conv2d_backward(gy, x, w, **args, output_mask=(True, True, b is not None))
    assert isinstance(grads, fastpool.Conv2dGrads)
    assert grads.grad_input.shape == x.shape and grads.grad_weight.shape == w.shape
    assert (grads.grad_bias is None) == (b is None)
    _check_all((y, *grads), expected, bounds, x.dtype)

    if case["unbatched"]:  # (C, H, W) in, no batch axis out, same values as image 0
        y0 = fastpool.conv2d(x[0], w, b, **args)
        assert y0.shape == y.shape[1:]
        _check_all([y0[None]], [expected[0][:1]], [bounds[0][:1]], x.dtype)
        gi0, gw0, _ = fastpool.conv2d_backward(gy[0], x[0], w, **args)
        assert gi0.shape == x.shape[1:]
        single_expected, single_bounds = _reference(x[:1], w, b, gy[:1], args)
        _check_all([gi0[None], gw0], single_expected[1:3], single_bounds[1:3], x.dtype)


@SETTINGS
@given(case=conv_cases())
def test_every_algorithm_matches_reference(case):
    rng, x, w, b = _arrays(case)
    args = case["args"]
    x, w, b, geometry = _params.conv_window(x, w, b, 2, **args)
    gy = rng.standard_normal(geometry.output_shape).astype(x.dtype)
    expected, bounds = _reference(x, w, b, gy, args)
    algorithms = cpu_conv.valid_algorithms(geometry)
    assert cpu_conv.choose_algorithm(geometry) in algorithms
    for algorithm in algorithms:
        y = cpu_conv.conv2d_forward(x, w, b, geometry, algorithm)
        grads = cpu_conv.conv2d_backward(gy, x, w, geometry, (True, True, True), algorithm)
        _check_all((y, *grads), expected, bounds, x.dtype)


def test_stride_two_reads_match_reference_at_every_edge():
    # Stride 2 reads both column phases of an input row in one loop and copies tap j
    # from tap j - 2 one column on (``_gather_columns_s2``, ``_pad_phase_pair``); the
    # cells where only one tap of a pair, or no shifted copy, lies inside the row sit
    # at the edges, so sweep kernel widths, paddings and odd/even widths (rows of 16
    # output columns and more: ``_S2_MIN_WIDTH``, ``_PAIR_MIN_WIDTH``).
    rng = np.random.default_rng(20261206)
    for kw in range(2, 8):
        for pad in range(kw):
            # narrow rows keep the plain strided reads; 16 output columns take the pairs
            for width in (kw, kw + 1, kw + 30, kw + 31, kw + 34, kw + 35):
                if width + 2 * pad < kw:
                    continue
                x = rng.standard_normal((1, 2, 5, width))
                # groups=2: one channel per group, the direct plane kernels
                for groups, ww in ((1, rng.standard_normal((3, 2, 2, kw))),
                                   (2, rng.standard_normal((2, 1, 2, kw)))):
                    args = dict(stride=(1, 2), padding=(1, pad), groups=groups)
                    x_, w_, _, geometry = _params.conv_window(x, ww, None, 2, **args)
                    expected = ref.conv2d(x, ww, None, **args)
                    bound = ref.conv2d(np.abs(x), np.abs(ww), None, **args)
                    for algorithm in set(cpu_conv.valid_algorithms(geometry)):
                        got = cpu_conv.conv2d_forward(x_, w_, None, geometry, algorithm)
                        assert_close_to_sum(got, expected, bound, x.dtype)


def test_choose_algorithm_per_shape():
    def chosen(x_shape, w_shape, **args):
        x, w = np.zeros(x_shape, np.float32), np.zeros(w_shape, np.float32)
        return cpu_conv.choose_algorithm(_params.conv_window(x, w, None, 2, **args)[3])

    assert chosen((2, 8, 9, 9), (8, 1, 3, 3), padding=1, groups=8) == "direct"
    assert chosen((2, 8, 9, 9), (16, 1, 3, 3), stride=2, groups=8) == "direct"
    assert chosen((2, 8, 9, 9), (4, 8, 1, 1)) == "pointwise"
    assert chosen((2, 8, 9, 9), (4, 8, 1, 1), stride=2) == "im2col"
    # "rows" on outputs at least 56 wide (_ROWS_MIN_WIDTH), im2col on narrower ones
    assert chosen((2, 8, 9, 60), (4, 8, 1, 2), padding=1) == "rows"
    # ... whose GEMMs are at least 12 deep (C_g * KW: _ROWS_MIN_DEPTH)
    assert chosen((2, 8, 9, 60), (4, 8, 1, 1), padding=1) == "im2col"
    assert chosen((1, 3, 9, 60), (4, 3, 3, 3), padding=1) == "im2col"
    assert chosen((1, 4, 9, 60), (4, 4, 3, 3), padding=1) == "rows"
    assert chosen((2, 8, 9, 9), (4, 8, 1, 1), padding=1) == "im2col"
    # Winograd once the images hold 256 output pixels (_WINOGRAD_MIN_PIXELS)
    assert chosen((4, 8, 8, 8), (4, 8, 3, 3), padding=1) == "winograd"
    assert chosen((3, 8, 9, 9), (4, 8, 3, 3), padding=1) == "im2col"  # 243 pixels: below
    assert chosen((1, 8, 9, 9), (4, 8, 3, 3), padding=1) == "im2col"
    assert chosen((1, 8, 9, 60), (4, 8, 3, 3), padding=1, dilation=(1, 2)) == "rows"
    assert chosen((1, 8, 9, 60), (4, 4, 3, 3), padding=1, groups=2) == "rows"  # C_g < 8
    assert chosen((1, 8, 9, 60), (4, 8, 3, 2), padding=1) == "rows"
    assert chosen((1, 8, 9, 120), (4, 4, 3, 3), stride=(1, 2), groups=2) == "rows"
    assert chosen((1, 8, 9, 60), (4, 4, 3, 3), stride=(1, 2), groups=2) == "im2col"
    assert chosen((2, 8, 9, 9), (4, 8, 3, 3), stride=(2, 1)) == "im2col"


def test_narrow_forwards_choose_rows_where_it_gathers_less():
    """Outputs narrower than _ROWS_MIN_WIDTH: the forward runs "rows" for kernels at
    least 3 high and 5 wide with GEMMs at most _ROWS_NARROW_MAX_DEPTH deep over at least
    _ROWS_NARROW_MIN_PIXELS pixels (LeNet's 5x5 6->16@14 at batch 32), channels-last
    inputs too (through a copy); the backward of the same layer keeps im2col."""
    from fastpool.cpu.conv import _forward_problem
    from fastpool.cpu.conv import _planner

    def window(x_shape, w_shape, channels_last=False, **args):
        x, w = np.zeros(x_shape, np.float32), np.zeros(w_shape, np.float32)
        if channels_last:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        return _params.conv_window(x, w, None, 2, **args)[3]

    def chosen(*shapes, **args):
        w = window(*shapes, **args)
        return (cpu_conv.choose_algorithm(w),
                _planner._NAMES[_forward_problem(w).backward_algorithm()])

    assert chosen((32, 6, 14, 14), (16, 6, 5, 5)) == ("rows", "im2col")
    assert chosen((4, 6, 14, 14), (16, 6, 5, 5)) == ("rows", "im2col")  # 400 pixels
    assert chosen((3, 6, 14, 14), (16, 6, 5, 5)) == ("im2col", "im2col")  # 300
    assert chosen((8, 32, 20, 20), (32, 32, 3, 5), padding=1) == ("rows", "im2col")
    assert chosen((8, 128, 14, 14), (128, 128, 5, 5), padding=2) == ("rows", "im2col")
    assert chosen((8, 129, 14, 14), (128, 129, 5, 5), padding=2) == ("im2col",) * 2
    # a 14x14 plane runs Winograd forwards from 64 channels (_WINOGRAD_WIDE_CHANNELS),
    # not backwards
    assert chosen((1, 256, 14, 14), (256, 256, 3, 3), padding=1) == ("winograd", "im2col")
    assert chosen((1, 64, 14, 14), (64, 64, 3, 3), padding=1) == ("winograd", "im2col")
    assert chosen((1, 63, 14, 14), (64, 63, 3, 3), padding=1) == ("im2col",) * 2
    assert chosen((1, 256, 13, 14), (256, 256, 3, 3), padding=1) == ("im2col",) * 2
    assert chosen((8, 64, 17, 17), (64, 64, 1, 7), padding=(0, 3)) == ("im2col",) * 2
    assert chosen((8, 4, 28, 28), (16, 4, 3, 3), padding=1) == ("im2col",) * 2
    assert chosen((32, 6, 14, 14), (16, 6, 5, 5), channels_last=True) == ("rows", "im2col")
    assert chosen((32, 6, 14, 14), (16, 6, 5, 5), stride=(2, 1)) == ("im2col",) * 2
    # At least _ROWS_MIN_WIDTH wide, both directions run rows, as before.
    assert chosen((1, 8, 9, 60), (4, 8, 3, 2), padding=1) == ("rows", "rows")


# ----------------------------------------------------------------------------- PyTorch

@needs_torch
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@SETTINGS
@given(case=conv_cases())
def test_conv_matches_torch(case):
    rng, x, w, b = _arrays(case)
    args = case["args"]
    if case["unbatched"]:
        x = x[0]
    tensors = [torch.from_numpy(a).requires_grad_() for a in (x, w)]
    tensors.append(None if b is None else torch.from_numpy(b).requires_grad_())
    ty = F.conv2d(*tensors, **args)
    y = fastpool.conv2d(x, w, b, **args)
    gy = rng.standard_normal(y.shape).astype(x.dtype)
    ty.backward(torch.from_numpy(gy))

    # Bounds: the same sums over absolute values, by autograd on |x|, |w|, |b|, |gy|.
    absolute = [None if a is None else torch.from_numpy(np.abs(a)).requires_grad_()
                for a in (x, w, b)]
    bound_y = F.conv2d(*absolute, **args)
    bound_y.backward(torch.from_numpy(np.abs(gy)))

    grads = fastpool.conv2d_backward(gy, x, w, **args, output_mask=(True, True, b is not None))
    results = (y, *grads)
    expected = [ty.detach().numpy()] + [None if t is None else t.grad.numpy()
                                        for t in tensors]
    bounds = [bound_y.detach().numpy()] + [None if t is None else t.grad.numpy()
                                           for t in absolute]
    for got, want, bound in zip(results, expected, bounds):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.shape == want.shape
            assert_close_to_sum(got, want, bound, x.dtype)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("x_shape, w_shape, args", [
    ((2, 4, 5, 6), (6, 4, 3, 3), dict(padding=1)),
    ((2, 4, 6, 7), (4, 2, 2, 3), dict(stride=(2, 1), padding=(1, 2), dilation=(2, 1),
                                      groups=2)),
    ((1, 3, 6, 6), (6, 1, 3, 2), dict(stride=2, padding=1, groups=3)),
    ((2, 2, 5, 5), (3, 2, 4, 2), dict(padding="same", dilation=(1, 2))),
    ((2, 3, 4, 5), (2, 3, 1, 1), dict()),
], ids=["3x3", "grouped-strided-dilated", "depthwise-x2", "same-asymmetric", "1x1"])
def test_backward_finite_differences(x_shape, w_shape, args):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    gy = rng.standard_normal(fastpool.conv2d(x, w, b, **args).shape)
    gi, gw, gb = fastpool.conv2d_backward(gy, x, w, **args)
    # conv is linear, so central differences are exact up to the rounding of the two
    # sums they subtract: a few ulps of sum(|y * gy|), divided by 2 * eps (1e-6).
    rounding = np.sum(np.abs(fastpool.conv2d(x, w, b, **args) * gy))
    tolerance = dict(rtol=1e-6, atol=8 * np.finfo(np.float64).eps * rounding / 2e-6)
    np.testing.assert_allclose(
        gi, numeric_gradient(lambda a: fastpool.conv2d(a, w, b, **args), x, gy),
        **tolerance)
    np.testing.assert_allclose(
        gw, numeric_gradient(lambda a: fastpool.conv2d(x, a, b, **args), w, gy),
        **tolerance)
    np.testing.assert_allclose(
        gb, numeric_gradient(lambda a: fastpool.conv2d(x, w, a, **args), b, gy),
        **tolerance)


# ----------------------------------------------------------------------------- bands

@pytest.fixture
def small_bands(monkeypatch):
    """Tiny column buffers, so every GEMM kernel runs many bands (and partial last
    bands) and the weight gradient runs several chunks, on small test shapes."""
    planner = cpu_conv._planner  # the sizes live, and are read, there
    monkeypatch.setattr(planner, "_PLANS", {})  # plans made with these sizes only
    monkeypatch.setattr(planner, "_COLUMN_BYTES", 1024)
    monkeypatch.setattr(planner, "_WINOGRAD_BYTES", 1024)
    monkeypatch.setattr(planner, "_POINTWISE_BYTES", 1024)
    monkeypatch.setattr(planner, "_MAX_CHUNKS", 3)


def test_plans_are_kept_per_shape_but_not_for_pinned_chunks(monkeypatch):
    """Band and block plans are computed once per problem shape (``_PLANS``), from the
    planner's sizes at the time (a fresh ``_PLANS`` with other sizes plans afresh),
    and never reused inside ``planned_as``: a Dask chunk's bands are the whole call's,
    not those its own shape got in an earlier plain call."""
    monkeypatch.setattr(cpu_planner, "_PLANS", {})
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 16, 28, 28)).astype(np.float32)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    whole = _params.conv_window(x, w, None, 2, padding=1)[-1]
    chunk = _params.conv_window(x[:1], w, None, 2, padding=1)[-1]
    code = cpu_conv.ALGORITHMS["im2col"]
    problem = cpu_conv._forward_problem(chunk)
    alone = problem.forward_band_rows(code, 4)
    fresh = cpu_planner._Problem.forward(chunk)  # same shape, another object
    assert fresh.forward_band_rows(code, 4) == alone
    assert len(cpu_planner._PLANS) == 2  # band_rows inside, then forward_band_rows
    # kept per argument too: 28 one-row bands are tasks enough, one band is not
    assert problem.forward_channel_blocks(1) == 1
    assert problem.forward_channel_blocks(chunk.out_size[0]) > 1
    as_whole = cpu_conv._forward_problem(whole).forward_band_rows(code, 4)
    assert as_whole != alone  # the case under test: batch 8 bands differ from batch 1
    with cpu_planner.planned_as(whole):
        assert problem.forward_band_rows(code, 4) == as_whole
    assert problem.forward_band_rows(code, 4) == alone
    monkeypatch.setattr(cpu_planner, "_PLANS", {})
    monkeypatch.setattr(cpu_planner, "_MIN_BAND_PIXELS", 10**6)  # one band a call
    assert problem.forward_band_rows(code, 4) == chunk.out_size[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_shape, args", [
    ((48, 4, 1, 1), dict()),
    ((48, 4, 3, 3), dict(padding=1)),
    ((64, 8, 3, 3), dict(stride=2, padding=1, groups=2)),
], ids=["1x1", "3x3", "strided-grouped"])
def test_batch_one_splits_bands_and_channel_blocks(dtype, w_shape, args):
    """At batch 1 the forward splits output rows and then output channels into tasks
    (``forward_band_rows``, ``forward_channel_blocks``) from the shapes alone: results
    match the reference and are identical at 1 and 2 threads."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, w_shape[1] * args.get("groups", 1), 7, 9)).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    x, w, b, geometry = _params.conv_window(x, w, b, 2, **args)
    problem = cpu_conv._Problem.forward(geometry)
    gy = rng.standard_normal(geometry.output_shape).astype(dtype)
    expected, bounds = _reference(x, w, b, gy, args)
    saved = numba.get_num_threads()
    try:
        for algorithm in set(cpu_conv.valid_algorithms(geometry)) - {"direct", "winograd"}:
            code = cpu_conv.ALGORITHMS[algorithm]
            rows = problem.forward_band_rows(code, x.itemsize)
            assert problem.forward_channel_blocks(rows) > 1  # the case under test
            runs = []
            for threads in (1, 2):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                runs.append(cpu_conv.conv2d_forward(x, w, b, geometry, algorithm))
            np.testing.assert_array_equal(runs[0], runs[1])
            _check_all(runs[:1], expected[:1], bounds[:1], dtype)
    finally:
        numba.set_num_threads(saved)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_shape, args", [
    ((6, 4, 3, 3), dict(padding=1)),
    ((6, 2, 3, 2), dict(stride=(2, 3), padding=(2, 0), dilation=(1, 2), groups=2)),
    ((6, 4, 1, 1), dict()),
    ((8, 1, 3, 3), dict(padding=2, dilation=2, groups=4)),
], ids=["3x3", "strided", "1x1", "depthwise"])
def test_results_identical_at_any_thread_count(small_bands, dtype, w_shape, args):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4, 11, 10)).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    x, w, b, geometry = _params.conv_window(x, w, b, 2, **args)
    gy = rng.standard_normal(geometry.output_shape).astype(dtype)
    expected, bounds = _reference(x, w, b, gy, args)
    saved = numba.get_num_threads()
    try:
        for algorithm in cpu_conv.valid_algorithms(geometry):
            runs = []
            for threads in (1, 2):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                runs.append((cpu_conv.conv2d_forward(x, w, b, geometry, algorithm),
                             *cpu_conv.conv2d_backward(gy, x, w, geometry,
                                                       (True, True, True), algorithm)))
            for one, two in zip(*runs):
                np.testing.assert_array_equal(one, two)
            _check_all(runs[0], expected, bounds, dtype)
    finally:
        numba.set_num_threads(saved)


def _einsum_conv(x, w, b, padding, groups):
    """A stride-1 convolution with NumPy alone, in float64 (an independent check)."""
    p = padding
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=(2, 3))
    cg, og = w.shape[1], w.shape[0] // groups
    y = np.concatenate([np.einsum("nchwij,ocij->nohw", windows[:, g * cg:(g + 1) * cg],
                                  w[g * og:(g + 1) * og].astype(np.float64))
                        for g in range(groups)], axis=1)
    return y + b[:, None, None]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, w_shape, padding, groups, algorithm, chunk", [
    ((1, 512, 8, 8), (64, 512, 3, 3), 1, 1, "im2col", 1),
    ((2, 2048, 5, 5), (160, 2048, 1, 1), 0, 1, "pointwise", 2),  # 25 pixels
    ((3, 1024, 6, 6), (128, 512, 3, 3), 1, 2, "im2col", 2),      # groups, two chunks
    ((3, 4096, 5, 5), (320, 2048, 1, 1), 0, 2, "pointwise", 2),  # groups, two chunks
    # a small weight: a 7x7 plane (_WHOLE_POINTWISE_PIXELS), 68 outputs (a part tile)
    ((1, 96, 7, 7), (68, 96, 1, 1), 0, 1, "pointwise", 1),
], ids=["im2col", "pointwise", "grouped-chunks", "pointwise-grouped-chunks",
        "pointwise-small-plane"])
def test_whole_plane_channel_blocks_give_the_bands_bits(monkeypatch, dtype, x_shape,
                                                        w_shape, padding, groups,
                                                        algorithm, chunk):
    """Batch-1-like layers whose weight outweighs L2 and their columns run the whole
    plane, threads taking blocks of output channels; fastpool's own GEMM gives each
    output the bits the bands of the plane give, at any thread count."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = (rng.standard_normal(w_shape) / 40).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    x, w, b, geometry = _params.conv_window(x, w, b, 2, padding=padding, groups=groups)
    problem = cpu_conv._forward_problem(geometry)
    code = cpu_conv.ALGORITHMS[algorithm]
    if chunk < x.shape[0]:  # images per chunk: fewer than the batch
        per_image = w.shape[1] * w.shape[2] * w.shape[3] * 48 * x.itemsize
        monkeypatch.setattr(cpu_planner, "_PLANS", {})
        monkeypatch.setattr(cpu_planner, "_WHOLE_COLUMN_BYTES", chunk * per_image)
        assert problem.column_images(x.itemsize) == chunk
    assert problem.whole_plane_columns(code, x.itemsize)
    saved = numba.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            runs.append(cpu_conv.conv2d_forward(x, w, b, geometry, algorithm))
    finally:
        numba.set_num_threads(saved)
    np.testing.assert_array_equal(runs[0], runs[1])
    # one block of output channels per thread or several (each a GEMM of its own)
    for per_thread in (1, 3):
        monkeypatch.setattr(cpu_conv, "_IM2COL_BLOCKS_PER_THREAD", per_thread)
        monkeypatch.setattr(cpu_conv, "_BLOCKS_PER_THREAD", per_thread)
        np.testing.assert_array_equal(
            runs[0], cpu_conv.conv2d_forward(x, w, b, geometry, algorithm))
    # a pointwise input read in place or copied with its rows on cache lines (the
    # 6x16 tile's choice, ``ALIGN_B_ROWS``), the whole plane or bands: the same bits
    for whole in (True, False):
        if not whole:
            monkeypatch.setattr(type(problem), "whole_plane_columns", lambda *args: False)
        for align in (True, False):
            monkeypatch.setattr(cpu_conv, "ALIGN_B_ROWS", align)
            np.testing.assert_array_equal(
                runs[0], cpu_conv.conv2d_forward(x, w, b, geometry, algorithm))
    expected = _einsum_conv(x, w, b, padding, groups)
    bound = _einsum_conv(np.abs(x), np.abs(w), np.abs(b), padding, groups)
    assert_close_to_sum(runs[0], expected, bound, dtype)


def test_whole_plane_rule_for_small_pointwise_planes():
    """A pointwise forward of at most ``_WHOLE_POINTWISE_PIXELS`` output pixels and
    ``_WHOLE_POINTWISE_CHANNELS`` or more outputs a group at batch 1 runs the whole
    plane whatever its weight; larger planes, fewer outputs, batches of
    ``_MIN_FORWARD_TASKS`` images and im2col with a small weight keep bands."""
    def whole(x_shape, w_shape, padding=0, groups=1):
        x = np.zeros(x_shape, np.float32)
        w = np.zeros(w_shape, np.float32)
        x, w, _, geometry = _params.conv_window(x, w, None, 2, padding=padding,
                                                groups=groups)
        problem = cpu_conv._forward_problem(geometry)
        code = cpu_conv.ALGORITHMS["im2col" if w_shape[2] > 1 else "pointwise"]
        return problem.whole_plane_columns(code, 4)
    assert whole((1, 960, 7, 7), (160, 960, 1, 1))     # 614 KB of weight
    assert whole((1, 192, 14, 14), (64, 192, 1, 1))    # fewer outputs than pixels
    assert whole((1, 16, 1, 196), (64, 16, 1, 1))
    assert not whole((1, 16, 1, 197), (64, 16, 1, 1))  # 197 pixels
    assert not whole((1, 16, 14, 14), (63, 16, 1, 1))  # too few blocks to share
    assert whole((1, 32, 7, 7), (128, 16, 1, 1), groups=2)
    assert not whole((1, 32, 7, 7), (96, 16, 1, 1), groups=2)  # 48 a group
    assert not whole((1, 256, 28, 28), (128, 256, 1, 1))
    assert not whole((8, 960, 7, 7), (160, 960, 1, 1))  # enough images for tasks
    assert not whole((1, 64, 7, 7), (64, 64, 3, 3), 1)  # im2col, weight in L2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, args", [
    ((2, 4, 13, 11), (6, 4, 3, 3), dict(stride=2, padding=1)),
    ((1, 6, 12, 10), (4, 3, 3, 2), dict(stride=(3, 2), padding=2, dilation=(2, 1),
                                        groups=2)),
    ((1, 3, 9, 8), (5, 3, 3, 3), dict(padding=1)),  # stride 1, im2col asked for
    ((5, 2, 8, 9), (3, 2, 2, 3), dict(stride=2)),   # runs of images, a short last one
], ids=["stride2", "grouped", "stride1", "images"])
def test_col2im_input_gradient_bits_do_not_depend_on_the_bands(monkeypatch, dtype,
                                                                x_shape, w_shape, args):
    """The im2col input gradient adds each input cell's terms in kernel-tap order
    whatever band of output rows they come from, so a Dask chunk's call (other bands)
    gives the whole call's bits; and the same bits on 1 and 2 threads (blocks of
    channels, runs of images) and with one image's weight copied or read in place."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    x, w, _, geometry = _params.conv_window(x, w, None, 2, **args)
    gy = rng.standard_normal(geometry.output_shape).astype(dtype)
    runs = []
    for rows in (geometry.output_shape[2], 1, 2, 3):
        monkeypatch.setattr(cpu_planner._Problem, "band_rows",
                            lambda self, algorithm, itemsize, rows=rows: rows)
        runs.append(cpu_conv.conv2d_backward(gy, x, w, geometry, (True, False, False),
                                             "im2col")[0])
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        runs.append(cpu_conv.conv2d_backward(gy, x, w, geometry, (True, False, False),
                                             "im2col")[0])
    finally:
        numba.set_num_threads(saved)
    # one image's weight copied by rows, as large ones are, not read by columns
    monkeypatch.setattr(cpu_conv, "_COPY_WEIGHT_PANEL_BYTES", 0)
    runs.append(cpu_conv.conv2d_backward(gy, x, w, geometry, (True, False, False),
                                         "im2col")[0])
    for run in runs[1:]:
        np.testing.assert_array_equal(run, runs[0])
    expected = ref.conv2d_backward(gy, x, w, **args)[0]
    bound = ref.conv2d_backward(np.abs(gy), x, np.abs(w), **args)[0]
    assert_close_to_sum(runs[0], expected, bound, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, padding, groups", [
    ((2, 8, 7, 9), (4, 8, 3, 3), 1, 1),        # odd output: clipped last tiles
    ((1, 8, 6, 6), (5, 8, 3, 3), 0, 1),        # even output, no padding
    ((2, 6, 5, 4), (6, 3, 3, 3), 2, 2),        # grouped, padding 2 grows the output
    ((1, 3, 4, 5), (2, 3, 3, 3), 3, 1),        # padding 3: tiles wholly in padding
    ((1, 4, 3, 3), (3, 4, 3, 3), "same", 1),
    ((2, 4, 1, 12), (3, 4, 3, 3), 1, 1),       # a single output row
], ids=["odd", "even", "grouped", "pad3", "same", "one-row"])
def test_winograd_matches_reference(dtype, x_shape, w_shape, padding, groups):
    rng = np.random.default_rng(13)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    args = dict(padding=padding, groups=groups)
    x, w, b, geometry = _params.conv_window(x, w, b, 2, **args)
    gy = rng.standard_normal(geometry.output_shape).astype(dtype)
    expected, bounds = _reference(x, w, b, gy, args)
    y = cpu_conv.conv2d_forward(x, w, b, geometry, "winograd")
    grads = cpu_conv.conv2d_backward(gy, x, w, geometry, (True, True, True), "winograd")
    _check_all((y, *grads), expected, bounds, dtype)


def _winograd_pinned_plans(monkeypatch, dtype, x_shape, w_shape, groups, plan, place,
                           value):
    """The Winograd forward with the planner's ``plan`` (a ``_Problem`` method of
    ``(itemsize, threads)``) pinned to 1, then to ``value``, each on a channels-first
    and a channels-last input with a bias: checks the kernel got the value (its
    argument ``place``) and that all four give the same bits and strides; returns
    ``(x, w, b, y)``, ``y`` the channels-first output with ``value``."""
    rng = np.random.default_rng(seed_for(x_shape, w_shape, groups, value))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    launched = []
    kernel = cpu_conv._winograd_forward

    def spy(*args):
        launched.append(args[place])
        return kernel(*args)

    monkeypatch.setattr(cpu_conv, "_winograd_forward", spy)
    results = []
    for each in (1, value):
        monkeypatch.setattr(cpu_planner, "_PLANS", {})
        monkeypatch.setattr(cpu_planner._Problem, plan,
                            lambda self, itemsize, threads, each=each: each)
        runs = []
        for a in (x, xl):
            a, w_, b_, geometry = _params.conv_window(a, w, b, 2, groups=groups,
                                                      padding=1)
            runs.append(cpu_conv.conv2d_forward(a, w_, b_, geometry, "winograd"))
        results.append(runs)
    assert launched == [1, 1, value, value]
    for one, several in zip(*results):
        assert one.tobytes() == several.tobytes()
        assert one.strides == several.strides
    return x, w, b, results[1][0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, groups, images", [
    ((5, 8, 7, 7), (8, 8, 3, 3), 1, 3),       # runs of 3 and 2 images
    ((4, 6, 5, 6), (10, 3, 3, 3), 2, 4),      # groups; clipped tiles; one run
    ((3, 16, 3, 3), (9, 16, 3, 3), 1, 2),     # channels-last staging blocks + rest
])
def test_winograd_images_side_by_side_give_the_one_image_bits(
        monkeypatch, dtype, x_shape, w_shape, groups, images):
    """Several images' planes in one Winograd band (``winograd_images``): the bits of
    one image a band, either layout, with a bias. (A stride-1 input gradient on
    Winograd is this same kernel on the flipped weight.)"""
    _winograd_pinned_plans(monkeypatch, dtype, x_shape, w_shape, groups,
                           "winograd_images", 5, images)


def _winograd_problem(monkeypatch, batch, channels, size, threads, groups):
    """The forward problem of a 3x3 ``channels -> channels`` convolution, padding 1, on
    ``size x size`` planes, planned for ``threads`` threads (the bands' rows depend on
    the thread count too: a band for every thread), with fresh plans."""
    monkeypatch.setattr(cpu_planner, "thread_count", lambda: threads)
    monkeypatch.setattr(cpu_planner, "_PLANS", {})
    return cpu_planner._Problem((batch, channels, size, size), (size, size),
                                (channels, channels // groups, 3, 3), groups,
                                (1, 1), (1, 1), (1, 1))


def test_winograd_images_rule(monkeypatch):
    """Whole planes a band, images side by side as the band's bytes allow (the
    transformed weight's size where it is larger), in equal runs shared evenly by the
    threads; one image where a plane takes several bands or the batch is 1."""
    def images(batch, channels, size, threads, groups=1):
        problem = _winograd_problem(monkeypatch, batch, channels, size, threads, groups)
        return problem.winograd_images(4, threads)

    assert images(32, 512, 7, 2) == 16      # weight 16 MiB, 1 MiB an image
    assert images(32, 512, 7, 1) == 16
    assert images(32, 512, 7, 16) == 2      # 16 equal runs
    assert images(8, 512, 7, 16) == 1       # a band for every thread: several a plane
    assert images(8, 512, 7, 2) == 4        # 8 would be one run for two threads
    assert images(32, 512, 14, 2) == 4      # 5 fit; 4 divides the batch
    assert images(32, 256, 14, 2) == 2
    assert images(1, 512, 7, 1) == 1
    assert images(31, 512, 7, 2) == 1       # no equal runs
    assert images(32, 64, 56, 2) == 1       # bands within a plane


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, groups, blocks", [
    ((1, 8, 7, 7), (20, 8, 3, 3), 1, 2),      # blocks of 16 and 4 channels
    ((1, 8, 6, 5), (40, 4, 3, 3), 2, 3),      # groups: blocks of 8, 8 and 4 each
    ((3, 16, 4, 4), (17, 16, 3, 3), 1, 4),    # blocks of 8, 8, 1, none; 3 bands
    ((1, 16, 5, 6), (32, 16, 3, 3), 1, 2),    # channels-last staging blocks of 16
])
def test_winograd_output_channel_blocks_give_the_whole_band_bits(
        monkeypatch, dtype, x_shape, w_shape, groups, blocks):
    """Threads sharing a band by blocks of output channels (``winograd_out_blocks``):
    the bits of one block a band, either layout, with a bias; each block a whole
    number of GEMM tile rows but the last; a block past the channels runs nothing."""
    x, w, b, y = _winograd_pinned_plans(monkeypatch, dtype, x_shape, w_shape, groups,
                                        "winograd_out_blocks", 6, blocks)
    args = dict(padding=1, groups=groups)
    assert_close_to_sum(y, ref.conv2d(x, w, b, **args),
                        ref.conv2d(np.abs(x), np.abs(w), np.abs(b), **args), dtype)


def test_winograd_out_blocks_rule(monkeypatch):
    """Threads share a band by output channels where fewer images x groups than
    threads leave a small plane (under _WINOGRAD_SHARED_TILES tiles) in one band, in
    blocks of at least _WINOGRAD_MIN_BLOCK channels; else each takes bands (and a
    band for every thread cuts the plane)."""
    def plan(batch, channels, size, threads, groups=1):
        problem = _winograd_problem(monkeypatch, batch, channels, size, threads, groups)
        return problem.winograd_out_blocks(4, threads), problem.winograd_band_tile_rows(4)

    assert plan(1, 256, 14, 2) == (2, 7)     # 49 tiles: one band, two blocks
    assert plan(1, 256, 14, 4) == (4, 7)
    assert plan(1, 64, 14, 4) == (2, 4)      # blocks of 32 channels, two bands
    assert plan(1, 32, 14, 2) == (1, 4)      # too few channels: two bands
    assert plan(2, 256, 14, 2) == (1, 7)     # an image a thread
    assert plan(1, 256, 14, 2, groups=2) == (1, 7)  # a group a thread
    assert plan(1, 256, 14, 1) == (1, 7)
    assert plan(1, 64, 28, 2) == (1, 7)      # 196 tiles: bands


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, groups, stride, images", [
    ((5, 8, 9, 9), (8, 8, 3, 3), 1, 2, 3),    # runs of 3 and 2 images
    ((4, 6, 7, 8), (10, 3, 3, 3), 2, 1, 4),   # groups; one run
    ((3, 2, 6, 6), (5, 2, 3, 3), 1, 2, 2),    # few channels: gathered from a copy
    ((4, 12, 6, 6), (40, 12, 3, 3), 1, 2, 2),  # channels-last: gathered in place
    ((8, 80, 5, 5), (96, 80, 3, 3), 1, 2, 4),  # a weight over 256 KiB: not turned
])
def test_im2col_images_side_by_side_give_the_one_image_bits(
        monkeypatch, dtype, x_shape, w_shape, groups, stride, images):
    """Several images' whole planes side by side in one im2col GEMM
    (``im2col_images``), channels-first (products into a buffer, copied out) and
    channels-last (the run's pixels are consecutive output rows): the bits of one
    image a GEMM, with a bias, close to the reference. (Inputs of few channels
    gathered here, not read in place by ``_channels_last_taps``.)"""
    from fastpool.cpu.conv import _channels_last_gemm, _channels_last_taps
    monkeypatch.setattr(_channels_last_taps, "MAX_CHANNELS", 0)
    rng = np.random.default_rng(seed_for(x_shape, w_shape, groups, stride, images))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    launched = []
    for module, name, at in ((cpu_conv, "_gemm_forward", 8),
                             (_channels_last_gemm, "_im2col_forward", 8)):
        def spy(*args, kernel=getattr(module, name), at=at):
            launched.append(args[at])
            return kernel(*args)
        monkeypatch.setattr(module, name, spy)
    args = dict(groups=groups, padding=1, stride=stride)
    results = []
    for each in (1, images):
        monkeypatch.setattr(cpu_planner, "_PLANS", {})
        monkeypatch.setattr(cpu_planner._Problem, "im2col_images",
                            lambda self, itemsize, threads, each=each: each)
        runs = []
        for a in (x, xl):
            a, w_, b_, geometry = _params.conv_window(a, w, b, 2, **args)
            runs.append(cpu_conv.conv2d_forward(a, w_, b_, geometry, "im2col"))
        results.append(runs)
    assert launched == [1, 1, images, images]
    for one, several in zip(*results):
        assert one.tobytes() == several.tobytes()
        assert one.strides == several.strides
    assert_close_to_sum(results[1][0], ref.conv2d(x, w, b, **args),
                        ref.conv2d(np.abs(x), np.abs(w), np.abs(b), **args), dtype)


def test_im2col_images_need_whole_planes(monkeypatch):
    """Runs of images are only for bands of whole planes (the channels-last kernel
    takes a run's pixels as consecutive output rows): where a plane takes several
    bands, the kernels get one image a run whatever ``im2col_images`` says."""
    from fastpool.cpu.conv import _channels_last_gemm, _channels_last_taps
    monkeypatch.setattr(_channels_last_taps, "MAX_CHANNELS", 0)
    rng = np.random.default_rng(20261207)
    x = rng.standard_normal((3, 12, 33, 4)).astype(np.float32)
    w = rng.standard_normal((20, 12, 3, 3)).astype(np.float32)
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    args = dict(stride=(2, 1), padding=1)
    launched = []
    for module, name, at in ((cpu_conv, "_gemm_forward", 8),
                             (_channels_last_gemm, "_im2col_forward", 8)):
        def spy(*a, kernel=getattr(module, name), at=at):
            launched.append((a[at - 2], a[at]))  # rows a band, images a run
            return kernel(*a)
        monkeypatch.setattr(module, name, spy)
    monkeypatch.setattr(cpu_planner._Problem, "im2col_images",
                        lambda self, itemsize, threads: 2)
    results = []
    for a in (x, xl):
        a, w_, b_, geometry = _params.conv_window(a, w, None, 2, **args)
        results.append(cpu_conv.conv2d_forward(a, w_, b_, geometry, "im2col"))
    assert len(launched) == 2
    assert all(rows < 17 and images == 1 for rows, images in launched)
    assert results[0].tobytes() == np.ascontiguousarray(results[1]).tobytes()
    assert_close_to_sum(results[1], ref.conv2d(x, w, None, **args),
                        ref.conv2d(np.abs(x), np.abs(w), None, **args), np.float32)


def test_im2col_images_rule(monkeypatch):
    """Whole planes a band and one block of output channels: images side by side as
    the larger of 1 MiB and the weight allow, in equal runs shared evenly by the
    threads; one image where a plane takes several bands or the batch is 1."""
    def images(batch, channels, outputs, size, threads, stride=2):
        monkeypatch.setattr(cpu_planner, "thread_count", lambda: threads)
        monkeypatch.setattr(cpu_planner, "_PLANS", {})
        out = (size - 1) // stride + 1
        problem = cpu_planner._Problem((batch, channels, size, size), (out, out),
                                       (outputs, channels, 3, 3), 1, (stride, stride),
                                       (1, 1), (1, 1))
        return problem.im2col_images(4, threads)

    # 3x3 s2 256->512 on 14x14: 737 KiB of columns an image (49 pixels padded to
    # 80), a 4.5 MiB weight: 6 fit, 4 divides the batch into runs shared evenly
    assert images(32, 256, 512, 14, 2) == 4
    assert images(32, 256, 512, 14, 16) == 2
    assert images(8, 256, 512, 14, 2) == 4
    assert images(10, 256, 512, 14, 2) == 5
    assert images(6, 256, 512, 14, 2) == 1      # blocks of output channels (batch < 8)
    assert images(31, 256, 512, 14, 2) == 1     # no equal runs
    assert images(1, 256, 512, 14, 1) == 1
    assert images(32, 128, 256, 28, 2) == 1     # planes of more than 64 pixels
    assert images(32, 64, 128, 56, 2) == 1
    assert images(8, 2048, 2048, 14, 2) == 1    # bands within a plane
    # 3x3 s2 64->64: 184 KiB an image, the 1 MiB budget (the weight is smaller)
    assert images(32, 64, 64, 14, 2) == 4


WINOGRAD_GRAD_CASES = [
    ((3, 8, 9, 7), (4, 8, 3, 3), dict(padding=1)),            # odd output: clipped tiles
    ((2, 6, 8, 10), (6, 3, 3, 3), dict(padding=(2, 0), groups=2)),
    ((1, 4, 12, 5), (5, 4, 3, 3), dict(padding=0)),
    ((2, 8, 16, 16), (8, 8, 3, 3), dict(padding=1)),          # chosen: winograd
    ((2, 12, 7, 19), (10, 12, 3, 3), dict(padding=1)),        # blocks and remainders
]


@pytest.mark.parametrize("sizes", ["chosen", "small"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, args", WINOGRAD_GRAD_CASES)
def test_winograd_weight_gradient_same_bits_in_both_layouts_and_thread_counts(
        monkeypatch, dtype, x_shape, w_shape, args, sizes):
    """The Winograd weight gradient (``_winograd_grad``) reads channels-last ``x`` and
    ``grad_output`` in place through their strides: the channels-first bits, the
    same on 1 and 2 threads, close to the reference. "small": a chunk per tile row
    and bands of one tile row (bands crossing no image, chunks summed in order):
    other bits, still deterministic and close."""
    from fastpool.cpu.conv import _winograd_grad
    rng = np.random.default_rng(seed_for(x_shape, w_shape, str(args)))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    _, _, _, geometry = _params.conv_window(x, w, None, 2, **args)
    gy = rng.standard_normal(geometry.output_shape).astype(dtype)
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    gl = np.ascontiguousarray(gy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if sizes == "small":
        monkeypatch.setattr(_winograd_grad, "_MIN_TILES", 1)
        monkeypatch.setattr(_winograd_grad, "_BAND_BYTES", 1)
    seen = []
    original = _winograd_grad.weight_grad
    def spy(a, g, *rest):
        found = original(a, g, *rest)
        seen.append((a, g, found is not None))
        return found

    monkeypatch.setattr(_winograd_grad, "weight_grad", spy)
    runs = []
    saved = numba.get_num_threads()
    try:
        for a, g in ((x, gy), (xl, gl)):
            window = _params.conv_window(a, w, None, 2, **args)[3]
            for threads in (1, 2):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                runs.append(cpu_conv.conv2d_backward(g, a, w, window, (False, True, False),
                                                     "winograd")[1])
    finally:
        numba.set_num_threads(saved)
    assert len(seen) == 4 and all(ran for _, _, ran in seen), "Winograd did not run"
    assert np.shares_memory(seen[2][0], xl) and np.shares_memory(seen[2][1], gl), (
        "x or grad_output was copied")
    for run in runs[1:]:
        np.testing.assert_array_equal(run, runs[0])
    expected = ref.conv2d_backward(gy, x, w, **args)[1]
    bound = ref.conv2d_backward(np.abs(gy), np.abs(x), np.abs(w), **args)[1]
    assert_close_to_sum(runs[0], expected, bound, dtype)
    if cpu_conv.choose_algorithm(geometry) == "winograd":  # chosen: the public call too
        seen.clear()
        grad_weight = fastpool.conv2d_backward(gl, xl, w, **args).grad_weight
        assert len(seen) == 1
        np.testing.assert_array_equal(grad_weight, runs[0])


def test_winograd_weight_gradient_memory_limits_never_depend_on_the_threads(monkeypatch):
    """A cap on all threads' transformed bands (``_DEPTH_BYTES``) runs fewer threads
    (the same bits); whether the kernel runs at all is decided from the shapes alone
    (``_BAND_LIMIT``: a band over it falls back to ``rows``, at any thread count)."""
    from fastpool.cpu.conv import _winograd_grad
    rng = np.random.default_rng(31)
    x = rng.standard_normal((2, 8, 16, 16))
    w = rng.standard_normal((8, 8, 3, 3))
    gy = rng.standard_normal((2, 8, 16, 16))
    args = dict(padding=1)
    window = _params.conv_window(x, w, None, 2, **args)[3]
    runs = []
    original = _winograd_grad._transform_sums
    monkeypatch.setattr(_winograd_grad, "_transform_sums",
                        _Spy(original, lambda *a: runs.append(a[-1])))

    def weight_grad():
        return cpu_conv.conv2d_backward(gy, x, w, window, (False, True, False),
                                        "winograd")[1]
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        free = weight_grad()
        monkeypatch.setattr(_winograd_grad, "_DEPTH_BYTES", 1)
        capped = weight_grad()
        assert runs[-1] == 1  # one worker
        np.testing.assert_array_equal(capped, free)
        monkeypatch.setattr(_winograd_grad, "_BAND_LIMIT", 0)
        count = len(runs)
        fallback = weight_grad()
        assert len(runs) == count  # the Winograd kernel did not run
    finally:
        numba.set_num_threads(saved)
    expected = ref.conv2d_backward(gy, x, w, **args)[1]
    bound = ref.conv2d_backward(np.abs(gy), np.abs(x), np.abs(w), **args)[1]
    assert_close_to_sum(fallback, expected, bound, np.float64)
    assert_close_to_sum(free, expected, bound, np.float64)


class _Spy:
    """``function`` that also calls ``record(*args)`` (keeps ``function``'s other
    attributes out of the way: the kernels are called, never inspected)."""

    def __init__(self, function, record):
        self.function, self.record = function, record

    def __call__(self, *args):
        self.record(*args)
        return self.function(*args)


def test_forcing_an_algorithm_that_cannot_run_is_an_error():
    x, w = np.ones((1, 4, 6, 6)), np.ones((2, 4, 3, 3))
    geometry = _params.conv_window(x, w, None, 2, stride=2)[3]
    for algorithm in ("winograd", "rows", "pointwise", "fft"):
        with pytest.raises(ValueError, match="algorithm"):
            cpu_conv.conv2d_forward(x, w, None, geometry, algorithm)
        with pytest.raises(ValueError, match="algorithm"):
            cpu_conv.conv2d_backward(np.ones(geometry.output_shape), x, w, geometry,
                                     (True, True, True), algorithm)


# ----------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous_inputs_match_contiguous(dtype):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 6, 9, 8)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 6)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    args = dict(padding=1, groups=2)
    # Views: reversed rows in Fortran order, every other weight column, a strided bias.
    x_view = np.asfortranarray(x[:, :, ::-1, :])
    w_view = w[..., ::2]
    b_view = np.repeat(b, 2)[::2]
    assert not (x_view.flags.c_contiguous or w_view.flags.c_contiguous
                or b_view.flags.c_contiguous)
    want = fastpool.conv2d(np.ascontiguousarray(x_view), np.ascontiguousarray(w_view),
                           np.ascontiguousarray(b_view), **args)
    np.testing.assert_array_equal(fastpool.conv2d(x_view, w_view, b_view, **args), want)
    gy = rng.standard_normal(want.shape).astype(dtype)
    gy_view = np.asfortranarray(gy)
    for got, expected in zip(
            fastpool.conv2d_backward(gy_view, x_view, w_view, **args),
            fastpool.conv2d_backward(gy, np.ascontiguousarray(x_view),
                                     np.ascontiguousarray(w_view), **args)):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype):
    x = np.zeros((0, 4, 6, 6), dtype)
    w = np.ones((2, 4, 3, 3), dtype)
    y = fastpool.conv2d(x, w, np.ones(2, dtype), padding=1)
    assert y.shape == (0, 2, 6, 6) and y.dtype == dtype
    gi, gw, gb = fastpool.conv2d_backward(np.zeros((0, 2, 6, 6), dtype), x, w, padding=1)
    assert gi.shape == x.shape and gi.dtype == dtype
    np.testing.assert_array_equal(gw, np.zeros_like(w))
    np.testing.assert_array_equal(gb, np.zeros(2, dtype))


def test_padding_modes():
    x = np.random.default_rng(0).standard_normal((1, 2, 7, 6))
    w = np.ones((3, 2, 4, 3))
    assert fastpool.conv2d(x, w, padding="same").shape == (1, 3, 7, 6)
    assert fastpool.conv2d(x, w, padding="same", dilation=2).shape == (1, 3, 7, 6)
    assert fastpool.conv2d(x, w, padding="valid").shape == (1, 3, 4, 4)
    # 'same' with an even kernel: total pad 3 rows = 1 on top, 2 at the bottom.
    same = fastpool.conv2d(x, w, padding="same")
    explicit = fastpool.conv2d(np.pad(x, ((0, 0), (0, 0), (1, 2), (1, 1))), w)
    np.testing.assert_allclose(same, explicit, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- output_mask

@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False),
                                  (False, False, True), (False, False, False),
                                  (True, True, True)])
def test_output_mask_skips_unrequested_work(monkeypatch, mask):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 6, 6))
    w = rng.standard_normal((3, 4, 3, 3))
    gy = rng.standard_normal((2, 3, 6, 6))
    full = fastpool.conv2d_backward(gy, x, w, padding=1)

    def forbidden(*args, **kwargs):
        raise AssertionError("computed a gradient output_mask did not ask for")

    for wanted, name in zip(mask, ("_input_grad", "_weight_grad", "_bias_grad")):
        if not wanted:
            monkeypatch.setattr(cpu_conv, name, forbidden)
    grads = fastpool.conv2d_backward(gy, x, w, padding=1, output_mask=mask)
    for wanted, got, want in zip(mask, grads, full):
        if wanted:
            np.testing.assert_array_equal(got, want)
        else:
            assert got is None


def test_blas_thread_limit_is_restored():
    before = [(i["filepath"], i["num_threads"]) for i in threadpool_info()
              if i["user_api"] == "blas"]
    x = np.ones((2, 4, 6, 6))
    fastpool.conv2d_backward(np.ones((2, 3, 6, 6)), x, np.ones((3, 4, 3, 3)), padding=1)
    after = {i["filepath"]: i["num_threads"] for i in threadpool_info()
             if i["user_api"] == "blas"}
    for path, threads in before:
        assert after[path] == threads


def test_blas_runs_one_thread_inside_the_kernels_and_nests():
    from fastpool.cpu._blas import single_threaded_blas

    def blas_threads():
        return {i["filepath"]: i["num_threads"] for i in threadpool_info()
                if i["user_api"] == "blas"}

    before = blas_threads()
    with threadpool_limits(limits=2, user_api="blas"):
        with single_threaded_blas(np.float64):
            with single_threaded_blas(np.float32):
                assert set(blas_threads().values()) == {1}
            assert set(blas_threads().values()) == {1}
        assert set(blas_threads().values()) == {2}
    assert blas_threads() == before


@numba.njit(cache=True)
def _leave_nan_in_freed_memory(n):
    """Allocate and free arrays of NaN, so that the next ``np.empty`` of a similar size
    is likely to be handed that memory."""
    for k in range(64):
        a = np.empty(n + k)
        a[:] = np.nan


def test_direct_weight_gradient_never_reads_unwritten_phases():
    """The direct kernels split the zero-padded plane into stride phases; a tap's run
    can cross into a phase no tap reads, where it meets zeros of ``grad_output``.
    That phase must hold zeros, not whatever memory held before (NaN * 0 is NaN):
    the weight gradient stays finite and matches the reference after freed memory
    held NaN (review of 2026-12-05: NaN three times out of three before the fix)."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal((2, 5, 1, 8))
    w = rng.standard_normal((5, 1, 1, 4))
    args = dict(stride=(3, 1), padding=(3, 2), dilation=(1, 2), groups=5)
    _, _, _, window = _params.conv_window(x, w, None, 2, **args)
    assert cpu_conv.choose_algorithm(window) == "direct"
    g = rng.standard_normal(fastpool.conv2d(x, w, **args).shape)
    expected = ref.conv2d_backward(g, x, w, **args)
    bound = ref.conv2d_backward(np.abs(g), np.abs(x), np.abs(w), **args)
    for _ in range(3):
        _leave_nan_in_freed_memory(100)
        grads = fastpool.conv2d_backward(g, x, w, **args)
        assert np.isfinite(grads.grad_weight).all()
        assert_close_to_sum(grads.grad_weight, expected[1], bound[1], np.float64)
        y = fastpool.conv2d(x, w, **args)
        assert np.isfinite(y).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, groups", [
    ((6, 4, 3, 3), 1), ((6, 2, 3, 5), 3), ((4, 3, 2, 3, 2), 2), ((5, 7, 4), 1),
    ((8, 8, 1, 1), 2), ((33, 17, 3, 3), 1), ((3, 1, 3, 3), 3), ((2 * 70, 3, 3, 2), 2),
], ids=["3x3", "grouped-3x5", "3d", "1d", "1x1", "odd-tiles", "depthwise",
        "column-tiles"])
@pytest.mark.parametrize("kernel", [False, True], ids=["numpy", "kernel"])
def test_flipped_transposed_weight(monkeypatch, dtype, shape, groups, kernel):
    """The stride-1 input gradient's weight (``fastpool.cpu._flip``): each group's
    channels swapped and every tap axis flipped, by the tiled kernel (large weights;
    here forced) and by NumPy (small and 1x1 ones)."""
    from fastpool.cpu import _flip
    if kernel:
        monkeypatch.setattr(_flip, "_MIN_SIZE", 0)
    w = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    O, Cg = shape[:2]
    taps = shape[2:]
    expected = np.empty((groups * Cg, O // groups) + taps, dtype)
    for g in range(groups):
        for o in range(O // groups):
            for c in range(Cg):
                expected[g * Cg + c, o] = np.flip(w[g * (O // groups) + o, c])
    got = _flip.flipped_transposed(w, groups)
    assert got.shape == expected.shape and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
