"""Adaptive average and max pooling, ranks 1-3, both memory formats, both devices:
against the loop references (written from PyTorch's window formula), PyTorch itself,
finite differences, and CPU against the GPU kernels (the simulator here)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpool
import reference as ref
from conftest import DTYPES, assert_close, numeric_gradient, seed_for
from strategies import distinct_values

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
OPS = {rank: {f"{op}{suffix}": getattr(fastpool, f"adaptive_{op}_pool{rank}d{suffix}")
              for op in ("avg", "max") for suffix in ("", "_backward")}
       for rank in (1, 2, 3)}


def channels_last(a):
    axis = 1 if a.ndim >= 3 else 0
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, axis, -1)), -1, axis)


def is_channels_last(a):
    return np.moveaxis(a, 1, -1).flags.c_contiguous and not a.flags.c_contiguous


@st.composite
def cases(draw, rank):
    size = tuple(draw(st.integers(1, 7)) for _ in range(rank))
    out = tuple(draw(st.one_of(st.integers(1, 9), st.none())) for _ in range(rank))
    output_size = out[0] if len(set(out)) == 1 and out[0] and draw(st.booleans()) else out
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3))) + size
    return dict(shape=shape, output_size=output_size, dtype=draw(st.sampled_from(DTYPES)),
                channels_last=draw(st.booleans()), unbatched=draw(st.booleans()))


def _prepare(case, a):
    a = channels_last(a) if case["channels_last"] else a
    return a[0] if case["unbatched"] else a


@pytest.mark.parametrize("rank", [1, 2, 3])
@SETTINGS
@given(data=st.data())
def test_adaptive_pooling_matches_reference(rank, data):
    case = data.draw(cases(rank))
    rng = np.random.default_rng(seed_for(rank, case["shape"], case["output_size"],
                                         case["channels_last"], case["unbatched"]))
    x = distinct_values(rng, case["shape"], case["dtype"])
    xin = _prepare(case, x)
    size = case["output_size"]
    ops = OPS[rank]
    shaped = (lambda r: r[0]) if case["unbatched"] else (lambda r: r)

    y = ops["avg"](xin, size)
    assert_close(y, shaped(ref.adaptive_pool(x, size, "avg")), x.dtype)
    g = rng.standard_normal(ref.adaptive_pool(x, size, "avg").shape).astype(x.dtype)
    gi = ops["avg_backward"](_prepare(case, g), xin, size)
    assert_close(gi, shaped(ref.adaptive_avg_pool_backward(g, x.shape, size)), x.dtype)

    m, indices = ops["max"](xin, size, return_indices=True)
    m_ref, i_ref = ref.adaptive_pool(x, size, "max")
    np.testing.assert_array_equal(m, shaped(m_ref).astype(x.dtype))
    np.testing.assert_array_equal(indices, shaped(i_ref))
    gm = ops["max_backward"](_prepare(case, g), xin, size, indices=indices)
    assert_close(gm, shaped(ref.scatter_to_indices(g, i_ref, x.shape)), x.dtype)
    np.testing.assert_array_equal(ops["max_backward"](_prepare(case, g), xin, size), gm)

    big = x.shape[1] > 1 and np.prod(x.shape[2:]) > 1 and not case["unbatched"]
    if case["channels_last"] and big:
        for result, spatial in ((y, y.shape[2:]), (indices, m.shape[2:]), (gi, x.shape[2:]),
                                (gm, x.shape[2:])):
            if np.prod(spatial) > 1:
                assert is_channels_last(result)


@needs_torch
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["first", "last"])
def test_adaptive_pooling_matches_torch(rank, dtype, layout):
    rng = np.random.default_rng(30 + rank)
    shape = (2, 3) + {1: (13,), 2: (9, 7), 3: (5, 6, 7)}[rank]
    x = distinct_values(rng, shape, dtype)
    xin = channels_last(x) if layout == "last" else x
    for size in ({1: 5, 2: (4, None), 3: (2, 4, 3)}[rank], 1, {1: 17, 2: (10, 3),
                                                               3: (7, 1, 9)}[rank]):
        xt = torch.from_numpy(x.copy()).requires_grad_()
        yt = getattr(F, f"adaptive_avg_pool{rank}d")(xt, size)
        g = rng.standard_normal(tuple(yt.shape)).astype(dtype)
        yt.backward(torch.from_numpy(g))
        gin = channels_last(g) if layout == "last" else g
        assert_close(OPS[rank]["avg"](xin, size), yt.detach().numpy(), dtype)
        assert_close(OPS[rank]["avg_backward"](gin, xin, size), xt.grad.numpy(), dtype)
        xt.grad = None
        mt, it = getattr(F, f"adaptive_max_pool{rank}d")(xt, size, return_indices=True)
        mt.backward(torch.from_numpy(g))
        m, indices = OPS[rank]["max"](xin, size, return_indices=True)
        np.testing.assert_array_equal(m, mt.detach().numpy())
        np.testing.assert_array_equal(indices, it.numpy())
        assert_close(OPS[rank]["max_backward"](gin, xin, size, indices=indices),
                     xt.grad.numpy(), dtype)


@pytest.mark.parametrize("rank", [1, 3])
def test_adaptive_avg_gradient_matches_finite_differences(rank):
    rng = np.random.default_rng(50 + rank)
    x = rng.standard_normal((1, 2) + (5,) * rank)
    size = 3

    def f(v):
        return OPS[rank]["avg"](v, size)

    g = rng.standard_normal(f(x).shape)
    np.testing.assert_allclose(OPS[rank]["avg_backward"](g, x, size),
                               numeric_gradient(f, x, g), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_global_pooling_is_the_mean_and_max(rank):
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((3, 20) + (4,) * rank).astype(np.float32)
    axes = tuple(range(2, 2 + rank))
    for xin in (x, channels_last(x)):
        y = OPS[rank]["avg"](xin, 1)
        assert y.shape == x.shape[:2] + (1,) * rank
        np.testing.assert_allclose(y, x.mean(axis=axes, keepdims=True), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_array_equal(OPS[rank]["max"](xin, 1),
                                      x.max(axis=axes, keepdims=True))
    np.testing.assert_array_equal(OPS[rank]["avg"](x, 1), OPS[rank]["avg"](channels_last(x), 1))


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_global_average_adds_in_the_documented_order(rank, dtype):
    """Both layouts' reduction kernels sum in the documented order of interleaved
    partials, bit for bit: volumes shorter than one vector, one vector exactly, and
    with every tail length; values spread over 12 decades so that another order
    rounds differently (checked: an in-order sum fails)."""
    rng = np.random.default_rng(30 + rank)
    for size in (1, 3, 16, 17, 31, 49, 64, 70):
        spatial = {1: (size,), 2: (1, size), 3: (1, size, 1)}[rank]
        x = (rng.standard_normal((2, 19) + spatial)
             * 10.0 ** rng.integers(-6, 6, (2, 19) + spatial)).astype(dtype)
        want = ref.global_avg_pool_in_order(x)
        for xin in (x, channels_last(x)):
            got = OPS[rank]["avg"](xin, 1)
            np.testing.assert_array_equal(got.view(f"i{x.itemsize}"),
                                          want.view(f"i{x.itemsize}"), err_msg=str(size))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_global_average_in_channel_blocks(dtype):
    """One image of many channels runs in blocks of 256 channels, each summed a
    vector of channels at a time (``_lanes.interleaved_column_sums``, partials in
    registers) with the last block's last channels in the scalar loop: the documented
    order's bits for every channel."""
    rng = np.random.default_rng(33)
    shape = (1, 4099, 7, 7)
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 6, shape)).astype(dtype)
    want = ref.global_avg_pool_in_order(x)
    got = OPS[2]["avg"](channels_last(x), 1)
    np.testing.assert_array_equal(got.view(f"i{x.itemsize}"), want.view(f"i{x.itemsize}"))


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_global_average_sum_vector_widths(dtype, wide):
    """The channels-first sum is 32-byte vector code even where the CPU has AVX-512
    (``interleaved_sum``): a core running 512-bit code after a millisecond without it
    waits for its clock licence again, which made a small global average 1.5x slower
    when called after other work (``fastpool/cpu/_lanes.py``). Calls of at least
    ``WIDE_FROM`` elements run ``interleaved_sum_wide``, 64-byte code. Both give the
    documented order's bits for every tail length. Compiled afresh (Numba shows no code
    of functions loaded from its disk cache)."""
    import re

    from numba import config, njit
    from numba.core.codegen import get_host_cpu_features

    from fastpool.cpu._lanes import interleaved_sum, interleaved_sum_wide

    summed = interleaved_sum_wide if wide else interleaved_sum

    @njit(cache=False)
    def total(x, count):
        return summed(x, 3, count)

    rng = np.random.default_rng(40)
    x = (rng.standard_normal(80) * 10.0 ** rng.integers(-6, 6, 80)).astype(dtype)
    assert total(x, 0) == 0
    for count in (1, 15, 16, 17, 31, 32, 49, 70):
        want = ref.global_avg_pool_in_order(x[3:3 + count].reshape(1, 1, count))
        got = dtype(np.float64(total(x, count)) / count)  # the kernel's mean
        assert got.view(f"i{x.itemsize}") == want[0, 0, 0].view(f"i{x.itemsize}"), count
    code = total.inspect_asm(total.signatures[0])
    features = (config.CPU_FEATURES or get_host_cpu_features()).split(",")
    assert ("%zmm" in code) == (wide and "+avx512f" in features)
    if "+avx" in features and not wide:
        assert re.search(r"vaddp[sd]\s[^\n]*%ymm", code)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_global_backward_is_the_general_kernel_bit_for_bit(rank, dtype):
    """Global average backward broadcasts each share (its own kernel): the general
    adaptive kernel's values bit for bit, signed zeros of underflowing shares included,
    in both layouts; and grad / size against the reference."""
    from fastpool import _params
    from fastpool.cpu import pool_adaptive, pooling
    rng = np.random.default_rng(20 + rank)
    x = rng.standard_normal((2, 5) + (3,) * rank).astype(dtype)
    g = rng.standard_normal((2, 5) + (1,) * rank).astype(dtype)
    g.flat[0] = -np.finfo(dtype).smallest_subnormal  # / size rounds to -0.0
    for xin, gin in ((x, g), (channels_last(x), channels_last(g))):
        got = OPS[rank]["avg_backward"](gin, xin, 1)
        _, w = _params.adaptive_window(xin, rank, 1)
        buffer, general = pooling._adaptive_empty(w, w.input_shape, w.in_size, g.dtype)
        pool_adaptive.avg_backward(xin is not x)(
            pooling._adaptive_view(gin, w, w.out3), buffer, *pooling._bounds(w),
            *pooling._cover(w), g.dtype.type(0), pooling._rows_of(buffer))
        assert got.strides == general.strides
        np.testing.assert_array_equal(got.view(f"i{g.itemsize}"),
                                      general.view(f"i{g.itemsize}"))
        assert_close(got, np.broadcast_to(g / 3 ** rank, x.shape), dtype)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_gpu_kernels_match_cpu(rank, layout, small_launches):
    """Bit for bit, every op, both dtypes; NumPy in and out through the GPU."""
    for dtype in DTYPES:
        rng = np.random.default_rng(60 + rank)
        shape = (2, 3) + {1: (9,), 2: (5, 7), 3: (4, 5, 3)}[rank]
        x = distinct_values(rng, shape, dtype)
        x.flat[3] = np.nan
        x = channels_last(x) if layout == "last" else x
        size = {1: 4, 2: (3, 9), 3: (2, None, 5)}[rank]
        ops = OPS[rank]

        def everything(device):
            y = ops["avg"](x, size, device=device)
            g = np.cos(np.arange(y.size, dtype=dtype)).reshape(y.shape)
            g = channels_last(g) if layout == "last" else g
            m, indices = ops["max"](x, size, return_indices=True, device=device)
            return dict(avg=y, avg_backward=ops["avg_backward"](g, x, size, device=device),
                        max=m, indices=indices,
                        max_backward=ops["max_backward"](g, x, size, indices=indices,
                                                         device=device),
                        recomputed=ops["max_backward"](g, x, size, device=device),
                        global_avg=ops["avg"](x, 1, device=device))

        cpu, gpu = everything("cpu"), everything("cuda")
        for name in cpu:
            assert type(gpu[name]) is np.ndarray, name
            np.testing.assert_array_equal(gpu[name], cpu[name], err_msg=name)
            assert _strides(gpu[name]) == _strides(cpu[name]), name


