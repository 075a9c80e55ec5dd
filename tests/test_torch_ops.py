"""fastpool.torch as PyTorch custom operators (``torch.ops.fastpool.*``).

``torch.library.opcheck`` on every operator (forward and backward, every rank, both
memory formats), then what the operators make possible: ``torch.compile(fullgraph=True)``
matching eager bitwise, ``torch.export``, ``torch.jit.trace``, ``torch.func.vmap`` and
``torch.func.grad`` (per-sample gradients), and double backward checked by
``gradgradcheck`` (finite differences of the backward) for every op family.
"""

import copy

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastpool.torch as ft  # noqa: E402
from fastpool._torch_library import seed_tensor  # noqa: E402
from fastpool._torch_ops_conv import OPS as CONV_OPS  # noqa: E402
from fastpool._torch_ops_pool import OPS as POOL_OPS  # noqa: E402

OPS = {**CONV_OPS, **POOL_OPS}


pytestmark = pytest.mark.usefixtures("one_numba_thread")  # conftest says why


def rand(*shape, seed=0, low=-1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * (1 - low) + low)


def distinct(*shape, seed=0):
    """No ties (finite differences never move an argmax)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    return (torch.randperm(n, generator=g).double() / n - 0.5).reshape(shape)


def channels_last(t):
    """The same values stored channels-last (any rank)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def op_arguments(name, layout):
    """Arguments for operator ``name`` on small float64 inputs that require grad."""
    base = name.removesuffix("_backward")
    rank = int(base[-2])
    backward = name.endswith("_backward")
    place = channels_last if layout == "channels_last" else (lambda t: t)
    size = (2, 3) + (5,) * rank
    ones = [1] * rank

    def grad_like(y):
        return place(rand(*y.shape, seed=9)).requires_grad_()

    x = place(distinct(*size)).requires_grad_()
    xp = place(rand(*size, low=0.1)).requires_grad_()
    if base.startswith("conv"):
        transposed = base.startswith("conv_transpose")
        weight = rand(*((3, 2) if transposed else (4, 3)), *([2] * rank), seed=1)
        bias = rand(2 if transposed else 4, seed=2)
        weight.requires_grad_(), bias.requires_grad_()
        geometry = ([2] * rank, ones, ones, 1, ones) if transposed else (
            ones, ones, ones, 1, False)
        args = (x, weight, bias) + geometry
        if backward:
            y = OPS[base](*args)
            return (grad_like(y), x, weight) + geometry + ([True, True, True],)
        return args
    if base.startswith("max_unpool"):
        four = distinct(*(2, 3) + (4,) * rank)
        pooled, indices = OPS[f"max_pool{rank}d"](four, [2] * rank, [2] * rank,
                                                   [0] * rank, ones, False)
        pooled = place(pooled.contiguous()).requires_grad_()
        geometry = ([2] * rank, [2] * rank, [0] * rank, [4] * rank)
        if backward:
            y = OPS[base](pooled, indices, *geometry)
            return (grad_like(y), pooled, indices) + geometry
        return (pooled, indices) + geometry
    mode = base.split("_pool")[0]
    adaptive = mode.startswith("adaptive_")
    mode = mode.removeprefix("adaptive_")
    geometry = ([3] * rank,) if adaptive else {
        "max": ([3] * rank, [2] * rank, ones, ones, True),
        "avg": ([3] * rank, [2] * rank, ones, True, False, None),
        "stochastic": ([2] * rank, [2] * rank, [0] * rank, ones, False),
    }[mode]
    source = xp if mode == "stochastic" else x
    flags = (True, seed_tensor(7)) if mode == "stochastic" else ()
    if not backward:
        return (source,) + geometry + flags
    outputs = OPS[base](source, *geometry, *flags)
    y = outputs if mode == "avg" else outputs[0]
    picks = () if mode == "avg" else (outputs[1],)
    return (grad_like(y), source) + picks + geometry + flags[:1]


LAYOUTS = ("channels_first", "channels_last")


def test_every_public_function_has_its_operators():
    names = {name for name in OPS}
    for base in ("max_pool", "avg_pool", "stochastic_pool", "adaptive_avg_pool",
                 "adaptive_max_pool", "adaptive_stochastic_pool", "max_unpool", "conv",
                 "conv_transpose"):
        for rank in (1, 2, 3):
            assert {f"{base}{rank}d", f"{base}{rank}d_backward"} <= names
            assert hasattr(torch.ops.fastpool, f"{base}{rank}d")
    assert len(names) == 54


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_opcheck(name, layout):
    """Schema, fake tensor (shape, dtype and strides of the fake match the real
    result's), autograd registration and AOT dispatch (dynamic shapes) of each
    operator, in each memory format."""
    args = op_arguments(name, layout)
    torch.library.opcheck(OPS[name], args)


