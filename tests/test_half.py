"""Half precision: float16 and bfloat16 (``ml_dtypes``) NumPy arrays and torch tensors.

fastpool computes them in float32 and rounds each result once to the input's dtype
(docs/design.md section 3): every function is checked for exactly that (the float32
call on the widened arrays, rounded; the pooling kernels that read 16-bit arrays
themselves in every rank and layout, and that they allocate no float32 copy), against the float64 references within the
half-precision tolerances, against ``torch.nn.functional`` in the same dtype, and
under ``torch.autocast`` against the dtype PyTorch's own op gives.
"""

import copy

import numpy as np
import pytest

import fastpool
import reference as ref
from conftest import assert_close, ml_dtypes

HALF = [np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes is not None else [])
HALF_IDS = [np.dtype(d).name for d in HALF]

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 7, 6))
    return dict(x=x, xp=rng.random((2, 3, 7, 6)) + 0.1,
                w=rng.standard_normal((4, 3, 3, 3)) / 3, b=rng.standard_normal(4),
                wt=rng.standard_normal((3, 2, 2, 2)) / 3,
                g_pool=rng.standard_normal((2, 3, 4, 3)),
                g_conv=rng.standard_normal((2, 4, 7, 6)),
                x1=rng.standard_normal((2, 3, 9)), x3=rng.standard_normal((1, 2, 5, 6, 5)))


def _calls(a):
    """Every kind of function on the arrays ``a`` (all of one dtype): name -> result."""
    x, xp, g = a["x"], a["xp"], a["g_pool"]
    y, i = fastpool.max_pool2d(x, 3, 2, 1, return_indices=True)
    up = fastpool.max_unpool2d(y, i, 3, 2, 1, output_size=(7, 6))
    s, picks = fastpool.stochastic_pool2d(xp, 3, 2, 1, seed=5, return_indices=True)
    return {
        "max": y, "max_indices": i,
        "max_backward": fastpool.max_pool2d_backward(g, x, 3, 2, 1, indices=i),
        "avg": fastpool.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
        "avg_backward": fastpool.avg_pool2d_backward(g, x, 3, 2, 1),
        "stochastic": s, "picks": picks,
        "stochastic_inference": fastpool.stochastic_pool2d(xp, 3, 2, 1, training=False),
        "stochastic_backward": fastpool.stochastic_pool2d_backward(
            g, xp, 3, 2, 1, training=False),
        "adaptive_avg": fastpool.adaptive_avg_pool2d(x, (4, 3)),
        "adaptive_max": fastpool.adaptive_max_pool2d(x, (4, 3)),
        "adaptive_avg_backward": fastpool.adaptive_avg_pool2d_backward(g, x, (4, 3)),
        "unpool": up,
        "conv": fastpool.conv2d(x, a["w"], a["b"], padding=1),
        "conv_backward": fastpool.conv2d_backward(a["g_conv"], x, a["w"], padding=1),
        "conv_transpose": fastpool.conv_transpose2d(x, a["wt"], stride=2),
        "max1d": fastpool.max_pool1d(a["x1"], 3, 2),
        "avg3d": fastpool.avg_pool3d(a["x3"], 3, 2, 1),
        "conv1d": fastpool.conv1d(a["x1"], a["w"][:, :, 1], padding=1),
    }


def _cast(arrays, dtype):
    return {k: v.astype(dtype) for k, v in arrays.items()}


def _flat(result):
    return [r for r in result if r is not None] if isinstance(result, tuple) else [result]


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_half_is_float32_rounded_once(dtype):
    """Each function's half-precision result is its float32 result on the same
    (widened) values, rounded to the input's dtype; integer results are identical."""
    half = _cast(_data(), dtype)
    ours = _calls(half)
    wide = _calls(_cast(half, np.float32))
    for name, result in ours.items():
        for got, f32 in zip(_flat(result), _flat(wide[name])):
            if f32.dtype == np.float32:
                assert got.dtype == np.dtype(dtype), name
                np.testing.assert_array_equal(got, f32.astype(dtype), err_msg=name)
            else:
                assert got.dtype == f32.dtype, name
                np.testing.assert_array_equal(got, f32, err_msg=name)


