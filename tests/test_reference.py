"""Tests of tests/reference.py itself, so kernel tests can trust it.

Max / average pooling are compared with torch.nn.functional (float64, autograd for the
backward) where PyTorch is importable; stochastic pooling is checked against finite
differences, sampling frequencies and the contract's edge cases; the generator against the
published SplitMix64 test vector.
"""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402
from conftest import seed_for  # noqa: E402


# ----------------------------------------------------------------------------- case sweep

def _random_cases(n_cases, seed, with_dilation):
    """Random (H, W, k, s, p, d, ceil_mode) with torch-legal padding (p <= k // 2)."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n_cases:
        kh, kw = (int(v) for v in rng.integers(1, 5, size=2))
        sh, sw = (int(v) for v in rng.integers(1, 4, size=2))
        dh, dw = (int(v) for v in rng.integers(1, 3, size=2)) if with_dilation else (1, 1)
        # docs/design.md section 2 allows p <= ek // 2; torch only accepts p <= k // 2.
        ph, pw = int(rng.integers(0, kh // 2 + 1)), int(rng.integers(0, kw // 2 + 1))
        H, W = (int(v) for v in rng.integers(1, 10, size=2))
        ceil_mode = bool(rng.integers(0, 2))
        oh = ref.pool_output_size(H, kh, sh, ph, dh, ceil_mode)
        ow = ref.pool_output_size(W, kw, sw, pw, dw, ceil_mode)
        if oh < 1 or ow < 1:
            continue
        cases.append((H, W, (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode))
    return cases


MAX_CASES = _random_cases(60, 1234, with_dilation=True)
AVG_CASES = _random_cases(60, 5678, with_dilation=False)


def _distinct_input(rng, shape):
    """Values without ties: a random permutation, shifted and scaled."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) - 7.5) * 0.25


# ----------------------------------------------------------------------------- geometry

def test_pair():
    assert ref.pair(3) == (3, 3)
    assert ref.pair((2, 5)) == (2, 5)
    assert ref.pair([1, 4]) == (1, 4)


def test_pool_output_size_examples():
    assert ref.pool_output_size(7, 2, 2, 0, 1, False) == 3
    assert ref.pool_output_size(7, 2, 2, 0, 1, True) == 4
    # ceil_mode: the last window must start inside the input or the left padding
    assert ref.pool_output_size(4, 2, 2, 1, 1, True) == 3
    assert ref.pool_output_size(5, 3, 1, 0, 2, False) == 1


# ----------------------------------------------------------------------------- max (torch)

@pytest.mark.parametrize("case", MAX_CASES)
def test_max_pool2d_matches_torch(case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    H, W, k, s, p, d, ceil_mode = case
    rng = np.random.default_rng(seed_for(case))
    x = _distinct_input(rng, (2, 2, H, W))
    y, ind = ref.max_pool2d(x, k, s, p, d, ceil_mode)
    if (ind < 0).any():
        pytest.skip("a window lies entirely in the padding (torch's index is undefined)")
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt, it = F.max_pool2d(xt, k, s, p, d, ceil_mode, return_indices=True)
    assert y.shape == tuple(yt.shape)
    assert (ref.pool_output_size(H, k[0], s[0], p[0], d[0], ceil_mode),
            ref.pool_output_size(W, k[1], s[1], p[1], d[1], ceil_mode)) == tuple(yt.shape[2:])
    assert y.dtype == np.float64 and ind.dtype == np.int64
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(ind, it.numpy())

    g = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(g))
    gi = ref.max_pool2d_backward(g, x, k, s, p, d, ceil_mode)
    np.testing.assert_allclose(gi, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.scatter_to_indices(g, ind, x.shape), gi, rtol=0, atol=0)


# ----------------------------------------------------------------------------- max (contract)

