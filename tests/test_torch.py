"""fastpool.torch: autograd functions and nn.Modules backed by fastpool's kernels.

Gradients are checked against finite differences (``torch.autograd.gradcheck``, float64)
and against ``torch.nn.functional``; zero-copy hand-over is checked by recording what
reaches the (monkeypatched) fastpool kernels.
"""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402


import fastpool  # noqa: E402
import fastpool.torch as ft  # noqa: E402

DTYPES = (torch.float32, torch.float64)
# fastpool vs PyTorch: different summation orders (conv) and float32 rounding.
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}
SHAPE = (2, 3, 7, 8)


# One Numba thread in this module (conftest.one_numba_thread says why).
pytestmark = pytest.mark.usefixtures("one_numba_thread")


def assert_close(actual, expected, dtype=None):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOL[dtype or expected.dtype])


def distinct(shape, dtype=torch.float64, seed=0):
    """Values without ties, at least 1/numel apart (finite differences of 1e-6 never
    change an argmax), in random order."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape))
    return (torch.randperm(n, generator=g).to(dtype) / n - 0.5).reshape(shape)


def positive(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype) + 0.5


def randn(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------- cases
# (kwargs for ours and torch's; stochastic takes the max-pool kwargs). Geometries come
# from conftest.GEOMETRIES so the compiled kernels are shared with the other tests.

CONV_CASES = [
    dict(stride=2, bias=True),
    dict(dilation=2, padding=1, bias=False),
    dict(groups=3, padding=(1, 0), bias=True),
    dict(padding="same", bias=True),
    dict(padding="same", dilation=(1, 2), bias=False),
    dict(padding="valid", stride=(2, 1), bias=True),
]

MAX_CASES = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, dilation=2),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2),
         ceil_mode=True),
    dict(kernel_size=2),
]

AVG_CASES = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1), ceil_mode=True),
    dict(kernel_size=3, stride=2, divisor_override=5),
]


def conv_args(case, dtype, requires_grad=True, batch=2, seed=0):
    case = dict(case)
    has_bias = case.pop("bias")
    groups = case.get("groups", 1)
    c_in, c_out = 3, 6
    x = randn(batch, c_in, 7, 8, dtype=dtype, seed=seed)
    w = randn(c_out, c_in // groups, 3, 3, dtype=dtype, seed=seed + 1)
    b = randn(c_out, dtype=dtype, seed=seed + 2) if has_bias else None
    tensors = [t.requires_grad_(requires_grad) if t is not None else None
               for t in (x, w, b)]
    return tensors, case


# ----------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_gradcheck(case):
    (x, w, b), kwargs = conv_args(case, torch.float64, batch=1)
    inputs = (x, w) if b is None else (x, w, b)
    assert torch.autograd.gradcheck(lambda *t: ft.conv2d(*t, **kwargs), inputs)


# fastpool allows padding up to half the *effective* (dilated) kernel; torch only up
# to half the kernel, so this case is checked against finite differences only.
WIDE_PADDING = dict(kernel_size=3, stride=2, padding=2, dilation=2)


@pytest.mark.parametrize("case", MAX_CASES + [WIDE_PADDING])
def test_max_pool2d_gradcheck(case):
    x = distinct(SHAPE).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ft.max_pool2d(t, **case), (x,))


@pytest.mark.parametrize("case", AVG_CASES)
def test_avg_pool2d_gradcheck(case):
    x = randn(*SHAPE).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ft.avg_pool2d(t, **case), (x,))


@pytest.mark.parametrize("case", MAX_CASES[:2] + [WIDE_PADDING])
@pytest.mark.parametrize("training", [True, False])
def test_stochastic_pool2d_gradcheck(case, training):
    x = positive(SHAPE).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: ft.stochastic_pool2d(t, **case, training=training, seed=1234), (x,))


# ----------------------------------------------------------------------------- vs torch

def _backward_pair(ours, theirs, inputs, seed=5):
    """Backpropagate the same random grad_output through both; return both grads."""
    g = randn(*ours.shape, dtype=ours.dtype, seed=seed)
    ours_grads = torch.autograd.grad(ours, inputs, g)
    theirs_grads = torch.autograd.grad(theirs, inputs, g)
    return ours_grads, theirs_grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_torch(case, dtype):
    (x, w, b), kwargs = conv_args(case, dtype)
    y = ft.conv2d(x, w, b, **kwargs)
    y_ref = F.conv2d(x, w, b, **kwargs)
    assert_close(y, y_ref)
    inputs = [t for t in (x, w, b) if t is not None]
    for ours, theirs in zip(*_backward_pair(y, y_ref, inputs)):
        assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MAX_CASES)
def test_max_pool2d_matches_torch(case, dtype):
    x = randn(*SHAPE, dtype=dtype).requires_grad_()
    y, indices = ft.max_pool2d(x, **case, return_indices=True)
    y_ref, indices_ref = F.max_pool2d(x, **case, return_indices=True)
    assert indices.dtype == torch.int64 and not indices.requires_grad
    torch.testing.assert_close(indices, indices_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # a max is exact
    (gx,), (gx_ref,) = _backward_pair(y, y_ref, [x])
    assert_close(gx, gx_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", AVG_CASES)
def test_avg_pool2d_matches_torch(case, dtype):
    x = randn(*SHAPE, dtype=dtype).requires_grad_()
    y = ft.avg_pool2d(x, **case)
    y_ref = F.avg_pool2d(x, **case)
    assert_close(y, y_ref)
    (gx,), (gx_ref,) = _backward_pair(y, y_ref, [x])
    assert_close(gx, gx_ref)


def test_positional_arguments_follow_torch():
    x = randn(*SHAPE)
    w = randn(4, 3, 3, 3, seed=1)
    b = randn(4, seed=2)
    assert_close(ft.conv2d(x, w, b, 2, 1, 1, 1), F.conv2d(x, w, b, 2, 1, 1, 1))
    assert_close(ft.max_pool2d(x, 3, 2, 1, 1, True), F.max_pool2d(x, 3, 2, 1, 1, True))
    assert_close(ft.avg_pool2d(x, 3, 2, 1, True, False, None),
                 F.avg_pool2d(x, 3, 2, 1, True, False, None))
    # torch accepts one-element sizes and an empty stride (= kernel_size)
    assert_close(ft.max_pool2d(x, (2,), []), F.max_pool2d(x, (2,), []))


# ----------------------------------------------------------------------------- layouts

def _non_contiguous_inputs(dtype):
    base = randn(2, 7, 8, 3, dtype=dtype)
    permuted = base.permute(0, 3, 1, 2)  # channels-last strides
    sliced = randn(2, 3, 14, 8, dtype=dtype, seed=1)[:, :, ::2]
    assert not permuted.is_contiguous() and not sliced.is_contiguous()
    return [permuted, sliced]


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_input(dtype):
    for x in _non_contiguous_inputs(dtype):
        x = x.detach().requires_grad_()
        w = randn(4, 3, 3, 3, dtype=dtype, seed=2).requires_grad_()
        pairs = [
            (ft.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1), [x, w]),
            (ft.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1), [x]),
            (ft.avg_pool2d(x, 3, 2, 1), F.avg_pool2d(x, 3, 2, 1), [x]),
        ]
        for ours, theirs, inputs in pairs:
            assert_close(ours, theirs)
            for a, b in zip(*_backward_pair(ours, theirs, inputs)):
                assert_close(a, b)
        # stochastic: same samples and gradients as for the contiguous copy
        xp = x.detach().abs().requires_grad_()
        xc = xp.detach().contiguous().requires_grad_()
        for training in (True, False):
            ours = ft.stochastic_pool2d(xp, 3, 2, training=training, seed=9)
            theirs = ft.stochastic_pool2d(xc, 3, 2, training=training, seed=9)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
            (ga,) = torch.autograd.grad(ours.sum(), xp)
            (gb,) = torch.autograd.grad(theirs.sum(), xc)
            torch.testing.assert_close(ga, gb, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched_input(dtype):
    x = randn(3, 7, 8, dtype=dtype).requires_grad_()
    w = randn(4, 3, 3, 3, dtype=dtype, seed=1).requires_grad_()
    b = randn(4, dtype=dtype, seed=2).requires_grad_()
    pairs = [
        (ft.conv2d(x, w, b, padding="same"), F.conv2d(x, w, b, padding="same"), [x, w, b]),
        (ft.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1), [x]),
        (ft.avg_pool2d(x, 3, 2, 1, ceil_mode=True), F.avg_pool2d(x, 3, 2, 1, True), [x]),
    ]
    for ours, theirs, inputs in pairs:
        assert ours.dim() == 3
        assert_close(ours, theirs)
        for a, c in zip(*_backward_pair(ours, theirs, inputs)):
            assert_close(a, c)
    xp = x.detach().abs().requires_grad_()
    y, idx = ft.stochastic_pool2d(xp, 2, return_indices=True, seed=3)
    y4, idx4 = ft.stochastic_pool2d(xp[None], 2, return_indices=True, seed=3)
    assert y.shape == (3, 3, 4)
    torch.testing.assert_close(y, y4[0], rtol=0, atol=0)
    torch.testing.assert_close(idx, idx4[0], rtol=0, atol=0)


def _stride0_recorder(monkeypatch, name):
    """Wrap fastpool.<name> (a backward) to record the strides of its grad_output."""
    seen = []
    real = getattr(fastpool, name)

    def spy(grad_output, *args, **kwargs):
        seen.append(grad_output.strides)
        return real(grad_output, *args, **kwargs)

    monkeypatch.setattr(fastpool, name, spy)
    return seen


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_backward_expanded_grad(monkeypatch, dtype):
    """``y.sum().backward()`` hands backward a stride-0 (expanded) grad_output."""
    x = randn(*SHAPE, dtype=dtype).requires_grad_()
    w = randn(4, 3, 3, 3, dtype=dtype, seed=1).requires_grad_()
    xp = positive(SHAPE, dtype=dtype).requires_grad_()
    cases = [
        ("conv2d_backward", lambda: ft.conv2d(x, w, padding=1),
         lambda: F.conv2d(x, w, padding=1), [x, w]),
        ("max_pool2d_backward", lambda: ft.max_pool2d(x, 3, 2, 1),
         lambda: F.max_pool2d(x, 3, 2, 1), [x]),
        ("avg_pool2d_backward", lambda: ft.avg_pool2d(x, 3, 2, 1),
         lambda: F.avg_pool2d(x, 3, 2, 1), [x]),
        # stochastic: compare with an explicit (contiguous) ones grad_output
        ("stochastic_pool2d_backward", lambda: ft.stochastic_pool2d(xp, 3, 2, seed=4),
         None, [xp]),
        ("stochastic_pool2d_backward",
         lambda: ft.stochastic_pool2d(xp, 3, 2, training=False), None, [xp]),
    ]
    for name, ours, theirs, inputs in cases:
        seen = _stride0_recorder(monkeypatch, name)
        for t in inputs:
            t.grad = None
        ours().sum().backward()
        assert len(seen) == 1 and 0 in seen[0], (name, seen)  # really stride 0
        got = [t.grad.clone() for t in inputs]
        if theirs is not None:
            expected = torch.autograd.grad(theirs().sum(), inputs)
        else:
            y = ours()
            expected = torch.autograd.grad(y, inputs, torch.ones(y.shape, dtype=dtype))
        for a, b in zip(got, expected):
            assert_close(a, b)


# ----------------------------------------------------------------------------- zero-copy

def _spy(monkeypatch, name, record):
    real = getattr(fastpool, name)

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        record.append((args, kwargs, result))
        return result

    monkeypatch.setattr(fastpool, name, spy)


def _ptr(array):
    assert isinstance(array, np.ndarray)
    return array.__array_interface__["data"][0]


def test_zero_copy_max_pool2d(monkeypatch):
    record = []
    _spy(monkeypatch, "max_pool2d", record)
    _spy(monkeypatch, "max_pool2d_backward", record)
    x = randn(*SHAPE).requires_grad_()
    y, indices = ft.max_pool2d(x, 3, 2, 1, return_indices=True)
    (args, kwargs, (y_np, indices_np)), = record
    assert kwargs["device"] == "cpu"
    assert _ptr(args[0]) == x.data_ptr()
    assert y.data_ptr() == _ptr(y_np) and indices.data_ptr() == _ptr(indices_np)

    g = randn(*y.shape, seed=1)
    (gx,) = torch.autograd.grad(y, x, g)
    (args, kwargs, gx_np), = record[1:]
    assert _ptr(args[0]) == g.data_ptr()  # grad_output
    assert _ptr(args[1]) == x.data_ptr()  # the saved input
    assert _ptr(kwargs["indices"]) == indices.data_ptr()  # the saved indices
    assert gx.data_ptr() == _ptr(gx_np)


def test_zero_copy_conv2d(monkeypatch):
    record = []
    _spy(monkeypatch, "conv2d", record)
    _spy(monkeypatch, "conv2d_backward", record)
    x = randn(*SHAPE).requires_grad_()
    w = randn(4, 3, 3, 3, seed=1).requires_grad_()
    b = randn(4, seed=2).requires_grad_()
    y = ft.conv2d(x, w, b, padding=1)
    (args, kwargs, y_np), = record
    assert [_ptr(a) for a in args[:3]] == [x.data_ptr(), w.data_ptr(), b.data_ptr()]
    assert y.data_ptr() == _ptr(y_np)

    g = randn(*y.shape, seed=3)
    grads = torch.autograd.grad(y, (x, w, b), g)
    (args, kwargs, grads_np), = record[1:]
    assert kwargs["output_mask"] == (True, True, True)
    assert _ptr(args[0]) == g.data_ptr()
    assert [t.data_ptr() for t in grads] == [_ptr(a) for a in grads_np]


def test_conv2d_backward_asks_only_for_needed_grads(monkeypatch):
    record = []
    _spy(monkeypatch, "conv2d_backward", record)
    x = randn(*SHAPE)  # no grad
    w = randn(4, 3, 3, 3, seed=1).requires_grad_()
    b = randn(4, seed=2)  # no grad
    ft.conv2d(x, w, b).sum().backward()
    (_, kwargs, grads), = record
    assert kwargs["output_mask"] == (False, True, False)
    assert grads.grad_input is None and grads.grad_bias is None
    assert w.grad is not None
    record.clear()
    x.requires_grad_()
    ft.conv2d(x, w.detach()).sum().backward()  # no bias at all
    assert record[0][1]["output_mask"] == (True, False, False)


def test_device_follows_the_tensor_not_fastpool_settings(monkeypatch):
    """CPU tensors compute on the CPU even when fastpool is configured for CUDA."""
    x = randn(*SHAPE)
    expected = F.max_pool2d(x, 2)
    try:
        fastpool.set_device("cuda")
        assert_close(ft.max_pool2d(x, 2), expected)
    finally:
        fastpool.set_device(None)
    monkeypatch.setenv("FASTPOOL_DEVICE", "cuda")
    with fastpool.use_device("cuda"):
        assert_close(ft.max_pool2d(x, 2), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch")
def test_cuda_tensors_match_cpu():
    x = randn(*SHAPE)
    w = randn(4, 3, 3, 3, seed=1)
    xp = positive(SHAPE)
    for f, inputs in [
        (lambda a, b: ft.conv2d(a, b, padding=1), (x, w)),
        (lambda a: ft.max_pool2d(a, 3, 2, 1), (x,)),
        (lambda a: ft.avg_pool2d(a, 3, 2, 1), (x,)),
        (lambda a: ft.stochastic_pool2d(a, 3, 2, seed=3), (xp,)),
        (lambda a: ft.stochastic_pool2d(a, 3, 2, training=False), (xp,)),
    ]:
        cpu = [t.clone().requires_grad_() for t in inputs]
        gpu = [t.cuda().requires_grad_() for t in inputs]
        y_cpu, y_gpu = f(*cpu), f(*gpu)
        assert y_gpu.is_cuda
        assert_close(y_gpu.cpu(), y_cpu)
        for a, b in zip(torch.autograd.grad(y_gpu.pow(2).sum(), gpu),
                        torch.autograd.grad(y_cpu.pow(2).sum(), cpu)):
            assert a.is_cuda
            assert_close(a.cpu(), b)


# ----------------------------------------------------------------------------- stochastic

def _window_members(shape, kernel_size, stride, padding, dilation):
    """For each output cell, the set of flat input indices of its window (padding
    excluded), as a bool array ``(OH, OW, H*W)``."""
    H, W = shape
    marks = (torch.arange(H * W, dtype=torch.float64) + 1).reshape(1, 1, H, W)
    cols = F.unfold(marks, kernel_size, dilation=dilation, padding=padding,
                    stride=stride)[0]  # (k*k, L), 0 marks padding
    members = torch.zeros(cols.shape[1], H * W, dtype=torch.bool)
    for col in range(cols.shape[1]):
        taps = cols[:, col].long()
        members[col, taps[taps > 0] - 1] = True
    return members


def test_stochastic_samples_are_window_elements():
    x = positive(SHAPE, seed=3)
    x[0, 0, :3, :3] = 0  # an all-zero window too
    pool = ft.StochasticPool2d(3, 2, padding=1, dilation=1, return_indices=True)
    y, indices = pool(x)
    assert indices.dtype == torch.int64 and not indices.requires_grad
    gathered = x.flatten(2).gather(2, indices.flatten(2)).reshape(y.shape)
    torch.testing.assert_close(y, gathered, rtol=0, atol=0)
    members = _window_members(SHAPE[2:], 3, 2, 1, 1)
    flat = indices.flatten(2)  # (N, C, L)
    assert bool(members[torch.arange(flat.shape[2]), flat].all())
    assert y[0, 0, 0, 0] == 0


def test_stochastic_seed_from_torch_generator():
    x = positive(SHAPE)
    torch.manual_seed(11)
    a, ia = ft.stochastic_pool2d(x, 2, return_indices=True)
    torch.manual_seed(11)
    b, ib = ft.stochastic_pool2d(x, 2, return_indices=True)
    torch.manual_seed(12)
    c, ic = ft.stochastic_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(ia, ib, rtol=0, atol=0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(ia, ic)
    # the documented draw: one int64 from the generator, as an unsigned 64-bit seed
    torch.manual_seed(11)
    seed = torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64).item() & (2**64 - 1)
    _, i_seed = fastpool.stochastic_pool2d(x.numpy(), 2, seed=seed, return_indices=True)
    np.testing.assert_array_equal(ia.numpy(), i_seed)
    # a private generator, and an explicit seed that wins over it
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _, i1 = ft.stochastic_pool2d(x, 2, return_indices=True, generator=g1)
    _, i2 = ft.stochastic_pool2d(x, 2, return_indices=True, generator=g2)
    torch.testing.assert_close(i1, i2, rtol=0, atol=0)
    _, i3 = ft.stochastic_pool2d(x, 2, return_indices=True, generator=g1, seed=77)
    _, i4 = fastpool.stochastic_pool2d(x.numpy(), 2, seed=77, return_indices=True)
    np.testing.assert_array_equal(i3.numpy(), i4)


def test_stochastic_inference_and_errors():
    x = positive(SHAPE)
    state = torch.random.get_rng_state()
    y = ft.stochastic_pool2d(x, 3, 2, padding=1, training=False)
    assert torch.equal(state, torch.random.get_rng_state())  # inference draws nothing
    expected = fastpool.stochastic_pool2d(x.numpy(), 3, 2, 1, training=False)
    np.testing.assert_array_equal(y.numpy(), expected)
    with pytest.raises(ValueError, match="return_indices"):
        ft.stochastic_pool2d(x, 2, return_indices=True, training=False)
    with pytest.raises(ValueError, match="non-negative"):
        ft.stochastic_pool2d(-x, 2)
    with pytest.raises(ValueError, match="seed"):
        ft.stochastic_pool2d(x, 2, seed=-1)


def test_stochastic_module_modes():
    x = positive(SHAPE, seed=2)
    pool = ft.StochasticPool2d(3, stride=2, padding=1)
    assert pool.training
    assert repr(pool) == ("StochasticPool2d(kernel_size=3, stride=2, padding=1, "
                          "dilation=1, ceil_mode=False)")
    torch.manual_seed(0)
    a = pool(x)
    torch.manual_seed(1)
    b = pool(x)
    assert not torch.equal(a, b)  # train mode samples
    pool.eval()
    expected = fastpool.stochastic_pool2d(x.numpy(), 3, 2, 1, training=False)
    np.testing.assert_array_equal(pool(x).numpy(), expected)
    pool_idx = ft.StochasticPool2d(3, 2, 1, return_indices=True).eval()
    with pytest.raises(ValueError, match="return_indices"):
        pool_idx(x)
    pool.train()
    torch.manual_seed(0)
    torch.testing.assert_close(pool(x), a, rtol=0, atol=0)
    g = torch.Generator().manual_seed(3)
    assert ft.StochasticPool2d(2, generator=g).generator is g


# ----------------------------------------------------------------------------- modules

@pytest.mark.parametrize("kwargs", [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=3, out_channels=6, kernel_size=(3, 2), stride=2, padding=1,
         dilation=(1, 2), groups=3, bias=False),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding="same",
         dtype=torch.float64),
])
def test_conv2d_module_is_torch_conv2d(kwargs):
    torch.manual_seed(0)
    ours = ft.Conv2d(**kwargs)
    torch.manual_seed(0)
    theirs = torch.nn.Conv2d(**kwargs)
    assert isinstance(ours, torch.nn.Conv2d)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    x = randn(*SHAPE, dtype=ours.weight.dtype)
    assert_close(ours(x), theirs(x))
    # load_state_dict from a freshly initialised nn.Conv2d
    other = torch.nn.Conv2d(**kwargs)
    ours.load_state_dict(other.state_dict())
    assert_close(ours(x), other(x))


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_conv2d_module_padding_modes(padding_mode):
    theirs = torch.nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode=padding_mode,
                             dtype=torch.float64)
    ours = ft.Conv2d(3, 4, 3, padding=(1, 2), padding_mode=padding_mode,
                     dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = randn(*SHAPE).requires_grad_()
    y, y_ref = ours(x), theirs(x)
    assert_close(y, y_ref)
    params = [x, ours.weight, ours.bias]
    g = randn(*y.shape, seed=1)
    got = torch.autograd.grad(y, params, g)
    expected = torch.autograd.grad(y_ref, [x, theirs.weight, theirs.bias], g)
    for a, b in zip(got, expected):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_modules_match_torch(dtype):
    x = randn(*SHAPE, dtype=dtype).requires_grad_()
    pairs = [
        (ft.MaxPool2d(3, 2, 1, ceil_mode=True),
         torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
        (ft.MaxPool2d(2, return_indices=True), torch.nn.MaxPool2d(2, return_indices=True)),
        (ft.AvgPool2d(3, 2, 1, count_include_pad=False),
         torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False)),
        (ft.AvgPool2d(2, divisor_override=3), torch.nn.AvgPool2d(2, divisor_override=3)),
    ]
    for ours, theirs in pairs:
        assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
        y, y_ref = ours(x), theirs(x)
        if isinstance(y, tuple):
            torch.testing.assert_close(y[1], y_ref[1], rtol=0, atol=0)
            y, y_ref = y[0], y_ref[0]
        assert_close(y, y_ref)
        (a,), (b,) = _backward_pair(y, y_ref, [x])
        assert_close(a, b)


# ----------------------------------------------------------------------------- errors

def _all_calls(x):
    w = torch.ones(4, 3, 3, 3, dtype=x.dtype)
    return [
        lambda: ft.conv2d(x, w),
        lambda: ft.max_pool2d(x, 2),
        lambda: ft.avg_pool2d(x, 2),
        lambda: ft.stochastic_pool2d(x, 2),
        lambda: ft.stochastic_pool2d(x, 2, training=False),
    ]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool,
                                   torch.complex64])
def test_unsupported_dtypes_raise_type_error(dtype):
    x = torch.ones(SHAPE, dtype=dtype)
    for call in _all_calls(x):
        with pytest.raises(TypeError, match="float32 or torch.float64"):
            call()


def test_mixed_dtypes_raise_type_error():
    x = randn(*SHAPE)
    with pytest.raises(TypeError, match="dtype"):
        ft.conv2d(x, torch.ones(4, 3, 3, 3, dtype=torch.float32))


def test_non_tensor_input_raises_type_error():
    with pytest.raises(TypeError, match="torch.Tensor"):
        ft.max_pool2d(np.ones(SHAPE), 2)


def _plain_calls(x, gy, w, b):
    """Every array argument of fastpool's plain (non-autograd) functions, by name."""
    idx = np.zeros((2, 3, 3, 4), dtype=np.int64)
    return {
        "max.x": lambda: fastpool.max_pool2d(x, 2),
        "max_backward.grad_output": lambda: fastpool.max_pool2d_backward(gy, x, 2),
        "avg.x": lambda: fastpool.avg_pool2d(x, 2),
        "avg_backward.grad_output": lambda: fastpool.avg_pool2d_backward(gy, x, 2),
        "stochastic.x": lambda: fastpool.stochastic_pool2d(x.abs(), 2, seed=0),
        "stochastic_backward.grad_output": lambda: fastpool.stochastic_pool2d_backward(
            gy, x.abs(), 2, indices=idx),
        "conv.weight": lambda: fastpool.conv2d(x, w),
        "conv.bias": lambda: fastpool.conv2d(x, w, b),
        "conv_backward.grad_output": lambda: fastpool.conv2d_backward(
            torch.ones(2, 4, 5, 6, dtype=x.dtype, requires_grad=gy.requires_grad), x, w),
    }


