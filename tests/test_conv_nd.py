"""conv1d (and its backward) against the any-rank loop reference, PyTorch, finite
differences and the GPU (simulator here)."""

import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpool
import reference as ref
from conftest import (DTYPES, assert_close_to_sum, at_one_and_two_threads,
                      numeric_gradient, seed_for)

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv1d_cases(draw):
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 2))
    k, d, s = draw(st.integers(1, 4)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["int", "tuple", "valid", "same"]))
    if kind == "same":
        s, padding, total = 1, "same", d * (k - 1)
    elif kind == "valid":
        padding, total = "valid", 0
    else:
        p = draw(st.integers(0, 3))
        padding, total = (p if kind == "int" else (p,)), 2 * p
    length = draw(st.integers(max(1, d * (k - 1) + 1 - total), 12))
    return dict(x_shape=(draw(st.integers(1, 2)), cin, length),
                weight_shape=(cout, cin // groups, k), bias=draw(st.booleans()),
                unbatched=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
                args=dict(stride=s, padding=padding, dilation=d, groups=groups))


def _bound(x, w, **args):
    return ref.conv(np.abs(x), np.abs(w), **args)


@SETTINGS
@given(case=conv1d_cases())
def test_conv1d_matches_reference(case):
    rng = np.random.default_rng(seed_for(case))
    dtype = case["dtype"]
    x = rng.standard_normal(case["x_shape"]).astype(dtype)
    if case["unbatched"]:
        x = x[:1]  # the call sees x[0]; the references see that one image
    w = rng.standard_normal(case["weight_shape"]).astype(dtype)
    b = rng.standard_normal(case["weight_shape"][0]).astype(dtype) if case["bias"] else None
    xin = x[0] if case["unbatched"] else x
    y = fastpool.conv1d(xin, w, b, **case["args"])
    y_ref = ref.conv(x, w, b, **case["args"])
    bound = _bound(x, w, **case["args"]) + (0 if b is None else np.abs(b)[:, None])
    assert y.dtype == dtype
    assert_close_to_sum(y, y_ref[0] if case["unbatched"] else y_ref,
                        bound[0] if case["unbatched"] else bound, dtype)
    g = rng.standard_normal(y_ref.shape).astype(dtype)
    gx, gw, gb = fastpool.conv1d_backward(g[0] if case["unbatched"] else g, xin, w,
                                          **case["args"])
    gx_ref, gw_ref, gb_ref = ref.conv_backward(g, x, w, **case["args"])
    gx_bound, gw_bound, _ = ref.conv_backward(np.abs(g), np.abs(x), np.abs(w),
                                              **case["args"])
    assert_close_to_sum(gx, gx_ref[0] if case["unbatched"] else gx_ref,
                        gx_bound[0] if case["unbatched"] else gx_bound, dtype)
    assert_close_to_sum(gw, gw_ref, gw_bound, dtype)
    assert_close_to_sum(gb, gb_ref, np.abs(g).sum(axis=(0, 2)), dtype)


def test_conv1d_gradients_match_finite_differences():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 9))
    w = rng.standard_normal((6, 2, 3))
    args = dict(stride=2, padding=1, dilation=1, groups=2)
    g = rng.standard_normal(fastpool.conv1d(x, w, **args).shape)
    gx, gw, _ = fastpool.conv1d_backward(g, x, w, **args)
    np.testing.assert_allclose(gx, numeric_gradient(lambda v: fastpool.conv1d(v, w, **args),
                                                    x, g), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gw, numeric_gradient(lambda v: fastpool.conv1d(x, v, **args),
                                                    w, g), rtol=1e-6, atol=1e-8)


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("args", [dict(stride=1, padding=1), dict(stride=3, dilation=2),
                                  dict(padding="same", groups=2), dict(padding="valid")])
def test_conv1d_matches_torch(args):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 4096 // 64))
    w = rng.standard_normal((6, 4 // args.get("groups", 1), 3))
    b = rng.standard_normal(6)
    xt, wt, bt = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, w, b))
    yt = F.conv1d(xt, wt, bt, **args)
    g = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(fastpool.conv1d(x, w, b, **args), yt.detach().numpy(),
                               rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(fastpool.conv1d_backward(g, x, w, **args),
                            (xt.grad, wt.grad, bt.grad)):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-10, atol=1e-10)


def test_conv1d_on_the_gpu_matches_cpu(small_launches):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 4, 11)).astype(np.float32)
    w = rng.standard_normal((4, 2, 3)).astype(np.float32)
    args = dict(stride=1, padding=1, groups=2)
    y_cpu = fastpool.conv1d(x, w, **args, device="cpu")
    y_gpu = fastpool.conv1d(x, w, **args, device="cuda")
    np.testing.assert_allclose(y_gpu, y_cpu, rtol=1e-5, atol=1e-5)
    g = np.ones_like(y_cpu)
    for a, b in zip(fastpool.conv1d_backward(g, x, w, **args, device="cpu"),
                    fastpool.conv1d_backward(g, x, w, **args, device="cuda")):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_conv1d_bad_input_names_the_argument():
    x = np.ones((1, 2, 8), np.float32)
    w = np.ones((2, 2, 3), np.float32)
    with pytest.raises(ValueError, match=r"x must be 3-D \(N, C, L\)"):
        fastpool.conv1d(x[None], w)
    with pytest.raises(ValueError, match=r"weight must be 3-D"):
        fastpool.conv1d(x, w[..., None])
    with pytest.raises(ValueError, match="stride"):
        fastpool.conv1d(x, w, stride=(1, 1))
    with pytest.raises(ValueError, match="padding"):
        fastpool.conv1d(x, w, padding=(1, 1))
    with pytest.raises(ValueError, match="grad_output"):
        fastpool.conv1d_backward(np.ones((6,), np.float32), x, w)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("groups", [1, 3])
def test_channels_last_input_gives_channels_last_results(rank, groups):
    """Same values in both layouts: bitwise, except the weight gradient (the
    channels-last kernels sum in another order, docs/design.md: to rounding)."""
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((2, 3) + (9,) * rank).astype(np.float32)
    w = rng.standard_normal((4 if groups == 1 else 3, 3 // groups) + (3,) * rank)
    w = w.astype(np.float32)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    conv = getattr(fastpool, f"conv{rank}d")
    backward = getattr(fastpool, f"conv{rank}d_backward")
    y, yl = conv(x, w, padding=1, groups=groups), conv(xl, w, padding=1, groups=groups)
    np.testing.assert_array_equal(yl, y)
    assert np.moveaxis(yl, 1, -1).flags.c_contiguous and not yl.flags.c_contiguous
    g = rng.standard_normal(y.shape).astype(np.float32)
    grads = backward(g, x, w, padding=1, groups=groups)
    grads_l = backward(g, xl, w, padding=1, groups=groups)
    bound = backward(np.abs(g), np.abs(x), w, padding=1, groups=groups).grad_weight
    for name, a, b in zip(grads._fields, grads, grads_l):
        if name == "grad_weight":
            assert_close_to_sum(b, a, bound, np.float32)
        else:
            np.testing.assert_array_equal(b, a)
    assert np.moveaxis(grads_l.grad_input, 1, -1).flags.c_contiguous


@pytest.mark.parametrize("turned", [True, False], ids=["turned", "band"])
@pytest.mark.parametrize("x_shape, w_shape, args", [
    ((1, 3, 20, 18), (8, 3, 3, 3), dict(padding=1)),
    ((2, 6, 11, 9), (6, 3, 3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                                       groups=2)),
    ((1, 16, 7, 7), (40, 16, 3, 3), dict(padding=1)),     # blocks of output channels
    ((3, 9, 5), (4, 3, 5, 5), dict(padding=3, stride=2)),  # unbatched, pads past taps
    ((2, 16, 1, 200), (8, 16, 1, 3), dict(padding=(0, 1))),  # `rows`, one kernel row
])
def test_channels_last_im2col_runs_in_place_with_the_channels_first_bits(
        monkeypatch, turned, x_shape, w_shape, args):
    """Channels-last inputs whose convolution runs im2col (or `rows` with one kernel
    row: the same chains) are read in place and the result written channels-last
    (``cpu/conv/_channels_last_gemm``), the product turned over (pixels as rows, small
    weights) or into a band buffer: both give the channels-first call's bits. (Inputs
    of few channels gathered here, not read by ``_channels_last_taps``.)"""
    from fastpool.cpu.conv import _channels_last_gemm, _channels_last_taps
    monkeypatch.setattr(_channels_last_taps, "MAX_CHANNELS", 0)
    rng = np.random.default_rng(29)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, -3, -1)), -1, -3)
    calls = []
    original = _channels_last_gemm.forward
    monkeypatch.setattr(_channels_last_gemm, "forward",
                        lambda *a: calls.append(a[2]) or original(*a))
    monkeypatch.setattr(_channels_last_gemm, "_TURNED_WEIGHT_BYTES",
                        1 << 30 if turned else 0)
    y = fastpool.conv2d(x, w, b, **args)
    yl = fastpool.conv2d(xl, w, b, **args)
    assert len(calls) == 1
    np.testing.assert_array_equal(yl, y)
    assert np.moveaxis(yl, -3, -1).flags.c_contiguous
    expected = ref.conv2d(x if x.ndim == 4 else x[None], w, b, **args)
    bound = ref.conv2d(np.abs(x if x.ndim == 4 else x[None]), np.abs(w), np.abs(b),
                       **args)
    assert_close_to_sum(y if y.ndim == 4 else y[None], expected, bound, np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, w_shape, args", [
    ((2, 8, 9, 7), (8, 8, 3, 3), dict(padding=1)),            # clipped edge tiles
    ((1, 16, 10, 12), (12, 8, 3, 3), dict(padding=(0, 2), groups=2)),
    ((8, 6, 5), (16, 8, 3, 3), dict(padding=1)),              # unbatched
    # rows staged and stored in blocks of 8 (4) pixels x channels, with remainders
    ((2, 12, 7, 19), (10, 12, 3, 3), dict(padding=1)),
])
def test_channels_last_winograd_runs_in_place_with_the_channels_first_bits(
        monkeypatch, dtype, x_shape, w_shape, args):
    """A channels-last input whose convolution runs Winograd is transformed through
    its own strides and the output written channels-last: the kernel is handed the
    caller's buffer and an NHWC output, and gives the channels-first call's bits."""
    import fastpool.cpu.conv as cpu_conv
    from fastpool import _params
    rng = np.random.default_rng(31)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, -3, -1)), -1, -3)
    seen = []
    original = cpu_conv._winograd_forward
    monkeypatch.setattr(cpu_conv, "_winograd_forward",
                        lambda *a: seen.append((a[0], a[3])) or original(*a))
    def conv(a):  # Winograd pinned: the chooser prefers im2col at these small sizes
        a, w_, b_, window = _params.conv_window(a, w, b, 2, 1, args["padding"], 1,
                                                args.get("groups", 1))
        return cpu_conv.conv2d_forward(a, w_, b_, window, "winograd")

    y = conv(x)
    assert len(seen) == 1 and seen[0][0].flags.c_contiguous  # the channels-first call
    yl = conv(xl)
    assert len(seen) == 2
    x_in, y_out = seen[1]
    assert np.shares_memory(x_in, xl), "the channels-last input was copied"
    assert np.moveaxis(y_out, 1, -1).flags.c_contiguous
    assert np.shares_memory(y_out, yl), "the output was copied after the kernel"
    np.testing.assert_array_equal(yl, y)
    assert np.moveaxis(yl, -3, -1).flags.c_contiguous
    batched = (lambda a: a) if x.ndim == 4 else (lambda a: a[None])
    expected = ref.conv2d(batched(x), w, b, **args)
    bound = ref.conv2d(np.abs(batched(x)), np.abs(w), np.abs(b), **args)
    assert_close_to_sum(batched(y), expected, bound, dtype)


