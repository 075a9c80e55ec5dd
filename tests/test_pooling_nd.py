"""1-D and 3-D pooling (every mode, forward and backward) and the channels-last memory
format of every rank, against the N-D references, PyTorch and finite differences.

2-D channels-first pooling has its own files (test_pooling.py, test_stochastic.py);
here the same kernels run with a depth axis, a height axis of 1, and channels-last
strides. Geometries come from short per-rank lists (each is a compiled kernel).
"""

import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import stats

import fastpool
import reference as ref
from conftest import DTYPES, assert_close, dtypes_for, numeric_gradient, seed_for
from strategies import distinct_values

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# (kernel_size, stride, dilation) per rank; stride None means kernel_size. Two per rank
# (each is a set of compiled kernels per op, dtype and layout): the common one, and one
# covering what it does not (stride None, dilation, a different size per axis).
GEOMETRIES = {
    1: [(3, 2, 1), (2, None, 2)],
    2: [(3, 2, 1), (2, None, 1)],
    3: [(3, 2, 1), ((1, 2, 3), (1, 2, 1), (1, 2, 1))],
}
OPS = {rank: dict(max=getattr(fastpool, f"max_pool{rank}d"),
                  max_backward=getattr(fastpool, f"max_pool{rank}d_backward"),
                  avg=getattr(fastpool, f"avg_pool{rank}d"),
                  avg_backward=getattr(fastpool, f"avg_pool{rank}d_backward"),
                  stochastic=getattr(fastpool, f"stochastic_pool{rank}d"),
                  stochastic_backward=getattr(fastpool, f"stochastic_pool{rank}d_backward"))
       for rank in (1, 2, 3)}


HALF_TOO = (np.float32, np.float64, np.float16)


def geometry_dtypes(names, cases, ids, extra=None):
    """``pytest.mark.parametrize(names + ", dtype", ...)`` over ``cases`` and
    ``HALF_TOO``, pairing instead of crossing them (``conftest.dtypes_for``'s rule with
    a third dtype): the first geometry in every dtype; each later one in float32 or
    float64 in turn (so every geometry meets the reference, which float16 results are
    not compared with), and every third one in float16 too; ``extra`` adds dtypes to
    the geometries it names. Each (geometry, dtype) is a separate kernel
    specialisation, seconds of Numba compilation on a cold run: about half of them."""
    params = []
    for i, (case, name) in enumerate(zip(cases, ids)):
        if i == 0:
            dtypes = HALF_TOO
        else:
            dtypes = (HALF_TOO[(i - 1) % 2],) + ((np.float16,) if i % 3 == 0 else ())
        dtypes += tuple(d for d in (extra or {}).get(name, ()) if d not in dtypes)
        for dtype in dtypes:
            params.append(pytest.param(*case, dtype, id=f"{name}-{np.dtype(dtype).name}"))
    return pytest.mark.parametrize(f"{names}, dtype", params)


def _covers(size, k, s, p, d, ceil_mode):
    out = ref.pool_output_size(size, k, s, p, d, ceil_mode)
    return out >= 1 and all(any(0 <= o * s - p + i * d < size for i in range(k))
                            for o in range(out))


@st.composite
def nd_cases(draw, rank, dilated=True):
    index = draw(st.integers(0, len(GEOMETRIES[rank]) - 1))
    kernel, stride, dilation = GEOMETRIES[rank][index]
    if not dilated:
        dilation = 1
    k = ref.ntuple(kernel, rank)
    s = k if stride is None else ref.ntuple(stride, rank)
    d = ref.ntuple(dilation, rank)
    p = tuple(draw(st.integers(0, (di * (ki - 1) + 1) // 2)) for ki, di in zip(k, d))
    ceil_mode = draw(st.booleans())
    size = tuple(draw(st.integers(max(1, di * (ki - 1) + 1 - 2 * pi), 6 + di * ki))
                 for ki, di, pi in zip(k, d, p))
    assume(all(_covers(*a, ceil_mode) for a in zip(size, k, s, p, d)))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3))) + size
    padding = p[0] if len(set(p)) == 1 and draw(st.booleans()) else p
    args = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode)
    if dilated:
        args["dilation"] = dilation
    return dict(rank=rank, shape=shape, dtype=draw(st.sampled_from(dtypes_for(index, 1))),
                args=args,
                channels_last=draw(st.booleans()), unbatched=draw(st.booleans()))


def channels_last(a):
    """The same array with channels-last strides (N, *spatial, C) in memory."""
    axis = 1 if a.ndim >= 3 else 0
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, axis, -1)), -1, axis)


def is_channels_last(a):
    return (not a.flags.c_contiguous) and np.moveaxis(a, 1, -1).flags.c_contiguous


def _prepare(case, x):
    """The input as the case asks (layout, batch axis) and a function that brings a
    batched reference result into the same shape."""
    if case["channels_last"]:
        x = channels_last(x)
    if case["unbatched"]:
        return x[0], (lambda r: r[0])
    return x, (lambda r: r)


def _check_layout(case, result, x_shape):
    if case["channels_last"] and not case["unbatched"] and x_shape[1] > 1 and \
            np.prod(result.shape[2:]) > 1:
        assert is_channels_last(result), result.strides


def _rng(case):
    return np.random.default_rng(seed_for(case["rank"], case["shape"], case["args"],
                                          case["channels_last"], case["unbatched"],
                                          np.dtype(case["dtype"]).name))


rank_param = pytest.mark.parametrize("rank", [1, 3])
all_ranks = pytest.mark.parametrize("rank", [1, 2, 3])


# ----------------------------------------------------------------------------- max

@all_ranks
@SETTINGS
@given(data=st.data())
def test_max_pool_matches_reference(rank, data):
    case = data.draw(nd_cases(rank))
    rng = _rng(case)
    x = distinct_values(rng, case["shape"], case["dtype"])
    xin, shaped = _prepare(case, x)
    ops = OPS[rank]
    y, indices = ops["max"](xin, **case["args"], return_indices=True)
    y_ref, i_ref = ref.max_pool(x, **case["args"])
    np.testing.assert_array_equal(y, shaped(y_ref).astype(x.dtype))
    np.testing.assert_array_equal(indices, shaped(i_ref))
    _check_layout(case, y, case["shape"])
    g = rng.standard_normal(y_ref.shape).astype(x.dtype)
    gin = channels_last(g) if case["channels_last"] else g
    gin = gin[0] if case["unbatched"] else gin
    gi = ops["max_backward"](gin, xin, **case["args"], indices=indices)
    assert_close(gi, shaped(ref.scatter_to_indices(g, i_ref, x.shape)), x.dtype)
    _check_layout(case, gi, case["shape"])
    gi2 = ops["max_backward"](gin, xin, **case["args"])  # indices recomputed
    np.testing.assert_array_equal(gi2, gi)


# ----------------------------------------------------------------------------- average

@all_ranks
@SETTINGS
@given(data=st.data(), count_include_pad=st.booleans(),
       divisor_override=st.sampled_from([None, 3]))
def test_avg_pool_matches_reference(rank, data, count_include_pad, divisor_override):
    case = data.draw(nd_cases(rank, dilated=False))
    rng = _rng(case)
    x = rng.standard_normal(case["shape"]).astype(case["dtype"])
    xin, shaped = _prepare(case, x)
    kw = dict(case["args"], count_include_pad=count_include_pad,
              divisor_override=divisor_override)
    ops = OPS[rank]
    y = ops["avg"](xin, **kw)
    y_ref = ref.avg_pool(x, **kw)
    assert_close(y, shaped(y_ref), x.dtype)
    _check_layout(case, y, case["shape"])
    g = rng.standard_normal(y_ref.shape).astype(x.dtype)
    gin = channels_last(g) if case["channels_last"] else g
    gin = gin[0] if case["unbatched"] else gin
    gi = ops["avg_backward"](gin, xin, **kw)
    assert_close(gi, shaped(ref.avg_pool_backward(g, x, **kw)), x.dtype)
    _check_layout(case, gi, case["shape"])


# ----------------------------------------------------------------------------- stochastic