def _strides(a):
    """Strides of the axes longer than 1 (a size-1 axis's stride means nothing)."""
    return tuple(s for s, n in zip(a.strides, a.shape) if n > 1)


def test_bad_input_names_the_argument():
    x = np.ones((2, 3, 6, 6), np.float32)
    with pytest.raises(ValueError, match="output_size"):
        fastpool.adaptive_avg_pool2d(x, (2, 2, 2))
    with pytest.raises(ValueError, match="output_size"):
        fastpool.adaptive_avg_pool2d(x, 0)
    with pytest.raises(TypeError, match="output_size"):
        fastpool.adaptive_max_pool2d(x, 2.5)
    with pytest.raises(ValueError, match="output_size"):
        fastpool.adaptive_max_pool1d(x[:, :, 0], 2**40)
    with pytest.raises(ValueError, match=r"x must be 4-D"):
        fastpool.adaptive_avg_pool2d(x[0, 0], 2)
    with pytest.raises(ValueError, match="grad_output"):
        fastpool.adaptive_avg_pool2d_backward(np.ones((2, 3, 3, 3), np.float32), x, 2)
    with pytest.raises(TypeError, match="return_indices"):
        fastpool.adaptive_max_pool2d(x, 2, return_indices=1)
    bad = np.full((2, 3, 2, 2), 36, np.int64)  # one past the end of each 6x6 volume
    grad = np.ones((2, 3, 2, 2), np.float32)
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="indices"):
            fastpool.adaptive_max_pool2d_backward(grad, x, 2, indices=bad, device=device)
    inside_another_window = np.zeros((2, 3, 2, 2), np.int64)  # window (1, 1) holds no 0
    with pytest.raises(ValueError, match="own adaptive window"):
        fastpool.adaptive_max_pool2d_backward(grad, x, 2, indices=inside_another_window,
                                              device="cuda")