def test_max_first_maximum_wins():
    x = np.array([[[[1.0, 3.0], [3.0, 2.0]]]])
    y, ind = ref.max_pool2d(x, 2)
    assert y[0, 0, 0, 0] == 3.0 and ind[0, 0, 0, 0] == 1


def test_max_first_nan_wins():
    x = np.array([[[[5.0, np.nan], [np.nan, 9.0]]]])
    y, ind = ref.max_pool2d(x, 2)
    assert np.isnan(y[0, 0, 0, 0]) and ind[0, 0, 0, 0] == 1


def test_max_all_neg_inf_picks_first_in_range():
    x = np.full((1, 1, 3, 3), -np.inf)
    y, ind = ref.max_pool2d(x, 2, 2, 1)
    assert np.all(y == -np.inf)
    np.testing.assert_array_equal(ind[0, 0], [[0, 1], [3, 4]])


def test_max_backward_accumulates_overlaps():
    x = np.array([[[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]])
    gi = ref.max_pool2d_backward(np.ones((1, 1, 2, 2)), x, 2, 1)
    assert gi[0, 0, 0, 1] == 2.0 and gi.sum() == 4.0


# ----------------------------------------------------------------------------- avg (torch)

@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("divisor_override", [None, 3])
@pytest.mark.parametrize("case", AVG_CASES[:15])
def test_avg_pool2d_matches_torch(case, count_include_pad, divisor_override):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    H, W, k, s, p, _, ceil_mode = case
    rng = np.random.default_rng(seed_for(case))
    x = rng.standard_normal((2, 2, H, W))
    kw = dict(ceil_mode=ceil_mode, count_include_pad=count_include_pad,
              divisor_override=divisor_override)
    y = ref.avg_pool2d(x, k, s, p, **kw)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = F.avg_pool2d(xt, k, s, p, **kw)
    assert y.shape == tuple(yt.shape) and y.dtype == np.float64
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)

    g = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(g))
    gi = ref.avg_pool2d_backward(g, x, k, s, p, **kw)
    np.testing.assert_allclose(gi, xt.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", AVG_CASES[15:])
def test_avg_pool2d_matches_torch_more_geometries(case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    H, W, k, s, p, _, ceil_mode = case
    rng = np.random.default_rng(seed_for(case))
    x = rng.standard_normal((1, 2, H, W))
    cip = bool(rng.integers(0, 2))
    y = ref.avg_pool2d(x, k, s, p, ceil_mode, cip)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = F.avg_pool2d(xt, k, s, p, ceil_mode, cip)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(ref.avg_pool2d_backward(g, x, k, s, p, ceil_mode, cip),
                               xt.grad.numpy(), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- generator

def test_mix64_splitmix64_test_vector():
    state = 0
    state = (state + ref.GAMMA) & ref.MASK
    assert ref.mix64(state) == 0xE220A8397B1DCDAF


def test_stochastic_uniform_range_and_determinism():
    us = [ref.stochastic_uniform(s, n, c, oh, ow)
          for s in range(3) for n in range(2) for c in range(2)
          for oh in range(3) for ow in range(3)]
    assert all(0.0 <= u < 1.0 for u in us)
    assert len(set(us)) == len(us)
    assert ref.stochastic_uniform(7, 1, 2, 3, 4) == ref.stochastic_uniform(7, 1, 2, 3, 4)


# ----------------------------------------------------------------------------- stochastic

STOCH_GEOMS = [
    dict(kernel_size=2, stride=1, padding=1, dilation=1, ceil_mode=False),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=1, ceil_mode=True),
    dict(kernel_size=2, stride=2, padding=1, dilation=2, ceil_mode=False),
]


@pytest.mark.parametrize("geom", STOCH_GEOMS)
def test_stochastic_inference_backward_matches_finite_differences(geom):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 2.0, size=(1, 2, 5, 4))
    y, ind = ref.stochastic_pool2d(x, training=False, **geom)
    assert ind is None
    g = rng.standard_normal(y.shape)
    gi = ref.stochastic_pool2d_backward(g, x, training=False, **geom)
    eps = 1e-6
    num = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fp = np.sum(g * ref.stochastic_pool2d(xp, training=False, **geom)[0])
        fm = np.sum(g * ref.stochastic_pool2d(xm, training=False, **geom)[0])
        num[idx] = (fp - fm) / (2 * eps)
    np.testing.assert_allclose(gi, num, rtol=1e-6, atol=1e-8)


def test_stochastic_inference_values():
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    y, _ = ref.stochastic_pool2d(x, 2, training=False)
    assert y[0, 0, 0, 0] == pytest.approx(30.0 / 10.0)
    assert y[1, 0, 0, 0] == 0.0
    gi = ref.stochastic_pool2d_backward(np.ones((2, 1, 1, 1)), x, 2, training=False)
    assert np.all(gi[1] == 0.0)


def test_stochastic_sampling_frequencies_chi_square():
    stats = pytest.importorskip("scipy.stats")
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    counts = np.zeros(4)
    for seed in range(4000):
        y, ind = ref.stochastic_pool2d(x, 2, training=True, seed=seed)
        i = int(ind[0, 0, 0, 0])
        assert y[0, 0, 0, 0] == x.flat[i]
        counts[i] += 1
    expected = 4000 * np.array([1.0, 2.0, 3.0, 4.0]) / 10.0
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_stochastic_zero_window_picks_first_in_range():
    x = np.zeros((1, 1, 3, 3))
    y, ind = ref.stochastic_pool2d(x, 2, 2, 1, training=True, seed=3)
    assert np.all(y == 0.0)
    np.testing.assert_array_equal(ind[0, 0], [[0, 1], [3, 4]])


def test_stochastic_padding_never_chosen_and_backward_scatters():
    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 1.0, size=(2, 2, 4, 5))
    geom = dict(kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=True)
    for seed in range(30):
        y, ind = ref.stochastic_pool2d(x, training=True, seed=seed, **geom)
        assert ind.dtype == np.int64
        assert np.all((ind >= 0) & (ind < 4 * 5))
        for n, c, oh, ow in np.ndindex(y.shape):
            i = int(ind[n, c, oh, ow])
            h, w = divmod(i, 5)
            assert y[n, c, oh, ow] == x[n, c, h, w]
            # the chosen element lies inside the window
            assert oh * 2 - 1 <= h < oh * 2 + 2 and ow * 2 - 1 <= w < ow * 2 + 2
    g = rng.standard_normal(y.shape)
    gi = ref.stochastic_pool2d_backward(g, x, training=True, indices=ind, **geom)
    np.testing.assert_array_equal(gi, ref.scatter_to_indices(g, ind, x.shape))
    assert gi.sum() == pytest.approx(g.sum())