@pytest.mark.parametrize("case", list(_plain_calls(*[None] * 4)))
def test_plain_functions_refuse_tensors_that_require_grad(case):
    """fastpool's NumPy-level functions take CPU tensors (as NumPy does), but not ones
    that require grad: those get a TypeError naming the argument and the way out,
    before any kernel runs, instead of torch's error from inside np.asarray."""
    x, gy = randn(*SHAPE), torch.ones(2, 3, 3, 4, dtype=torch.float64)
    w, b = randn(4, 3, 3, 3, seed=1), randn(4, seed=2)
    name = case.partition(".")[2]
    graded = {"x": x, "grad_output": gy, "weight": w, "bias": b}
    graded[name] = graded[name].clone().requires_grad_()
    with pytest.raises(TypeError, match=rf"{name} is a tensor that requires grad.*"
                                        rf"{name}\.detach\(\)"):
        _plain_calls(graded["x"], graded["grad_output"], graded["weight"],
                     graded["bias"])[case]()
    # The same call with the argument detached runs and returns NumPy.
    graded[name] = graded[name].detach()
    result = _plain_calls(graded["x"], graded["grad_output"], graded["weight"],
                          graded["bias"])[case]()
    first = result[0] if isinstance(result, tuple) else result
    assert isinstance(first, np.ndarray)