@all_ranks
@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**64 - 1))
def test_stochastic_pool_matches_reference(rank, data, seed):
    case = data.draw(nd_cases(rank))
    rng = _rng(case)
    x = rng.random(case["shape"]).astype(case["dtype"])
    x[x < 0.2] = 0  # zero windows happen
    xin, shaped = _prepare(case, x)
    ops = OPS[rank]
    y, picks = ops["stochastic"](xin, **case["args"], seed=seed, return_indices=True)
    y_ref, p_ref = ref.stochastic_pool(x, **case["args"], seed=seed)
    np.testing.assert_array_equal(picks, shaped(p_ref))
    np.testing.assert_array_equal(y, shaped(y_ref).astype(x.dtype))
    _check_layout(case, y, case["shape"])
    e = ops["stochastic"](xin, **case["args"], training=False)
    e_ref, _ = ref.stochastic_pool(x, **case["args"], training=False)
    assert_close(e, shaped(e_ref), x.dtype)
    g = rng.standard_normal(y_ref.shape).astype(x.dtype)
    gin = channels_last(g) if case["channels_last"] else g
    gin = gin[0] if case["unbatched"] else gin
    gi = ops["stochastic_backward"](gin, xin, **case["args"], indices=picks)
    assert_close(gi, shaped(ref.scatter_to_indices(g, p_ref, x.shape)), x.dtype)
    ge = ops["stochastic_backward"](gin, xin, **case["args"], training=False)
    assert_close(ge, shaped(ref.stochastic_pool_backward(g, x, **case["args"],
                                                         training=False)), x.dtype)
    _check_layout(case, ge, case["shape"])


@rank_param
def test_stochastic_sampling_frequencies(rank):
    """One window over many seeds: the picks follow a / sum(a) (chi-square)."""
    rng = np.random.default_rng(11 + rank)
    size = (5,) * rank
    x = rng.random((1, 1) + size) + 0.05
    args = dict(kernel_size=3, stride=2, padding=1)
    draws = 3000
    centre = (1,) * rank
    picks = np.array([int(OPS[rank]["stochastic"](x, **args, seed=s, return_indices=True)
                          [1][(0, 0) + centre]) for s in range(draws)])
    g = ref.pool_geometry(x.shape, **args)
    cells = ref.window(centre, g)
    flat = [ref.flat_index(q, g.in_size) for q in cells]
    weights = np.array([x[(0, 0) + q] for q in cells])
    observed = np.array([(picks == f).sum() for f in flat])
    assert observed.sum() == draws
    assert stats.chisquare(observed, weights / weights.sum() * draws).pvalue > 1e-3


def test_2d_picks_are_those_of_the_2d_key_and_3d_with_depth_1_matches_2d():
    rng = np.random.default_rng(3)
    x = rng.random((2, 3, 7, 8))
    y2, p2 = fastpool.stochastic_pool2d(x, 3, 2, 1, seed=99, return_indices=True)
    y3, p3 = fastpool.stochastic_pool3d(x[:, :, None], (1, 3, 3), (1, 2, 2), (0, 1, 1),
                                        seed=99, return_indices=True)
    np.testing.assert_array_equal(p3[:, :, 0], p2)
    np.testing.assert_array_equal(y3[:, :, 0], y2)
    y1, p1 = fastpool.stochastic_pool1d(x[:, :, 0], 3, 2, 1, seed=99, return_indices=True)
    y2h, p2h = fastpool.stochastic_pool2d(x[:, :, :1], (1, 3), (1, 2), (0, 1), seed=99,
                                          return_indices=True)
    np.testing.assert_array_equal(p1, p2h[:, :, 0])


# ----------------------------------------------------------------------------- gradients

@rank_param
@pytest.mark.parametrize("op", ["avg", "stochastic"])
def test_gradients_match_finite_differences(rank, op):
    rng = np.random.default_rng(40 + rank)
    shape = (1, 2) + (5,) * rank
    x = rng.random(shape) + 0.1
    args = dict(kernel_size=3, stride=2, padding=1)
    ops = OPS[rank]
    if op == "avg":
        def f(v):
            return ops["avg"](v, **args, count_include_pad=False)
        g = rng.standard_normal(f(x).shape)
        analytic = ops["avg_backward"](g, x, **args, count_include_pad=False)
    else:
        def f(v):
            return ops["stochastic"](v, **args, training=False)
        g = rng.standard_normal(f(x).shape)
        analytic = ops["stochastic_backward"](g, x, **args, training=False)
    np.testing.assert_allclose(analytic, numeric_gradient(f, x, g), rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- torch

@needs_torch
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_against_torch_in_both_layouts(rank, dtype):
    rng = np.random.default_rng(7 * rank)
    shape = (2, 4) + {1: (17,), 2: (9, 10), 3: (5, 7, 6)}[rank]
    x = distinct_values(rng, shape, dtype)
    args = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    fmax = getattr(F, f"max_pool{rank}d")
    favg = getattr(F, f"avg_pool{rank}d")
    for layout in ("first", "last"):
        xin = channels_last(x) if layout == "last" else x
        xt = torch.from_numpy(np.array(x)).requires_grad_()
        y, i = OPS[rank]["max"](xin, **args, return_indices=True)
        yt, it = fmax(xt, **args, return_indices=True)
        np.testing.assert_array_equal(y, yt.detach().numpy())
        np.testing.assert_array_equal(i, it.numpy())
        g = rng.standard_normal(y.shape).astype(dtype)
        yt.backward(torch.from_numpy(g))
        gi = OPS[rank]["max_backward"](channels_last(g) if layout == "last" else g, xin,
                                       **args, indices=i)
        np.testing.assert_allclose(gi, xt.grad.numpy(), rtol=1e-6, atol=1e-6)
        xt.grad = None
        a = OPS[rank]["avg"](xin, **args, count_include_pad=False)
        at = favg(xt, **args, count_include_pad=False)
        assert_close(a, at.detach().numpy(), dtype)
        ga = rng.standard_normal(a.shape).astype(dtype)
        at.backward(torch.from_numpy(ga))
        gi = OPS[rank]["avg_backward"](channels_last(ga) if layout == "last" else ga, xin,
                                       **args, count_include_pad=False)
        assert_close(gi, xt.grad.numpy(), dtype)


@needs_torch
@pytest.mark.parametrize("rank", [1, 3])
def test_avg_backward_against_torch(rank):
    rng = np.random.default_rng(70 + rank)
    shape = (2, 3) + {1: (11,), 3: (5, 6, 7)}[rank]
    x = rng.standard_normal(shape)
    favg = getattr(F, f"avg_pool{rank}d")
    for kw in (dict(kernel_size=3, stride=2, padding=1),
               dict(kernel_size=2, stride=1, padding=1, ceil_mode=True,
                    count_include_pad=False),
               dict(kernel_size=3, stride=2, padding=1, divisor_override=5)):
        if rank == 1 and "divisor_override" in kw:
            continue  # torch's avg_pool1d has no divisor_override (fastpool's has)
        xt = torch.from_numpy(x.copy()).requires_grad_()
        yt = favg(xt, **kw)
        g = rng.standard_normal(tuple(yt.shape))
        yt.backward(torch.from_numpy(g))
        assert_close(OPS[rank]["avg"](x, **kw), yt.detach().numpy(), np.float64)
        assert_close(OPS[rank]["avg_backward"](g, x, **kw), xt.grad.numpy(), np.float64)


# ----------------------------------------------------------------------------- layouts

@all_ranks
def test_layouts_give_identical_results(rank):
    """Channels-last in, channels-last out, bitwise the channels-first values."""
    rng = np.random.default_rng(5 + rank)
    x = rng.random((2, 5) + (6,) * rank).astype(np.float32)
    xl = channels_last(x)
    ops = OPS[rank]
    for name, call in [
        ("max", lambda v: ops["max"](v, 3, 2, 1, return_indices=True)),
        ("avg", lambda v: ops["avg"](v, 2, 1, 1, ceil_mode=True)),
        ("stochastic", lambda v: ops["stochastic"](v, 3, 2, 1, seed=4, return_indices=True)),
        ("stochastic inference", lambda v: ops["stochastic"](v, 3, 2, 1, training=False)),
    ]:
        first, last = call(x), call(xl)
        for f, l in zip(first if isinstance(first, tuple) else (first,),
                        last if isinstance(last, tuple) else (last,)):
            np.testing.assert_array_equal(f, l, err_msg=name)
            assert is_channels_last(l), (name, l.strides)
            assert f.flags.c_contiguous, name


def _spy_on_factory(monkeypatch, op):
    """The list of constants ``op``'s kernel factory is called with from now on (the
    factory itself still runs)."""
    from fastpool.cpu import pooling as cpu_pooling
    made = []
    factory = cpu_pooling._FACTORIES[op]
    monkeypatch.setitem(cpu_pooling._FACTORIES, op,
                        lambda *c: made.append(c) or factory(*c))
    return made


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def _assert_bitwise_same(first, last, channels):
    for name in first:
        assert np.array_equal(_bits(first[name]), _bits(last[name])), name
        if channels > 1 and np.prod(last[name].shape[2:]) > 1:
            assert is_channels_last(last[name]), name


@all_ranks
@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**64 - 1))
def test_channels_last_kernels_are_bitwise_channels_first(rank, data, seed):
    """Every op's channels-last kernels (read in place) against its channels-first ones,
    byte for byte, over random geometries: edge and interior windows, dilation,
    ceil_mode, zero windows."""
    ops = OPS[rank]
    case = data.draw(nd_cases(rank))
    rng = _rng(case)
    x = rng.random(case["shape"]).astype(case["dtype"])
    x[x < 0.2] = 0
    args = case["args"]
    g = rng.standard_normal(ops["max"](x, **args).shape).astype(x.dtype)

    def picking(v, grad):
        out, picks = ops["stochastic"](v, **args, seed=seed, return_indices=True)
        return dict(
            max=ops["max"](v, **args), max_backward=ops["max_backward"](grad, v, **args),
            stochastic=out, picks=picks,
            stochastic_backward=ops["stochastic_backward"](grad, v, **args, indices=picks),
            inference=ops["stochastic"](v, **args, training=False),
            inference_backward=ops["stochastic_backward"](grad, v, **args,
                                                          training=False))

    _assert_bitwise_same(picking(x, g), picking(channels_last(x), channels_last(g)),
                         x.shape[1])
    case = data.draw(nd_cases(rank, dilated=False))
    x = rng.standard_normal(case["shape"]).astype(case["dtype"])
    args = case["args"]
    g = rng.standard_normal(ops["avg"](x, **args).shape).astype(x.dtype)

    def averaging(v, grad):
        return dict(avg=ops["avg"](v, **args),
                    avg_backward=ops["avg_backward"](grad, v, **args))

    _assert_bitwise_same(averaging(x, g), averaging(channels_last(x), channels_last(g)),
                         x.shape[1])


