"""Stochastic pooling: references, sampling statistics, the generator, determinism."""

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

import fastpool
import reference as ref
from conftest import assert_close, numeric_gradient
from fastpool import _rng
from strategies import pool_cases

SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _activations(rng, shape, dtype, zero_fraction=0.3):
    """ReLU-like data: non-negative with exact zeros, so zero windows occur too."""
    x = rng.random(shape)
    x[rng.random(shape) < zero_fraction] = 0.0
    return x.astype(dtype)


@SETTINGS
@given(case=pool_cases(), seed=st.integers(0, 2**64 - 1))
def test_matches_reference(case, seed):
    rng = np.random.default_rng(seed % 2**32)
    x = _activations(rng, case["shape"], case["dtype"])
    args = case["args"]

    y, indices = fastpool.stochastic_pool2d(x, **args, seed=seed, return_indices=True)
    y_ref, indices_ref = ref.stochastic_pool2d(x, **args, training=True, seed=seed)
    assert y.dtype == x.dtype and indices.dtype == np.int64
    np.testing.assert_array_equal(indices, indices_ref)  # the very same choices
    np.testing.assert_array_equal(y, y_ref.astype(x.dtype))

    grad = rng.standard_normal(y.shape).astype(x.dtype)
    assert_close(fastpool.stochastic_pool2d_backward(grad, x, **args, indices=indices),
                 ref.scatter_to_indices(grad, indices, x.shape), x.dtype)

    y_inf = fastpool.stochastic_pool2d(x, **args, training=False)
    y_inf_ref, _ = ref.stochastic_pool2d(x, **args, training=False)
    assert_close(y_inf, y_inf_ref, x.dtype)
    assert_close(fastpool.stochastic_pool2d_backward(grad, x, **args, training=False),
                 ref.stochastic_pool2d_backward(grad, x, **args, training=False), x.dtype)


def test_generator_matches_reference_implementation():
    keys = [(0, 0, 0, 0, 0), (1, 2, 3, 4, 5), (2**64 - 1, 10**6, 7, 2**31, 2**32 - 1),
            (0x0123456789ABCDEF, 31, 63, 55, 55)]
    for key in keys:
        assert _rng.uniform_host(*key) == ref.stochastic_uniform(*key)


def test_sampling_frequencies_follow_weights():
    # 4000 identical 2x2 windows [[1, 2], [3, 4]] side by side: each draws its own u
    # (keyed by ow), so the picked offsets must follow p = a / sum(a).
    windows = 4000
    x = np.tile(np.array([[1.0, 2.0], [3.0, 4.0]]), (1, windows))[None, None]
    _, indices = fastpool.stochastic_pool2d(x, 2, seed=2026, return_indices=True)
    width = x.shape[-1]
    rows, cols = np.divmod(indices[0, 0, 0], width)
    offsets = rows * 2 + (cols - 2 * np.arange(windows))
    counts = np.bincount(offsets, minlength=4)
    expected = np.array([1, 2, 3, 4]) / 10 * windows
    assert counts.sum() == windows
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_sampling_frequencies_with_dilation_padding_and_float32():
    rng = np.random.default_rng(5)
    x = _activations(rng, (2, 3, 9, 9), np.float32, zero_fraction=0.2)
    args = dict(kernel_size=3, stride=2, padding=2, dilation=2)
    # Window (0, 0, 1, 1): count its picks over many seeds and compare with a / sum(a).
    picks = {}
    for seed in range(3000):
        _, indices = fastpool.stochastic_pool2d(x, **args, seed=seed, return_indices=True)
        k = int(indices[0, 0, 1, 1])
        picks[k] = picks.get(k, 0) + 1
    cells = [(h, w) for h in (0, 2, 4) for w in (0, 2, 4)]
    weights = np.array([x[0, 0, h, w] for h, w in cells], dtype=np.float64)
    observed = np.array([picks.get(h * 9 + w, 0) for h, w in cells])
    assert observed.sum() == 3000  # nothing outside the window was ever picked
    nonzero = weights > 0
    assert observed[~nonzero].sum() == 0
    expected = weights[nonzero] / weights.sum() * 3000
    assert stats.chisquare(observed[nonzero], expected).pvalue > 1e-3


