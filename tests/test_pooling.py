"""Max and average pooling against the loop references, PyTorch and finite differences."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import fastpool
import reference as ref
from conftest import assert_close, numeric_gradient, seed_for
from strategies import distinct_values, pool_cases

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the cross-checks are skipped; users never need torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _rng_for(case):
    return np.random.default_rng(seed_for(case))


# ----------------------------------------------------------------------------- max

@SETTINGS
@given(case=pool_cases())
def test_max_pool_matches_reference(case):
    rng = _rng_for(case)
    x = distinct_values(rng, case["shape"], case["dtype"])
    y, indices = fastpool.max_pool2d(x, **case["args"], return_indices=True)
    y_ref, indices_ref = ref.max_pool2d(x, **case["args"])
    assert y.dtype == x.dtype and indices.dtype == np.int64
    np.testing.assert_array_equal(y, y_ref.astype(x.dtype))
    np.testing.assert_array_equal(indices, indices_ref)
    np.testing.assert_array_equal(fastpool.max_pool2d(x, **case["args"]), y)

    grad = rng.standard_normal(y.shape).astype(x.dtype)
    expected = ref.max_pool2d_backward(grad, x, **case["args"])
    assert_close(fastpool.max_pool2d_backward(grad, x, **case["args"], indices=indices),
                 expected, x.dtype)
    assert_close(fastpool.max_pool2d_backward(grad, x, **case["args"]), expected, x.dtype)


@needs_torch
@SETTINGS
@given(case=pool_cases())
def test_max_pool_matches_torch(case):
    rng = _rng_for(case)
    x = distinct_values(rng, case["shape"], case["dtype"])
    args = case["args"]
    kh, kw = ref.pair(args["kernel_size"])
    ph, pw = ref.pair(args["padding"])
    if ph > kh // 2 or pw > kw // 2:
        return  # PyTorch caps padding at k // 2; the reference covers the rest
    y, indices = fastpool.max_pool2d(x, **args, return_indices=True)
    tx = torch.from_numpy(x).requires_grad_()
    ty, tindices = F.max_pool2d(tx, **args, return_indices=True)
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_array_equal(indices, tindices.numpy())
    grad = rng.standard_normal(y.shape).astype(x.dtype)
    ty.backward(torch.from_numpy(grad))
    assert_close(fastpool.max_pool2d_backward(grad, x, **args, indices=indices),
                 tx.grad.numpy(), x.dtype)


def test_max_pool_first_maximum_wins_ties():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 1] = x[0, 0, 1, 0] = x[0, 0, 0, 1] = 5.0  # three maxima in one window
    y, indices = fastpool.max_pool2d(x, 2, 2, return_indices=True)
    assert y[0, 0, 0, 0] == 5.0 and indices[0, 0, 0, 0] == 1  # (0, 1) is first row-major
    # All-equal windows: the first element of each window.
    y, indices = fastpool.max_pool2d(np.ones((1, 1, 4, 4)), 2, 2, return_indices=True)
    np.testing.assert_array_equal(indices[0, 0], [[0, 2], [8, 10]])
    # With padding the first in-input element (padding is -inf, never a maximum).
    _, indices = fastpool.max_pool2d(np.ones((1, 1, 3, 3)), 3, 1, 1, return_indices=True)
    assert indices[0, 0, 0, 0] == 0 and indices[0, 0, 2, 2] == 4


def test_max_pool_nan_propagates_to_first_nan():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 0, 3] = np.nan
    x[0, 0, 1, 2] = np.nan  # same window, later in row-major order
    x[0, 0, 3, 3] = np.nan
    y, indices = fastpool.max_pool2d(x, 2, 2, return_indices=True)
    assert np.isnan(y[0, 0, 0, 1]) and indices[0, 0, 0, 1] == 3
    assert np.isnan(y[0, 0, 1, 1]) and indices[0, 0, 1, 1] == 15
    assert y[0, 0, 0, 0] == 5 and y[0, 0, 1, 0] == 13
    # Interior windows (the vectorised path) and edge windows follow the same rule.
    x = np.arange(64.0).reshape(1, 1, 8, 8)
    x[0, 0, 3, 3] = x[0, 0, 3, 5] = x[0, 0, 4, 4] = np.nan
    y, indices = fastpool.max_pool2d(x, 3, 1, 1, return_indices=True)
    y_ref, indices_ref = ref.max_pool2d(x, 3, 1, 1)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(indices, indices_ref)


def test_max_pool_infinities():
    x = np.full((1, 1, 5, 5), -np.inf)
    x[0, 0, 4, 4] = np.inf
    y, indices = fastpool.max_pool2d(x, 3, 2, 1, return_indices=True)
    y_ref, indices_ref = ref.max_pool2d(x, 3, 2, 1)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(indices, indices_ref)


# ----------------------------------------------------------------------------- average

@SETTINGS
@given(case=pool_cases(dilated=False))
def test_avg_pool_matches_reference(case):
    rng = _rng_for(case)
    x = rng.standard_normal(case["shape"]).astype(case["dtype"])
    grad = None
    for count_include_pad in (True, False):
        for divisor_override in (None, 3, -2):
            args = dict(case["args"], count_include_pad=count_include_pad,
                        divisor_override=divisor_override)
            y = fastpool.avg_pool2d(x, **args)
            assert y.dtype == x.dtype
            assert_close(y, ref.avg_pool2d(x, **args), x.dtype)
            if grad is None:
                grad = rng.standard_normal(y.shape).astype(x.dtype)
            gx = fastpool.avg_pool2d_backward(grad, x, **args)
            assert gx.dtype == x.dtype and gx.shape == x.shape
            assert_close(gx, ref.avg_pool2d_backward(grad, x, **args), x.dtype)


@needs_torch
@SETTINGS
@given(case=pool_cases(dilated=False))
def test_avg_pool_matches_torch(case):
    rng = _rng_for(case)
    x = rng.standard_normal(case["shape"]).astype(case["dtype"])
    for count_include_pad in (True, False):
        for divisor_override in (None, 5):
            args = dict(case["args"], count_include_pad=count_include_pad,
                        divisor_override=divisor_override)
            tx = torch.from_numpy(x).requires_grad_()
            ty = F.avg_pool2d(tx, **args)
            y = fastpool.avg_pool2d(x, **args)
            assert_close(y, ty.detach().numpy(), x.dtype)
            grad = rng.standard_normal(y.shape).astype(x.dtype)
            ty.backward(torch.from_numpy(grad))
            assert_close(fastpool.avg_pool2d_backward(grad, x, **args), tx.grad.numpy(),
                         x.dtype)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("kernel, stride, padding, ceil_mode", [
    (3, 2, 1, False), (2, None, 1, True), ((2, 3), (1, 2), (1, 0), True)])
def test_avg_pool_backward_finite_differences(rng, kernel, stride, padding, ceil_mode):
    x = rng.standard_normal((2, 2, 5, 6))
    for count_include_pad in (True, False):
        args = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode,
                    count_include_pad=count_include_pad)
        grad = rng.standard_normal(fastpool.avg_pool2d(x, **args).shape)
        numeric = numeric_gradient(lambda a: fastpool.avg_pool2d(a, **args), x, grad)
        np.testing.assert_allclose(fastpool.avg_pool2d_backward(grad, x, **args), numeric,
                                   rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kernel, stride, padding, dilation, ceil_mode", [
    (3, 2, 1, 1, False), (3, 2, 2, 2, True), (2, None, 0, 1, True)])
def test_max_pool_backward_finite_differences(rng, kernel, stride, padding, dilation,
                                              ceil_mode):
    # Distinct values far apart (relative to eps), so the argmax does not flip.
    x = distinct_values(rng, (2, 2, 6, 7), np.float64) * 10
    args = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                ceil_mode=ceil_mode)
    grad = rng.standard_normal(fastpool.max_pool2d(x, **args).shape)
    numeric = numeric_gradient(lambda a: fastpool.max_pool2d(a, **args), x, grad)
    np.testing.assert_allclose(fastpool.max_pool2d_backward(grad, x, **args), numeric,
                               rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unbatched_and_noncontiguous_inputs(rng, dtype):
    x4 = distinct_values(rng, (2, 3, 9, 8), dtype)
    ops = [
        lambda a: fastpool.max_pool2d(a, 3, 2, 1, return_indices=True),
        lambda a: fastpool.avg_pool2d(a, 3, 2, 1, count_include_pad=False),
        lambda a: fastpool.stochastic_pool2d(np.abs(a), 3, 2, 1, seed=7,
                                             return_indices=True),
        lambda a: fastpool.stochastic_pool2d(np.abs(a), 3, 2, 1, training=False),
    ]
    for op in ops:
        batched = op(x4)
        batched = batched if isinstance(batched, tuple) else (batched,)
        # (C, H, W) input: the result has no batch axis and equals that image's slice.
        # (Stochastic draws are keyed by n, so only the n = 0 image is compared.)
        single = op(x4[0])
        single = single if isinstance(single, tuple) else (single,)
        for b, s in zip(batched, single):
            assert s.shape == b.shape[1:]
            np.testing.assert_array_equal(s, b[0])
        # Non-contiguous views give the same result as their contiguous copies.
        for view in (x4[:, :, ::-1, :], np.asfortranarray(x4), x4.transpose(1, 0, 2, 3)):
            got = op(view)
            want = op(np.ascontiguousarray(view))
            for g, w in zip(got if isinstance(got, tuple) else (got,),
                            want if isinstance(want, tuple) else (want,)):
                np.testing.assert_array_equal(g, w)


def test_backward_accepts_unbatched_and_noncontiguous(rng):
    x = distinct_values(rng, (3, 9, 8), np.float64)
    y, indices = fastpool.max_pool2d(x, 3, 2, 1, return_indices=True)
    grad = rng.standard_normal(y.shape)
    expected = ref.max_pool2d_backward(grad[None], x[None], 3, 2, 1)[0]
    np.testing.assert_allclose(fastpool.max_pool2d_backward(grad, x, 3, 2, 1), expected)
    grad_view = np.asfortranarray(grad)
    np.testing.assert_allclose(
        fastpool.max_pool2d_backward(grad_view, x, 3, 2, 1, indices=indices[:, :, :]),
        expected)
    np.testing.assert_allclose(fastpool.avg_pool2d_backward(grad_view, x, 3, 2, 1),
                               ref.avg_pool2d_backward(grad[None], x[None], 3, 2, 1)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batch(dtype):
    x = np.zeros((0, 3, 8, 8), dtype)
    y, indices = fastpool.max_pool2d(x, 2, return_indices=True)
    assert y.shape == indices.shape == (0, 3, 4, 4) and y.dtype == dtype
    assert fastpool.avg_pool2d(x, 2).shape == (0, 3, 4, 4)
    assert fastpool.stochastic_pool2d(x, 2, seed=0).shape == (0, 3, 4, 4)
    grad = np.zeros((0, 3, 4, 4), dtype)
    assert fastpool.max_pool2d_backward(grad, x, 2).shape == x.shape
    assert fastpool.avg_pool2d_backward(grad, x, 2).shape == x.shape
    assert fastpool.stochastic_pool2d_backward(grad, x, 2, indices=indices).shape == x.shape


def test_output_size_follows_pytorch_ceil_rule():
    # out = floor((H + 2p - ek + (s - 1 if ceil)) / s) + 1, and with ceil_mode the last
    # window is dropped if it would start at or past H + p.
    x = np.ones((1, 1, 5, 5))
    assert fastpool.max_pool2d(x, 2, 2, ceil_mode=False).shape == (1, 1, 2, 2)
    assert fastpool.max_pool2d(x, 2, 2, ceil_mode=True).shape == (1, 1, 3, 3)
    assert fastpool.avg_pool2d(x, 3, 2, 1, ceil_mode=True).shape == (1, 1, 3, 3)
    assert fastpool.max_pool2d(np.ones((1, 1, 6, 6)), 2, 2, 1, ceil_mode=True).shape == (
        1, 1, 4, 4)
    # H=3, k=1, s=3: the formula gives 2, but window 2 would start at 3 >= H + p = 3.
    assert fastpool.max_pool2d(np.ones((1, 1, 3, 3)), 1, 3, ceil_mode=True).shape == (
        1, 1, 1, 1)
    assert fastpool.max_pool2d(np.ones((1, 1, 4, 4)), 1, 3, ceil_mode=True).shape == (
        1, 1, 2, 2)