def _pool_calls(x, g, rank):
    """Every pooling function the CPU computes in 16-bit arrays (``fastpool.cpu.
    HALF_NATIVE``), on ``x`` (positive) and ``g`` (its gradients): name -> result."""
    max_pool, avg_pool, stochastic_pool = (
        getattr(fastpool, f"{mode}_pool{rank}d") for mode in ("max", "avg", "stochastic"))
    back = {mode: getattr(fastpool, f"{mode}_pool{rank}d_backward")
            for mode in ("max", "avg", "stochastic")}
    y, i = max_pool(x, 3, 2, 1, return_indices=True)
    s, picks = stochastic_pool(x, 3, 2, 1, seed=11, return_indices=True)
    return {
        "max": y, "max_indices": i,
        "max_backward": back["max"](g, x, 3, 2, 1, indices=i),
        "max_backward_recomputed": back["max"](g, x, 3, 2, 1),
        "max_k2s2": max_pool(x, 2, 2),
        "avg": avg_pool(x, 3, 2, 1, count_include_pad=False),
        "avg_override": avg_pool(x, 3, 2, 1, divisor_override=7),
        "avg_backward": back["avg"](g, x, 3, 2, 1),
        "stochastic": s, "picks": picks,
        "stochastic_inference": stochastic_pool(x, 3, 2, 1, training=False),
        "stochastic_backward": back["stochastic"](g, x, 3, 2, 1, indices=picks),
        "stochastic_inference_backward": back["stochastic"](g, x, 3, 2, 1,
                                                            training=False),
    }