CHANNELS_LAST_BACKWARD_CASES = [
    # (x shape, weight shape, args): the weight gradient's product as is (K_W * C_g >=
    # O_g) or turned (first-layer-like: 3 channels, many outputs); groups and
    # dilation (tap by tap gathers); the input gradient on Winograd, im2col, col2im
    ((2, 8, 9, 7), (12, 8, 3, 3), dict(padding=1)),
    ((3, 3, 11, 10), (16, 3, 5, 5), dict(stride=2, padding=2)),
    ((2, 12, 8, 9), (18, 4, 3, 2), dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1),
                                        groups=3)),
    ((2, 16, 6, 6), (24, 16, 3, 3), dict(padding=1)),
    ((8, 7, 5), (10, 8, 3, 3), dict(padding=(0, 1))),  # unbatched
]


@pytest.mark.parametrize("sizes", ["chosen", "small", "one chunk"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, args", CHANNELS_LAST_BACKWARD_CASES)
def test_channels_last_backward_runs_in_place(x_shape, w_shape, args, dtype, sizes,
                                              monkeypatch):
    """The backward of a channels-last convolution (neither 1x1 nor depthwise) reads
    ``x`` and ``grad_output`` in place: the weight gradient close to the reference,
    the input gradient (channels-last) and the bias gradient bitwise the
    channels-first call's, every result identical at 1 and 2 threads. "small": bands
    of one output row and blocks of one tile give the chosen sizes' bits (each
    element of the weight gradient is one chain over the chunk's pixels in order);
    "one chunk": the path of weights too large for L2 (the chunks of images change
    the sums: close to the reference)."""
    from fastpool import _params
    from fastpool.cpu import conv as cpu_conv
    from fastpool.cpu.conv import _channels_last_backward as clb
    rng = np.random.default_rng(seed_for(x_shape, w_shape))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    batched = (lambda a: a) if x.ndim == 4 else (lambda a: a[None])
    y = fastpool.conv2d(x, w, **args)
    g = rng.standard_normal(y.shape).astype(dtype)

    def last(a):
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, -3, -1)), -1, -3)

    xl, gl = last(x), last(g)
    grads = fastpool.conv2d_backward(g, x, w, **args)
    expected = ref.conv2d_backward(batched(g), batched(x), w, **args)
    bound = ref.conv2d_backward(np.abs(batched(g)), np.abs(batched(x)), np.abs(w),
                                **args)[1]
    seen = []
    original = clb.weight_grad
    monkeypatch.setattr(clb, "weight_grad",
                        lambda x4, gy4, *a: seen.append((x4, gy4)) or original(x4, gy4,
                                                                                 *a))
    if sizes == "small":
        monkeypatch.setattr(clb, "_BAND_PIXELS", 1)
        monkeypatch.setattr(clb, "_BAND_BYTES", 1)
        monkeypatch.setattr(clb, "_BLOCK_CHANNELS", 1)
    if sizes == "one chunk":
        monkeypatch.setattr(clb, "_RESIDENT_BYTES", 0)
    runs = at_one_and_two_threads(lambda: fastpool.conv2d_backward(gl, xl, w, **args))
    for one, two in zip(*runs):
        np.testing.assert_array_equal(one, two)
    gi, gw, gb = runs[0]
    assert len(seen) == 2
    assert np.shares_memory(seen[0][0], xl) and np.shares_memory(seen[0][1], gl), (
        "x or grad_output was copied")
    np.testing.assert_array_equal(gi, grads.grad_input)
    assert np.moveaxis(gi, -3, -1).flags.c_contiguous
    np.testing.assert_array_equal(gb, grads.grad_bias)
    assert_close_to_sum(gw, expected[1], bound, dtype)
    if sizes == "small":  # the chosen sizes' bits
        monkeypatch.undo()
        np.testing.assert_array_equal(gw, fastpool.conv2d_backward(gl, xl, w,
                                                                   **args).grad_weight)


def _forward_problem_names(x, w, stride, padding):
    """The algorithms of the forward and of the stride-1 input-gradient problem."""
    from fastpool import _params
    from fastpool.cpu import conv as cpu_conv
    from fastpool.cpu.conv._planner import _NAMES
    *_, window = _params.conv_window(x, w, None, 2, stride, padding)
    return (_NAMES[cpu_conv._forward_problem(window).algorithm()],
            _NAMES[cpu_conv._input_grad_problem(window).algorithm()])


