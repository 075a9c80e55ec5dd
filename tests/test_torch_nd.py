"""fastpool.torch's 1-D and 3-D pools and the channels-last memory format:
gradcheck, the modules against their torch.nn namesakes, values against
torch.nn.functional."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastpool.torch as fpt  # noqa: E402

F = torch.nn.functional
SHAPES = {1: (2, 3, 11), 2: (2, 3, 7, 6), 3: (2, 3, 5, 6, 4)}
MEMORY_FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}


def _input(rank, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(SHAPES[rank], dtype=dtype, generator=generator) + 0.05


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("kind", ["max", "avg", "stochastic train", "stochastic eval"])
def test_gradcheck(rank, kind):
    x = _input(rank).requires_grad_()
    args = dict(kernel_size=3, stride=2, padding=1)
    if kind == "max":
        f = getattr(fpt, f"max_pool{rank}d")
        function = (lambda t: f(t, **args))
    elif kind == "avg":
        f = getattr(fpt, f"avg_pool{rank}d")
        function = (lambda t: f(t, **args, ceil_mode=True, count_include_pad=False))
    else:
        f = getattr(fpt, f"stochastic_pool{rank}d")
        training = kind.endswith("train")
        function = (lambda t: f(t, **args, training=training, seed=7))
    assert torch.autograd.gradcheck(function, (x,))


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functions_and_modules_match_torch(rank, dtype):
    x = _input(rank, dtype)
    args = dict(kernel_size=3, stride=2, padding=1)
    y, i = getattr(fpt, f"max_pool{rank}d")(x, **args, return_indices=True)
    yt, it = getattr(F, f"max_pool{rank}d")(x, **args, return_indices=True)
    assert torch.equal(y, yt) and torch.equal(i, it)
    torch.testing.assert_close(getattr(fpt, f"avg_pool{rank}d")(x, **args),
                               getattr(F, f"avg_pool{rank}d")(x, **args))
    for name in ("MaxPool", "AvgPool"):
        ours = getattr(fpt, f"{name}{rank}d")(3, stride=2, padding=1)
        theirs = getattr(torch.nn, f"{name}{rank}d")(3, stride=2, padding=1)
        assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
        torch.testing.assert_close(ours(x), theirs(x))
    pool = getattr(fpt, f"StochasticPool{rank}d")(3, stride=2, padding=1)
    torch.manual_seed(3)
    sampled = pool(x)
    torch.manual_seed(3)
    assert torch.equal(pool(x), sampled)  # torch.manual_seed reproduces the picks
    pool.eval()
    weighted = pool(x)
    expected = getattr(fpt, f"stochastic_pool{rank}d")(x, 3, 2, 1, training=False)
    assert torch.equal(weighted, expected)


@pytest.mark.parametrize("rank", [2, 3])
def test_channels_last_tensors_stay_channels_last(rank):
    memory_format = MEMORY_FORMATS[rank]
    x = _input(rank).contiguous(memory_format=memory_format).requires_grad_()
    reference = x.detach().contiguous().requires_grad_()
    for name in ("max", "avg", "stochastic"):
        f = getattr(fpt, f"{name}_pool{rank}d")
        kwargs = dict(seed=5) if name == "stochastic" else {}
        y = f(x, 3, 2, 1, **kwargs)
        assert y.is_contiguous(memory_format=memory_format), name
        y_ref = f(reference, 3, 2, 1, **kwargs)
        assert torch.equal(y, y_ref), name
        (grad,) = torch.autograd.grad(y.sum(), x)
        (grad_ref,) = torch.autograd.grad(y_ref.sum(), reference)
        torch.testing.assert_close(grad, grad_ref)
    # And against PyTorch in the same memory format.
    torch.testing.assert_close(getattr(fpt, f"max_pool{rank}d")(x, 3, 2, 1),
                               getattr(F, f"max_pool{rank}d")(x, 3, 2, 1))


def test_bad_input_names_the_argument():
    x = _input(3)
    with pytest.raises(ValueError, match="x must be 5-D"):
        fpt.max_pool3d(x[0, 0], 2)
    with pytest.raises(TypeError, match="input must have a floating dtype"):
        fpt.avg_pool1d(x.to(torch.int32)[0], 2)
    with pytest.raises(TypeError, match="return_indices"):
        fpt.max_pool1d(x[0], 2, return_indices="yes")
    with pytest.raises(ValueError, match="padding"):
        fpt.stochastic_pool3d(x, 2, padding=2)
    assert np.isfinite(fpt.max_pool3d(x, 2).numpy()).all()


def test_conv1d_gradcheck_and_module():
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(2, 4, 13, dtype=torch.float64, generator=generator).requires_grad_()
    w = torch.rand(6, 2, 3, dtype=torch.float64, generator=generator).requires_grad_()
    b = torch.rand(6, dtype=torch.float64, generator=generator).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, c, d: fpt.conv1d(a, c, d, stride=2, padding=1, groups=2), (x, w, b))
    ours = fpt.Conv1d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect").double()
    theirs = torch.nn.Conv1d(4, 6, 3, padding=2, dilation=2,
                             padding_mode="reflect").double()
    theirs.load_state_dict(ours.state_dict())
    assert repr(ours) == repr(theirs)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(fpt.conv1d(x, w, b, padding="same", groups=2),
                               F.conv1d(x, w, b, padding="same", groups=2))


def test_conv3d_gradcheck_and_module():
    generator = torch.Generator().manual_seed(4)
    x = torch.rand(1, 4, 4, 3, 4, dtype=torch.float64, generator=generator).requires_grad_()
    w = torch.rand(2, 2, 2, 2, 3, dtype=torch.float64, generator=generator).requires_grad_()
    b = torch.rand(2, dtype=torch.float64, generator=generator).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, c, d: fpt.conv3d(a, c, d, stride=(2, 1, 1), padding=1, groups=2),
        (x, w, b))
    ours = fpt.Conv3d(4, 2, 3, padding=1, padding_mode="replicate").double()
    theirs = torch.nn.Conv3d(4, 2, 3, padding=1, padding_mode="replicate").double()
    theirs.load_state_dict(ours.state_dict())
    assert repr(ours) == repr(theirs)
    torch.testing.assert_close(ours(x), theirs(x))
    xl = x.detach().contiguous(memory_format=torch.channels_last_3d)
    yl = fpt.conv3d(xl, w.detach(), padding=1, groups=2)
    assert yl.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(yl, F.conv3d(xl, w.detach(), padding=1, groups=2))


# ----------------------------------------------------------------------------- adaptive

ADAPTIVE_SIZES = {1: 4, 2: (3, None), 3: (2, 5, 3)}


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("op", ["avg", "max"])
def test_adaptive_gradcheck(rank, op):
    x = _input(rank).requires_grad_()
    f = getattr(fpt, f"adaptive_{op}_pool{rank}d")
    assert torch.autograd.gradcheck(lambda t: f(t, ADAPTIVE_SIZES[rank]), (x,))
    assert torch.autograd.gradcheck(lambda t: f(t, 1), (x,))  # global pooling


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adaptive_functions_and_modules_match_torch(rank, dtype):
    x = _input(rank, dtype)
    size = ADAPTIVE_SIZES[rank]
    torch.testing.assert_close(getattr(fpt, f"adaptive_avg_pool{rank}d")(x, size),
                               getattr(F, f"adaptive_avg_pool{rank}d")(x, size))
    y, i = getattr(fpt, f"adaptive_max_pool{rank}d")(x, size, return_indices=True)
    yt, it = getattr(F, f"adaptive_max_pool{rank}d")(x, size, return_indices=True)
    assert torch.equal(y, yt) and torch.equal(i, it)
    for name, kwargs in (("AdaptiveAvgPool", {}), ("AdaptiveMaxPool", {}),
                         ("AdaptiveMaxPool", dict(return_indices=True))):
        ours = getattr(fpt, f"{name}{rank}d")(size, **kwargs)
        theirs = getattr(torch.nn, f"{name}{rank}d")(size, **kwargs)
        assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
        got, want = ours(x), theirs(x)
        for a, b in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("rank", [2, 3])
def test_adaptive_channels_last_tensors_stay_channels_last(rank):
    x = _input(rank).contiguous(memory_format=MEMORY_FORMATS[rank]).requires_grad_()
    for op in ("avg", "max"):
        y = getattr(fpt, f"adaptive_{op}_pool{rank}d")(x, ADAPTIVE_SIZES[rank])
        assert y.is_contiguous(memory_format=MEMORY_FORMATS[rank])
        y.sum().backward()
        assert x.grad.is_contiguous(memory_format=MEMORY_FORMATS[rank])
        x.grad = None


# ----------------------------------------------------------------------------- unpooling

@pytest.mark.parametrize("rank", [1, 2, 3])
def test_max_unpool_gradcheck_module_and_torch(rank):
    x = _input(rank)
    y, indices = getattr(F, f"max_pool{rank}d")(x, 2, return_indices=True)
    y = y.detach().requires_grad_()
    f = getattr(fpt, f"max_unpool{rank}d")
    assert torch.autograd.gradcheck(lambda t: f(t, indices, 2, output_size=x.shape), (y,))
    ours, theirs = getattr(fpt, f"MaxUnpool{rank}d")(2), getattr(torch.nn,
                                                                 f"MaxUnpool{rank}d")(2)
    assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
    assert torch.equal(ours(y, indices, output_size=x.shape[2:]),
                       theirs(y, indices, output_size=x.shape[2:]))
    assert torch.equal(ours(y, indices), theirs(y, indices))


@pytest.mark.parametrize("rank", [2, 3])
def test_max_unpool_channels_last_stays_channels_last(rank):
    x = _input(rank).contiguous(memory_format=MEMORY_FORMATS[rank])
    y, indices = fpt.__dict__[f"max_pool{rank}d"](x, 2, return_indices=True)
    assert y.is_contiguous(memory_format=MEMORY_FORMATS[rank])
    u = getattr(fpt, f"max_unpool{rank}d")(y.requires_grad_(), indices, 2)
    assert u.is_contiguous(memory_format=MEMORY_FORMATS[rank])
    u.sum().backward()
    assert y.grad.is_contiguous(memory_format=MEMORY_FORMATS[rank])


# ----------------------------------------------------------------------------- transposed conv

@pytest.mark.parametrize("rank", [1, 2, 3])
def test_conv_transpose_gradcheck_module_and_output_size(rank):
    x = _input(rank).requires_grad_()
    generator = torch.Generator().manual_seed(rank)
    w = torch.randn((3, 2) + (3,) * rank, dtype=torch.float64,
                    generator=generator).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, generator=generator).requires_grad_()
    f = getattr(fpt, f"conv_transpose{rank}d")
    assert torch.autograd.gradcheck(
        lambda *t: f(*t, stride=2, padding=1, output_padding=1), (x, w, b))
    torch.manual_seed(0)
    ours = getattr(fpt, f"ConvTranspose{rank}d")(3, 4, 3, stride=2, padding=1).double()
    torch.manual_seed(0)
    theirs = getattr(torch.nn, f"ConvTranspose{rank}d")(3, 4, 3, stride=2, padding=1).double()
    assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
    torch.testing.assert_close(ours(x), theirs(x))
    size = tuple(2 * n for n in x.shape[2:])  # needs output_padding 1 on every axis
    torch.testing.assert_close(ours(x, output_size=size), theirs(x, output_size=size))
    assert ours(x, output_size=size).shape[2:] == size


@pytest.mark.parametrize("rank", [2, 3])
def test_conv_transpose_channels_last_stays_channels_last(rank):
    x = _input(rank).contiguous(memory_format=MEMORY_FORMATS[rank]).requires_grad_()
    module = getattr(fpt, f"ConvTranspose{rank}d")(3, 4, 2, stride=2).double()
    y = module(x)
    assert y.is_contiguous(memory_format=MEMORY_FORMATS[rank])
    y.sum().backward()
    assert x.grad.is_contiguous(memory_format=MEMORY_FORMATS[rank])


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_adaptive_stochastic_gradcheck_and_module(rank):
    x = _input(rank).requires_grad_()
    f = getattr(fpt, f"adaptive_stochastic_pool{rank}d")
    size = ADAPTIVE_SIZES[rank]
    assert torch.autograd.gradcheck(lambda t: f(t, size, seed=3), (x,))
    assert torch.autograd.gradcheck(lambda t: f(t, size, training=False), (x,))
    pool = getattr(fpt, f"AdaptiveStochasticPool{rank}d")(size, return_indices=True)
    torch.manual_seed(5)
    y, picks = pool(x)
    torch.manual_seed(5)
    assert torch.equal(pool(x)[1], picks)  # torch.manual_seed reproduces the picks
    expected = getattr(__import__("fastpool"), f"adaptive_stochastic_pool{rank}d")(
        x.detach().numpy(), size, training=False)
    weighted = getattr(fpt, f"AdaptiveStochasticPool{rank}d")(size).eval()
    torch.testing.assert_close(weighted(x), torch.from_numpy(expected))
