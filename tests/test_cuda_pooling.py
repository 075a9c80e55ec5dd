"""GPU pooling kernels against the CPU kernels and the loop references.

These run on the real GPU when there is one, else under Numba's CUDA simulator
(conftest.py switches it on before Numba is imported). Shapes are small and launches
are capped at 32 threads and 3 blocks (``launch_limits``), so several blocks run and the
grid-stride loops turn more than once.

Max pooling, average pooling and the stochastic choices are compared with the CPU
bit for bit: the GPU kernels visit windows in the CPU's order and add in the CPU's
order. Stochastic inference multiplies and adds (the GPU may fuse them), so it is
compared within the per-dtype tolerance.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from numba import cuda

import fastpool
import reference as ref
from conftest import assert_close, seed_for
from fastpool import _dispatch
from fastpool.cuda._launch import launch_limits
from strategies import distinct_values, pool_cases

SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _rng_for(case):
    return np.random.default_rng(seed_for(case))


def _small_launches():
    return launch_limits(threads_per_block=32, max_blocks=3)


def _both(function, *args, **kwargs):
    """``function`` on the CPU and on the GPU (host arrays in, NumPy out)."""
    return function(*args, **kwargs, device="cpu"), function(*args, **kwargs, device="cuda")


def _assert_same(cpu, gpu):
    assert type(gpu) is np.ndarray and gpu.dtype == cpu.dtype and gpu.shape == cpu.shape
    np.testing.assert_array_equal(gpu, cpu)


def _avg_args(args):
    return {k: v for k, v in args.items() if k != "dilation"}


@SETTINGS
@given(case=pool_cases(max_hw=4))
def test_max_pool_matches_cpu_and_reference(case):
    rng = _rng_for(case)
    x = distinct_values(rng, case["shape"], case["dtype"])
    x.flat[rng.integers(x.size)] = np.nan  # a NaN wins its windows, on both devices
    args = case["args"]
    with _small_launches():
        (y, indices), (y_gpu, indices_gpu) = _both(fastpool.max_pool2d, x, **args,
                                                   return_indices=True)
        _assert_same(y, y_gpu)
        _assert_same(indices, indices_gpu)
        grad = rng.standard_normal(y.shape).astype(x.dtype)
        _assert_same(*_both(fastpool.max_pool2d_backward, grad, x, **args, indices=indices))
        _assert_same(*_both(fastpool.max_pool2d_backward, grad, x, **args))
    y_ref, indices_ref = ref.max_pool2d(x, **args)
    np.testing.assert_array_equal(y_gpu, y_ref.astype(x.dtype))
    np.testing.assert_array_equal(indices_gpu, indices_ref)


def test_max_pool_ties_pick_the_first():
    x = np.zeros((1, 2, 4, 4), np.float32)
    x[0, 1] = 1.0
    with _small_launches():
        (_, indices), (_, indices_gpu) = _both(fastpool.max_pool2d, x, 2, 1,
                                               return_indices=True)
    _assert_same(indices, indices_gpu)
    np.testing.assert_array_equal(indices_gpu[0, 0], [[0, 1, 2], [4, 5, 6], [8, 9, 10]])


@SETTINGS
@given(case=pool_cases(dilated=False, max_hw=4))
def test_avg_pool_matches_cpu_and_reference(case):
    rng = _rng_for(case)
    x = rng.standard_normal(case["shape"]).astype(case["dtype"])
    args = _avg_args(case["args"])
    for extra in (dict(count_include_pad=True), dict(count_include_pad=False),
                  dict(divisor_override=3)):
        with _small_launches():
            y, y_gpu = _both(fastpool.avg_pool2d, x, **args, **extra)
            _assert_same(y, y_gpu)
            grad = rng.standard_normal(y.shape).astype(x.dtype)
            grad_x, grad_x_gpu = _both(fastpool.avg_pool2d_backward, grad, x, **args,
                                       **extra)
            _assert_same(grad_x, grad_x_gpu)
        assert_close(y_gpu, ref.avg_pool2d(x, **args, **extra), x.dtype)
        assert_close(grad_x_gpu, ref.avg_pool2d_backward(grad, x, **args, **extra), x.dtype)


@SETTINGS
@given(case=pool_cases(max_hw=4))
def test_stochastic_pool_matches_cpu_index_for_index(case):
    rng = _rng_for(case)
    x = rng.random(case["shape"]).astype(case["dtype"])
    x[x < 0.3] = 0  # zero elements and some all-zero windows
    args = case["args"]
    with _small_launches():
        for seed in (0, 2**64 - 1):
            (y, indices), (y_gpu, indices_gpu) = _both(
                fastpool.stochastic_pool2d, x, **args, seed=seed, return_indices=True)
            _assert_same(indices, indices_gpu)
            _assert_same(y, y_gpu)
        grad = rng.standard_normal(y.shape).astype(x.dtype)
        _assert_same(*_both(fastpool.stochastic_pool2d_backward, grad, x, **args,
                            indices=indices))
        e, e_gpu = _both(fastpool.stochastic_pool2d, x, **args, training=False)
        g, g_gpu = _both(fastpool.stochastic_pool2d_backward, grad, x, **args,
                         training=False)
    y_ref, indices_ref = ref.stochastic_pool2d(x, **args, seed=2**64 - 1)
    np.testing.assert_array_equal(indices_gpu, indices_ref)
    assert_close(e_gpu, e, x.dtype)
    assert_close(e_gpu, ref.stochastic_pool2d(x, **args, training=False)[0], x.dtype)
    assert_close(g_gpu, g, x.dtype)
    assert_close(g_gpu, ref.stochastic_pool2d_backward(grad, x, **args, training=False),
                 x.dtype)


def test_grid_stride_loop_covers_every_element():
    """One block of 32 threads for 2 * 3 * 9 * 10 outputs: each thread takes 17 turns."""
    x = distinct_values(np.random.default_rng(1), (2, 3, 9, 10), np.float64)
    with launch_limits(threads_per_block=32, max_blocks=1):
        y, y_gpu = _both(fastpool.max_pool2d, x, 1)
        grad, grad_gpu = _both(fastpool.avg_pool2d_backward, x, x, 1)
    _assert_same(y, y_gpu)
    np.testing.assert_array_equal(y_gpu, x)
    _assert_same(grad, grad_gpu)


# ----------------------------------------------------------------------------- errors

def test_negative_input_raises_on_gpu():
    x = np.ones((1, 1, 4, 4), np.float32)
    x[0, 0, 3, 1] = -1
    for training in (True, False):
        with pytest.raises(ValueError, match="non-negative"):
            fastpool.stochastic_pool2d(x, 2, training=training, seed=1, device="cuda")
    with pytest.raises(ValueError, match="non-negative"):
        fastpool.stochastic_pool2d_backward(np.ones((1, 1, 2, 2), np.float32), x, 2,
                                            training=False, device="cuda")


@pytest.mark.parametrize("bad", [-1, 16, 2**40, 10], ids=["negative", "past_end", "huge",
                                                           "other_window"])
def test_bad_indices_raise_on_gpu(bad):
    """Out of range, or (GPU only: its gather reads only inside windows) in range but
    outside the index's own window."""
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    _, indices = fastpool.max_pool2d(x, 2, return_indices=True)
    indices[0, 0, 0, 0] = bad  # window (0, 0) holds 0, 1, 4, 5; 10 is in window (1, 1)
    grad = np.ones((1, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="indices"):
        fastpool.max_pool2d_backward(grad, x, 2, indices=indices, device="cuda")
    with pytest.raises(ValueError, match="indices"):
        fastpool.stochastic_pool2d_backward(grad, x, 2, indices=indices, device="cuda")


# ----------------------------------------------------------------------------- arrays

def test_numba_device_arrays_stay_on_the_gpu():
    rng = np.random.default_rng(2)
    x = rng.random((2, 3, 6, 5)).astype(np.float32)
    x_gpu = cuda.to_device(x)
    y, indices = fastpool.max_pool2d(x_gpu, 2, return_indices=True)  # auto -> cuda
    assert _dispatch.array_kind(y) == "numba" and _dispatch.array_kind(indices) == "numba"
    expected, expected_indices = fastpool.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(y.copy_to_host(), expected)
    np.testing.assert_array_equal(indices.copy_to_host(), expected_indices)
    grad = cuda.to_device(np.ones(y.shape, np.float32))
    outputs = [
        fastpool.max_pool2d_backward(grad, x_gpu, 2, indices=indices),
        fastpool.avg_pool2d(x_gpu, 2),
        fastpool.avg_pool2d_backward(grad, x_gpu, 2),
        fastpool.stochastic_pool2d(x_gpu, 2, seed=3),
        fastpool.stochastic_pool2d_backward(grad, x_gpu, 2, training=False),
    ]
    expected = [
        fastpool.max_pool2d_backward(np.ones(y.shape, np.float32), x, 2),
        fastpool.avg_pool2d(x, 2),
        fastpool.avg_pool2d_backward(np.ones(y.shape, np.float32), x, 2),
        fastpool.stochastic_pool2d(x, 2, seed=3),
        fastpool.stochastic_pool2d_backward(np.ones(y.shape, np.float32), x, 2,
                                            training=False),
    ]
    for got, want in zip(outputs, expected):
        assert _dispatch.array_kind(got) == "numba"
        assert_close(got.copy_to_host(), want, np.float32)


@pytest.mark.parametrize("unbatched", [False, True])
def test_non_contiguous_device_input(unbatched):
    rng = np.random.default_rng(3)
    big = rng.random((2, 3, 6, 10)).astype(np.float64)
    host = big[:, :, :, ::2]
    device = cuda.to_device(big)[:, :, :, ::2]
    if unbatched:
        host, device = host[1], cuda.to_device(big[1])[:, :, ::2]
    assert not device.is_c_contiguous()
    with _small_launches():
        for function in (fastpool.max_pool2d, fastpool.avg_pool2d):
            got = function(device, 2, 1, 1)
            assert got.shape == function(host, 2, 1, 1).shape
            np.testing.assert_array_equal(got.copy_to_host(), function(host, 2, 1, 1))
        got = fastpool.stochastic_pool2d(device, 2, seed=9)
        np.testing.assert_array_equal(got.copy_to_host(),
                                      fastpool.stochastic_pool2d(host, 2, seed=9))


def test_unbatched_and_empty_batch():
    x = np.random.default_rng(4).random((3, 5, 5)).astype(np.float32)
    y, indices = fastpool.max_pool2d(x, 3, 2, 1, return_indices=True, device="cuda")
    assert y.shape == indices.shape == (3, 3, 3)
    np.testing.assert_array_equal(y, fastpool.max_pool2d(x, 3, 2, 1, device="cpu"))
    empty = np.zeros((0, 2, 5, 5), np.float32)
    for function in (fastpool.max_pool2d, fastpool.avg_pool2d, fastpool.stochastic_pool2d):
        assert function(empty, 2, device="cuda").shape == (0, 2, 2, 2)
    grad = np.zeros((0, 2, 2, 2), np.float32)
    assert fastpool.avg_pool2d_backward(grad, empty, 2, device="cuda").shape == empty.shape
    assert fastpool.max_pool2d_backward(grad, empty, 2, device="cuda").shape == empty.shape


def test_mixed_host_and_device_arrays_raise():
    x = np.ones((1, 1, 4, 4), np.float32)
    grad = cuda.to_device(np.ones((1, 1, 2, 2), np.float32))
    for device in (None, "cuda", "cpu"):
        with pytest.raises(ValueError, match="mix host"):
            fastpool.avg_pool2d_backward(grad, x, 2, device=device)


def test_results_are_deterministic():
    rng = np.random.default_rng(5)
    x = rng.random((2, 2, 7, 7)).astype(np.float32)
    grad = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    with _small_launches():
        first = [fastpool.avg_pool2d_backward(grad, x, 3, 2, 1, device="cuda"),
                 fastpool.stochastic_pool2d_backward(grad, x, 3, 2, 1, training=False,
                                                     device="cuda")]
        second = [fastpool.avg_pool2d_backward(grad, x, 3, 2, 1, device="cuda"),
                  fastpool.stochastic_pool2d_backward(grad, x, 3, 2, 1, training=False,
                                                      device="cuda")]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("unbatched", [False, True])
def test_channels_last_device_arrays_stay_channels_last(unbatched):
    """An NHWC buffer on the GPU viewed as (N, C, H, W) is computed where it lies, and
    every result comes back a device array with channels-last strides."""
    from fastpool.cuda._launch import strided_view
    rng = np.random.default_rng(8)
    x = rng.random((2, 4, 5, 6)).astype(np.float32)
    nhwc = cuda.to_device(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    n, h, w, c = nhwc.shape
    view = strided_view(nhwc, (n, c, h, w), (h * w * c * 4, 4, w * c * 4, c * 4))
    if unbatched:
        x, view = x[1], strided_view(nhwc[1], (c, h, w), (4, w * c * 4, c * 4))
    channel = 0 if unbatched else 1
    with _small_launches():
        y, indices = fastpool.max_pool2d(view, 3, 2, 1, return_indices=True)
        grad = fastpool.max_pool2d(x, 3, 2, 1)  # any values of the output's shape
        grad_device = cuda.to_device(grad)  # channels-first: gradients may differ
        results = {
            "max": (y, fastpool.max_pool2d(x, 3, 2, 1)),
            "indices": (indices, fastpool.max_pool2d(x, 3, 2, 1, return_indices=True)[1]),
            "max_backward": (fastpool.max_pool2d_backward(grad_device, view, 3, 2, 1),
                             fastpool.max_pool2d_backward(grad, x, 3, 2, 1)),
            "avg": (fastpool.avg_pool2d(view, 2), fastpool.avg_pool2d(x, 2)),
            "stochastic": (fastpool.stochastic_pool2d(view, 3, 2, seed=5),
                           fastpool.stochastic_pool2d(x, 3, 2, seed=5)),
            "inference_backward": (
                fastpool.stochastic_pool2d_backward(grad_device, view, 3, 2, 1,
                                                    training=False),
                fastpool.stochastic_pool2d_backward(grad, x, 3, 2, 1, training=False)),
        }
    for name, (got, want) in results.items():
        assert _dispatch.array_kind(got) == "numba", name
        assert got.strides[channel] == got.dtype.itemsize, (name, got.strides)
        host = got.copy_to_host()
        assert np.moveaxis(host, channel, -1).flags.c_contiguous, name
        if name == "inference_backward":
            assert_close(host, want, np.float32)
        else:
            np.testing.assert_array_equal(host, want, err_msg=name)


def test_host_channels_last_input_is_copied_to_the_gpu_in_its_layout():
    x = np.random.default_rng(9).random((2, 3, 4, 5)).astype(np.float64)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    device = _dispatch.to_device(nhwc)
    assert device.strides == nhwc.strides
    np.testing.assert_array_equal(device.copy_to_host(), x)
    gaps = x[:, :, :, ::2]  # not dense: copied C-contiguous
    assert _dispatch.to_device(gaps).is_c_contiguous()
    np.testing.assert_array_equal(_dispatch.to_device(gaps).copy_to_host(), gaps)