@all_ranks
def test_channels_last_stochastic_pooling_rejects_bad_input(rank):
    x = channels_last(np.random.default_rng(rank).random((2, 3) + (5,) * rank))
    g = channels_last(np.ones((2, 3) + (3,) * rank))
    ops = OPS[rank]
    for bad in (-1.0, np.nan, np.inf):
        x[1, 2, ...] = bad
        with pytest.raises(ValueError, match="non-negative"):
            ops["stochastic"](x, 3, 2, 1, seed=1)
        with pytest.raises(ValueError, match="non-negative"):
            ops["stochastic"](x, 3, 2, 1, training=False)
        with pytest.raises(ValueError, match="non-negative"):
            ops["stochastic_backward"](g, x, 3, 2, 1, training=False)


def test_memory_format_rules():
    from fastpool._geometry import CHANNELS_FIRST, CHANNELS_LAST, memory_format
    x = np.zeros((2, 3, 4, 5), np.float32)
    assert memory_format(x.shape, x.strides, 4) == CHANNELS_FIRST
    xl = channels_last(x)
    assert memory_format(xl.shape, xl.strides, 4) == CHANNELS_LAST
    one = np.zeros((2, 1, 4, 5), np.float32)  # one channel: both readings fit
    assert memory_format(one.shape, channels_last(one).strides, 4) == CHANNELS_FIRST
    odd = np.zeros((2, 3, 4, 5), np.float32).transpose(0, 1, 3, 2)
    assert memory_format(odd.shape, odd.strides, 4) == CHANNELS_FIRST  # copied once
    vol = channels_last(np.zeros((2, 3, 4, 5, 6), np.float32))
    assert memory_format(vol.shape, vol.strides, 4) == CHANNELS_LAST
    seq = channels_last(np.zeros((2, 3, 7), np.float32))
    assert memory_format(seq.shape, seq.strides, 4) == CHANNELS_LAST


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("rank", [1, 3])
def test_bad_input_names_the_argument(rank):
    ops = OPS[rank]
    x = np.ones((1, 2) + (6,) * rank, np.float32)
    with pytest.raises(ValueError, match=rf"x must be {rank + 2}-D"):
        ops["max"](np.ones((6,) * (rank + 3), np.float32), 2)
    with pytest.raises(ValueError, match="kernel_size"):
        ops["avg"](x, (2,) * (rank + 1))
    with pytest.raises(ValueError, match="padding"):
        ops["max"](x, 2, padding=2)
    with pytest.raises(ValueError, match="stride"):
        ops["stochastic"](x, 2, stride=0)
    with pytest.raises(ValueError, match="grad_output"):
        ops["avg_backward"](np.ones((1, 2) + (2,) * rank, np.float32), x, 2)
    with pytest.raises(ValueError, match="indices"):
        ops["max_backward"](np.ones((1, 2) + (3,) * rank, np.float32), x, 2,
                            indices=np.full((1, 2) + (3,) * rank, 6**rank, np.int64))
    with pytest.raises(ValueError, match="negative"):
        ops["stochastic"](-x, 2)


# ----------------------------------------------------------------------------- threads

@pytest.mark.parametrize("rank", [1, 3])
def test_results_do_not_depend_on_thread_count(rank):
    import numba
    rng = np.random.default_rng(rank)
    x = rng.random((3, 4) + (9,) * rank)
    ops = OPS[rank]

    def everything():
        y, i = ops["max"](x, 3, 2, 1, return_indices=True)
        g = np.ones_like(y)
        return (y, i, ops["avg_backward"](g, x, 3, 2, 1),
                ops["stochastic"](x, 3, 2, 1, seed=8),
                ops["stochastic_backward"](g, x, 3, 2, 1, training=False))

    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = everything()
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = everything()
    finally:
        numba.set_num_threads(saved)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("blocks", [1, 2, 5])