# Double backward: tests/test_torch_ops.py (gradgradcheck for every op family).


# ----------------------------------------------------------------------------- process

def test_import_fastpool_does_not_import_torch():
    code = ("import sys, fastpool; assert 'torch' not in sys.modules, 'torch imported'; "
            "import fastpool.torch; assert 'torch' in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_public_names():
    pools = [f"{op}_pool{r}d" for op in ("max", "avg", "stochastic") for r in (1, 2, 3)]
    modules = [f"{op}Pool{r}d" for op in ("Max", "Avg", "Stochastic") for r in (1, 2, 3)]
    convs = [f"{name}{r}d" for name in ("conv", "Conv", "conv_transpose", "ConvTranspose")
             for r in (1, 2, 3)]
    adaptive = [f"{name}{r}d" for name in ("adaptive_avg_pool", "adaptive_max_pool",
                                           "adaptive_stochastic_pool", "AdaptiveAvgPool",
                                           "AdaptiveMaxPool", "AdaptiveStochasticPool",
                                           "max_unpool", "MaxUnpool") for r in (1, 2, 3)]
    assert sorted(ft.__all__) == sorted(convs + pools + modules + adaptive)
    for name in ft.__all__:
        assert getattr(ft, name).__doc__


# ----------------------------------------------------------------------------- training

def test_training_smoke():
    """Conv2d -> ReLU -> StochasticPool2d -> Flatten -> Linear learns a separable task."""
    torch.manual_seed(0)
    n = 64
    labels = torch.arange(n) % 2
    x = 0.3 * torch.randn(n, 1, 8, 8)
    x[labels == 0, :, :, :4] += 1.0  # class 0: bright left half
    x[labels == 1, :, :, 4:] += 1.0  # class 1: bright right half
    net = torch.nn.Sequential(
        ft.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), ft.StochasticPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    def eval_loss():
        net.eval()
        with torch.no_grad():
            loss = F.cross_entropy(net(x), labels).item()
        net.train()
        return loss

    initial = eval_loss()
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), labels)
        loss.backward()
        optimizer.step()
    final = eval_loss()
    assert np.isfinite(final)
    assert final < 0.5 * initial, (initial, final)