def test_stochastic_single_nonzero_always_chosen():
    x = np.zeros((1, 1, 2, 2))
    x[0, 0, 1, 0] = 0.5
    for seed in range(50):
        y, ind = ref.stochastic_pool2d(x, 2, training=True, seed=seed)
        assert ind[0, 0, 0, 0] == 2 and y[0, 0, 0, 0] == 0.5


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
@pytest.mark.parametrize("training", [True, False])
def test_stochastic_rejects_bad_input(bad, training):
    x = np.ones((1, 1, 2, 2))
    x[0, 0, 1, 1] = bad
    with pytest.raises(ValueError):
        ref.stochastic_pool2d(x, 2, training=training)


# ----------------------------------------------------------------------------- conv

def _conv_cases(n_cases, seed):
    """Random valid conv2d cases: shapes, bias, stride/padding/dilation/groups."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n_cases:
        groups = int(rng.integers(1, 4))
        cg, og = (int(v) for v in rng.integers(1, 4, size=2))
        kh, kw = (int(v) for v in rng.integers(1, 5, size=2))
        dh, dw = (int(v) for v in rng.integers(1, 3, size=2))
        padding = ["same", "valid", int(rng.integers(0, 3)),
                   (int(rng.integers(0, 3)), int(rng.integers(0, 3)))][rng.integers(0, 4)]
        stride = (1, 1) if padding == "same" else tuple(int(v) for v in
                                                        rng.integers(1, 4, size=2))
        H, W = (int(v) for v in rng.integers(1, 9, size=2))
        (pt, pb), (pl, pr) = ref.conv_padding(padding, (kh, kw), (dh, dw))
        if H + pt + pb < dh * (kh - 1) + 1 or W + pl + pr < dw * (kw - 1) + 1:
            continue
        cases.append(dict(x_shape=(2, groups * cg, H, W), w_shape=(groups * og, cg, kh, kw),
                          bias=bool(rng.integers(0, 2)),
                          args=dict(stride=stride, padding=padding, dilation=(dh, dw),
                                    groups=groups)))
    return cases


def _check_conv_against_torch(case, forward, backward, seed, weight=lambda w: w):
    """``forward``/``backward`` (a reference's conv pair) against torch's conv of the
    case's rank, float64, autograd for the gradients; ``weight`` rearranges the
    weight's memory before the reference reads it."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(case["x_shape"]) - 2]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case["x_shape"])
    w = rng.standard_normal(case["w_shape"])
    b = rng.standard_normal(case["w_shape"][0]) if case["bias"] else None
    tx, tw = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    tb = None if b is None else torch.from_numpy(b).requires_grad_()
    ty = conv(tx, tw, tb, **case["args"])
    y = forward(x, weight(w), b, **case["args"])
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    gy = rng.standard_normal(y.shape)
    ty.backward(torch.from_numpy(gy))
    gi, gw, gb = backward(gy, x, weight(w), **case["args"])
    np.testing.assert_allclose(gi, tx.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-10, atol=1e-10)
    if b is not None:
        np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", _conv_cases(40, seed=2), ids=lambda c: str(c["args"]))
def test_conv_reference_matches_torch(case):
    _check_conv_against_torch(case, ref.conv2d, ref.conv2d_backward, 0)


def _conv_nd_cases(n_cases, seed):
    """Random valid conv cases of rank 1, 2 and 3 for the any-rank ``ref.conv``."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n_cases:
        rank = 1 + len(cases) % 3
        groups = int(rng.integers(1, 4))
        cg, og = (int(v) for v in rng.integers(1, 4, size=2))
        k, d = rng.integers(1, 4, size=rank), rng.integers(1, 3, size=rank)
        size = rng.integers(1, 8, size=rank)
        padding = ["same", "valid", int(rng.integers(0, 3)),
                   tuple(int(v) for v in rng.integers(0, 3, size=rank))][rng.integers(0, 4)]
        stride = 1 if padding == "same" else tuple(int(v) for v in
                                                   rng.integers(1, 4, size=rank))
        pads = ref.conv_pads(padding, tuple(k), tuple(d))
        if any(n + a + b < e * (kk - 1) + 1 for n, (a, b), kk, e in zip(size, pads, k, d)):
            continue
        cases.append(dict(x_shape=(2, groups * cg) + tuple(int(v) for v in size),
                          w_shape=(groups * og, cg) + tuple(int(v) for v in k),
                          bias=bool(rng.integers(0, 2)),
                          args=dict(stride=stride, padding=padding,
                                    dilation=tuple(int(v) for v in d), groups=groups)))
    return cases


@pytest.mark.parametrize("case", _conv_nd_cases(45, seed=3),
                         ids=lambda c: f"{len(c['x_shape']) - 2}d-{c['args']}")
def test_conv_any_rank_reference_matches_torch(case):
    """``ref.conv`` / ``ref.conv_backward`` (any rank; the sum over a group's channels
    taken per output position and tap) against torch, a Fortran-ordered weight too."""
    _check_conv_against_torch(case, ref.conv, ref.conv_backward, 1, np.asfortranarray)