def test_channels_last_scatters_do_not_depend_on_channel_blocks(blocks, monkeypatch):
    """Whatever ``scatter_blocks`` splits the channels into, every (n, c) is scattered
    by one task in output order: max backward, stochastic training backward and
    max_unpool give the one-block results bitwise (float16 too: widened rows)."""
    from fastpool.cpu import pool_channels_last
    rng = np.random.default_rng(40)
    x = channels_last(rng.random((2, 10, 9, 8)))
    g = channels_last(rng.standard_normal((2, 10, 5, 4)))

    def everything():
        y, i = fastpool.max_pool2d(x, 3, 2, 1, return_indices=True)
        _, picks = fastpool.stochastic_pool2d(x, 3, 2, 1, seed=3, return_indices=True)
        half = fastpool.max_pool2d_backward(g.astype(np.float16), x.astype(np.float16),
                                            3, 2, 1)
        return (fastpool.max_pool2d_backward(g, x, 3, 2, 1, indices=i),
                fastpool.stochastic_pool2d_backward(g, x, 3, 2, 1, indices=picks),
                fastpool.max_unpool2d(g, i, 3, 2, 1, output_size=x.shape[2:]), half)

    expected = everything()
    monkeypatch.setattr(pool_channels_last, "scatter_blocks", lambda batch, c: blocks)
    for got, want in zip(everything(), expected):
        assert is_channels_last(got)
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["first", "last"])
def test_gpu_kernels_match_cpu(rank, dtype, layout, small_launches):
    """Every op of every rank on the GPU (the simulator here) against the CPU: bit for
    bit, but stochastic inference within the dtype's tolerance (the GPU may fuse its
    multiply-adds); results in the input's memory format on both devices."""
    rng = np.random.default_rng(90 + rank)
    shape = (2, 3) + {1: (9,), 2: (5, 6), 3: (4, 5, 4)}[rank]
    x = distinct_values(rng, shape, dtype) + dtype(0.6)
    x = channels_last(x) if layout == "last" else x
    ops = OPS[rank]
    args = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)

    def everything(device):
        y, i = ops["max"](x, **args, return_indices=True, device=device)
        g = np.cos(np.arange(y.size, dtype=dtype)).reshape(y.shape)
        g = channels_last(g) if layout == "last" else g
        s, p = ops["stochastic"](x, **args, seed=12, return_indices=True, device=device)
        avg_args = {k: v for k, v in args.items()}
        return dict(
            max=y, indices=i,
            max_backward=ops["max_backward"](g, x, **args, indices=i, device=device),
            avg=ops["avg"](x, **avg_args, count_include_pad=False, device=device),
            avg_backward=ops["avg_backward"](g, x, **avg_args, divisor_override=2,
                                             device=device),
            stochastic=s, picks=p,
            stochastic_backward=ops["stochastic_backward"](g, x, **args, indices=p,
                                                           device=device),
            inference=ops["stochastic"](x, **args, training=False, device=device),
            inference_backward=ops["stochastic_backward"](g, x, **args, training=False,
                                                          device=device))

    cpu, gpu = everything("cpu"), everything("cuda")
    for name in cpu:
        assert type(gpu[name]) is np.ndarray and gpu[name].shape == cpu[name].shape, name
        assert is_channels_last(gpu[name]) == (layout == "last"), (name, gpu[name].strides)
        assert is_channels_last(cpu[name]) == (layout == "last"), (name, cpu[name].strides)
        if name.startswith("inference"):
            assert_close(gpu[name], cpu[name], dtype)
        else:
            np.testing.assert_array_equal(gpu[name], cpu[name], err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, args", [
    ((2, 3, 9, 11), dict(kernel_size=3, stride=2, padding=1)),
    ((1, 2, 10, 13), dict(kernel_size=(2, 3), stride=(3, 2), padding=(1, 1), dilation=(2, 2))),
    ((1, 2, 7, 12), dict(kernel_size=4, stride=3, padding=2, ceil_mode=True)),
    ((1, 2, 5, 6, 9), dict(kernel_size=3, stride=2, padding=1)),
    ((2, 3, 8, 11), dict(kernel_size=2, stride=2, ceil_mode=True)),
], ids=["3x3s2", "dilated", "s3-ceil", "3-D", "2x2s2"])
def test_strided_max_pooling_edges_ties_nan_and_infinities(shape, args, dtype):
    """Column strides above 1 read each row's column phases (2x2 stride 2: the input
    directly), with -inf standing in for rows outside the input: a window whose inside
    values are all -inf (or equal, or NaN) must still report the reference's value and
    first index, zeros' signs kept; in both layouts."""
    rng = np.random.default_rng(17)
    x = rng.choice(np.array([-np.inf, -1.0, 0.0, -0.0, 2.0], dtype), size=shape)
    x.flat[rng.choice(x.size, size=max(1, x.size // 40), replace=False)] = np.nan
    x[..., :2, :] = -np.inf  # top rows: windows that hang over the padding see only -inf
    rank = len(shape) - 2
    pool = {2: fastpool.max_pool2d, 3: fastpool.max_pool3d}[rank]
    ry, ridx = ref.max_pool(x, **args)
    for layout in (x, channels_last(x)):  # channels-last: interior windows in registers
        y, idx = pool(layout, return_indices=True, **args)
        np.testing.assert_array_equal(idx, ridx)
        np.testing.assert_array_equal(np.signbit(y), np.signbit(ry.astype(dtype)))
        np.testing.assert_array_equal(y, ry.astype(dtype))
        np.testing.assert_array_equal(pool(layout, **args), y)  # without indices


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, args", [
    ((2, 3, 9, 11), dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)),
    ((1, 2, 7, 12), dict(kernel_size=4, stride=3, padding=2, ceil_mode=True)),
    ((1, 2, 7, 12), dict(kernel_size=4, stride=3, padding=2, ceil_mode=True,
                         count_include_pad=False)),
    ((1, 2, 8, 10), dict(kernel_size=3, stride=2, padding=1, divisor_override=5)),
    ((1, 2, 5, 6, 9), dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)),
], ids=["s2-exclude-pad", "s3-ceil", "s3-ceil-exclude-pad", "divisor", "3-D"])
def test_strided_avg_pooling_matches_reference_and_channels_last(shape, args, dtype):
    """Column strides above 1 read each row's column phases, rows outside the input as
    zeros: the reference's means, and bit for bit the channels-last kernel's values
    (top and bottom rows, clipped divisors, ceil_mode's last windows included)."""
    rng = np.random.default_rng(19)
    x = rng.standard_normal(shape).astype(dtype)
    x[..., 0, :] = -0.0
    rank = len(shape) - 2
    pool = {2: fastpool.avg_pool2d, 3: fastpool.avg_pool3d}[rank]
    y = pool(x, **args)
    assert_close(y, ref.avg_pool(x, **args), dtype)
    from fastpool._geometry import channels_last_copy
    np.testing.assert_array_equal(pool(channels_last_copy(x, 1), **args), y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 16, 14, 14), (20, 9, 7), (1, 32, 3, 5, 6)],
                         ids=["batched", "unbatched", "3-D"])