def test_zero_windows_and_padding():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 3, 3] = 2.0
    y, indices = fastpool.stochastic_pool2d(x, 3, 1, 1, seed=3, return_indices=True)
    # Zero window at the top-left corner (padded): outputs 0, records (0, 0).
    assert y[0, 0, 0, 0] == 0 and indices[0, 0, 0, 0] == 0
    # Zero window starting in padding at row -1, column 1: first in-input cell is (0, 0).
    assert indices[0, 0, 0, 1] == 0
    # The lone positive element is always chosen where it lies in the window.
    np.testing.assert_array_equal(indices[0, 0, 2:, 2:], 15)
    np.testing.assert_array_equal(y[0, 0, 2:, 2:], 2.0)
    assert fastpool.stochastic_pool2d(x, 3, 1, 1, training=False)[0, 0, 0, 0] == 0
    grad = np.ones((1, 1, 4, 4))
    gx = fastpool.stochastic_pool2d_backward(grad, x, 3, 1, 1, training=False)
    assert np.all(np.isfinite(gx))  # S1 == 0 windows contribute nothing, not NaN


def test_inference_backward_finite_differences():
    rng = np.random.default_rng(11)
    x = rng.random((2, 2, 6, 5)) + 0.1
    for args in (dict(kernel_size=3, stride=2, padding=1),
                 dict(kernel_size=2, stride=1, dilation=2, ceil_mode=True)):
        y = fastpool.stochastic_pool2d(x, **args, training=False)
        grad = rng.standard_normal(y.shape)
        numeric = numeric_gradient(
            lambda a: fastpool.stochastic_pool2d(a, **args, training=False), x, grad)
        np.testing.assert_allclose(
            fastpool.stochastic_pool2d_backward(grad, x, **args, training=False), numeric,
            rtol=1e-6, atol=1e-8)


def test_seeds():
    x = _activations(np.random.default_rng(1), (2, 4, 12, 12), np.float64, 0.0)
    a = fastpool.stochastic_pool2d(x, 2, seed=123, return_indices=True)[1]
    b = fastpool.stochastic_pool2d(x, 2, seed=123, return_indices=True)[1]
    c = fastpool.stochastic_pool2d(x, 2, seed=124, return_indices=True)[1]
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.3
    # Equal Generators give equal results, and each call advances the Generator.
    g1, g2 = np.random.default_rng(9), np.random.default_rng(9)
    first = fastpool.stochastic_pool2d(x, 2, seed=g1, return_indices=True)[1]
    np.testing.assert_array_equal(
        first, fastpool.stochastic_pool2d(x, 2, seed=g2, return_indices=True)[1])
    assert np.mean(first != fastpool.stochastic_pool2d(
        x, 2, seed=g1, return_indices=True)[1]) > 0.3
    # seed=None draws fresh entropy each call.
    d = fastpool.stochastic_pool2d(x, 2, return_indices=True)[1]
    e = fastpool.stochastic_pool2d(x, 2, return_indices=True)[1]
    assert np.mean(d != e) > 0.3


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(3)
    x = _activations(rng, (3, 5, 20, 17), np.float32)
    grad = rng.standard_normal((3, 5, 10, 9)).astype(np.float32)
    geometry = dict(kernel_size=3, stride=2, padding=1)
    ops = {
        "max": lambda: fastpool.max_pool2d(x, **geometry, return_indices=True),
        "max_bwd": lambda: fastpool.max_pool2d_backward(grad, x, **geometry),
        "avg": lambda: fastpool.avg_pool2d(x, **geometry),
        "avg_bwd": lambda: fastpool.avg_pool2d_backward(grad, x, **geometry),
        "sto": lambda: fastpool.stochastic_pool2d(x, **geometry, seed=77,
                                                  return_indices=True),
        "sto_inf": lambda: fastpool.stochastic_pool2d(x, **geometry, training=False),
        "sto_inf_bwd": lambda: fastpool.stochastic_pool2d_backward(
            grad, x, **geometry, training=False),
    }
    saved = numba.get_num_threads()
    results = {}
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            results[threads] = {name: op() for name, op in ops.items()}
    finally:
        numba.set_num_threads(saved)
    runs = list(results.values())
    for name in ops:
        first, last = runs[0][name], runs[-1][name]
        first, last = (first, last) if isinstance(first, tuple) else ((first,), (last,))
        for a, b in zip(first, last):
            assert a.dtype == b.dtype and np.array_equal(a, b), name  # bitwise identical


# Planes scaled by powers of two from the bottom to the top of float64's range: the
# squares of 2**-700 vanish, those of 2**600 overflow, and windows of 2**1020-sized
# elements sum past the float64 maximum; 1.0 keeps the ordinary path in the same call.
_SCALES = np.array([2.0**-1000, 2.0**-700, 1.0, 2.0**600, 2.0**1020])

# case: (spatial shape, pooling arguments or an adaptive output size); routes on the
# CPU: whole-plane loops, rows (forward) and the ring backward, the exactly tiled
# backward, 1-D, 3-D (a depth kernel), adaptive
_RANGE_CASES = {
    "flat": ((6, 7), dict(kernel_size=3, stride=1, padding=1)),
    "rows": ((6, 7), dict(kernel_size=3, stride=2, padding=1)),
    "tiled": ((6, 8), dict(kernel_size=2)),
    "1-D": ((11,), dict(kernel_size=5, stride=1, padding=2)),
    "3-D": ((3, 4, 5), dict(kernel_size=(2, 3, 2), stride=1)),
    "adaptive": ((6, 7), (4, 5)),
}


