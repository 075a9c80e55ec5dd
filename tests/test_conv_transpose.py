"""Transposed convolution, ranks 1-3: against the loop references (written from the
definition), PyTorch, finite differences, both layouts, and CPU against the GPU
kernels (the simulator here)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpool
import reference as ref
from conftest import DTYPES, assert_close, numeric_gradient, seed_for

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
OPS = {r: (getattr(fastpool, f"conv_transpose{r}d"),
           getattr(fastpool, f"conv_transpose{r}d_backward")) for r in (1, 2, 3)}


def channels_last(a):
    axis = 1 if a.ndim >= 3 else 0
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, axis, -1)), -1, axis)


@st.composite
def cases(draw, rank):
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(rank))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1))
                           for s, d in zip(stride, dilation))
    size = tuple(draw(st.integers(1, 5)) for _ in range(rank))
    out = [(n - 1) * s - 2 * p + d * (k - 1) + o + 1 for n, s, p, d, k, o in
           zip(size, stride, padding, dilation, kernel, output_padding)]
    if min(out) < 1:
        padding = (0,) * rank
    return dict(x=(draw(st.integers(1, 2)), c_in) + size, w=(c_in, c_out // groups) + kernel,
                args=dict(stride=stride, padding=padding, output_padding=output_padding,
                          groups=groups, dilation=dilation),
                dtype=draw(st.sampled_from(DTYPES)), bias=draw(st.booleans()),
                layout=draw(st.sampled_from(["first", "last"])))


@pytest.mark.parametrize("rank", [1, 2, 3])
@SETTINGS
@given(data=st.data())
def test_matches_reference(rank, data):
    case = data.draw(cases(rank))
    rng = np.random.default_rng(seed_for(rank, case["x"], case["w"], case["args"]))
    dtype = case["dtype"]
    x = rng.standard_normal(case["x"]).astype(dtype)
    w = rng.standard_normal(case["w"]).astype(dtype)
    b = rng.standard_normal(case["w"][1] * case["args"]["groups"]).astype(dtype)
    b = b if case["bias"] else None
    xin = channels_last(x) if case["layout"] == "last" else x
    forward, backward = OPS[rank]
    y = forward(xin, w, b, **case["args"])
    assert_close(y, ref.conv_transpose(x, w, b, **case["args"]), dtype)
    g = rng.standard_normal(y.shape).astype(dtype)
    gin = channels_last(g) if case["layout"] == "last" else g
    grads = backward(gin, xin, w, **case["args"])
    for got, want in zip(grads, ref.conv_transpose_backward(g, x, w, **case["args"])):
        assert_close(got, want, dtype)
    if case["layout"] == "last" and x.shape[1] > 1 and np.prod(x.shape[2:]) > 1 and \
            y.shape[1] > 1:
        assert np.moveaxis(y, 1, -1).flags.c_contiguous
        assert np.moveaxis(grads.grad_input, 1, -1).flags.c_contiguous


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_matches_torch(rank):
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((2, 4) + (5,) * rank)
    w = rng.standard_normal((4, 3) + (3,) * rank)
    b = rng.standard_normal(6)
    args = dict(stride=2, padding=1, output_padding=1, groups=2, dilation=1)
    xt, wt, bt = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, w, b))
    yt = getattr(F, f"conv_transpose{rank}d")(xt, wt, bt, **args)
    g = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.from_numpy(g))
    forward, backward = OPS[rank]
    np.testing.assert_allclose(forward(x, w, b, **args), yt.detach().numpy(), rtol=1e-10,
                               atol=1e-10)
    for got, want in zip(backward(g, x, w, **args), (xt.grad, wt.grad, bt.grad)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-10)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 3, 4))
    w = rng.standard_normal((2, 3, 3, 2))
    args = dict(stride=(2, 1), padding=(1, 0), output_padding=(1, 0))
    forward, backward = OPS[2]
    g = rng.standard_normal(forward(x, w, **args).shape)
    gx, gw, _ = backward(g, x, w, **args)
    np.testing.assert_allclose(gx, numeric_gradient(lambda v: forward(v, w, **args), x, g),
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gw, numeric_gradient(lambda v: forward(x, v, **args), w, g),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_gpu_matches_cpu(rank, layout, small_launches):
    rng = np.random.default_rng(10 + rank)
    x = rng.standard_normal((2, 4) + (4,) * rank).astype(np.float32)
    x = channels_last(x) if layout == "last" else x
    w = rng.standard_normal((4, 3) + (2,) * rank).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    args = dict(stride=2, padding=1, output_padding=1, groups=2)
    forward, backward = OPS[rank]
    y_cpu = forward(x, w, b, **args, device="cpu")
    y_gpu = forward(x, w, b, **args, device="cuda")
    np.testing.assert_allclose(y_gpu, y_cpu, rtol=1e-5, atol=1e-5)
    assert y_gpu.strides == y_cpu.strides
    g = np.cos(np.arange(y_cpu.size, dtype=np.float32)).reshape(y_cpu.shape)
    for a, c in zip(backward(g, x, w, **args, device="cpu"),
                    backward(g, x, w, **args, device="cuda")):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weight_shape, groups, padding", [
    ((4, 2, 1, 1), 1, 0),  # the inner calls' pointwise path
    ((4, 1, 3, 3), 4, 1),  # the inner calls' depthwise path
], ids=["1x1", "depthwise"])
def test_unbatched_channels_last_runs_as_channels_first(weight_shape, groups, padding):
    """An unbatched channels-last (C, H, W) input: the launchers hand batched
    channels-first arrays to the 2-D kernels with the unbatched call's window, which
    once crashed the depthwise path and corrupted memory in the pointwise one."""
    rng = np.random.default_rng(seed_for(weight_shape))
    x = rng.standard_normal((4, 6, 7))
    w = rng.standard_normal(weight_shape)
    xl = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 0, -1)), -1, 0)
    args = dict(groups=groups, padding=padding)
    y = fastpool.conv_transpose2d(x, w, **args)
    np.testing.assert_array_equal(fastpool.conv_transpose2d(xl, w, **args), y)
    g = rng.standard_normal(y.shape)
    gl = np.moveaxis(np.ascontiguousarray(np.moveaxis(g, 0, -1)), -1, 0)
    expected = ref.conv2d(g[None], w, groups=groups, padding=padding)[0]
    grads = fastpool.conv_transpose2d_backward(gl, xl, w, **args)
    assert_close(grads.grad_input, expected, np.float64)
    for got, want in zip(grads, fastpool.conv_transpose2d_backward(g, x, w, **args)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_unbatched_empty_batch_and_bad_input():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    w = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    y = fastpool.conv_transpose2d(x, w, stride=2)
    assert y.shape == (3, 9, 11)
    np.testing.assert_allclose(y, fastpool.conv_transpose2d(x[None], w, stride=2)[0])
    empty = fastpool.conv_transpose2d(np.zeros((0, 2, 4, 5), np.float32), w)
    assert empty.shape == (0, 3, 6, 7)
    with pytest.raises(ValueError, match="output_padding"):
        fastpool.conv_transpose2d(x, w, stride=2, output_padding=2)
    with pytest.raises(ValueError, match="dim 0 = in_channels"):
        fastpool.conv_transpose2d(x, w[:1])
    with pytest.raises(ValueError, match="groups"):
        fastpool.conv_transpose2d(x, w, groups=3)
    with pytest.raises(ValueError, match="output size"):
        fastpool.conv_transpose2d(x[:, :1, :1], w[..., :1, :1], padding=1)
    with pytest.raises(ValueError, match="grad_output"):
        fastpool.conv_transpose2d_backward(np.ones((3, 5, 5), np.float32), x, w)
    with pytest.raises(TypeError, match="weight dtype"):
        fastpool.conv_transpose2d(x, w.astype(np.float64))


@pytest.mark.parametrize("rank", [2, 3])
def test_output_padding_beyond_the_stride_on_both_devices(rank, small_launches):
    """output_padding < dilation with stride 1 crops the far end of the convolution it
    transposes (a 1x1 kernel once took the plain-GEMM path that assumes no cropping)."""
    rng = np.random.default_rng(20 + rank)
    x = rng.standard_normal((1, 2) + (3,) * rank)
    for kernel in (1, 2):
        w = rng.standard_normal((2, 3) + (kernel,) * rank)
        args = dict(stride=1, output_padding=1, dilation=2)
        forward, backward = OPS[rank]
        y = forward(x, w, **args)
        assert_close(y, ref.conv_transpose(x, w, **args), np.float64)
        g = rng.standard_normal(y.shape)
        want = ref.conv_transpose_backward(g, x, w, **args)
        for device in ("cpu", "cuda"):
            for got, expected in zip(backward(g, x, w, **args, device=device), want):
                assert_close(got, expected, np.float64)