def _channels_last(a):
    """``a`` (N, C, *spatial) with channels-last strides (same values)."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


# Each case compiles a dozen kernels, so: channels-last 2-D, and 3-D (whose depth
# loops and plane gathers 1-D and 2-D skip) in both layouts, the dtypes alternating.
# 2-D channels-first is test_half_is_float32_rounded_once's (both dtypes, with a 1-D
# max pooling); the conversions themselves are checked exhaustively below.
NATIVE_CASES = [(HALF[0], 2, "channels_last"), (HALF[-1], 3, "channels_first"),
                (HALF[0], 3, "channels_last")]


@pytest.mark.parametrize("dtype, rank, layout", NATIVE_CASES,
                         ids=[f"{np.dtype(d).name}-{r}d-{lay}" for d, r, lay in NATIVE_CASES])
def test_native_half_pooling_is_float32_rounded_once(dtype, rank, layout):
    """The pooling kernels that read and write float16/bfloat16 themselves give the
    float32 call's result rounded once, bit for bit, in every rank and layout (both
    layouts run their own kernels), with infinities and a NaN among the inputs of max
    pooling."""
    rng = np.random.default_rng(20 + rank)
    shape = {1: (2, 3, 11), 2: (2, 3, 7, 6), 3: (1, 2, 5, 6, 5)}[rank]
    x = (rng.random(shape) + 0.05).astype(dtype)
    g = rng.standard_normal(shape[:2] + tuple((n + 2 - 3) // 2 + 1 for n in shape[2:]))
    g = g.astype(dtype)
    special = x.copy()
    special.reshape(-1)[[1, 4, 9]] = [np.inf, -np.inf, np.nan]
    if layout == "channels_last":
        x, g, special = _channels_last(x), _channels_last(g), _channels_last(special)
    ours = _pool_calls(x, g, rank)
    ours["max_special"] = getattr(fastpool, f"max_pool{rank}d")(special, 3, 2, 1)
    wide = _pool_calls(x.astype(np.float32), g.astype(np.float32), rank)
    wide["max_special"] = getattr(fastpool, f"max_pool{rank}d")(
        special.astype(np.float32), 3, 2, 1)
    for name, got in ours.items():
        f32 = wide[name]
        if f32.dtype == np.float32:
            assert got.dtype == np.dtype(dtype), name
            np.testing.assert_array_equal(got, f32.astype(dtype), err_msg=name)
            assert got.strides == np.empty_like(f32, dtype=dtype).strides, name
        else:
            np.testing.assert_array_equal(got, f32, err_msg=name)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_kernel_conversions_round_to_nearest_even(dtype):
    """``wide`` and ``narrow`` (the kernels' loads and stores of 16-bit values) against
    NumPy's and ml_dtypes' casts: every one of the 65536 bit patterns widened, and
    float32 values of every bit pattern class (random bits: normals, subnormals,
    overflow, NaN) and float64 values rounded."""
    from numba import njit

    from fastpool.cpu._half_bits import bits, narrow, wide

    @njit
    def widen(a, out):
        for k in range(a.size):
            out[k] = wide(a[k])

    @njit
    def round_into(v, out):
        for k in range(v.size):
            out[k] = narrow(v[k], out)

    every = np.arange(1 << 16, dtype=np.uint16).view(dtype)
    out = np.empty(every.size, np.float32)
    widen(bits(every), out)
    np.testing.assert_array_equal(out, every.astype(np.float32))
    rng = np.random.default_rng(3)
    for values in (rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint32).view(np.float32),
                   rng.standard_normal(1 << 16) * 1e3):
        got = bits(np.empty(values.size, dtype))
        round_into(values, got)
        with np.errstate(over="ignore", invalid="ignore"):
            expected = values.astype(np.float32).astype(dtype)
        nan = np.isnan(expected.astype(np.float32))
        np.testing.assert_array_equal(got[~nan], bits(expected)[~nan])
        assert np.isnan(got.view(dtype)[nan].astype(np.float32)).all()


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_native_half_pooling_moves_16_bit_values(dtype):
    """Pooling a half-precision array allocates no float32 copy of it: the largest
    allocation during a call stays below the size of the input itself (a float32 copy
    would be twice that)."""
    import tracemalloc
    rng = np.random.default_rng(7)
    x = (rng.random((4, 16, 64, 64)) + 0.1).astype(dtype)
    y, i = fastpool.max_pool2d(x, 3, 2, 1, return_indices=True)
    g = np.ones_like(y)
    calls = {
        "max": lambda: fastpool.max_pool2d(x, 3, 2, 1),
        "avg": lambda: fastpool.avg_pool2d(x, 3, 2, 1),
        "stochastic": lambda: fastpool.stochastic_pool2d(x, 3, 2, 1, training=False),
        "max_backward": lambda: fastpool.max_pool2d_backward(g, x, 3, 2, 1, indices=i),
        "avg_backward": lambda: fastpool.avg_pool2d_backward(g, x, 3, 2, 1),
    }
    for name, call in calls.items():
        call()  # compiled and loaded before measuring
        tracemalloc.start()
        try:
            result = call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert result.dtype == np.dtype(dtype), name
        # the result itself (input-sized for the backwards) plus small scratch
        assert peak < result.nbytes + x.nbytes // 4, (name, peak, x.nbytes)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_half_against_the_references(dtype):
    a = _data(1)
    half = _cast(a, dtype)
    x = half["x"].astype(np.float64)  # the values the half-precision call sees
    w = half["w"].astype(np.float64)
    y, i = fastpool.max_pool2d(half["x"], 3, 2, 1, return_indices=True)
    y_ref, i_ref = ref.max_pool(x, 3, 2, 1)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(y.astype(np.float64), y_ref)
    assert_close(fastpool.avg_pool2d(half["x"], 3, 2, 1).astype(np.float64),
                 ref.avg_pool(x, 3, 2, 1), dtype)
    conv = fastpool.conv2d(half["x"], half["w"], padding=1).astype(np.float64)
    expected = ref.conv(x, w, padding=1)
    bound = ref.conv(np.abs(x), np.abs(w), padding=1)
    # one rounding of a float32 sum: half an ulp of the bound, relative
    assert np.all(np.abs(conv - expected) <= TOL[np.dtype(dtype)] * bound)


TOL = {np.dtype(np.float16): 2**-11 * 1.01 + 1e-5}
if ml_dtypes is not None:
    TOL[np.dtype(ml_dtypes.bfloat16)] = 2**-8 * 1.01 + 1e-5


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_half_keeps_channels_last(dtype):
    x = _data()["x"].astype(dtype)
    nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    view = np.moveaxis(nhwc, -1, 1)
    y = fastpool.avg_pool2d(view, 2)
    assert y.dtype == np.dtype(dtype)
    assert np.moveaxis(y, 1, -1).flags.c_contiguous and not y.flags.c_contiguous
    np.testing.assert_array_equal(y, fastpool.avg_pool2d(x, 2))


def test_mixed_half_and_float32_raise():
    a = _data()
    with pytest.raises(TypeError, match="weight dtype float32 must match x dtype float16"):
        fastpool.conv2d(a["x"].astype(np.float16), a["w"].astype(np.float32))
    with pytest.raises(TypeError, match="grad_output dtype"):
        fastpool.max_pool2d_backward(a["g_pool"].astype(np.float32),
                                     a["x"].astype(np.float16), 3, 2, 1)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        fastpool.max_pool2d(a["x"].astype(np.int16), 2)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_half_on_the_gpu_path(layout):
    """Under the CUDA simulator (or on a GPU) float16 device arrays run the GPU kernels
    and come back in their dtype with the CPU's values bit for bit: max, average and
    stochastic pooling read and write float16 themselves (``fastpool.cuda.HALF_NATIVE``),
    the others (adaptive pooling here) through float32 copies."""
    from numba import cuda
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float16)
    x.reshape(-1)[[2, 5, 11]] = [np.nan, np.inf, -np.inf]
    xp = (rng.random((2, 3, 7, 6)) + 0.1).astype(np.float16)
    g = rng.standard_normal((2, 3, 4, 3)).astype(np.float16)
    if layout == "channels_last":
        x, xp, g = _channels_last(x), _channels_last(xp), _channels_last(g)
    _, i = fastpool.max_pool2d(x, 3, 2, 1, return_indices=True)
    calls = {
        "max": lambda d, **k: fastpool.max_pool2d(d(x), 3, 2, 1, return_indices=True,
                                                  **k),
        "max_backward": lambda d, **k: fastpool.max_pool2d_backward(
            d(g), d(x), 3, 2, 1, indices=d(i), **k),
        "avg": lambda d, **k: fastpool.avg_pool2d(d(x), 3, 2, 1, count_include_pad=False,
                                                  **k),
        "avg_override": lambda d, **k: fastpool.avg_pool2d(d(x), 3, 2, 1,
                                                           divisor_override=7, **k),
        "avg_backward": lambda d, **k: fastpool.avg_pool2d_backward(d(g), d(x), 3, 2, 1,
                                                                    **k),
        "stochastic": lambda d, **k: fastpool.stochastic_pool2d(
            d(xp), 3, 2, 1, seed=2, return_indices=True, **k),
        "stochastic_inference": lambda d, **k: fastpool.stochastic_pool2d(
            d(xp), 3, 2, 1, training=False, **k),
        "stochastic_backward": lambda d, **k: fastpool.stochastic_pool2d_backward(
            d(g), d(xp), 3, 2, 1, training=False, **k),
        "adaptive_avg": lambda d, **k: fastpool.adaptive_avg_pool2d(d(x), (4, 3), **k),
    }
    for name, call in calls.items():
        cpu = call(lambda a: a)
        # channels-first calls take device arrays; channels-last views go as host
        # arrays (the launcher moves them, keeping their strides)
        gpu = call(cuda.to_device if layout == "channels_first" else (lambda a: a),
                   device="cuda")
        for c, r in zip(_flat(cpu), _flat(gpu)):
            assert r.dtype == c.dtype, name
            r = r if isinstance(r, np.ndarray) else r.copy_to_host()
            assert r.strides == c.strides, name
            np.testing.assert_array_equal(r, c, err_msg=name)


# ----------------------------------------------------------------------------- torch

TORCH_HALF = ["float16", "bfloat16"]


def _torch_cases():
    """name -> (fastpool.torch call, torch.nn.functional call), each taking (x, w)."""
    import fastpool.torch as ft
    return {
        "conv2d": (lambda x, w: ft.conv2d(x, w, padding=1),
                   lambda x, w: F.conv2d(x, w, padding=1)),
        "conv_transpose2d": (lambda x, w: ft.conv_transpose2d(x, w[:3, :2], stride=2),
                             lambda x, w: F.conv_transpose2d(x, w[:3, :2], stride=2)),
        "max_pool2d": (lambda x, w: ft.max_pool2d(x, 3, 2, 1),
                       lambda x, w: F.max_pool2d(x, 3, 2, 1)),
        "avg_pool2d": (lambda x, w: ft.avg_pool2d(x, 3, 2, 1),
                       lambda x, w: F.avg_pool2d(x, 3, 2, 1)),
        "adaptive_avg_pool2d": (lambda x, w: ft.adaptive_avg_pool2d(x, (4, 3)),
                                lambda x, w: F.adaptive_avg_pool2d(x, (4, 3))),
        "adaptive_max_pool2d": (lambda x, w: ft.adaptive_max_pool2d(x, (4, 3)),
                                lambda x, w: F.adaptive_max_pool2d(x, (4, 3))),
    }


@needs_torch
@pytest.mark.usefixtures("one_numba_thread")
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", TORCH_HALF)
def test_torch_half_matches_pytorch(dtype, layout):
    """Forward and input/weight gradients in float16 and bfloat16 against PyTorch's
    own kernels in the same dtype (which also accumulate in float32)."""
    dtype = getattr(torch, dtype)
    a = _data(2)
    # Two ulps of the largest value: each side rounds its float32 sums once, and its
    # gradient sums the other side's differently rounded half-precision values.
    ulps = 2 * (2**-7 if dtype == torch.bfloat16 else 2**-10)

    def close(got, expected, name):
        scale = expected.double().abs().max()
        assert (got.double() - expected.double()).abs().max() <= ulps * scale, name

    for name, (ours, theirs) in _torch_cases().items():
        results = []
        for f in (ours, theirs):
            x = torch.tensor(a["x"], dtype=dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            w = torch.tensor(a["w"], dtype=dtype)
            x.requires_grad_(), w.requires_grad_()
            y = f(x, w)
            y.float().pow(2).sum().backward()
            results.append((y, x.grad, w.grad))
        (y, gx, gw), (ty, tgx, tgw) = results
        assert y.dtype == dtype and gx.dtype == dtype, name
        close(y, ty, name)
        close(gx, tgx, name)
        if tgw is not None:
            close(gw, tgw, name)
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last), name


def _autocast_pairs():
    """(name, fastpool.torch call, the PyTorch op whose autocast dtype it follows) for
    every forward op family and rank; stochastic pooling follows max pooling."""
    import fastpool.torch as ft
    pairs = []
    for r in (1, 2, 3):
        w = torch.ones((2, 2) + (2,) * r)
        pool = dict(kernel_size=3, stride=2, padding=1)

        def fp(name):
            return getattr(ft, name.format(r=r))

        def tf(name):
            return getattr(F, name.format(r=r))

        unpool = lambda f, p, r=r: (  # noqa: E731
            lambda x: f(*p(x, 2, return_indices=True), 2))
        pairs += [
            (f"conv{r}d", lambda x, f=fp("conv{r}d"), w=w: f(x, w.to(x.dtype)),
             lambda x, f=tf("conv{r}d"), w=w: f(x, w.to(x.dtype))),
            (f"conv_transpose{r}d",
             lambda x, f=fp("conv_transpose{r}d"), w=w: f(x, w.to(x.dtype)),
             lambda x, f=tf("conv_transpose{r}d"), w=w: f(x, w.to(x.dtype))),
            (f"max_pool{r}d", lambda x, f=fp("max_pool{r}d"): f(x, **pool),
             lambda x, f=tf("max_pool{r}d"): f(x, **pool)),
            (f"avg_pool{r}d", lambda x, f=fp("avg_pool{r}d"): f(x, **pool),
             lambda x, f=tf("avg_pool{r}d"): f(x, **pool)),
            (f"stochastic_pool{r}d",
             lambda x, f=fp("stochastic_pool{r}d"): f(x.abs(), **pool, seed=1),
             lambda x, f=tf("max_pool{r}d"): f(x, **pool)),
            (f"adaptive_avg_pool{r}d", lambda x, f=fp("adaptive_avg_pool{r}d"): f(x, 2),
             lambda x, f=tf("adaptive_avg_pool{r}d"): f(x, 2)),
            (f"adaptive_max_pool{r}d", lambda x, f=fp("adaptive_max_pool{r}d"): f(x, 2),
             lambda x, f=tf("adaptive_max_pool{r}d"): f(x, 2)),
            (f"adaptive_stochastic_pool{r}d",
             lambda x, f=fp("adaptive_stochastic_pool{r}d"): f(x.abs(), 2, seed=1),
             lambda x, f=tf("adaptive_max_pool{r}d"): f(x, 2)),
            (f"max_unpool{r}d", unpool(fp("max_unpool{r}d"), fp("max_pool{r}d")),
             unpool(tf("max_unpool{r}d"), tf("max_pool{r}d"))),
        ]
    return pairs


@needs_torch
@pytest.mark.usefixtures("one_numba_thread")
@pytest.mark.parametrize("source", ["float32", "same"])
@pytest.mark.parametrize("dtype", TORCH_HALF)
def test_autocast_follows_pytorch(dtype, source):
    """Under ``torch.autocast("cpu", dtype)`` each fastpool op returns the dtype the
    PyTorch op it mirrors returns, for float32 inputs and for inputs already in
    ``dtype``; outside autocast nothing is cast."""
    dtype = getattr(torch, dtype)
    for name, ours, theirs in _autocast_pairs():
        rank = int(name[-2])
        x = torch.rand((1, 2) + (4,) * rank)
        x = x.to(dtype) if source == "same" else x
        with torch.autocast("cpu", dtype=dtype):
            expected = theirs(x).dtype
            got = ours(x).dtype
        assert got == expected, name
        assert ours(x).dtype == x.dtype, name


@needs_torch
@pytest.mark.usefixtures("one_numba_thread")
def test_compile_under_autocast_matches_eager():
    import fastpool.torch as ft

    def f(x, w):
        y = ft.conv2d(x, w, padding=1)  # bfloat16 under autocast
        return ft.max_pool3d(y.unsqueeze(0), 3, 2, 1) , ft.avg_pool2d(y, 3, 2, 1)

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 7, 6, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = f(x, w)
        compiled = torch.compile(f, fullgraph=True)(x, w)
    assert [t.dtype for t in eager] == [torch.float32, torch.bfloat16]
    for c, e in zip(compiled, eager):
        assert c.dtype == e.dtype and torch.equal(c, e)


@needs_torch
@pytest.mark.usefixtures("one_numba_thread")
@pytest.mark.parametrize("dtype", TORCH_HALF)
def test_opcheck_in_half_precision(dtype):
    """The operators' fakes, autograd and dispatch agree with the real half-precision
    results (dtype and strides included)."""
    from fastpool._torch_ops_conv import OPS as CONV
    from fastpool._torch_ops_pool import OPS as POOL
    dtype = getattr(torch, dtype)
    a = _data(3)
    x = torch.tensor(a["x"], dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w = torch.tensor(a["w"], dtype=dtype).requires_grad_()
    torch.library.opcheck(POOL["max_pool2d"], (x, [3, 3], [2, 2], [1, 1], [1, 1], False))
    torch.library.opcheck(POOL["avg_pool2d"],
                          (x, [3, 3], [2, 2], [1, 1], False, True, None))
    torch.library.opcheck(CONV["conv2d"], (x, w, None, [1, 1], [1, 1], [1, 1], 1, False))


@needs_torch
@pytest.mark.usefixtures("one_numba_thread")
@pytest.mark.parametrize("dtype", TORCH_HALF)
def test_half_model_through_every_torch_transform(dtype):
    """A half-precision model of fastpool layers compiles (fullgraph, bitwise eager),
    exports, scripts, vmaps and differentiates twice, all in its dtype."""
    import fastpool.torch as ft
    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    model = torch.nn.Sequential(ft.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                ft.MaxPool2d(3, 2, 1), ft.AvgPool2d(3, 2, 1),
                                ft.AdaptiveAvgPool2d(2)).to(dtype).eval()
    x = torch.rand(2, 3, 7, 6).to(dtype)
    expected = model(x)
    assert expected.dtype == dtype
    torch._dynamo.reset()
    assert torch.equal(torch.compile(model, fullgraph=True)(x), expected)
    assert torch.equal(torch.export.export(model, (x,)).module()(x), expected)
    assert torch.equal(torch.jit.script(copy.deepcopy(model))(x), expected)
    assert torch.equal(torch.func.vmap(model)(x[:, None]), expected[:, None])
    xi = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(model(xi).float().pow(2).sum(), xi, create_graph=True)
    assert g.dtype == dtype
    (gg,) = torch.autograd.grad(g.float().pow(2).sum(), model[0].weight)
    assert gg.dtype == dtype and torch.isfinite(gg.float()).all()


@needs_torch
@pytest.mark.usefixtures("one_numba_thread")
@pytest.mark.parametrize("dtype", TORCH_HALF)
def test_torch_half_pooling_reaches_the_16_bit_kernels(dtype, monkeypatch):
    """CPU float16/bfloat16 tensors reach max, average and stochastic pooling's 16-bit
    kernels as they are (bfloat16 through ml_dtypes): with both float32-copy paths made
    to fail, forward and backward still run and give the float32 results rounded once."""
    import fastpool._half
    import fastpool._torch_library
    import fastpool.torch as ft
    dtype = getattr(torch, dtype)
    if dtype == torch.bfloat16 and ml_dtypes is None:
        pytest.skip("ml_dtypes is not installed")
    base = torch.rand(2, 3, 7, 6, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(3)) + 0.1

    def run(compute):
        """Every call on ``base`` rounded to ``dtype``, computed in ``compute``."""
        results = []
        for layout in (torch.contiguous_format, torch.channels_last):
            for f in (lambda x: ft.max_pool2d(x, 3, 2, 1),
                      lambda x: ft.avg_pool2d(x, 3, 2, 1),
                      lambda x: ft.stochastic_pool2d(x, 3, 2, 1, seed=1),
                      lambda x: ft.stochastic_pool2d(x, 3, 2, 1, training=False)):
                x = base.to(dtype).to(compute).contiguous(memory_format=layout)
                y = f(x.requires_grad_())
                y.backward(torch.ones_like(y))
                assert y.dtype == compute and x.grad.dtype == compute
                results += [y.detach(), x.grad]
        return results

    in_float32 = run(torch.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("a float32 copy was made")
    monkeypatch.setattr(fastpool._torch_library, "_widened", refuse)
    monkeypatch.setattr(fastpool._half, "_widen", refuse)
    for got, expected in zip(run(dtype), in_float32):
        assert torch.equal(got, expected.to(dtype))


@needs_torch
@pytest.mark.usefixtures("one_numba_thread")
def test_torch_half_edges():
    """Mixed floating dtypes raise naming the arguments (PyTorch raises too); a
    non-dense half-precision tensor is computed in the memory format its strides give,
    as a float32 one is; scripted stochastic layers in eval draw no seed."""
    import fastpool.torch as ft
    x = torch.rand(2, 3, 6, 6)
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but input has "
                                        "torch.bfloat16"):
        ft.conv2d(x.bfloat16(), torch.ones(4, 3, 3, 3))
    with pytest.raises(TypeError, match="dtype"):
        ft.conv2d(x.half(), torch.ones(4, 3, 3, 3, dtype=torch.bfloat16))
    last = torch.channels_last
    sliced = x.contiguous(memory_format=last)[..., ::2]  # not dense: channels-first
    half = x.half().contiguous(memory_format=last)[..., ::2]
    assert half.stride() == sliced.stride()
    expected = ft.max_pool2d(sliced, 2)
    got = ft.max_pool2d(half, 2)
    assert got.stride() == expected.stride() and got.is_contiguous()
    assert torch.equal(got, ft.max_pool2d(half.float(), 2).half())
    pool = torch.jit.script(ft.StochasticPool2d(2).eval())
    state = torch.random.get_rng_state()
    pool(x)
    assert torch.equal(torch.random.get_rng_state(), state)