def test_fakes_keep_the_memory_format():
    """A channels-last input gives a channels-last output in a traced graph too."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = channels_last(distinct(2, 3, 6, 6))
    real = ft.max_pool2d(x, 2)
    with FakeTensorMode() as mode:
        fake = ft.max_pool2d(mode.from_tensor(x), 2)
    assert fake.shape == real.shape and fake.stride() == real.stride()
    assert real.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- a model

class Net(torch.nn.Module):
    """Every op family in one graph (2-D), stochastic pooling with explicit seeds so
    that compiled and eager runs sample alike."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64) / 5)
        self.w2 = torch.nn.Parameter(torch.randn(6, 4, 2, 2, generator=g, dtype=torch.float64) / 5)
        self.b2 = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))

    def forward(self, x):
        y = torch.relu(ft.conv2d(x, self.w1, padding=1))
        p, idx = ft.max_pool2d(y, 2, return_indices=True)
        u = ft.max_unpool2d(p, idx, 2)
        a = ft.avg_pool2d(u + y, 3, 1, 1, count_include_pad=False)
        s = ft.stochastic_pool2d(a, 2, seed=11)
        t = ft.conv_transpose2d(s, self.w2, self.b2, stride=2)
        q = ft.adaptive_max_pool2d(t, (5, 4)) + ft.adaptive_avg_pool2d(t, (5, 4))
        r = ft.adaptive_stochastic_pool2d(torch.relu(q), 2, seed=3)
        return r.flatten(1)


def _run(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    out.pow(2).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compile_fullgraph_matches_eager_bitwise(layout):
    torch._dynamo.reset()
    model = Net()
    x = rand(2, 3, 12, 12, seed=4)
    x = channels_last(x) if layout == "channels_last" else x
    eager = _run(model, x)
    compiled = _run(torch.compile(model, fullgraph=True), x)
    assert torch.equal(compiled[0], eager[0])
    for c, e in zip(compiled[1], eager[1]):
        assert torch.equal(c, e)


def test_export_and_trace_run_the_operators():
    model = Net().eval()
    x = rand(2, 3, 12, 12, seed=4)
    expected = model(x)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"fastpool.conv2d.default", "fastpool.max_unpool2d.default"} <= targets
    assert torch.equal(program.module()(x), expected)
    traced = torch.jit.trace(model, (x,))
    assert torch.equal(traced(x), expected)
    assert torch.equal(traced(x + 1), model(x + 1))  # not a constant


# ----------------------------------------------------------------------------- torch.func

W_CONV, W_TRANSPOSED = rand(4, 3, 3, 3, seed=1), rand(3, 2, 2, 2, seed=1)
VMAPPED = {
    "max": lambda t: ft.max_pool2d(t, 3, 2, 1),
    "avg": lambda t: ft.avg_pool2d(t, 3, 2, 1, ceil_mode=True),
    "adaptive_max": lambda t: ft.adaptive_max_pool2d(t, 3),
    "adaptive_avg": lambda t: ft.adaptive_avg_pool2d(t, (2, 3)),
    "conv": lambda t: ft.conv2d(t, W_CONV, padding=1),
    "conv_transpose": lambda t: ft.conv_transpose2d(t, W_TRANSPOSED, stride=2),
}


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("name", sorted(VMAPPED))
def test_vmap_equals_a_loop(name, batched):
    f = VMAPPED[name]
    xs = distinct(4, 2, 3, 7, 6) if batched else distinct(4, 3, 7, 6)
    expected = torch.stack([f(x) for x in xs])
    assert torch.equal(torch.func.vmap(f)(xs), expected)
    # vmapped along another axis
    assert torch.equal(torch.func.vmap(f, in_dims=1)(xs.movedim(0, 1)), expected)


def test_vmap_over_weights_loops():
    x = rand(2, 3, 6, 6)
    ws = rand(3, 4, 3, 3, 3, seed=1)
    got = torch.func.vmap(lambda w: ft.conv2d(x, w))(ws)
    assert torch.equal(got, torch.stack([ft.conv2d(x, w) for w in ws]))