@pytest.mark.parametrize("x_shape, w_shape, stride, algorithms", [
    # the input gradient as a Winograd or an im2col forward of grad_output
    ((4, 8, 8, 8), (8, 8, 3, 3), 1, ("winograd", "winograd")),
    ((2, 8, 12, 12), (4, 8, 3, 3), 1, ("winograd", "im2col")),
    # col2im: after an im2col forward, and strided
    ((1, 3, 6, 5), (4, 3, 3, 3), 1, ("im2col", "im2col")),
    ((2, 6, 9, 8), (8, 6, 3, 3), 2, ("im2col", "im2col")),
    ((3, 5, 7, 9), (7, 5, 1, 1), (2, 3), ("im2col", "im2col")),
])
def test_channels_last_backward_input_gradient_reads_grad_output_in_place(
        x_shape, w_shape, stride, algorithms, monkeypatch):
    """The channels-last input gradient reads ``grad_output`` where it lies (no
    channels-first copy of it) wherever the channels-first path runs a Winograd or
    im2col forward of it or col2im, with that path's bits."""
    from fastpool.cpu import conv as cpu_conv
    rng = np.random.default_rng(41)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    padding = 1 if w_shape[-1] > 1 else 0
    g = rng.standard_normal(fastpool.conv2d(x, w, stride=stride,
                                            padding=padding).shape).astype(np.float32)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    gl = np.moveaxis(np.ascontiguousarray(np.moveaxis(g, 1, -1)), -1, 1)
    real = cpu_conv.contiguous

    def no_activation_copies(a):
        assert a.shape not in (x.shape, g.shape), "an activation was copied"
        return real(a)

    assert _forward_problem_names(x, w, stride, padding) == algorithms
    monkeypatch.setattr(cpu_conv, "contiguous", no_activation_copies)
    gi = fastpool.conv2d_backward(gl, xl, w, stride=stride, padding=padding,
                                  output_mask=(True, False, False)).grad_input
    monkeypatch.undo()
    np.testing.assert_array_equal(
        gi, fastpool.conv2d_backward(g, x, w, stride=stride,
                                     padding=padding).grad_input)
    assert np.moveaxis(gi, 1, -1).flags.c_contiguous


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_channels_last_gpu_arrays_give_channels_last_results(rank, small_launches):
    """A channels-last Numba device array in (one copy of an NHWC-style buffer to the
    GPU, viewed as (N, C, *spatial)); the output and the input gradient come back as
    channels-last device arrays with the CPU's values."""
    from fastpool import _dispatch
    rng = np.random.default_rng(20 + rank)
    x = rng.standard_normal((2, 4) + (5,) * rank).astype(np.float32)
    w = rng.standard_normal((6, 2) + (3,) * rank).astype(np.float32)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    device = _dispatch.to_device(xl)
    assert device.strides == xl.strides  # the layout survived the copy
    w_host, w = w, _dispatch.to_device(w)
    conv = getattr(fastpool, f"conv{rank}d")
    backward = getattr(fastpool, f"conv{rank}d_backward")
    args = dict(padding=1, groups=2)
    y = conv(device, w, **args)
    y_cpu = conv(x, w_host, **args)
    assert _dispatch.array_kind(y) == "numba" and y.strides[1] == 4, y.strides
    np.testing.assert_allclose(y.copy_to_host(), y_cpu, rtol=1e-5, atol=1e-5)
    g = np.cos(np.arange(y_cpu.size, dtype=np.float32)).reshape(y_cpu.shape)
    grads = backward(_dispatch.to_device(g), device, w, **args)
    assert grads.grad_input.strides[1] == 4, grads.grad_input.strides
    for got, want in zip(grads, backward(g, x, w_host, **args)):
        np.testing.assert_allclose(got.copy_to_host(), want, rtol=1e-4, atol=1e-4)
    host = conv(xl, w_host, **args, device="cuda")  # NumPy in and out through the GPU
    assert np.moveaxis(host, 1, -1).flags.c_contiguous
    np.testing.assert_allclose(host, y_cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("unbatched", [False, True])
def test_channels_last_pointwise_runs_in_place(groups, unbatched, monkeypatch):
    """A 1x1 convolution of a channels-last input is GEMMs on its pixel matrix: the
    channels-first copy never happens, results match the reference and stay
    channels-last; a channels-first grad_output is copied once."""
    from fastpool.cpu import conv as cpu_conv
    rng = np.random.default_rng(30 + groups)
    x = rng.standard_normal((3, 6, 5, 7))
    w = rng.standard_normal((4, 6 // groups, 1, 1))
    b = rng.standard_normal(4)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    g = rng.standard_normal((3, 4, 5, 7))
    y_ref = ref.conv2d(x, w, b, groups=groups)
    grads_ref = ref.conv2d_backward(g, x, w, groups=groups)
    if unbatched:
        x, xl, g, y_ref = x[1], xl[1], g[1], y_ref[1]
        grads_ref = (grads_ref[0][1],) + tuple(ref.conv2d_backward(
            g[None], x[None], w, groups=groups)[1:])

    def no_copies(a):
        raise AssertionError("the channels-first path ran")

    monkeypatch.setattr(cpu_conv, "contiguous", no_copies)
    y = fastpool.conv2d(xl, w, b, groups=groups)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    axis = 0 if unbatched else 1
    assert np.moveaxis(y, axis, -1).flags.c_contiguous
    for grad_output in (g, np.moveaxis(np.ascontiguousarray(np.moveaxis(g, axis, -1)),
                                       -1, axis)):
        grads = fastpool.conv2d_backward(grad_output, xl, w, groups=groups)
        for got, want in zip(grads, grads_ref):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        assert np.moveaxis(grads.grad_input, axis, -1).flags.c_contiguous


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("blocking", ["by channels", "by pixels", "small blocks"])
@pytest.mark.parametrize("x_shape, out_channels, groups, bias", [
    ((2, 6, 5, 7), 10, 1, True), ((1, 8, 4, 3), 10, 2, True), ((5, 3, 4), 10, 1, False),
    ((1, 35, 9, 11), 70, 1, True),    # blocks of channels past one vector, ragged
    ((3, 16, 6, 6), 48, 4, False),    # groups > threads
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_channels_last_pointwise_gives_the_channels_first_bits(
        x_shape, out_channels, groups, bias, blocking, threads, dtype, monkeypatch):
    """The channels-last pointwise forward (``_channels_last_pointwise``: fastpool's GEMM
    on the pixel matrix read in place, the weight transposed per block of output
    channels) writes channels-last and gives the channels-first call's bits, however
    the work is cut (by output channels, by pixels, in many small blocks of the
    weight) and on any number of threads."""
    import numba
    from fastpool import _threading
    from fastpool.cpu import conv as cpu_conv
    from fastpool.cpu.conv import _channels_last_pointwise as clp
    rng = np.random.default_rng(41)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((out_channels, x_shape[-3] // groups, 1, 1)).astype(dtype)
    b = rng.standard_normal(out_channels).astype(dtype) if bias else None
    y = fastpool.conv2d(x, w, b, groups=groups)
    batched = x if x.ndim == 4 else x[None]
    want = ref.conv2d(batched.astype(np.float64), w, b, groups=groups)
    np.testing.assert_allclose(y, want if x.ndim == 4 else want[0], rtol=1e-4, atol=1e-4)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, -3, -1)), -1, -3)
    monkeypatch.setattr(clp, "_SPLIT_PIXELS", 1 if blocking == "by pixels" else 1 << 30)
    monkeypatch.setattr(clp, "_BLOCK_BYTES",
                        1 if blocking == "small blocks" else 1 << 30)
    clp.blocks.cache_clear()
    cuts = []
    original = clp.blocks

    def recorded(*args):
        cuts.append(original.__wrapped__(*args))
        return cuts[-1]

    monkeypatch.setattr(clp, "blocks", recorded)

    def no_copies(a):
        raise AssertionError("the channels-first path ran")

    monkeypatch.setattr(cpu_conv, "contiguous", no_copies)
    monkeypatch.setattr(_threading, "SMALL_WORK_NS", -1)  # every call on the threads
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        yl = fastpool.conv2d(xl, w, b, groups=groups)
    finally:
        numba.set_num_threads(before)
    assert cuts, "the pointwise kernel did not run"
    pixel_blocks, channel_blocks, _ = cuts[0]
    if threads > 1 and groups < threads:
        assert (pixel_blocks > 1) == (blocking == "by pixels"), cuts
    if blocking == "small blocks":
        assert channel_blocks == -(-out_channels // groups // clp._MIN_CHANNELS), cuts
    np.testing.assert_array_equal(yl, y)
    assert np.moveaxis(yl, -3, -1).flags.c_contiguous


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, multiplier, stride", [
    ((1, 8, 4, 3), 1, 1), ((2, 16, 9, 9), 1, 2), ((1, 8, 9, 9), 2, 1),
    ((1, 8, 9, 9), 2, (1, 2)), ((6, 7, 5), 1, 1),
])
def test_channels_last_depthwise_1x1_gives_the_channels_first_bits(
        x_shape, multiplier, stride, dtype):
    """A depthwise 1x1 convolution (one input channel a group, with a bias, channel
    multipliers too) of a channels-last input does not run the pointwise GEMM, whose
    chains fuse the product with the bias: the channels-first call's direct kernel
    rounds the product first. Forward and gradients are its bits (review of
    2026-12-07: the pointwise route was 1 ulp off)."""
    rng = np.random.default_rng(59)
    channels = x_shape[-3]
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((channels * multiplier, 1, 1, 1)).astype(dtype)
    b = rng.standard_normal(channels * multiplier).astype(dtype)
    args = dict(stride=stride, groups=channels)
    y = fastpool.conv2d(x, w, b, **args)
    g = rng.standard_normal(y.shape).astype(dtype)
    grads = fastpool.conv2d_backward(g, x, w, **args)
    axis = x.ndim - 3
    xl, gl = (np.moveaxis(np.ascontiguousarray(np.moveaxis(a, axis, -1)), -1, axis)
              for a in (x, g))
    np.testing.assert_array_equal(fastpool.conv2d(xl, w, b, **args), y)
    got = fastpool.conv2d_backward(gl, xl, w, **args)
    np.testing.assert_array_equal(got.grad_input, grads.grad_input)
    np.testing.assert_allclose(got.grad_weight, grads.grad_weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("route", ["in place", "padded rows", "blas"])
@pytest.mark.parametrize("x_shape, out_channels, groups", [
    ((2, 6, 5, 7), 10, 1), ((1, 8, 4, 3), 10, 2), ((5, 3, 4), 10, 1),
    ((1, 35, 9, 11), 70, 1), ((3, 16, 6, 6), 48, 4),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_channels_last_pointwise_input_gradient_gives_the_channels_first_bits(
        x_shape, out_channels, groups, route, threads, dtype, monkeypatch):
    """The channels-last pointwise input gradient on fastpool's GEMM
    (``_channels_last_pointwise.input_grad``: the output gradient's pixel matrix and
    the weight's rows read in place, or from a copy with rows a padded stride apart)
    gives the channels-first call's bits at 1 and 2 threads; with BLAS instead
    (``input_grad_applies`` false) it is close to them."""
    import numba
    from fastpool import _threading
    from fastpool.cpu.conv import _channels_last_pointwise as clp
    rng = np.random.default_rng(53)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((out_channels, x_shape[-3] // groups, 1, 1)).astype(dtype)
    g = rng.standard_normal((x_shape[:-3] + (out_channels,) + x_shape[-2:])).astype(dtype)
    want = fastpool.conv2d_backward(g, x, w, groups=groups,
                                    output_mask=(True, False, False)).grad_input
    axis = x.ndim - 3
    xl, gl = (np.moveaxis(np.ascontiguousarray(np.moveaxis(a, axis, -1)), -1, axis)
              for a in (x, g))
    monkeypatch.setattr(clp, "_PADDED_PIXELS", 1 if route == "padded rows" else 1 << 30)
    if route == "blas":
        monkeypatch.setattr(clp, "_PADDED_PIXELS", 0)
        monkeypatch.setattr(clp, "_BLOCK_BYTES", -1)
    ran = []
    original = clp._input_grad
    monkeypatch.setattr(clp, "_input_grad",
                        lambda *a: ran.append(a[1].shape) or original(*a))
    monkeypatch.setattr(_threading, "SMALL_WORK_NS", -1)
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        got = fastpool.conv2d_backward(gl, xl, w, groups=groups,
                                       output_mask=(True, False, False)).grad_input
    finally:
        numba.set_num_threads(before)
    assert np.moveaxis(got, axis, -1).flags.c_contiguous
    if route == "blas":
        assert not ran
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        return
    cg = x_shape[-3] // groups
    assert len(ran) == 1 and (ran[0][1] > cg) == (route == "padded rows"), ran
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, stride, groups", [
    ((2, 6, 9, 8), 2, 1), ((1, 8, 7, 11), (2, 3), 2), ((6, 10, 5), 3, 1),
    ((1, 12, 1, 9), (1, 2), 1),  # a 1-row plane (conv1d's), the stride along W only
    ((1, 8, 3, 5), 1, 1),        # stride 1: few pixels and a large weight, im2col too
])
@pytest.mark.parametrize("route", ["pointwise", "im2col", "many pixels"])
def test_channels_last_strided_1x1_gives_the_channels_first_bits(
        x_shape, stride, groups, route, dtype, monkeypatch):
    """A 1x1 convolution with a stride and no padding of a channels-last input (ResNets'
    shortcuts) runs as a pointwise one on the pixels it reads, copied
    (``_channels_last_pointwise.sampled_pixels``), or, for few pixels and a large
    weight or more than ``STRIDED_PIXELS`` output pixels, on the channels-last im2col;
    either way the channels-first call's bits,
    close to the reference, written channels-last."""
    from fastpool.cpu import conv as cpu_conv
    from fastpool.cpu.conv import _channels_last_gemm as clg
    from fastpool.cpu.conv import _channels_last_pointwise as clp
    rng = np.random.default_rng(47)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((10, x_shape[-3] // groups, 1, 1)).astype(dtype)
    b = rng.standard_normal(10).astype(dtype)
    y = fastpool.conv2d(x, w, b, stride=stride, groups=groups)
    batched = x if x.ndim == 4 else x[None]
    want = ref.conv2d(batched.astype(np.float64), w, b, stride=stride, groups=groups)
    np.testing.assert_allclose(y, want if x.ndim == 4 else want[0], rtol=1e-4, atol=1e-4)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, -3, -1)), -1, -3)
    if route == "im2col":
        monkeypatch.setattr(clp, "_NARROW_WEIGHT_BYTES", -1)
    if route == "many pixels":  # strided: the im2col; stride 1: pointwise still
        monkeypatch.setattr(clp, "STRIDED_PIXELS", 0)
        route = "pointwise" if stride == 1 else "im2col"
    ran = []
    for module, name in ((clp, "forward"), (clg, "forward")):
        def spy(*args, kernel=getattr(module, name), name=module.__name__):
            ran.append(name.rsplit(".", 1)[1])
            return kernel(*args)
        monkeypatch.setattr(module, name, spy)

    def no_copies(a):
        raise AssertionError("the channels-first path ran")

    monkeypatch.setattr(cpu_conv, "contiguous", no_copies)
    yl = fastpool.conv2d(xl, w, b, stride=stride, groups=groups)
    assert ran == ["_channels_last_" + ("pointwise" if route == "pointwise" else "gemm")]
    np.testing.assert_array_equal(yl, y)
    assert np.moveaxis(yl, -3, -1).flags.c_contiguous


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, out_channels, kernel, args, band_bytes", [
    ((1, 3, 20, 18), 32, 3, dict(stride=2, padding=1), 1 << 20),   # a first layer
    ((3, 3, 23, 21), 64, 7, dict(stride=2, padding=3), 1 << 20),   # images a worker
    ((1, 2, 9, 11), 5, (3, 2), dict(stride=(2, 1), padding=(2, 0), dilation=(1, 2)),
     1 << 20),
    ((2, 4, 8, 8), 7, 5, dict(padding=4), 1 << 20),                # rows all padding
    ((1, 6, 14, 14), 16, 5, dict(), 1 << 20),                      # LeNet's, no bias
    ((2, 16, 1, 40), 8, (1, 3), dict(padding=(0, 1)), 1 << 20),    # one kernel row
    ((1, 48, 10, 9), 20, 3, dict(stride=2, padding=1), 1 << 20),   # MAX_CHANNELS
    ((1, 3, 30, 12), 9, 3, dict(padding=1, dilation=(2, 1)), 300 * 8),  # bands cut
    ((3, 5, 7), 4, 3, dict(padding="same"), 1 << 20),              # unbatched
])
def test_channels_last_taps_give_the_channels_first_bits(
        x_shape, out_channels, kernel, args, band_bytes, dtype, monkeypatch):
    """Channels-last inputs of few channels run ``_channels_last_taps`` (implicit
    GEMMs reading a padded copy of each band of input rows in place): the
    channels-first call's bits, written channels-last, close to the reference; bands
    cut to ``_BAND_BYTES``, where one output row's input rows still fit."""
    from fastpool.cpu.conv import _channels_last_taps as taps
    monkeypatch.setattr(taps, "_BAND_BYTES", band_bytes)
    rng = np.random.default_rng(seed_for(x_shape, out_channels, kernel))
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((out_channels, x_shape[-3]) + kernel).astype(dtype)
    b = None if not args else rng.standard_normal(out_channels).astype(dtype)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, -3, -1)), -1, -3)
    launches = []
    original = taps._taps_forward
    monkeypatch.setattr(taps, "_taps_forward",
                        lambda *a: launches.append(a[5]) or original(*a))
    y = fastpool.conv2d(x, w, b, **args)
    assert not launches
    yl = fastpool.conv2d(xl, w, b, **args)
    assert len(launches) == 1
    if band_bytes < 1 << 20:
        assert launches[0] < y.shape[-2]  # rows a band: several bands an image
    np.testing.assert_array_equal(yl, y)
    assert np.moveaxis(yl, -3, -1).flags.c_contiguous
    x4, y4 = (x, y) if x.ndim == 4 else (x[None], y[None])
    bias = None if b is None else np.abs(b)
    assert_close_to_sum(y4, ref.conv2d(x4, w, b, **args),
                        ref.conv2d(np.abs(x4), np.abs(w), bias, **args), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, w_shape, args", [
    ((32, 6, 14, 14), (16, 6, 5, 5), dict()),                 # LeNet's: chosen
    ((1, 3, 20, 17), (8, 3, 3, 3), dict(padding=1)),
    ((2, 5, 11, 9), (7, 5, 3, 2), dict(padding=(2, 1), dilation=(2, 1))),
    ((1, 4, 9, 30), (6, 4, 4, 5), dict(padding=2, stride=(1, 2))),
])
def test_channels_last_taps_run_rows_chains(x_shape, w_shape, args, dtype, monkeypatch):
    """Where the convolution runs "rows" (chosen or pinned), the channels-last input of
    few channels runs ``_channels_last_taps`` with the taps in rows' order (kernel rows
    in order, each over channels and columns): the channels-first "rows" bits, not
    im2col's."""
    from fastpool import _params
    from fastpool.cpu import conv as cpu_conv
    from fastpool.cpu.conv import _channels_last_taps as taps
    launches = []
    original = taps._taps_forward
    monkeypatch.setattr(taps, "_taps_forward",
                        lambda *a: launches.append(a[6]) or original(*a))
    rng = np.random.default_rng(seed_for(x_shape, w_shape))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    pinned = None if x_shape[0] == 32 else "rows"
    results = {}
    for algorithm in (pinned, "im2col"):
        for name, source in (("nchw", x), ("nhwc", xl)):
            a, w_, b_, geometry = _params.conv_window(source, w, b, 2, **args)
            if algorithm is None:
                assert cpu_conv.choose_algorithm(geometry) == "rows"
            results[name, algorithm] = cpu_conv.conv2d_forward(a, w_, b_, geometry,
                                                               algorithm)
    assert launches == [True, False]  # rows' order, then im2col's
    for algorithm in (pinned, "im2col"):
        np.testing.assert_array_equal(results["nhwc", algorithm], results["nchw", algorithm])
        assert np.moveaxis(results["nhwc", algorithm], 1, -1).flags.c_contiguous
    assert results["nchw", pinned].tobytes() != results["nchw", "im2col"].tobytes()