# ----------------------------------------------------------------------------- stochastic

STOCHASTIC = {rank: (getattr(fastpool, f"adaptive_stochastic_pool{rank}d"),
                     getattr(fastpool, f"adaptive_stochastic_pool{rank}d_backward"))
              for rank in (1, 2, 3)}


@pytest.mark.parametrize("rank", [1, 2, 3])
@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**64 - 1))
def test_adaptive_stochastic_matches_reference(rank, data, seed):
    case = data.draw(cases(rank))
    rng = np.random.default_rng(seed_for("stochastic", rank, case["shape"],
                                         case["output_size"], case["channels_last"]))
    x = rng.random(case["shape"]).astype(case["dtype"])
    x[x < 0.2] = 0  # zero windows happen
    xin = _prepare(case, x)
    size = case["output_size"]
    forward, backward = STOCHASTIC[rank]
    shaped = (lambda r: r[0]) if case["unbatched"] else (lambda r: r)
    y, picks = forward(xin, size, seed=seed, return_indices=True)
    y_ref, p_ref = ref.adaptive_stochastic_pool(x, size, seed=seed)
    np.testing.assert_array_equal(picks, shaped(p_ref))
    np.testing.assert_array_equal(y, shaped(y_ref).astype(x.dtype))
    e = forward(xin, size, training=False)
    assert_close(e, shaped(ref.adaptive_stochastic_pool(x, size, training=False)[0]),
                 x.dtype)
    g = rng.standard_normal(y_ref.shape).astype(x.dtype)
    gin = _prepare(case, g)
    assert_close(backward(gin, xin, size, indices=picks),
                 shaped(ref.scatter_to_indices(g, p_ref, x.shape)), x.dtype)
    assert_close(backward(gin, xin, size, training=False),
                 shaped(ref.adaptive_stochastic_pool_backward(g, x, size)), x.dtype)