def test_vmap_of_stochastic_pooling_samples_as_one_batch():
    """Under vmap the vmapped axis joins the batch: the picks are those of one call on
    the whole stack (each sample its own picks), the same on every run."""
    xs = rand(3, 2, 3, 6, 6, low=0.1)
    f = lambda t: ft.stochastic_pool2d(t, 2, seed=5)  # noqa: E731
    got = torch.func.vmap(f)(xs)
    assert torch.equal(got, f(xs.reshape(6, 3, 6, 6)).reshape(3, 2, 3, 3, 3))


def test_per_sample_gradients_match_pytorch():
    xs, w = rand(5, 3, 6, 6), rand(4, 3, 3, 3, seed=1)

    def loss(conv, pool):
        return lambda x: pool(conv(x[None], w, padding=1), 2).pow(2).sum()

    ours = torch.func.vmap(torch.func.grad(loss(ft.conv2d, ft.max_pool2d)))(xs)
    theirs = torch.func.vmap(torch.func.grad(loss(F.conv2d, F.max_pool2d)))(xs)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- double backward

DOUBLE = {  # name: (function, rank, kind); conv kinds give their weight's leading axes
    "conv1d": (lambda x, w, b: ft.conv1d(x, w, b, stride=2, padding=1), 1, (4, 3)),
    "conv2d_same": (lambda x, w, b: ft.conv2d(x, w, b, padding="same", dilation=2), 2,
                    (4, 3)),
    "conv2d_depthwise": (lambda x, w, b: ft.conv2d(x, w, b, groups=3), 2, (3, 1)),
    "conv3d": (lambda x, w, b: ft.conv3d(x, w, b, padding=(1, 0, 1)), 3, (4, 3)),
    "conv_transpose2d": (lambda x, w, b: ft.conv_transpose2d(
        x, w, b, stride=2, padding=1, output_padding=1), 2, (3, 2)),
    "max_pool2d": (lambda x: ft.max_pool2d(x, 3, 2, 1, ceil_mode=True), 2, "pool"),
    "max_pool3d": (lambda x: ft.max_pool3d(x, 2, 1, dilation=(1, 2, 1)), 3, "pool"),
    "avg_pool1d": (lambda x: ft.avg_pool1d(x, 3, 2, 1, count_include_pad=False), 1,
                   "pool"),
    "avg_pool2d": (lambda x: ft.avg_pool2d(x, 3, 2, 1, divisor_override=5), 2, "pool"),
    "stochastic_pool2d": (lambda x: ft.stochastic_pool2d(x, 2, seed=3), 2, "positive"),
    "adaptive_avg_pool2d": (lambda x: ft.adaptive_avg_pool2d(x, (3, 2)), 2, "pool"),
    "adaptive_max_pool3d": (lambda x: ft.adaptive_max_pool3d(x, 2), 3, "pool"),
    "adaptive_stochastic_pool2d": (lambda x: ft.adaptive_stochastic_pool2d(x, 3, seed=2),
                                   2, "positive"),
    "max_unpool2d": (None, 2, "unpool"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(DOUBLE))
def test_gradgradcheck(name, layout):
    f, rank, kind = DOUBLE[name]
    place = channels_last if layout == "channels_last" else (lambda t: t)
    shape = (2, 3) + (6, 5)[:rank] if rank < 3 else (1, 3, 4, 4, 3)
    if isinstance(kind, tuple):  # a convolution
        x = place(rand(*shape))
        w = rand(*kind, *(3, 2, 2)[:rank], seed=1)
        transposed = name.startswith("conv_transpose")
        b = rand(kind[1] if transposed else kind[0], seed=2)
        inputs = [t.requires_grad_() for t in (x, w, b)]
    elif kind == "unpool":
        _, idx = F.max_pool2d(distinct(2, 3, 6, 6), 2, return_indices=True)
        inputs = [place(rand(2, 3, 3, 3)).requires_grad_()]
        f = lambda x: ft.max_unpool2d(x, idx, 2)  # noqa: E731
    else:
        source = rand(*shape, low=0.1) if kind == "positive" else distinct(*shape)
        inputs = [place(source).requires_grad_()]
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradient_penalty_through_a_module_matches_pytorch():
    """WGAN-GP style: the norm of the input gradient, differentiated with respect to
    the weights."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(ft.Conv2d(3, 4, 3), ft.AvgPool2d(2)).double()
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AvgPool2d(2)).double()
    theirs.load_state_dict(ours.state_dict())
    x = rand(2, 3, 8, 8)
    grads = []
    for model in (ours, theirs):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(xi).sum(), xi, create_graph=True)
        penalty = (g.flatten(1).norm(dim=1) - 1).pow(2).mean()
        grads.append(torch.autograd.grad(penalty, list(model.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_stochastic_inference_double_backward_says_so():
    x = rand(2, 3, 6, 6, low=0.1).requires_grad_()
    (g,) = torch.autograd.grad(ft.stochastic_pool2d(x, 2, training=False).pow(2).sum(), x,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="training=False.*once differentiable"):
        g.sum().backward()


# ----------------------------------------------------------------------------- TorchScript

def _scriptable_models():
    """Every module family, in the forms their arguments take (tuples, None entries,
    'same', a padding mode, indices, a 1-D and a 3-D rank)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        ft.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), ft.MaxPool2d(2, ceil_mode=True),
        ft.AvgPool2d((3, 1), 1, (1, 0), count_include_pad=False),
        ft.StochasticPool2d(2, 1), ft.ConvTranspose2d(4, 2, 2, stride=2, output_padding=1),
        ft.AdaptiveMaxPool2d((3, None)), ft.AdaptiveAvgPool2d(2), torch.nn.ReLU(),
        ft.AdaptiveStochasticPool2d((2, None)),
        ft.Conv2d(2, 2, 3, padding="same", padding_mode="reflect", bias=False))
    seq = torch.nn.Sequential(ft.Conv1d(3, 2, 3, stride=2), ft.AvgPool1d(2),
                              ft.MaxPool1d(2, 1))
    vol = torch.nn.Sequential(ft.Conv3d(3, 2, 2), ft.MaxPool3d(2, 1),
                              ft.AdaptiveAvgPool3d((None, 1, 2)))
    return [(net, (2, 3, 8, 8)), (seq, (2, 3, 12)), (vol, (1, 3, 4, 5, 5))]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_jit_script_matches_eager_and_saves(mode, tmp_path):
    """``torch.jit.script`` compiles fastpool modules (through their TorchScript
    twins): the same outputs and gradients as eager, stochastic layers drawing the same
    seeds from PyTorch's generator, and a saved module that loads and runs."""
    for i, (model, shape) in enumerate(_scriptable_models()):
        model = model.double().train(mode == "train")
        # Scripting replaces the fastpool modules inside what it is given by their
        # twins (PyTorch's __prepare_scriptable__ protocol): script a copy, so that
        # `model` keeps the eager modules to compare with.
        scripted = torch.jit.script(copy.deepcopy(model))
        assert any(type(m).__module__ == "fastpool.torch" for m in model.modules())
        x = rand(*shape, seed=i, low=0.0)
        outputs = []
        for m in (model, scripted):
            xi = x.clone().requires_grad_()
            torch.manual_seed(5)
            y = m(xi)
            y.pow(2).sum().backward()
            outputs.append((y, xi.grad))
        assert torch.equal(outputs[0][0], outputs[1][0])
        assert torch.equal(outputs[0][1], outputs[1][1])
        path = tmp_path / f"model{i}.pt"
        torch.jit.save(scripted, str(path))
        torch.manual_seed(5)
        assert torch.equal(torch.jit.load(str(path))(x), outputs[0][0])
    graph = str(torch.jit.script(_scriptable_models()[0][0]).inlined_graph)
    assert "fastpool::conv2d" in graph and "fastpool::stochastic_pool2d" in graph


def test_jit_script_indices_and_unpooling():
    x = distinct(2, 3, 6, 6)
    pool, unpool = ft.MaxPool2d(2, return_indices=True), ft.MaxUnpool2d(2)
    y, idx = torch.jit.script(copy.deepcopy(pool))(x)
    ey, eidx = pool(x)
    assert torch.equal(y, ey) and torch.equal(idx, eidx)
    scripted = torch.jit.script(copy.deepcopy(unpool))
    assert torch.equal(scripted(y, idx), unpool(y, idx))
    assert torch.equal(scripted(y, idx, [2, 3, 7, 7]), unpool(y, idx, (2, 3, 7, 7)))


def test_jit_trace_and_script_warn_only_of_their_own_deprecation():
    """No TracerWarning (nothing data-dependent leaks into the trace) and nothing from
    fastpool; PyTorch 2.13 deprecates torch.jit itself, which is PyTorch's warning."""
    import warnings
    model = _scriptable_models()[0][0].double().eval()
    x = rand(2, 3, 8, 8, low=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(model, (x,))
        torch.jit.script(model)
    others = [w for w in caught if "is deprecated. Please switch to `torch.compile`"
              not in str(w.message)]
    assert not others, [str(w.message) for w in others]