def _range_ops(case):
    """``(forward(x, device), backward(g, x, device), reference forward, reference
    backward)`` of ``_RANGE_CASES[case]`` at inference."""
    size, args = _RANGE_CASES[case]
    rank = len(size)
    if case == "adaptive":
        op = getattr(fastpool, f"adaptive_stochastic_pool{rank}d")
        grad = getattr(fastpool, f"adaptive_stochastic_pool{rank}d_backward")
        return (lambda x, d: op(x, args, training=False, device=d),
                lambda g, x, d: grad(g, x, args, training=False, device=d),
                lambda x: ref.adaptive_stochastic_pool(x, args, training=False)[0],
                lambda g, x: ref.adaptive_stochastic_pool_backward(g, x, args))
    op = getattr(fastpool, f"stochastic_pool{rank}d")
    grad = getattr(fastpool, f"stochastic_pool{rank}d_backward")
    return (lambda x, d: op(x, **args, training=False, device=d),
            lambda g, x, d: grad(g, x, **args, training=False, device=d),
            lambda x: ref.stochastic_pool(x, **args, training=False)[0],
            lambda g, x: ref.stochastic_pool_backward(g, x, **args, training=False))


def _channels_last(x):
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)


# The simulator runs kernels on NumPy scalars, which warn where the plain sums overflow.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("layout", ["channels-first", "channels-last"])
@pytest.mark.parametrize("case", list(_RANGE_CASES))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_inference_over_the_whole_float64_range(case, layout, device):
    """Inference is homogeneous: ``y(c x) = c y(x)``, and the gradient does not depend
    on ``c``. Plane ``p`` of ``x`` is scaled by ``_SCALES[p]``, so every path sees
    windows whose squares vanish or overflow, and sums that overflow, beside ordinary
    ones: outputs are ``c`` times the unscaled input's and gradients equal (the plain
    sums gave 0 and NaN gradients for the small planes and raised for the large ones),
    and both are close to the reference's, which divides each window by its largest
    element. Outputs get relative tolerances only: an absolute one would pass any tiny
    output."""
    if device == "cuda" and layout == "channels-last" and case in ("rows", "3-D"):
        pytest.skip("same GPU kernels as channels-first; the simulator is slow")
    forward, backward, ref_forward, ref_backward = _range_ops(case)
    size = _RANGE_CASES[case][0]
    rng = np.random.default_rng(71)
    x = _activations(rng, (1, len(_SCALES)) + size, np.float64)
    scale = _SCALES.reshape((1, -1) + (1,) * len(size))
    big = x * scale
    if layout == "channels-last":
        x, big = _channels_last(x), _channels_last(big)
    y = forward(x, device)
    got = forward(big, device)
    rtol = dict(rtol=1e-13, atol=0)
    np.testing.assert_allclose(got / scale, y, **rtol)
    g = rng.standard_normal(y.shape)
    want = backward(g, x, device)
    grad = backward(g, big, device)
    np.testing.assert_allclose(grad, want, **rtol)
    np.testing.assert_allclose(got, ref_forward(big), **rtol)
    assert_close(grad, ref_backward(g, big), np.float64)  # gradients are scale-free
    assert_close(y, ref_forward(x), np.float64)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_tiny_negative_beside_huge_values_is_rejected(device):
    """A window summed again scaled down by 2**-600 must still see a tiny negative
    element: -1e-300 * 2**-600 rounds to -0.0, which passes ``0 <= v``, so the check
    reads the element before scaling (a review found the scaled check accepting it)."""
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 1e300, -1e-300
    calls = [lambda: fastpool.stochastic_pool2d(x, 2, training=False, device=device),
             lambda: fastpool.stochastic_pool2d_backward(
                 np.ones((1, 1, 2, 2)), x, 2, training=False, device=device),
             lambda: fastpool.stochastic_pool2d(x, 3, 2, 1, training=False, device=device),
             lambda: fastpool.stochastic_pool2d_backward(
                 np.ones((1, 1, 2, 2)), x, 3, 2, 1, training=False, device=device),
             lambda: fastpool.adaptive_stochastic_pool2d(x, 2, training=False,
                                                         device=device),
             lambda: fastpool.adaptive_stochastic_pool2d_backward(
                 np.ones((1, 1, 2, 2)), x, 2, training=False, device=device)]
    for call in calls:
        with pytest.raises(ValueError):
            call()