def test_adaptive_stochastic_sampling_frequencies():
    """One 3x3 window (7 -> 3 along both axes, output (1, 1)) over many seeds: picks
    follow a / sum(a) (chi-square)."""
    from scipy import stats
    rng = np.random.default_rng(12)
    x = rng.random((1, 1, 7, 7)) + 0.05
    draws = 3000
    picks = np.array([int(fastpool.adaptive_stochastic_pool2d(
        x, 3, seed=s, return_indices=True)[1][0, 0, 1, 1]) for s in range(draws)])
    cells = ref.adaptive_window((1, 1), (7, 7), (3, 3))
    weights = np.array([x[(0, 0) + q] for q in cells])
    observed = np.array([(picks == ref.flat_index(q, (7, 7))).sum() for q in cells])
    assert observed.sum() == draws
    assert stats.chisquare(observed, weights / weights.sum() * draws).pvalue > 1e-3


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_adaptive_stochastic_gpu_matches_cpu(rank, layout, small_launches):
    rng = np.random.default_rng(70 + rank)
    shape = (2, 3) + {1: (9,), 2: (5, 7), 3: (4, 5, 3)}[rank]
    size = {1: 4, 2: (3, 9), 3: (2, None, 5)}[rank]
    forward, backward = STOCHASTIC[rank]
    for dtype in DTYPES:
        x = rng.random(shape).astype(dtype)
        x[x < 0.2] = 0
        x = channels_last(x) if layout == "last" else x

        def everything(device):
            y, picks = forward(x, size, seed=77, return_indices=True, device=device)
            g = np.cos(np.arange(y.size, dtype=dtype)).reshape(y.shape)
            g = channels_last(g) if layout == "last" else g
            return dict(y=y, picks=picks,
                        train_backward=backward(g, x, size, indices=picks, device=device),
                        inference=forward(x, size, training=False, device=device),
                        inference_backward=backward(g, x, size, training=False,
                                                    device=device))

        cpu, gpu = everything("cpu"), everything("cuda")
        for name in cpu:
            if name.startswith("inference"):
                assert_close(gpu[name], cpu[name], dtype)
            else:
                np.testing.assert_array_equal(gpu[name], cpu[name], err_msg=name)
            assert _strides(gpu[name]) == _strides(cpu[name]), name


def test_adaptive_stochastic_bad_input():
    x = np.random.default_rng(1).random((1, 2, 6, 6))
    g = np.ones((1, 2, 3, 3))
    for device in ("cpu", "cuda"):
        for bad in (-1.0, np.nan, np.inf):
            y = x.copy()
            y[0, 1, 5, 5] = bad
            with pytest.raises(ValueError, match="non-negative"):
                fastpool.adaptive_stochastic_pool2d(y, 3, seed=1, device=device)
            with pytest.raises(ValueError, match="non-negative"):
                fastpool.adaptive_stochastic_pool2d(y, 3, training=False, device=device)
            with pytest.raises(ValueError, match="non-negative"):
                fastpool.adaptive_stochastic_pool2d_backward(g, y, 3, training=False,
                                                             device=device)
    with pytest.raises(ValueError, match="indices is required"):
        fastpool.adaptive_stochastic_pool2d_backward(g, x, 3)
    with pytest.raises(ValueError, match="return_indices"):
        fastpool.adaptive_stochastic_pool2d(x, 3, training=False, return_indices=True)
    with pytest.raises(ValueError, match="seed"):
        fastpool.adaptive_stochastic_pool2d(x, 3, seed=-1)