def test_channels_last_taps_leave_what_does_not_fit(monkeypatch):
    """Groups, more than MAX_CHANNELS channels, 1x1 kernels and output rows whose
    input rows exceed _BAND_BYTES take the other channels-last routes."""
    from fastpool.cpu.conv import _channels_last_taps as taps
    launches = []
    original = taps._taps_forward
    monkeypatch.setattr(taps, "_taps_forward",
                        lambda *a: launches.append(1) or original(*a))
    rng = np.random.default_rng(20261207)

    def runs(c_in, kernel, groups=1, size=8):
        x = rng.standard_normal((1, c_in, size, size)).astype(np.float32)
        xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
        w = rng.standard_normal((8, c_in // groups, kernel, kernel)).astype(np.float32)
        launches.clear()
        y = fastpool.conv2d(xl, w, stride=2, groups=groups)
        np.testing.assert_array_equal(y, fastpool.conv2d(x, w, stride=2, groups=groups))
        return len(launches)

    assert runs(taps.MAX_CHANNELS, 3) == 1
    assert runs(taps.MAX_CHANNELS + 1, 3) == 0
    assert runs(4, 3, groups=2) == 0
    assert runs(4, 1) == 0
    # an output row reads 3 input rows of 7 padded columns x 4 channels
    monkeypatch.setattr(taps, "_BAND_BYTES", 3 * 7 * 4 * 4 - 1)
    assert runs(4, 3) == 0
    monkeypatch.setattr(taps, "_BAND_BYTES", 3 * 7 * 4 * 4)
    assert runs(4, 3) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("turned", [False, True], ids=["band", "turned"])
@pytest.mark.parametrize("x_shape, out_channels, kernel, args", [
    ((1, 20, 9, 13), 12, 3, dict(padding=1)),                    # 20 = 16 + 4 channels
    ((2, 24, 11, 19), 19, 3, dict(stride=2, padding=1)),         # odd pixels a band
    ((1, 40, 7, 10), 36, (3, 2), dict(stride=(1, 3), padding=(2, 1), groups=2)),
    ((1, 9, 6, 6), 8, 1, dict(stride=2)),                        # 9 = 8 + 1 channels
    # at most 8 channels a group: gathered from a channels-first copy of the input
    ((1, 3, 9, 21), 10, 3, dict(padding=1)),
    ((2, 3, 13, 37), 9, 7, dict(stride=2, padding=3)),           # s2 rows of 16+ columns
    ((1, 8, 7, 9), 8, 3, dict(padding=(1, 2), groups=2)),
])
def test_channels_last_im2col_blocks_give_the_channels_first_bits(
        x_shape, out_channels, kernel, args, turned, dtype, monkeypatch):
    """The channels-last im2col forward gathers its columns and stores its band in
    blocks of pixels x channels transposed in vector registers, the remainders (of
    channels, pixels, output channels, the columns where windows leave the input) one
    value at a time: the channels-first call's bits, in float32 (blocks of 8) and
    float64 (4), with the band buffer and with the product turned over."""
    from fastpool import _params
    from fastpool.cpu import conv as cpu_conv
    from fastpool.cpu.conv import _channels_last_gemm as clg
    from fastpool.cpu.conv import _channels_last_taps
    monkeypatch.setattr(_channels_last_taps, "MAX_CHANNELS", 0)
    monkeypatch.setattr(clg, "_TURNED_WEIGHT_BYTES", 1 << 30 if turned else 0)
    rng = np.random.default_rng(43)
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    groups = args.get("groups", 1)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((out_channels, x_shape[1] // groups) + kernel).astype(dtype)
    b = rng.standard_normal(out_channels).astype(dtype)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    launches = []
    original = clg._im2col_forward
    monkeypatch.setattr(clg, "_im2col_forward",
                        lambda *a: launches.append((a[3].size > 0, a[1].size > 0))
                        or original(*a))
    results = []
    for source in (x, xl):
        source, w_, b_, geometry = _params.conv_window(source, w, b, 2, **args)
        results.append(cpu_conv.conv2d_forward(source, w_, b_, geometry, "im2col"))
    # the channels-last call ran here, from a channels-first copy with few channels
    assert launches == [(turned, x_shape[1] // groups <= clg._FEW_CHANNELS)]
    assert np.moveaxis(results[1], 1, -1).flags.c_contiguous
    np.testing.assert_array_equal(results[1], results[0])
    bound = _bound(x, w, **args) + np.abs(b)[:, None, None]
    assert_close_to_sum(results[1], ref.conv(x, w, b, **args), bound, dtype)


def _depthwise_case(x_shape, kernel, args, dtype):
    """``(rng, x, w, b, args)`` of a depthwise convolution (``groups`` added to
    ``args``; ``rng`` for more draws)."""
    rng = np.random.default_rng(seed_for(x_shape, kernel))
    channels = x_shape[1]
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((channels, 1) + kernel).astype(dtype)
    b = rng.standard_normal(channels).astype(dtype)
    return rng, x, w, b, dict(args, groups=channels)


DEPTHWISE_SMALL_CASES = [  # (x_shape, kernel, args, input gradient's path)
    ((4, 256, 7, 7), (3, 3), dict(padding=1), "blocks"),  # column pairs
    ((2, 128, 14, 13), (3, 3), dict(stride=2, padding=1), "last"),  # one column at a time
    ((1, 300, 6, 9), (5, 3), dict(stride=(1, 2), padding=(2, 1), dilation=(1, 2)),
     "last"),  # a last block of 12 channels
    ((1, 256, 4, 4), (3, 3), dict(padding=2), "blocks"),  # windows leave on all sides
    ((2, 40, 9, 9), (3, 3), dict(padding=1, dilation=2), "blocks"),  # 40: 16 + 16 + 8
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, kernel, args, grad_path", DEPTHWISE_SMALL_CASES)
def test_small_plane_depthwise_runs_across_channels(x_shape, kernel, args, grad_path,
                                                    dtype, monkeypatch):
    """A channels-first depthwise convolution of small planes runs its forward and
    stride-1 input gradient on ``_depthwise_blocks`` (``_Problem.depthwise_blocks``),
    and the strided input gradient of many small planes on the channels-last kernels
    through one copy in and one out (``_Problem.depthwise_by_channels``): the bits of
    the channels-first direct kernels, channels-first results, close to the reference,
    the same at 1 and 2 threads (every call on the threads here: a call this small
    otherwise runs on one, ``fastpool._threading.serialised``); larger planes and fewer
    channels keep the channels-first kernels."""
    from fastpool import _params, _threading
    from fastpool.cpu import conv as cpu_conv
    monkeypatch.setattr(_threading, "SMALL_WORK_NS", -1)
    from fastpool.cpu.conv import _channels_last_direct as cld
    from fastpool.cpu.conv import _depthwise_blocks
    rng, x, w, b, args = _depthwise_case(x_shape, kernel, args, dtype)
    calls = []
    for module, name, path in ((cld, "forward", "last"), (cld, "backward", "last"),
                               (_depthwise_blocks, "forward", "blocks")):
        monkeypatch.setattr(module, name, lambda *a, f=getattr(module, name), k=path: (
            calls.append((k, a[0].shape)) or f(*a)))
    _, _, _, window = _params.conv_window(x, w, b, 2, **args)
    runs = at_one_and_two_threads(lambda: fastpool.conv2d(x, w, b, **args))
    y = runs[0]
    assert calls == [("blocks", x_shape)] * 2
    np.testing.assert_array_equal(runs[1], y)
    assert y.flags.c_contiguous
    np.testing.assert_array_equal(
        y, cpu_conv.conv2d_forward(x, w, b, window, algorithm="direct"))
    np.testing.assert_array_equal(fastpool.conv2d(x, w, **args),
                                  cpu_conv.conv2d_forward(x, w, None, window, "direct"))
    bound = ref.conv2d(np.abs(x), np.abs(w), np.abs(b), **args)
    assert_close_to_sum(y, ref.conv2d(x, w, b, **args), bound, dtype)
    np.testing.assert_array_equal(fastpool.conv2d(x[0], w, b, **args), y[0])
    # The input gradient (the weight and bias gradients stay channels-first).
    g = rng.standard_normal(y.shape).astype(dtype)
    calls.clear()
    runs = at_one_and_two_threads(lambda: fastpool.conv2d_backward(g, x, w, **args))
    assert calls == [(grad_path, y.shape if grad_path == "blocks"
                      else y.shape[:1] + y.shape[2:] + y.shape[1:2])] * 2
    gi = runs[0].grad_input
    np.testing.assert_array_equal(runs[1].grad_input, gi)
    assert gi.flags.c_contiguous
    pinned = cpu_conv.conv2d_backward(g, x, w, window, (True, True, True), "direct")
    for got, expected in zip(runs[0], pinned):
        np.testing.assert_array_equal(got, expected)
    bound = ref.conv2d_backward(np.abs(g), np.abs(x), np.abs(w), **args)[0]
    assert_close_to_sum(gi, ref.conv2d_backward(g, x, w, **args)[0], bound, dtype)
    np.testing.assert_array_equal(fastpool.conv2d_backward(g[0], x[0], w, **args)
                                  .grad_input, gi[0])
    # Too few channels, or planes too large: the channels-first kernels.
    calls.clear()
    fastpool.conv2d(x[:1, :16], w[:16], b[:16], **dict(args, groups=16))
    fastpool.conv2d_backward(g[:1, :16], x[:1, :16], w[:16], **dict(args, groups=16))
    big = np.zeros((1, x_shape[1], 57, 57), dtype)  # 3249 > 56 * 56 outputs
    fastpool.conv2d(big, w, b, **dict(args, stride=1, padding="same"))
    fastpool.conv2d_backward(big, big, w, **dict(args, stride=1, padding="same"))
    assert calls == []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels, args", [
    (16, dict(padding=1)),                      # one vector block, edge columns banded
    (40, dict(padding=2)),                      # 16 + 16 + 8: a remainder; rows leave
    (48, dict(stride=2, padding=1)),            # strided rows of blocks
    (33, dict(padding=2, dilation=2)),          # dilated; a remainder of 1
    (32, dict(stride=(2, 1), padding=(0, 1))),  # unequal strides
])
@pytest.mark.parametrize("with_bias", [True, False])
def test_channels_last_depthwise_3x3_vector_blocks(channels, args, with_bias, dtype,
                                                   monkeypatch):
    """The channels-last depthwise 3x3 forward adds the taps of whole blocks of 16
    channels as vectors (``_channels_last_direct._nine_taps_grouped``, ``_row3x3``), in
    chunks of columns narrower than a row here, and the channels past the last block
    one at a time: the channels-first call's bits, at 1 and 2 threads, close to the
    reference."""
    from fastpool import _threading
    from fastpool.cpu.conv import _channels_last_direct as cld
    monkeypatch.setattr(_threading, "SMALL_WORK_NS", -1)
    rng, x, w, b, args = _depthwise_case((2, channels, 11, 150), (3, 3), args, dtype)
    b = b if with_bias else None
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    y = fastpool.conv2d(x, w, b, **args)
    stride_w = np.broadcast_to(args.get("stride", 1), 2)[1]
    assert max(4, cld._CHUNK_BYTES // (3 * stride_w * channels * x.itemsize)) < y.shape[3]
    calls = []
    monkeypatch.setattr(cld, "forward", lambda *a, f=cld.forward: (
        calls.append(a[0].shape) or f(*a)))
    runs = at_one_and_two_threads(lambda: fastpool.conv2d(xl, w, b, **args))
    assert calls == [(2, 11, 150, channels)] * 2
    np.testing.assert_array_equal(runs[0], y)
    np.testing.assert_array_equal(runs[1], y)
    bias = np.zeros(channels, dtype) if b is None else b
    bound = ref.conv2d(np.abs(x), np.abs(w), np.abs(bias), **args)
    assert_close_to_sum(runs[0], ref.conv2d(x, w, bias, **args), bound, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, kernel, args", [
    ((1, 40, 9, 11), (3, 3), dict(padding=1)),
    ((2, 33, 12, 10), (3, 3), dict(stride=2, padding=1)),
    ((1, 20, 13, 13), (4, 3), dict(stride=(3, 2), padding=(2, 1))),
    ((1, 18, 9, 9), (3, 3), dict(padding=3, dilation=3)),
    ((1, 16, 6, 7), (1, 1), dict()),
    ((3, 17, 5, 5), (3, 3), dict()),
    ((1, 24, 11, 11), (7, 7), dict(padding=3)),
])
def test_depthwise_blocks_bands_and_workers(x_shape, kernel, args, dtype, monkeypatch):
    """``_depthwise_blocks.forward`` called directly: bitwise the channels-first direct
    kernels' output with and without bias, for bands of one output row, of two (a
    short last band) and whole planes, on 1, 2 and 3 workers (tasks split unevenly),
    with full and partial blocks of channels."""
    from fastpool import _params
    from fastpool.cpu import conv as cpu_conv
    from fastpool.cpu.conv import _depthwise_blocks
    _, x, w, b, args = _depthwise_case(x_shape, kernel, args, dtype)
    _, _, _, window = _params.conv_window(x, w, b, 2, **args)
    problem = cpu_conv._forward_problem(window)
    assert _depthwise_blocks.band_rows(problem, x.itemsize) == problem.out_h
    for bias in (b, None):
        expected = cpu_conv.conv2d_forward(x, w, bias, window, algorithm="direct")
        for rows in (1, 2, None):
            if rows is not None:
                monkeypatch.setattr(_depthwise_blocks, "band_rows", lambda p, i, r=rows: r)
            for workers in (1, 2, 3):
                got = _depthwise_blocks.forward(x, w, bias, problem, workers)
                np.testing.assert_array_equal(got, expected)
            monkeypatch.undo()


def test_depthwise_blocks_input_grad_follows_the_direct_kernels_choice(monkeypatch):
    """Where the forward's padded plane is too large for the plane kernels, the direct
    input gradient scatters (``_direct_backward_input``, another order of the sums),
    even when the input gradient's own (cropped) plane is small: the blocks must not
    run then, or the bits would differ from the pinned direct kernels. (The limit is
    lowered so that a small padded input reaches that case.)"""
    from fastpool import _params
    from fastpool.cpu import conv as cpu_conv
    from fastpool.cpu.conv import _depthwise_blocks, _planner
    # (8 + 2 * 6) * (7 + 2 * 6) = 380. The geometry is this test's alone: what the
    # memoised window derives under the lowered limit stays with it.
    monkeypatch.setattr(_planner, "_PADDED_PLANE_LIMIT", 379)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 34, 8, 7))
    w = rng.standard_normal((34, 1, 3, 3))
    args = dict(padding=6, groups=34)
    _, _, _, window = _params.conv_window(x, w, None, 2, **args)
    assert not cpu_conv._forward_problem(window).unit_stride_planes()
    assert cpu_conv._input_grad_problem(window).depthwise_blocks(8)
    calls = []
    monkeypatch.setattr(_depthwise_blocks, "forward", lambda *a, f=_depthwise_blocks.forward:
                        calls.append(a[0].shape) or f(*a))
    g = rng.standard_normal((1, 34, 18, 17))
    got = fastpool.conv2d_backward(g, x, w, output_mask=(True, False, False), **args)
    pinned = cpu_conv.conv2d_backward(g, x, w, window, (True, False, False), "direct")
    np.testing.assert_array_equal(got.grad_input, pinned[0])
    assert calls == []


def test_depthwise_blocks_rule():
    """Which channels-first depthwise problems ``_depthwise_blocks`` takes: 3x3 kernels
    on planes of at most 56 * 56 outputs (half as many for 8-byte items) with at least
    32 channels, and other kernels only where ``depthwise_by_channels`` holds."""
    from fastpool.cpu.conv._planner import _Problem

    def problem(channels, size, k=3, batch=1):
        return _Problem((batch, channels, size, size), (size, size), (channels, 1, k, k),
                        channels, (1, 1), (k // 2, k // 2), (1, 1))
    assert problem(32, 56).depthwise_blocks(4)
    assert not problem(32, 56).depthwise_blocks(8)
    assert problem(32, 39).depthwise_blocks(8)  # 1521 outputs
    assert not problem(32, 40).depthwise_blocks(8)  # 1600
    assert not problem(32, 57).depthwise_blocks(4)
    assert not problem(31, 14).depthwise_blocks(4)
    assert not problem(64, 14, k=5).depthwise_blocks(4)
    assert problem(256, 8, k=5).depthwise_blocks(8)  # depthwise_by_channels
    assert problem(256, 8, k=5).depthwise_by_channels()


@pytest.mark.parametrize("bad", ["read-only output", "mixed dtypes", "2-D", "float size"])
def test_depthwise_blocks_intrinsics_refuse_other_arrays(bad):
    """The vector loops of ``_depthwise_blocks`` (``_copy_pixels``) and of the
    channels-last kernels it shares (``_channels_last_direct._row3x3``) read ``.data``
    by element offsets: anything but flat, C-contiguous, writeable arrays of one float
    dtype and integer sizes is a typing error at compile time."""
    from numba import njit
    from numba.core.errors import TypingError
    from fastpool.cpu.conv._channels_last_direct import _row3x3
    from fastpool.cpu.conv._depthwise_blocks import _copy_pixels

    @njit
    def taps(xs, wt, ys, count):
        _row3x3(xs, 0, 16, 48, 16, wt, 0, 16, wt, 0, ys, 0, 16, count)

    @njit
    def copy(dst, src, count):
        _copy_pixels(dst, 0, src, 0, count)

    # The same calls with valid arguments compile and compute (xs: a 3x3 patch of
    # 16-lane pixels, rows 48 apart; the bias is wt's first 16 items).
    rng = np.random.default_rng(5)
    xs, wt, ys = rng.standard_normal(16 * 9), rng.standard_normal(16 * 9), np.zeros(16)
    taps(xs, wt, ys, 1)
    t = wt.reshape(9, 16) * xs.reshape(9, 16)
    np.testing.assert_array_equal(ys, ((wt[:16] + ((t[0] + t[1]) + (t[2] + t[3])))
                                       + ((t[4] + t[5]) + (t[6] + t[7]))) + t[8])
    copy(ys, xs, 1)
    np.testing.assert_array_equal(ys, xs[:16])
    x = np.zeros(16 * 9)
    args = {"read-only output": (x, x, np.zeros(16), 1),
            "mixed dtypes": (x, x.astype(np.float32), np.zeros(16), 1),
            "2-D": (x, x, np.zeros((1, 16)), 1),
            "float size": (x, x, np.zeros(16), 1.0)}[bad]
    if bad == "read-only output":
        args[2].flags.writeable = False
    with pytest.raises(TypingError, match="_row3x3"):
        taps(*args)
    with pytest.raises(TypingError, match="_copy_pixels"):
        copy(args[2], args[1], args[3])


@pytest.mark.skipif(sys.platform != "linux", reason="guard pages through mprotect")
def test_depthwise_blocks_read_nothing_outside_the_input():
    """Inputs flush against inaccessible pages (``guard_pages.py``, in a child process:
    a read past either end is a segmentation fault that fails this test): partial
    blocks of channels, bands, strides beyond the kernel, the input gradient's crops;
    the results bitwise the direct kernels'. (A one-channel overread of a partial
    block, multiplied by a zero weight, changes no result: only this catches it.)"""
    import guard_pages
    from test_reliability import run_python
    out = run_python("import guard_pages; guard_pages.depthwise_blocks()",
                     env={"NUMBA_NUM_THREADS": "2"})
    assert out["mismatches"] == []
    cases = guard_pages.DEPTHWISE_CASES
    problems = len(cases) + sum(case[5] == (1, 1) for case in cases)
    assert out["calls"] == problems * 2 * 2 * 3  # dtypes, ends, bands


def test_depthwise_blocks_band_rows_fit_the_scratch():
    """Large planes are cut into bands of as many output rows as let the scratch (the
    input rows, their bordered copy and the outputs, ``_BLOCK`` channels) fit
    ``_BAND_BYTES``, one row at least."""
    from fastpool.cpu.conv import _depthwise_blocks as blocks
    from fastpool.cpu.conv._planner import _Problem
    for size, k, s in ((112, 3, 2), (224, 3, 1), (56, 7, 1), (300, 5, 3)):
        out = (size + 2 * (k // 2) - k) // s + 1
        p = _Problem((1, 32, size, size), (out, out), (32, 1, k, k), 32, (s, s),
                     (k // 2, k // 2), (1, 1))
        for itemsize in (4, 8):
            rows = blocks.band_rows(p, itemsize)
            wp = (out - 1) * s + k

            def scratch(r):
                return (((r - 1) * s + k) * (wp + size) + r * out) * blocks._BLOCK * itemsize
            assert 1 <= rows < out, (size, k, s, itemsize)
            assert rows == 1 or scratch(rows) <= blocks._BAND_BYTES
            assert scratch(rows + 1) > blocks._BAND_BYTES


DEPTHWISE_LAST_CASES = [  # (x_shape, kernel, args): each path of the kernels
    ((2, 5, 9, 8), (3, 3), dict(padding=1)),  # 3x3 one pass, column pairs + one left
    ((1, 16, 7, 7), (3, 3), dict(stride=2, padding=1)),  # one tap at a time
    ((2, 3, 10, 9), (5, 3), dict(stride=(2, 3), padding=(2, 1), dilation=(1, 2))),
    ((2, 4, 8, 8), (3, 3), dict(padding="same", dilation=2)),  # 3x3 without pairs
    ((1, 8, 6, 6), (2, 2), dict()),  # one group of four taps, no padding
    ((1, 9, 5, 11), (1, 4), dict(stride=(1, 2))),
    ((1, 7, 12, 12), (7, 7), dict(padding=3)),  # 12 groups of four and one tap
    ((3, 6, 4, 5), (3, 3), dict(padding=2)),  # windows leaving the input on all sides
    ((1, 5, 9, 8), (3, 3), dict(stride=(2, 1), padding=1)),  # one at a time, pairs
    ((1, 3, 5, 6), (3, 3), dict(padding=3)),  # input gradient: a crop (negative pad)
    ((2, 4, 5, 5), (1, 1), dict(padding=1)),
    ((1, 6, 11, 10), (3, 3), dict(stride=2, padding=2, dilation=2)),  # strided bands
    ((1, 5, 10, 11), (3, 3), dict(stride=(3, 2), padding=1)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, kernel, args", DEPTHWISE_LAST_CASES)
def test_channels_last_depthwise_runs_in_place(x_shape, kernel, args, dtype,
                                               monkeypatch):
    """A depthwise convolution of a channels-last input runs on its buffer: no
    channels-first copy, results channels-last, the output, input gradient and bias
    gradient bitwise the channels-first call's, the weight gradient close to the
    reference, every result identical at 1 and 2 threads."""
    from fastpool import _params
    from fastpool.cpu import conv as cpu_conv
    rng, x, w, b, args = _depthwise_case(x_shape, kernel, args, dtype)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    y = fastpool.conv2d(x, w, b, **args)
    y_no_bias = fastpool.conv2d(x, w, **args)
    g = rng.standard_normal(y.shape).astype(dtype)
    gl = np.moveaxis(np.ascontiguousarray(np.moveaxis(g, 1, -1)), -1, 1)
    grads = fastpool.conv2d_backward(g, x, w, **args)
    expected = ref.conv2d_backward(g, x, w, **args)
    bound = ref.conv2d_backward(np.abs(g), np.abs(x), np.abs(w), **args)[1]

    def no_copies(a):
        raise AssertionError("the channels-first path ran")

    monkeypatch.setattr(cpu_conv, "contiguous", no_copies)
    _, _, _, window = _params.conv_window(xl, w, b, 2, **args)
    runs = at_one_and_two_threads(lambda: (
        cpu_conv.conv2d_forward(xl, w, b, window),
        *cpu_conv.conv2d_backward(gl, xl, w, window, (True, True, True))))
    for one, two in zip(*runs):
        np.testing.assert_array_equal(one, two)
    yl, gi, gw, gb = runs[0]
    np.testing.assert_array_equal(yl, y)
    np.testing.assert_array_equal(cpu_conv.conv2d_forward(xl, w, None, window),
                                  y_no_bias)
    np.testing.assert_array_equal(gi, grads.grad_input)
    np.testing.assert_array_equal(gb, grads.grad_bias)
    assert_close_to_sum(gw, expected[1], bound, dtype)
    for result in (yl, gi):
        assert np.moveaxis(result, 1, -1).flags.c_contiguous
    # The public functions, unbatched and with a channels-first grad_output (one copy).
    monkeypatch.undo()
    np.testing.assert_array_equal(fastpool.conv2d(xl[1 % len(x)], w, b, **args),
                                  y[1 % len(x)])
    unbatched = fastpool.conv2d_backward(g[0], xl[0], w, **args)
    np.testing.assert_array_equal(unbatched.grad_input,
                                  fastpool.conv2d_backward(g[:1], x[:1], w,
                                                           **args).grad_input[0])
    assert np.moveaxis(unbatched.grad_input, 0, -1).flags.c_contiguous
    mixed = fastpool.conv2d_backward(g, xl, w, **args)
    np.testing.assert_array_equal(mixed.grad_input, grads.grad_input)
    np.testing.assert_array_equal(mixed.grad_weight, gw)


# ----------------------------------------------------------------------------- 3-D

CONV3D_CASES = [
    ((2, 4, 4, 5, 4), (6, 4, 3, 3, 3), dict(stride=1, padding=1)),
    ((1, 4, 5, 4, 6), (4, 2, 2, 3, 1), dict(stride=(2, 1, 2), padding=(1, 0, 0),
                                             groups=2)),
    ((2, 3, 5, 5, 5), (3, 1, 3, 3, 3), dict(padding="same", dilation=(2, 1, 1),
                                             groups=3)),
    ((1, 2, 6, 4, 4), (2, 2, 1, 3, 3), dict(padding="valid", stride=(3, 1, 1))),
    ((2, 8, 3, 6, 6), (8, 8, 3, 3, 3), dict(padding=(0, 1, 1))),  # Winograd planes
    ((1, 4, 6, 4, 4), (2, 4, 2, 2, 2), dict(dilation=(2, 1, 1), padding=(1, 0, 1))),
]


@pytest.mark.parametrize("x_shape, w_shape, args", CONV3D_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv3d_matches_reference(x_shape, w_shape, args, dtype):
    rng = np.random.default_rng(seed_for(x_shape, w_shape, str(args)))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    y = fastpool.conv3d(x, w, b, **args)
    assert y.dtype == dtype
    assert_close_to_sum(y, ref.conv(x, w, b, **args),
                        _bound(x, w, **args) + np.abs(b)[:, None, None, None], dtype)
    g = rng.standard_normal(y.shape).astype(dtype)
    gx, gw, gb = fastpool.conv3d_backward(g, x, w, **args)
    refs = ref.conv_backward(g, x, w, **args)
    bounds = ref.conv_backward(np.abs(g), np.abs(x), np.abs(w), **args)
    assert_close_to_sum(gx, refs[0], bounds[0], dtype)
    assert_close_to_sum(gw, refs[1], bounds[1], dtype)
    assert_close_to_sum(gb, refs[2], np.abs(g).sum(axis=(0, 2, 3, 4)), dtype)
    only_input = fastpool.conv3d_backward(g, x, w, **args, output_mask=(True, False, False))
    np.testing.assert_array_equal(only_input.grad_input, gx)
    assert only_input.grad_weight is None and only_input.grad_bias is None
    np.testing.assert_array_equal(fastpool.conv3d(x[0], w, b, **args), y[0])


# Planes large enough for Winograd (3x3, stride 1, at least 256 output pixels in all)
# with depth strides within and past the kernel, depth padding, groups: the CPU's
# depth-aware Winograd runs (each input slice transformed once).
DEPTH_WINOGRAD_CASES = [
    ((2, 8, 6, 10, 9), (8, 8, 3, 3, 3), dict(padding=1)),
    ((1, 8, 9, 10, 12), (6, 4, 2, 3, 3), dict(stride=(4, 1, 1), padding=1, groups=2)),
    ((2, 8, 8, 12, 10), (16, 8, 3, 3, 3), dict(stride=(3, 1, 1), padding=(2, 0, 1))),
    ((1, 12, 5, 6, 19), (10, 12, 3, 3, 3), dict(padding=1)),  # blocks and remainders
]


def test_conv3d_weight_gradient_follows_the_backward_choice(monkeypatch):
    """A stacked 14x14 plane of 96 channels runs Winograd forwards but not backwards
    (``_WINOGRAD_WIDE_CHANNELS``: the forward's rule alone): the 3-D weight gradient
    keeps the backward's algorithm; with 256 pixels both run Winograd."""
    from fastpool.cpu.conv import _winograd_grad
    ran = []
    original = _winograd_grad.weight_grad
    monkeypatch.setattr(_winograd_grad, "weight_grad",
                        lambda *a: ran.append(1) or original(*a))
    rng = np.random.default_rng(20261207)
    w = rng.standard_normal((8, 32, 3, 3, 3)).astype(np.float32)
    for size, runs in ((14, 0), (16, 1)):
        x = rng.standard_normal((1, 32, 3, size, size)).astype(np.float32)
        g = rng.standard_normal((1, 8, 1, size, size)).astype(np.float32)
        ran.clear()
        grads = fastpool.conv3d_backward(g, x, w, padding=(0, 1, 1))
        assert len(ran) == runs
        assert_close_to_sum(grads.grad_weight,
                            ref.conv_backward(g, x, w, padding=(0, 1, 1))[1],
                            ref.conv_backward(np.abs(g), np.abs(x), np.abs(w),
                                              padding=(0, 1, 1))[1], np.float32)


@pytest.mark.parametrize("x_shape, w_shape, args", DEPTH_WINOGRAD_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv3d_depth_winograd_gives_the_stacked_images_bits(x_shape, w_shape, args,
                                                             dtype, monkeypatch):
    """The one-pass forward is bitwise the 2-D Winograd of the stacked images (which a
    Dask chunk or the GPU's stacked path may run), and both match the reference."""
    from fastpool.cpu import slabs
    rng = np.random.default_rng(seed_for(x_shape, w_shape, str(args)))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    ran = []
    fused = slabs.fused_forward
    monkeypatch.setattr(slabs, "fused_forward", lambda *a: ran.append(fused(*a)) or ran[-1])
    y = fastpool.conv3d(x, w, b, **args)
    assert ran == [True]
    monkeypatch.setattr(slabs, "fused_forward", lambda *a: False)
    np.testing.assert_array_equal(fastpool.conv3d(x, w, b, **args), y)
    assert_close_to_sum(y, ref.conv(x, w, b, **args),
                        _bound(x, w, **args) + np.abs(b)[:, None, None, None], dtype)


@pytest.mark.parametrize("x_shape, w_shape, args", DEPTH_WINOGRAD_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv3d_depth_winograd_weight_gradient(x_shape, w_shape, args, dtype,
                                               monkeypatch):
    """The weight gradient of a 3-D convolution whose planes run on Winograd is the
    depth-aware Winograd weight gradient (``weight_grad_depth``: nothing stacked),
    and with stride 1 the input gradient a forward convolution of grad_output
    (``input_grad_weight``): close to the reference, as the stacked images'
    gradients are; a channels-last volume is read in place, with the channels-first
    bits, its input gradient channels-last; the same on 1 and 2 threads."""
    import numba

    from fastpool.cpu import slabs
    rng = np.random.default_rng(seed_for(x_shape, w_shape, str(args), "grad"))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    g = rng.standard_normal(fastpool.conv3d(x, w, **args).shape).astype(dtype)
    handed, flipped = [], []
    original = slabs.weight_grad_depth
    monkeypatch.setattr(slabs, "weight_grad_depth",
                        lambda *a: handed.append(a[0]) or original(*a))
    original_flip = slabs.input_grad_weight
    monkeypatch.setattr(slabs, "input_grad_weight",
                        lambda *a: flipped.append(1) or original_flip(*a))
    runs = []
    saved = numba.get_num_threads()
    try:
        xl = _channels_last(x)
        for a, b in ((x, g), (xl, _channels_last(g))):
            for threads in (1, 2):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                runs.append(fastpool.conv3d_backward(b, a, w, **args,
                                                     output_mask=(True, True, False)))
    finally:
        numba.set_num_threads(saved)
    assert len(handed) == 4
    assert np.shares_memory(handed[2], xl), "the channels-last input was copied"
    # stride 1 on every axis: the input gradient as a forward of grad_output
    assert len(flipped) == (4 if args.get("stride", 1) == 1 else 0)
    for gx, gw, _ in runs[1:]:
        np.testing.assert_array_equal(gw, runs[0][1])
        np.testing.assert_array_equal(gx, runs[0][0])
    assert np.moveaxis(runs[2][0], 1, -1).flags.c_contiguous
    expected = ref.conv_backward(g, x, w, **args)
    bounds = ref.conv_backward(np.abs(g), np.abs(x), np.abs(w), **args)
    assert_close_to_sum(runs[0][1], expected[1], bounds[1], dtype)
    assert_close_to_sum(runs[0][0], expected[0], bounds[0], dtype)
    # the stacked images' 2-D backward: the same gradients to rounding
    monkeypatch.setattr(slabs, "fused_weight_grad", lambda *a: None)
    monkeypatch.setattr(slabs, "input_grad_weight", lambda *a: None)
    stacked = fastpool.conv3d_backward(g, x, w, **args)
    assert_close_to_sum(stacked.grad_weight, expected[1], bounds[1], dtype)
    assert_close_to_sum(stacked.grad_input, expected[0], bounds[0], dtype)


@pytest.mark.parametrize("x_shape, w_shape, args", DEPTH_WINOGRAD_CASES + [
    ((8, 6, 10, 9), (8, 8, 3, 3, 3), dict(padding=1)),  # unbatched
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv3d_channels_last_depth_winograd_runs_in_place(x_shape, w_shape, args,
                                                           dtype, monkeypatch):
    """A channels-last volume whose forward runs the depth-aware Winograd is read in
    place (the kernel is handed the caller's buffer) and written channels-last, with
    the channels-first call's bits; where the fused forward does not run (dilated
    depth taps) the result is still channels-last and equal."""
    from fastpool.cpu import slabs
    rng = np.random.default_rng(seed_for(x_shape, w_shape, str(args), "last"))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    xl = _channels_last(x) if x.ndim == 5 else _channels_last(x[None])[0]
    y = fastpool.conv3d(x, w, b, **args)
    handed = []
    original = slabs.forward_depth

    def spy(*a):
        ran = original(*a)
        handed.append((a[0], a[4], ran))
        return ran

    monkeypatch.setattr(slabs, "forward_depth", spy)
    yl = fastpool.conv3d(xl, w, b, **args)
    assert len(handed) == 1
    assert handed[0][2] is True, "the depth-aware Winograd did not run"
    assert np.shares_memory(handed[0][0], xl), "the channels-last input was copied"
    assert np.shares_memory(handed[0][1], yl), "the output was copied after the kernel"
    np.testing.assert_array_equal(yl, y)
    assert np.moveaxis(yl, -4, -1).flags.c_contiguous
    dilated = dict(args, dilation=(2, 1, 1), padding=2)
    np.testing.assert_array_equal(fastpool.conv3d(xl, w, b, **dilated),
                                  fastpool.conv3d(x, w, b, **dilated))


@pytest.mark.parametrize("x_shape, w_shape, args", [
    ((2, 4, 5, 6, 7), (6, 4, 3, 2, 3), dict(padding=1)),                  # stacked
    ((1, 6, 6, 5, 5), (6, 1, 3, 3, 3), dict(padding=1, groups=6)),        # taps
    ((2, 4, 7, 6, 5), (4, 2, 2, 3, 3), dict(stride=(2, 1, 2), dilation=(2, 1, 1),
                                            padding=(1, 1, 0), groups=2)),
    ((4, 5, 6, 7), (3, 4, 3, 3, 3), dict(padding=1)),                     # unbatched
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv3d_channels_last_runs_on_its_buffer(x_shape, w_shape, args, dtype,
                                                 monkeypatch):
    """Channels-last volumes are never copied to channels-first: the depth steps read
    and write them through their strides; forward and every gradient are bitwise the
    channels-first call's (the bias gradient too: one float64 sum per channel in
    pixel order), with channels-last output and input gradient."""
    from fastpool.cpu import slabs
    rng = np.random.default_rng(seed_for(x_shape, w_shape, str(args), "volumes"))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)

    def last(a):
        return _channels_last(a) if a.ndim == 5 else _channels_last(a[None])[0]

    y = fastpool.conv3d(x, w, b, **args)
    g = rng.standard_normal(y.shape).astype(dtype)
    grads = fastpool.conv3d_backward(g, x, w, **args)
    real = slabs.contiguous

    activations = {x.shape, g.shape, (1,) + x.shape, (1,) + g.shape}

    def no_activation_copies(a):
        assert a.shape not in activations, f"an activation {a.shape} was copied"
        return real(a)

    monkeypatch.setattr(slabs, "contiguous", no_activation_copies)
    yl = fastpool.conv3d(last(x), w, b, **args)
    grads_l = fastpool.conv3d_backward(last(g), last(x), w, **args)
    monkeypatch.undo()
    np.testing.assert_array_equal(yl, y)
    for a, b_ in zip(grads_l, grads):
        np.testing.assert_array_equal(a, b_)
    for result in (yl, grads_l.grad_input):
        assert np.moveaxis(result, -4, -1).flags.c_contiguous
    g5 = g if g.ndim == 5 else g[None]
    x5 = x if x.ndim == 5 else x[None]
    expected = ref.conv_backward(g5, x5, w, **args)
    assert_close_to_sum(grads_l.grad_bias, expected[2],
                        np.abs(g5).sum(axis=(0, 2, 3, 4)), dtype)
    assert_close_to_sum(grads_l.grad_input if x.ndim == 5 else grads_l.grad_input[None],
                        expected[0], ref.conv_backward(np.abs(g5), np.abs(x5), np.abs(w),
                                                       **args)[0], dtype)


@st.composite
def conv_nd_cases(draw):
    """Convolutions of every rank in either memory format, per axis its own kernel,
    stride, dilation and padding."""
    rank = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 2))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(rank))
    size = tuple(draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), 7))
                 for k, d, p in zip(kernel, dilation, padding))
    return dict(x_shape=(draw(st.integers(1, 2)), cin) + size,
                weight_shape=(cout, cin // groups) + kernel, bias=draw(st.booleans()),
                channels_last=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
                args=dict(stride=stride, padding=padding, dilation=dilation,
                          groups=groups))


def _channels_last(a):
    """``a`` (``(N, C, *spatial)``) viewing a channels-last buffer."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


@settings(SETTINGS, max_examples=100)
@given(case=conv_nd_cases())
def test_conv_of_every_rank_and_layout_matches_reference(case):
    """Forward and every gradient against the loop reference; a channels-last input
    gives channels-last results."""
    rng = np.random.default_rng(seed_for(case))
    dtype, args = case["dtype"], case["args"]
    rank = len(case["x_shape"]) - 2
    x = rng.standard_normal(case["x_shape"]).astype(dtype)
    w = rng.standard_normal(case["weight_shape"]).astype(dtype)
    b = rng.standard_normal(case["weight_shape"][0]).astype(dtype) if case["bias"] else None
    xin = _channels_last(x) if case["channels_last"] else x
    y = getattr(fastpool, f"conv{rank}d")(xin, w, b, **args)
    expand = (slice(None),) + (None,) * rank
    bound = _bound(x, w, **args) + (0 if b is None else np.abs(b)[expand])
    assert y.dtype == dtype
    assert_close_to_sum(y, ref.conv(x, w, b, **args), bound, dtype)
    g = rng.standard_normal(y.shape).astype(dtype)
    gx, gw, gb = getattr(fastpool, f"conv{rank}d_backward")(g, xin, w, **args)
    refs = ref.conv_backward(g, x, w, **args)
    bounds = ref.conv_backward(np.abs(g), np.abs(x), np.abs(w), **args)
    assert_close_to_sum(gx, refs[0], bounds[0], dtype)
    assert_close_to_sum(gw, refs[1], bounds[1], dtype)
    assert_close_to_sum(gb, refs[2], np.abs(g).sum(axis=(0,) + tuple(range(2, rank + 2))),
                        dtype)
    if not xin.flags.c_contiguous:  # channels-last and not also channels-first
        for out in (y, gx):
            assert np.moveaxis(out, 1, -1).flags.c_contiguous


# (x shape, w shape, args): the three ways (stacked taps in one Winograd kernel,
# forward only; stacked 2-D images; depthwise tap by tap), forward and backward.
CONV3D_THREAD_CASES = [
    ((2, 8, 6, 10, 9), (8, 8, 3, 3, 3), dict(padding=1)),
    ((2, 4, 5, 6, 7), (6, 2, 2, 3, 2), dict(stride=(2, 1, 2), padding=1, groups=2)),
    ((2, 4, 5, 6, 7), (4, 1, 3, 3, 3), dict(padding=1, groups=4)),
]


@pytest.mark.parametrize("x_shape, w_shape, args", CONV3D_THREAD_CASES,
                         ids=["depth-winograd", "stacked", "depthwise"])
def test_conv3d_is_the_same_at_one_and_two_threads(x_shape, w_shape, args):
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has one thread")
    rng = np.random.default_rng(seed_for(x_shape, w_shape, str(args)))
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    g = rng.standard_normal(fastpool.conv3d(x, w, b, **args).shape).astype(np.float32)
    saved = numba.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            runs.append((fastpool.conv3d(x, w, b, **args),
                         *fastpool.conv3d_backward(g, x, w, **args)))
    finally:
        numba.set_num_threads(saved)
    for one, two in zip(*runs):
        np.testing.assert_array_equal(one, two)


def test_conv3d_gradients_match_finite_differences():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 4, 3, 4))
    w = rng.standard_normal((2, 2, 2, 2, 3))
    args = dict(stride=(2, 1, 1), padding=1)
    g = rng.standard_normal(fastpool.conv3d(x, w, **args).shape)
    gx, gw, _ = fastpool.conv3d_backward(g, x, w, **args)
    np.testing.assert_allclose(gx, numeric_gradient(lambda v: fastpool.conv3d(v, w, **args),
                                                    x, g), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gw, numeric_gradient(lambda v: fastpool.conv3d(x, v, **args),
                                                    w, g), rtol=1e-6, atol=1e-8)


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("x_shape, w_shape, args", CONV3D_CASES)
def test_conv3d_matches_torch(x_shape, w_shape, args):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    xt, wt, bt = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, w, b))
    yt = F.conv3d(xt, wt, bt, **args)
    g = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(fastpool.conv3d(x, w, b, **args), yt.detach().numpy(),
                               rtol=1e-10, atol=1e-10)
    for ours, theirs in zip(fastpool.conv3d_backward(g, x, w, **args),
                            (xt.grad, wt.grad, bt.grad)):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-10, atol=1e-10)


# (x shape, w shape, args): stacked blocks of whole images; blocks that split an
# image's output depths (block = N * D // KD = 2 of 6); depth dilation; a depth stride
# past the kernel; depthwise (tap by tap); an empty batch.
GPU_CONV3D_CASES = [
    ((2, 4, 3, 4, 4), (4, 2, 2, 3, 3), dict(stride=(2, 1, 1), padding=1, groups=2)),
    ((1, 4, 6, 4, 3), (3, 4, 3, 2, 2), dict(padding=(1, 0, 1))),
    ((1, 2, 6, 3, 4), (2, 2, 2, 2, 2), dict(dilation=(2, 1, 1), padding=(1, 1, 0))),
    ((2, 2, 7, 3, 3), (2, 2, 2, 1, 2), dict(stride=(3, 1, 1), padding=1)),
    ((1, 3, 4, 4, 4), (3, 1, 3, 3, 3), dict(padding=1, groups=3)),
    ((0, 2, 3, 4, 4), (2, 2, 2, 2, 2), dict(padding=1)),
]


@pytest.mark.parametrize("x_shape, w_shape, args", GPU_CONV3D_CASES)
def test_conv3d_on_the_gpu_matches_cpu(x_shape, w_shape, args, small_launches):
    rng = np.random.default_rng(seed_for(x_shape, w_shape, str(args)))
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    y_cpu = fastpool.conv3d(x, w, b, **args, device="cpu")
    np.testing.assert_allclose(fastpool.conv3d(x, w, b, **args, device="cuda"), y_cpu,
                               rtol=1e-5, atol=1e-5)
    g = np.cos(np.arange(y_cpu.size, dtype=np.float32)).reshape(y_cpu.shape)
    for a, c in zip(fastpool.conv3d_backward(g, x, w, **args, device="cpu"),
                    fastpool.conv3d_backward(g, x, w, **args, device="cuda")):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-4)


def test_conv3d_channels_last_and_bad_input():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 4, 5, 4)).astype(np.float32)
    w = rng.standard_normal((2, 3, 3, 3, 3)).astype(np.float32)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    yl = fastpool.conv3d(xl, w, padding=1)
    np.testing.assert_array_equal(yl, fastpool.conv3d(x, w, padding=1))
    assert np.moveaxis(yl, 1, -1).flags.c_contiguous
    with pytest.raises(ValueError, match=r"x must be 5-D \(N, C, D, H, W\)"):
        fastpool.conv3d(x[0, 0], w)
    with pytest.raises(ValueError, match=r"weight must be 5-D"):
        fastpool.conv3d(x, w[0])
    with pytest.raises(ValueError, match="padding='same'"):
        fastpool.conv3d(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match="kernel size"):
        fastpool.conv3d(x, w, dilation=3)
    with pytest.raises(ValueError, match="grad_output"):
        fastpool.conv3d_backward(np.ones((2, 2, 2, 3, 3), np.float32), x, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, out_channels", [((3, 38, 283), 49), ((1, 38, 70), 160)])
def test_channels_last_pointwise_is_the_same_at_one_and_two_threads(dtype, x_shape,
                                                                    out_channels):
    """The channels-last 1x1 GEMMs on BLAS run over blocks of rows fixed by the pixel
    count (the forward over blocks of output channels when there are more of them than
    pixels, the second case): the forward and every gradient are the same bits at 1
    and 2 threads (the input gradient, split by the thread count, differed by up to
    7.6e-6 before; review of 2026-12-05), and the forward is the reference's."""
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has one thread")
    rng = np.random.default_rng(43)
    n, c, length = x_shape
    x = _channels_last(rng.standard_normal(x_shape).astype(dtype))
    w = rng.standard_normal((out_channels, c, 1)).astype(dtype)
    b = rng.standard_normal(out_channels).astype(dtype)
    g = _channels_last(rng.standard_normal((n, out_channels, length)).astype(dtype))
    x64, w64, b64 = (np.asarray(a, np.float64) for a in (x, w, b))
    assert_close_to_sum(fastpool.conv1d(x, w, b), ref.conv(x64, w64, b64),
                        ref.conv(np.abs(x64), np.abs(w64), np.abs(b64)), dtype)
    saved = numba.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            runs.append((fastpool.conv1d(x, w, b), *fastpool.conv1d_backward(g, x, w)))
    finally:
        numba.set_num_threads(saved)
    for one, two in zip(*runs):
        np.testing.assert_array_equal(one, two)