def test_narrow_channels_first_planes_through_channels_last_kernels(shape, dtype,
                                                                   monkeypatch):
    """Channels-first planes narrower than 32 columns (16 channels or more) are pooled
    by the channels-last kernels between two copies: the channels-first kernels' values
    and indices bit for bit, results channels-first."""
    from fastpool import _params
    from fastpool.cpu import pooling
    rng = np.random.default_rng(23)
    x = rng.choice(np.array([-1.0, 0.0, -0.0, 1.5, np.nan], dtype), size=shape)
    rank = len(shape) - 1 if len(shape) == 3 else len(shape) - 2
    ops = {2: (fastpool.max_pool2d, fastpool.avg_pool2d),
           3: (fastpool.max_pool3d, fastpool.avg_pool3d)}[rank]
    assert pooling._narrow(_params.pool_window(x, rank, 3, 2, 1, 1, False)[1])
    narrow = [ops[0](x, 3, 2, 1, return_indices=True), ops[1](x, 3, 2, 1),
              ops[1](x, 2, 1, 0, count_include_pad=False)]
    monkeypatch.setattr(pooling, "_NARROW_COLUMNS", 0)  # the channels-first kernels
    for args in ((3, 2, 1), (2, 1, 0)):  # plans are made per geometry: make them again
        window = _params.pool_window(x, rank, *args, 1, False)[1]
        for make in (*pooling._MAX_PLAN.values(), pooling._AVG_PLAN):
            window._derived.pop(make, None)
    direct = [ops[0](x, 3, 2, 1, return_indices=True), ops[1](x, 3, 2, 1),
              ops[1](x, 2, 1, 0, count_include_pad=False)]
    for got, want in zip(_flatten(narrow), _flatten(direct)):
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got.view(f"i{got.itemsize}"),
                                      want.view(f"i{want.itemsize}"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_narrow_planes_larger_than_the_copy_limit_run_the_channels_first_kernels(
        dtype, monkeypatch):
    """The copies to channels-last and back only pay off on small inputs: above
    ``_NARROW_BYTES`` a narrow-plane input runs the channels-first kernels (decided per
    call: the window does not know the dtype), with the same values."""
    from fastpool.cpu import pooling
    rng = np.random.default_rng(29)
    x = rng.random((2, 16, 14, 14)).astype(dtype)
    calls = []
    for name in ("_max_forward_channels_last", "_avg_forward_channels_last"):
        original = getattr(pooling, name)
        monkeypatch.setattr(pooling, name,
                            lambda *a, _f=original: calls.append(1) or _f(*a))
    monkeypatch.setattr(pooling, "_NARROW_BYTES", x.nbytes)
    small = [fastpool.max_pool2d(x, 3, 1, 1, return_indices=True),
             fastpool.avg_pool2d(x, 3, 1, 1)]
    assert len(calls) == 2
    monkeypatch.setattr(pooling, "_NARROW_BYTES", x.nbytes - 1)
    large = [fastpool.max_pool2d(x, 3, 1, 1, return_indices=True),
             fastpool.avg_pool2d(x, 3, 1, 1)]
    assert len(calls) == 2
    for got, want in zip(_flatten(large), _flatten(small)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_narrow_max_without_indices_matches_the_shared_rows_kernel(dtype, monkeypatch):
    """Max pooling without indices on narrow channels-first planes runs the channels-last
    kernels between two copies, with the bits (NaN, -0.0) of the channels-first kernel
    that shares each input row's maxima (``pool_max.shares_rows``), which runs when the
    copies are turned off, and the reference's values."""
    from fastpool import _params
    from fastpool.cpu import pooling
    rng = np.random.default_rng(31)
    x = rng.choice(np.array([-1.0, 0.0, -0.0, 1.5, np.nan], dtype), size=(2, 16, 14, 14),
                   p=[0.3, 0.25, 0.25, 0.19, 0.01])
    calls = []
    original = pooling._max_forward_channels_last
    monkeypatch.setattr(pooling, "_max_forward_channels_last",
                        lambda *a: calls.append(1) or original(*a))
    cases = ((3, 2, 1), (3, 1, 1), (5, 2, 2))
    narrow = []
    for args in cases:
        narrow.append(fastpool.max_pool2d(x, *args))
        assert len(calls) == 1
        calls.clear()
    monkeypatch.setattr(pooling, "_NARROW_COLUMNS", 0)  # the channels-first kernel
    for args in cases:
        window = _params.pool_window(x, 2, *args, 1, False)[1]
        from fastpool.cpu import pool_max
        assert pool_max.shares_rows(window.kernel3[0], window.kernel3[1], window.stride3[1],
                                    window.stride3[2], 1, 1, False)
        for make in pooling._MAX_PLAN.values():  # plans are made per geometry
            window._derived.pop(make, None)
    for args, y in zip(cases, narrow):
        direct = fastpool.max_pool2d(x, *args)
        assert not calls
        np.testing.assert_array_equal(y.view(f"i{y.itemsize}"),
                                      direct.view(f"i{direct.itemsize}"))
        np.testing.assert_array_equal(y, ref.max_pool(x, *args)[0])


def _flatten(results):
    out = []
    for r in results:
        out += list(r) if isinstance(r, tuple) else [r]
    return out


@geometry_dtypes("shape, kernel, ceil_mode", [
    ((2, 6, 9, 11), 2, False), ((3, 5, 10), 3, False), ((1, 4, 5, 7, 6), (2, 3, 2), False),
    ((2, 6, 8, 8), 2, False), ((2, 6, 9, 11), 2, True)],
    ids=["2-D-leftover", "1-D", "3-D", "2-D-exact", "ceil-partial"])
def test_tiled_channels_last_avg_backward(shape, kernel, ceil_mode, dtype, monkeypatch):
    """Windows that tile the input (stride = kernel, no padding) take the channels-last
    backward's one-share-per-element kernel: bit for bit the channels-first values,
    signed zeros and the rows and columns past the last window included; ceil_mode's
    partial windows take the general kernel."""
    made = _spy_on_factory(monkeypatch, "avg_backward_cl_tiled")
    rank = len(shape) - 2
    rng = np.random.default_rng(23)
    x = rng.standard_normal(shape).astype(dtype)
    args = dict(kernel_size=kernel, ceil_mode=ceil_mode)
    g = rng.standard_normal(OPS[rank]["avg"](x, **args).shape).astype(dtype)
    g[..., 0] = -0.0
    backward = OPS[rank]["avg_backward"]
    want = backward(g, x, **args)
    got = backward(channels_last(g), channels_last(x), **args)
    assert is_channels_last(got)
    assert np.array_equal(_bits(got), _bits(want))
    assert bool(made) != ceil_mode
    if dtype != np.float16:
        assert_close(got, ref.avg_pool_backward(g, x, **args), dtype)


@geometry_dtypes("shape, kernel, divisor, tiled", [
    ((4, 6, 28, 28), 2, None, True), ((2, 3, 9, 12), 3, None, True),
    ((3, 4, 10), 5, 3, True), ((2, 3, 4, 6, 8), (1, 2, 4), None, True),
    ((2, 3, 4, 6, 8), (2, 2, 2), None, False), ((2, 3, 9, 11), 2, None, False)],
    ids=["2x2", "3x3", "1-D-divisor", "3-D-flat", "3-D-deep", "leftover"])
def test_exactly_tiled_avg_forward(shape, kernel, divisor, tiled, dtype, monkeypatch):
    """Windows that tile the input exactly (stride = kernel, no padding, no leftover,
    depth kernel 1) take the whole-row kernel: the general kernel's bits, signed zeros
    included; other geometries keep the general kernel."""
    from fastpool.cpu import pooling as cpu_pooling
    made = _spy_on_factory(monkeypatch, "avg_forward_tiled")
    rank = len(shape) - 2
    x = np.random.default_rng(29).standard_normal(shape).astype(dtype)
    x[..., 0] = -0.0
    args = dict(kernel_size=kernel, divisor_override=divisor)
    # the geometry the call will be handed (remembered per geometry): forget its
    # launch plan, so this call builds it and the factory is seen
    from fastpool import _params
    window = _params.pool_window(x, rank, kernel, None, 0, 1, False)[1]
    window._derived.pop(cpu_pooling._AVG_PLAN, None)
    got = OPS[rank]["avg"](x, **args)
    assert bool(made) == tiled
    # the general kernel: no tiling, and a plan made again
    monkeypatch.setattr(cpu_pooling, "_tiled_launch", lambda *op: (lambda w: False))
    window._derived.pop(cpu_pooling._AVG_PLAN, None)
    want = OPS[rank]["avg"](x, **args)
    assert np.array_equal(_bits(got), _bits(want))
    if dtype != np.float16:
        assert_close(got, ref.avg_pool(x, **args), dtype)


@geometry_dtypes("shape, kernel, tiled", [
    ((4, 6, 28, 28), 2, True), ((2, 3, 9, 12), 3, True), ((3, 4, 10), 5, True),
    ((2, 3, 4, 6, 8), (1, 2, 4), True), ((2, 3, 4, 6, 8), (2, 2, 2), False),
    ((2, 3, 9, 11), 2, False),
    # 2x2 rows of 7, 8, 17 and 3 outputs: a masked chunk only, whole chunks only
    # (float32), both (_pool_pairs.max2x2_rows); 40, past PAIRS_WIDEST: the loop
    ((1, 5, 14, 14), 2, True), ((2, 3, 16, 16), 2, True), ((1, 2, 6, 34), 2, True),
    ((2, 3, 4, 6, 6), (1, 2, 2), True), ((1, 2, 4, 80), 2, True)],
    ids=["2x2", "3x3", "1-D", "3-D-flat", "3-D-deep", "leftover", "2x2-7-wide",
         "2x2-8-wide", "2x2-17-wide", "3-D-2x2", "2x2-40-wide"],
    extra={"2x2-7-wide": (np.float32,)})  # 7 outputs: less than float32's 8 lanes
def test_exactly_tiled_max_forward(shape, kernel, tiled, dtype, monkeypatch):
    """Max pooling's whole-row kernel for exactly tiling windows: the general kernel's
    values and indices, bit for bit, with NaNs (the first one wins), ties (the first
    one wins), infinities and signed zeros."""
    from fastpool import _params
    from fastpool.cpu import pooling as cpu_pooling
    made = _spy_on_factory(monkeypatch, "max_forward_tiled")
    rank = len(shape) - 2
    rng = np.random.default_rng(31)
    x = rng.integers(-3, 3, shape).astype(dtype)  # many ties
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, flat.size // 10, replace=False)
    flat[picks[0::4]] = np.nan
    flat[picks[1::4]] = -np.inf
    flat[picks[2::4]] = np.inf
    flat[picks[3::4]] = -0.0
    window = _params.pool_window(x, rank, kernel, None, 0, 1, False)[1]
    def forget_plans():  # the next call builds its plan: the factory is seen
        for make in cpu_pooling._MAX_PLAN.values():
            window._derived.pop(make, None)
    forget_plans()
    got, got_indices = OPS[rank]["max"](x, kernel, return_indices=True)
    got_plain = OPS[rank]["max"](x, kernel)
    assert bool(made) == tiled
    monkeypatch.setattr(cpu_pooling, "_tiled_launch", lambda *op: (lambda w: False))
    forget_plans()
    want, want_indices = OPS[rank]["max"](x, kernel, return_indices=True)
    assert np.array_equal(_bits(got), _bits(want))
    assert np.array_equal(_bits(got_plain), _bits(want))
    np.testing.assert_array_equal(got_indices, want_indices)


@geometry_dtypes("shape, kernel, tiled", [
    ((8, 16, 32, 32), 2, True), ((2, 3, 9, 12), 3, True), ((3, 4, 10), 5, True),
    ((2, 3, 4, 6, 8), (1, 2, 4), True), ((2, 3, 4, 6, 8), (2, 2, 2), False),
    ((2, 3, 9, 11), 2, False)],
    ids=["2x2", "3x3", "1-D", "3-D-flat", "3-D-deep", "leftover"])
def test_exactly_tiled_stochastic_inference_backward(shape, kernel, tiled, dtype,
                                                     monkeypatch):
    """Stochastic inference backward for exactly tiling windows (``infer_backward_
    tiled``): the ring kernel's bits, with all-zero windows (no gradient), signed
    zeros, subnormal sums and a zero gradient; invalid input still raises."""
    from fastpool import _params
    from fastpool.cpu import pooling as cpu_pooling
    made = _spy_on_factory(monkeypatch, "stochastic_infer_backward_tiled")
    rank = len(shape) - 2
    rng = np.random.default_rng(37)
    x = rng.random(shape).astype(dtype)
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, flat.size // 5, replace=False)
    flat[picks[0::3]] = 0.0
    flat[picks[1::3]] = -0.0
    flat[picks[2::3]] = np.finfo(dtype).smallest_subnormal
    x[..., :kernel if np.isscalar(kernel) else kernel[-1]] = 0.0  # whole windows of 0
    window = _params.pool_window(x, rank, kernel, None, 0, 1, False)[1]
    g = rng.standard_normal(window.output_shape).astype(dtype)
    g.reshape(-1)[::7] = -0.0
    key = "stochastic_infer_backward_tiled"
    window._derived.pop(key, None)
    backward = OPS[rank]["stochastic_backward"]
    got = backward(g, x, kernel, training=False)
    assert bool(made) == tiled
    monkeypatch.setattr(cpu_pooling, "_tiled_launch", lambda *op: (lambda w: False))
    window._derived.pop(key, None)
    want = backward(g, x, kernel, training=False)
    assert np.array_equal(_bits(got), _bits(want))
    monkeypatch.undo()
    window._derived.pop(key, None)
    if dtype != np.float16:  # the reference's S1**2 underflows on subnormal sums
        clean = np.where(x == np.finfo(dtype).smallest_subnormal, 0.5, x).astype(dtype)
        assert_close(backward(g, clean, kernel, training=False),
                     ref.stochastic_pool_backward(g, clean, kernel, training=False), dtype)
    for bad in (-1.0, np.nan, np.inf):
        x_bad = x.copy()
        x_bad.reshape(-1)[x.size // 2] = bad
        with pytest.raises(ValueError):
            backward(g, x_bad, kernel, training=False)


def test_exactly_tiled_stochastic_inference_backward_bfloat16_unbatched(monkeypatch):
    """The tiled stochastic inference backward on an unbatched bfloat16 input with a
    strided gradient holding +0.0 and -0.0: the ring kernel's bits."""
    from fastpool.cpu import pooling as cpu_pooling
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from fastpool import _params
    made = _spy_on_factory(monkeypatch, "stochastic_infer_backward_tiled")
    rng = np.random.default_rng(41)
    x = rng.random((5, 12, 18)).astype(ml_dtypes.bfloat16)
    x[:, :3, :3] = 0.0  # a window of zeros in every plane
    g = rng.standard_normal((5, 8, 6)).astype(ml_dtypes.bfloat16)[:, ::2, :]
    g[:, 0, ::2] = 0.0
    g[:, 1, ::3] = -0.0
    window = _params.pool_window(x, 2, 3, None, 0, 1, False)[1]
    key = "stochastic_infer_backward_tiled"
    window._derived.pop(key, None)
    got = fastpool.stochastic_pool2d_backward(g, x, 3, training=False)
    assert made
    monkeypatch.setattr(cpu_pooling, "_tiled_launch", lambda *op: (lambda w: False))
    window._derived.pop(key, None)
    want = fastpool.stochastic_pool2d_backward(g, x, 3, training=False)
    assert got.dtype == want.dtype == x.dtype and got.shape == x.shape
    assert np.array_equal(_bits(got), _bits(want))
    window._derived.pop(key, None)


@pytest.mark.skipif(sys.platform != "linux", reason="guard pages through mprotect")
def test_max2x2_rows_read_and_write_nothing_outside_the_rows():
    """The 2x2 max rows' vector code (``_pool_pairs``) on inputs and outputs flush
    against inaccessible pages (``guard_pages.py``, in a child process: an access past
    either end is a segmentation fault that fails this test), rows of 1-17 and 28
    outputs, the values those of the four taps folded in NumPy."""
    import guard_pages
    from test_reliability import run_python
    out = run_python("import guard_pages; guard_pages.max2x2_rows()")
    assert out["mismatches"] == []
    assert out["calls"] == 18 * 2 * 2  # widths, dtypes, ends


@geometry_dtypes("shape, kernel, stride, padding, ceil_mode", [
    ((2, 3, 40, 37), 3, 2, 1, False),             # the ResNet stem's geometry
    ((1, 2, 33, 35), 3, 1, 1, False),
    ((2, 3, 34, 41), 5, 2, 2, False),
    ((1, 3, 35, 36), 3, 2, 0, True),              # a last window hanging over
    ((2, 2, 36, 40), (3, 5), (2, 3), (1, 2), False),
    ((1, 2, 37, 33), 4, 3, 1, True),
    ((2, 2, 5, 33, 34), (1, 3, 3), (2, 2, 2), (0, 1, 1), False)],  # 3-D, one slab deep
    ids=["stem", "3x3s1", "5x5s2", "ceil", "rect", "4x4s3-ceil", "3-D-flat"])
def test_max_forward_sharing_row_maxima(shape, kernel, stride, padding, ceil_mode, dtype):
    """Max pooling without indices over windows whose rows overlap takes each input
    row's maxima once and shares them between output rows (``pool_max.shares_rows``):
    the values of the call with indices (the row-major walk over each window) bit for
    bit, with NaNs (the first one wins), ties, infinities and signed zeros, and the
    reference's. (Planes of at least 32 columns and 3 channels: no channels-last
    detour.)"""
    from fastpool import _params
    from fastpool.cpu import pool_max
    rank = len(shape) - 2
    window = _params.pool_window(np.zeros(shape, dtype), rank, kernel, stride, padding, 1,
                                 ceil_mode)[1]
    assert pool_max.shares_rows(window.kernel3[0], window.kernel3[1], window.stride3[1],
                                window.stride3[2], 1, 1, False)
    assert not pool_max.shares_rows(window.kernel3[0], window.kernel3[1],
                                    window.stride3[1], window.stride3[2], 1, 1, True)
    rng = np.random.default_rng(37)
    x = rng.integers(-3, 3, shape).astype(dtype)  # many ties
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, flat.size // 10, replace=False)
    # NaNs with distinct payloads and signs: which NaN wins shows in the bits
    nans = picks[0::4]
    bits = flat.view(np.dtype(f"u{flat.itemsize}"))
    quiet = np.array(np.nan, dtype).view(bits.dtype)
    bits[nans] = quiet | (np.arange(1, nans.size + 1) % (1 << 6)).astype(bits.dtype)
    bits[nans[::2]] |= np.array(1 << (8 * flat.itemsize - 1)).astype(bits.dtype)
    assert np.isnan(flat[nans]).all()
    flat[picks[1::4]] = -np.inf
    flat[picks[2::4]] = np.inf
    flat[picks[3::4]] = -0.0
    args = (kernel, stride, padding)
    got = OPS[rank]["max"](x, *args, ceil_mode=ceil_mode)
    want, _ = OPS[rank]["max"](x, *args, ceil_mode=ceil_mode, return_indices=True)
    assert np.array_equal(_bits(got), _bits(want))
    np.testing.assert_array_equal(
        got, ref.max_pool(x, *args, ceil_mode=ceil_mode)[0].astype(dtype))


def _chosen_and_forced(window, key, forced, call):
    """``(kernel, got, want)``: the kernel ``window``'s memo holds under ``key`` after
    ``call()`` chose it afresh (``got``), and ``call()`` again with ``forced`` (the
    kernel it replaces) in its place (``want``); the memo is cleared after."""
    window._derived.pop(key, None)
    got = call()
    chosen = window._derived[key]
    window._derived[key] = forced
    try:
        want = call()
    finally:
        window._derived.pop(key)
    return chosen, got, want


@geometry_dtypes("shape, kernel, padding, ceil_mode, flat", [
    ((2, 5, 14, 14), 3, 1, False, True), ((3, 4, 9, 11), (2, 4), (1, 2), True, True),
    ((2, 3, 17), 5, 2, False, True), ((2, 3, 4, 6, 7), (1, 3, 2), (0, 1, 1), True, True),
    ((1, 2, 200, 200), 3, 1, False, False), ((2, 3, 5, 6, 7), 2, 1, False, False)],
    ids=["3x3", "2x4-ceil", "1-D", "3-D-flat", "large-plane", "3-D-deep"])
@pytest.mark.parametrize("count_include_pad, divisor", [(True, None), (False, None),
                                                        (True, 5)])
def test_flat_avg_backward(shape, kernel, padding, ceil_mode, flat, count_include_pad,
                           divisor, dtype):
    """Stride-1 average backward on small planes runs whole-plane loops
    (``avg_backward_flat``): bit for bit the ring kernel's values (signed zeros,
    infinities and NaN included) and the reference's; larger planes and depth kernels
    keep the ring kernel."""
    from fastpool import _params
    from fastpool.cpu import pooling as cpu_pooling
    rank = len(shape) - 2
    rng = np.random.default_rng(31)
    x = rng.standard_normal(shape).astype(dtype)
    args = dict(kernel_size=kernel, stride=1, padding=padding, ceil_mode=ceil_mode,
                count_include_pad=count_include_pad, divisor_override=divisor)
    g = rng.standard_normal(OPS[rank]["avg"](x, **args).shape).astype(dtype)
    g[..., 0] = -0.0
    g.reshape(-1)[[1, 7]] = [np.inf, np.nan]
    window = _params.pool_window(x, rank, kernel, 1, padding, 1, ceil_mode)[1]
    chosen, got, want = _chosen_and_forced(  # against the ring kernel
        window, "avg_backward", "avg_backward",
        lambda: OPS[rank]["avg_backward"](g, x, **args))
    assert (chosen == "avg_backward_flat") == flat
    assert np.array_equal(_bits(got), _bits(want))
    if dtype != np.float16:
        finite = np.nan_to_num(g, nan=0.0, posinf=0.0)
        assert_close(OPS[rank]["avg_backward"](finite, x, **args),
                     ref.avg_pool_backward(finite, x, **args), dtype)


@geometry_dtypes("shape, kernel, padding, dilation, flat", [
    ((2, 5, 14, 14), 3, 1, 1, True), ((3, 4, 9, 11), (2, 4), (1, 2), 1, True),
    ((2, 3, 17), 5, 2, 1, True), ((2, 3, 4, 6, 7), (1, 3, 2), (0, 1, 1), 1, True),
    ((1, 2, 200, 200), 3, 1, 1, False), ((2, 3, 9, 9), 3, 1, 2, False),
    ((2, 3, 5, 6, 7), 2, 1, 1, False)],
    ids=["3x3", "2x4", "1-D", "3-D-flat", "large-plane", "dilated", "3-D-deep"])
def test_flat_stochastic_inference_forward(shape, kernel, padding, dilation, flat,
                                           dtype):
    """Stride-1 stochastic inference on small planes runs whole-plane loops
    (``infer_forward_flat``): bit for bit the row kernel's values (zeros and
    all-zero windows included) and the reference's; invalid input (negative,
    infinite, NaN, in the last element: an edge window) raises on both; larger planes,
    dilation and depth kernels keep the row kernel."""
    from fastpool import _params
    rank = len(shape) - 2
    rng = np.random.default_rng(37)
    x = rng.random(shape).astype(dtype)
    x[..., :2] = 0.0
    x[..., 0] = -0.0
    args = dict(kernel_size=kernel, stride=1, padding=padding, dilation=dilation,
                training=False)
    window = _params.pool_window(x, rank, kernel, 1, padding, dilation, False)[1]
    window._derived.pop("stochastic_infer_forward", None)
    got = OPS[rank]["stochastic"](x, **args)
    large, huge = x.copy(), {}
    large.reshape(-1)[-1] = 1e200
    assert (window._derived["stochastic_infer_forward"]
            == "stochastic_infer_forward_flat") == flat
    try:
        for op in ("stochastic_infer_forward_flat", "stochastic_infer_forward"):
            if op.endswith("flat") and not flat:
                continue
            window._derived["stochastic_infer_forward"] = op
            if not op.endswith("flat"):
                want = OPS[rank]["stochastic"](x, **args)
            for bad in [-1.0, np.inf, np.nan]:
                y = x.copy()
                y.reshape(-1)[-1] = bad
                with pytest.raises(ValueError):
                    OPS[rank]["stochastic"](y, **args)
            if dtype == np.float64:  # finite, though its square overflows: no error
                huge[op] = OPS[rank]["stochastic"](large, **args)
    finally:
        window._derived.pop("stochastic_infer_forward")
    assert np.array_equal(_bits(got), _bits(want))
    if dtype != np.float16:
        assert_close(got, ref.stochastic_pool(x, **args)[0], dtype)
    if huge:
        assert all(np.array_equal(_bits(h), _bits(huge[op])) for h in huge.values())
        np.testing.assert_allclose(huge[op], ref.stochastic_pool(large, **args)[0],
                                   rtol=1e-12)


@geometry_dtypes("shape, kernel, divisor, tiled", [
    ((4, 6, 28, 28), 2, None, True), ((2, 3, 9, 12), 3, None, True),
    ((3, 4, 10), 5, 3, True), ((2, 3, 4, 6, 8), (1, 2, 4), None, True),
    ((2, 3, 4, 6, 8), (2, 2, 2), None, False), ((2, 3, 9, 11), 2, None, False)],
    ids=["2x2", "3x3", "1-D-divisor", "3-D-flat", "3-D-deep", "leftover"])
def test_exactly_tiled_avg_backward(shape, kernel, divisor, tiled, dtype):
    """Channels-first average backward over windows that tile the input exactly
    (stride = kernel, no padding, no leftover, depth kernel 1) writes each window's
    share to its elements (``avg_backward_tiled``): the ring kernel's bits, signed
    zeros, infinities and NaN included, and the reference's values; other geometries
    keep the ring kernel."""
    from fastpool import _params
    rank = len(shape) - 2
    rng = np.random.default_rng(41)
    x = rng.standard_normal(shape).astype(dtype)
    args = dict(kernel_size=kernel, divisor_override=divisor)
    g = rng.standard_normal(OPS[rank]["avg"](x, **args).shape).astype(dtype)
    g[..., 0] = -0.0
    g.reshape(-1)[[1, 5]] = [np.inf, np.nan]
    window = _params.pool_window(x, rank, kernel, None, 0, 1, False)[1]
    chosen, got, want = _chosen_and_forced(  # False: the ring kernel
        window, "avg_backward_tiled", False,
        lambda: OPS[rank]["avg_backward"](g, x, **args))
    assert bool(chosen) == tiled
    assert np.array_equal(_bits(got), _bits(want))
    if dtype != np.float16:
        finite = np.nan_to_num(g, nan=0.0, posinf=0.0)
        assert_close(OPS[rank]["avg_backward"](finite, x, **args),
                     ref.avg_pool_backward(finite, x, **args), dtype)


@geometry_dtypes("shape, kernel, padding, flat", [
    ((2, 5, 14, 14), 3, 1, True), ((3, 4, 9, 11), (2, 4), (1, 2), True),
    ((2, 3, 17), 5, 2, True), ((2, 3, 4, 6, 7), (1, 3, 2), (0, 1, 1), True),
    ((1, 2, 150, 150), 3, 1, False), ((2, 3, 5, 6, 7), 2, 1, False)],
    ids=["3x3", "2x4", "1-D", "3-D-flat", "large-plane", "3-D-deep"])
def test_flat_stochastic_inference_backward(shape, kernel, padding, flat, dtype):
    """Stride-1 stochastic inference backward on small planes runs whole-plane loops
    (``infer_backward_flat``): bit for bit the ring kernel's values (zeros, an
    all-zero plane, signed zeros and infinite gradients included) and the
    reference's; invalid input raises on both; larger planes and depth kernels keep
    the ring kernel."""
    from fastpool import _params
    rank = len(shape) - 2
    rng = np.random.default_rng(43)
    x = rng.random(shape).astype(dtype)
    x[..., :2] = 0.0
    x[..., 0] = -0.0
    x[-1, -1] = 0.0
    args = dict(kernel_size=kernel, stride=1, padding=padding, training=False)
    g = rng.standard_normal(OPS[rank]["stochastic"](x, **args).shape).astype(dtype)
    g.reshape(-1)[:2] = [-0.0, np.inf]
    backward = OPS[rank]["stochastic_backward"]
    window = _params.pool_window(x, rank, kernel, 1, padding, 1, False)[1]
    window._derived.pop("stochastic_infer_backward", None)
    got = backward(g, x, **args)
    assert (window._derived["stochastic_infer_backward"]
            == "stochastic_infer_backward_flat") == flat
    large, huge = x.copy(), {}
    large.reshape(-1)[-1] = 1e200  # finite, though its square overflows: no error
    finite = np.where(np.isinf(g), 0, g).astype(dtype)
    try:
        for op in ("stochastic_infer_backward_flat", "stochastic_infer_backward"):
            if op.endswith("flat") and not flat:
                continue
            window._derived["stochastic_infer_backward"] = op
            if not op.endswith("flat"):
                want = backward(g, x, **args)
            for bad in [-1.0, np.inf, np.nan]:
                y = x.copy()
                y.reshape(-1)[-1] = bad
                with pytest.raises(ValueError):
                    backward(g, y, **args)
            if dtype == np.float64:
                huge[op] = backward(finite, large, **args)
    finally:
        window._derived.pop("stochastic_infer_backward")
    assert np.array_equal(_bits(got), _bits(want))
    if dtype != np.float16:
        assert_close(backward(finite, x, **args),
                     ref.stochastic_pool_backward(finite, x, **args), dtype)
    if huge:
        assert all(np.array_equal(_bits(h), _bits(huge[op])) for h in huge.values())
        assert_close(huge[op], ref.stochastic_pool_backward(finite, large, **args), dtype)


@geometry_dtypes("shape, kernel, padding, dilation, flat", [
    ((2, 3, 14, 14), 3, 1, 1, True), ((2, 3, 9, 12), (2, 4), (1, 2), 1, True),
    ((2, 3, 17), 5, 2, 1, True), ((2, 3, 4, 6, 7), (1, 3, 2), (0, 1, 1), 1, True),
    ((1, 2, 5, 5), 5, 2, 1, True), ((1, 2, 200, 200), 3, 1, 1, False),
    ((2, 3, 9, 9), 3, 1, 2, False)],
    ids=["3x3", "2x4", "1-D", "3-D-flat", "all-edge", "large-plane", "dilated"])
def test_flat_stochastic_training_forward(shape, kernel, padding, dilation, flat, dtype):
    """Stride-1 stochastic training on small planes runs whole-plane loops
    (``train_forward_flat``): the row kernel's picks and indices bit for bit, with and
    without indices, for several seeds, over inputs with zeros, negative zeros,
    all-zero windows (edge windows write +0, interior ones their first element) and
    tiny elements; the reference's values and indices; invalid input raises; larger
    planes and dilation keep the row kernel."""
    from fastpool import _params
    rank = len(shape) - 2
    rng = np.random.default_rng(53)
    x = rng.random(shape).astype(dtype)
    x[rng.random(shape) < 0.3] = 0.0
    x[rng.random(shape) < 0.2] = -0.0
    x[rng.random(shape) < 0.1] = 1e-30 if dtype != np.float16 else 6e-8
    x[0, 0] = -0.0  # all-zero windows everywhere in one plane
    args = dict(kernel_size=kernel, stride=1, padding=padding, dilation=dilation,
                training=True)
    pool = OPS[rank]["stochastic"]
    window = _params.pool_window(x, rank, kernel, 1, padding, dilation, False)[1]
    for seed in (0, 11, 2**40 + 3):
        for indices in (False, True):
            chosen, got, want = _chosen_and_forced(
                window, "stochastic_train_forward", "stochastic_train",
                lambda: pool(x, **args, seed=seed, return_indices=indices))
            assert (chosen == "stochastic_train_flat") == flat
            got, want = (got, want) if indices else ((got, None), (want, None))
            assert np.array_equal(_bits(got[0]), _bits(want[0]))
            if indices:
                assert np.array_equal(got[1], want[1])
    y, where = ref.stochastic_pool(x, **args, seed=2**40 + 3)
    np.testing.assert_array_equal(got[1], where)
    np.testing.assert_array_equal(got[0].astype(np.float64), y)
    if dtype == np.float64:
        # Sums of a few subnormals: u * S rounds up to S for u near 1, no running sum
        # passes the threshold, and each window falls back to its own rule's element.
        tiny = rng.integers(0, 3, shape) * 5e-324
        chosen, got, want = _chosen_and_forced(
            window, "stochastic_train_forward", "stochastic_train",
            lambda: pool(tiny, **args, seed=7, return_indices=True))
        assert np.array_equal(got[1], want[1]) and np.array_equal(_bits(got[0]),
                                                                  _bits(want[0]))
    for bad in [-1.0, np.inf, np.nan] + ([1e308] if dtype == np.float64 else []):
        z = x.copy()
        z.reshape(-1)[-1] = bad
        if bad == 1e308:
            z.reshape(-1)[-1 - dilation] = 1e308  # the sum of a window overflows
        with pytest.raises(ValueError):
            pool(z, **args, seed=1)


@pytest.mark.parametrize("first", [-1.0, -np.inf, np.nan])
def test_flat_stochastic_training_picks_only_real_elements_of_invalid_input(first):
    """On invalid input the call raises, but the kernel runs first: an edge window
    whose sum is not positive must still pick one of its real elements (as the row
    kernel does), never a border tap, whose index would lie outside the plane and whose
    value would be read from before it. The flat kernel run directly, its indices and
    flags inspected."""
    from fastpool import _params, _rng
    from fastpool.cpu import pooling as P
    x = np.zeros((2, 3, 6, 7))
    x[:, :, 0, 0] = first  # window (0, 0): one real element of a non-positive sum
    window = _params.pool_window(x, 2, 3, 1, 1, 1, False)[1]
    assert P._stochastic_train_op(window) == "stochastic_train_flat"
    out = np.full(window.output_shape, 7.0)
    indices = np.full(window.output_shape, -5, np.int64)
    invalid = np.zeros(window.planes * 6, np.bool_)
    lo, hi = P.interior_columns(window)
    P.kernel("stochastic_train_flat", window, True)(
        P._volumes(x, window.in3), out.reshape((-1,) + window.out3),
        indices.reshape((-1,) + window.out3), *P._pads(window),
        _rng.kernel_key_array(3, window.out3[1]), window.channels, invalid, lo, hi, 2)
    assert invalid.any()
    assert indices.min() >= 0 and indices.max() < 6 * 7
    # every window here sums to zero or less, so each keeps its first real element
    assert indices[0, 0, 0, 0] == 0 and indices[0, 0, 1, 1] == 0
    with pytest.raises(ValueError):
        fastpool.stochastic_pool2d(x, 3, 1, 1, seed=3)


def test_flat_stochastic_inference_checks_only_real_windows():
    """The flat forward also sums positions past a row's last window (taps of one
    row's right edge and the next row's left edge); an overflow there is not the
    input's fault: 1.2e154 at the end of row 0 and the start of row 1 share no real
    3x3 window (each window's S2 stays below the float64 maximum) but do share such a
    position. Same result as the row kernel, no error."""
    from fastpool import _params
    x = np.random.default_rng(47).random((1, 1, 4, 5))
    x[0, 0, 0, 4] = x[0, 0, 1, 0] = 1.2e154
    window = _params.pool_window(x, 2, 3, 1, 0, 1, False)[1]
    chosen, got, want = _chosen_and_forced(
        window, "stochastic_infer_forward", "stochastic_infer_forward",
        lambda: fastpool.stochastic_pool2d(x, 3, 1, 0, training=False))
    assert chosen == "stochastic_infer_forward_flat"
    assert np.array_equal(_bits(got), _bits(want))
    assert_close(got, ref.stochastic_pool(x, 3, 1, 0, training=False)[0], np.float64)
    g = np.ones_like(got)  # the flat backward masks those positions too
    chosen, got, want = _chosen_and_forced(
        window, "stochastic_infer_backward", "stochastic_infer_backward",
        lambda: fastpool.stochastic_pool2d_backward(g, x, 3, 1, 0, training=False))
    assert chosen == "stochastic_infer_backward_flat"
    assert np.array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((1, 2, 4, 4), 2, 2, 0), ((1, 2, 4, 4), 3, 1, 1)], ids=["tiled", "flat"])
@pytest.mark.parametrize("divisor", [2**24 + 1, -(2**40 + 3)])
def test_avg_backward_divisor_beyond_float32(shape, kernel, stride, padding, divisor,
                                             dtype):
    """A divisor_override that float32 cannot hold (above 2**24) gives the ring
    kernel's bits on the tiled and flat geometries too (the ring kernel divides in
    float64 and rounds once; 2**24 + 1 in float32 would round the divisor first):
    found on review."""
    from fastpool import _params
    x = np.zeros(shape, dtype)
    args = dict(kernel_size=kernel, stride=stride, padding=padding,
                divisor_override=divisor)
    g = np.ones(OPS[2]["avg"](x, **args).shape, dtype)
    got = OPS[2]["avg_backward"](g, x, **args)
    window = _params.pool_window(x, 2, kernel, stride, padding, 1, False)[1]
    window._derived["avg_backward_tiled"] = False
    window._derived["avg_backward"] = "avg_backward"  # the ring kernel
    try:
        want = OPS[2]["avg_backward"](g, x, **args)
    finally:
        window._derived.pop("avg_backward_tiled")
        window._derived.pop("avg_backward")
    assert np.array_equal(_bits(got), _bits(want))
    if dtype == np.float32:  # the share is g / divisor rounded once
        assert got.reshape(-1)[0] == np.float32(1.0 / divisor) or padding


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("divisor", [None, 3, -3, 7, 2**24 + 1, -(2**25 + 3)])
@pytest.mark.parametrize("args", [dict(kernel_size=2), dict(kernel_size=3, stride=2,
                                                           padding=1,
                                                           count_include_pad=False)],
                         ids=["tiled", "padded"])
def test_channels_last_avg_backward_divides_as_channels_first(dtype, divisor, args):
    """The channels-last average backward divides each window's gradient in the dtype
    computed in where the divisor is exact there (every divisor here but 2**24 + 1 and
    -(2**25 + 3), divided in float64): byte for byte the channels-first gradient."""
    x = np.random.default_rng(31).standard_normal((3, 5, 9, 10)).astype(dtype)
    g = np.random.default_rng(37).standard_normal(
        fastpool.avg_pool2d(x, **args).shape).astype(dtype) * 7
    want = fastpool.avg_pool2d_backward(g, x, **args, divisor_override=divisor)
    got = fastpool.avg_pool2d_backward(channels_last(g), channels_last(x), **args,
                                       divisor_override=divisor)
    assert np.array_equal(_bits(got), _bits(want))
