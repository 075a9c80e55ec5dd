"""CUDA conv2d and conv2d_backward (``fastpool.cuda.conv``) against the loop references
and the CPU kernels: both algorithms, production and small tiles, the geometries of
docs/design.md section 2, both dtypes, output_mask, empty batches, non-contiguous and GPU
array inputs, split-K partial sums, determinism and launch limits.

Without a GPU these run under Numba's CUDA simulator (see conftest), where every CUDA
thread is a Python thread: shapes are tiny, most tiled runs use ``SMALL_TILES`` (8
threads a block; tiles of 4 channels x 8 pixels, which the tiny shapes still cross)
and a few use the production tiles.
"""

import sys

import numpy as np
import pytest
from numba import cuda

import fastpool
import fastpool.cuda as fastpool_cuda
import reference as ref
from conftest import CUDA_SIMULATOR, DTYPES, assert_close_to_sum
from fastpool import _dispatch, _params
from fastpool.cuda import conv as cuda_conv
from fastpool.cuda._launch import launch_limits

SMALL_TILES = cuda_conv.TileConfig(block_m=4, block_n=8, block_k=4, thread_m=2, thread_n=2)


@pytest.fixture(autouse=True, scope="module")
def _quick_simulated_barriers():
    """The simulator's block manager polls its threads at every syncthreads; a short
    interpreter switch interval makes those barriers about 20 times faster."""
    saved = sys.getswitchinterval()
    if CUDA_SIMULATOR:
        sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(saved)


@pytest.fixture(autouse=True)
def _few_partial_slices(monkeypatch):
    """Split-K targets sized for tiny shapes (the production ones cut these into one
    slice per pixel or stage, which the simulator runs slowly);
    ``test_weight_grad_slices`` covers the extremes."""
    monkeypatch.setattr(cuda_conv, "_TARGET_BLOCKS", 4)
    monkeypatch.setattr(cuda_conv, "_TARGET_THREADS", 256)


@pytest.fixture
def small_tiles():
    with cuda_conv.use_tiles(SMALL_TILES):
        yield


# (x shape, weight shape, bias, conv2d arguments); the ids say what each one covers.
CASES = {
    "stride1-pad1-two-channel-tiles": ((2, 4, 6, 7), (6, 4, 3, 3), True, dict(padding=1)),
    "stride2-pair-pad-groups-dilation": ((2, 4, 7, 6), (6, 2, 3, 2), True,
                                         dict(stride=2, padding=(1, 0), groups=2,
                                              dilation=(1, 2))),
    "same-even-kernel-dilation": ((2, 3, 6, 7), (4, 3, 2, 3), False,
                                  dict(padding="same", dilation=(1, 2))),
    "depthwise": ((2, 4, 7, 7), (4, 1, 3, 3), True, dict(padding=1, groups=4)),
    "depthwise-multiplier-stride2": ((2, 2, 7, 7), (4, 1, 3, 3), False,
                                     dict(stride=2, groups=2)),
    "pointwise-valid": ((2, 4, 5, 5), (3, 4, 1, 1), False, dict(padding="valid")),
    "pad-past-kernel-dilation2": ((1, 2, 5, 6), (3, 2, 3, 3), True,
                                  dict(padding=(5, 1), dilation=2)),
    "strided-1x1-stride-pair": ((2, 3, 7, 7), (5, 3, 1, 1), True, dict(stride=(3, 2))),
}


def _arrays(case, dtype, seed=0):
    x_shape, w_shape, has_bias, args = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if has_bias else None
    geometry = _params.conv_window(x, w, b, 2, **args)[3]
    gy = rng.standard_normal(geometry.output_shape).astype(dtype)
    return x, w, b, gy, args, geometry


def _reference(x, w, b, gy, args):
    """Reference ``(y, gi, gw, gb)`` and their bounds (the same sums over absolute
    values), for batched or unbatched ``x``."""
    batched = x.ndim == 4
    x4, gy4 = (x, gy) if batched else (x[None], gy[None])
    absolute_b = None if b is None else np.abs(b)
    y = ref.conv2d(x4, w, b, **args)
    y_bound = ref.conv2d(np.abs(x4), np.abs(w), absolute_b, **args)
    grads = ref.conv2d_backward(gy4, x4, w, **args)
    bounds = ref.conv2d_backward(np.abs(gy4), np.abs(x4), np.abs(w), **args)
    expected, bound = [y, *grads], [y_bound, *bounds]
    if not batched:
        for i in (0, 1):
            expected[i], bound[i] = expected[i][0], bound[i][0]
    return expected, bound


def _check(results, expected, bounds, dtype):
    for got, want, bound in zip(results, expected, bounds):
        if got is not None:
            assert isinstance(got, np.ndarray) and got.dtype == dtype
            assert_close_to_sum(got, want, bound, dtype)


def _cpu_results(x, w, b, gy, args, mask=(True, True, True)):
    return (fastpool.conv2d(x, w, b, **args, device="cpu"),
            *fastpool.conv2d_backward(gy, x, w, **args, output_mask=mask, device="cpu"))


def _kernel_results(x, w, b, gy, geometry, algorithm, mask=(True, True, True)):
    """Forward and backward through ``fastpool.cuda``'s launchers (host in, host out)
    with the algorithm forced."""
    y = fastpool_cuda.conv2d_forward(x, w, b, geometry, algorithm)
    grads = fastpool_cuda.conv2d_backward(gy, x, w, geometry, mask, algorithm)
    return (y, *grads)


# ----------------------------------------------------------------------------- reference

@pytest.mark.parametrize("algorithm", cuda_conv.ALGORITHMS)
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_reference(name, algorithm, small_tiles, small_launches):
    # float64 for the cases' even positions, float32 for the odd ones: both dtypes
    # compile and run every kernel, at half the simulator time of both for all.
    dtype = DTYPES[list(CASES).index(name) % 2]
    x, w, b, gy, args, geometry = _arrays(CASES[name], dtype)
    expected, bounds = _reference(x, w, b, gy, args)
    mask = (True, True, b is not None)
    results = _kernel_results(x, w, b, gy, geometry, algorithm, mask)
    assert [r is None for r in results] == [False, False, False, b is None]
    _check(results, expected, bounds, dtype)
    # The CPU's results are within the same bound of the reference: twice it of ours.
    _check(results, _cpu_results(x, w, b, gy, args, mask), [2 * a for a in bounds], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched_input(dtype, small_tiles, small_launches):
    x, w, b, gy, args, geometry = _arrays(((4, 6, 5), (4, 4, 3, 3), True,
                                           dict(stride=(2, 1), padding=1)), dtype)
    expected, bounds = _reference(x, w, b, gy, args)
    y = fastpool.conv2d(x, w, b, **args, device="cuda")
    grads = fastpool.conv2d_backward(gy, x, w, **args, device="cuda")
    assert y.shape == geometry.output_shape and grads.grad_input.shape == x.shape
    _check((y, *grads), expected, bounds, dtype)
    for algorithm in cuda_conv.ALGORITHMS:  # stride 1: the input gradient is a forward
        x1, w1, b1, gy1, args1, g1 = _arrays(((3, 5, 6), (4, 3, 2, 2), False,
                                              dict(padding="same")), dtype)
        expected, bounds = _reference(x1, w1, b1, gy1, args1)
        _check(_kernel_results(x1, w1, b1, gy1, g1, algorithm), expected, bounds, dtype)


@pytest.mark.parametrize("dtype", [np.float32])
def test_production_tiles_through_public_api(dtype):
    # Enough channels that the automatic choice is "tiled", with the production tiles.
    x, w, b, gy, args, geometry = _arrays(((2, 8, 5, 6), (9, 8, 3, 3), True,
                                           dict(padding=1)), dtype)
    assert cuda_conv.choose_algorithm(geometry) == "tiled"
    expected, bounds = _reference(x, w, b, gy, args)
    y = fastpool.conv2d(x, w, b, **args, device="cuda")
    grads = fastpool.conv2d_backward(gy, x, w, **args, device="cuda")
    _check((y, *grads), expected, bounds, dtype)
    _check((y, *grads), _cpu_results(x, w, b, gy, args), [2 * a for a in bounds], dtype)


def test_production_tiles_strided_groups():
    x, w, b, gy, args, geometry = _arrays(CASES["stride2-pair-pad-groups-dilation"],
                                          np.float32)
    expected, bounds = _reference(x, w, b, gy, args)
    _check(_kernel_results(x, w, b, gy, geometry, "tiled"), expected, bounds, np.float32)


# ----------------------------------------------------------------------------- split-K

@pytest.mark.parametrize("target", [1, 3, 1 << 20])
def test_weight_grad_slices(target, monkeypatch, small_tiles, small_launches):
    # 1 slice (written straight into grad_weight), a few slices of several stages each
    # (the loaders' pixel walk crosses rows and images: OW < block_k), one per stage.
    monkeypatch.setattr(cuda_conv, "_TARGET_BLOCKS", target)
    monkeypatch.setattr(cuda_conv, "_TARGET_THREADS", target * 40)
    x, w, b, gy, args, geometry = _arrays(((3, 4, 4, 2), (6, 2, 2, 2), True,
                                           dict(padding=(0, 1), groups=2)), np.float64)
    assert geometry.out_size[1] < SMALL_TILES.block_k
    expected, bounds = _reference(x, w, b, gy, args)
    for algorithm in cuda_conv.ALGORITHMS:
        grads = fastpool_cuda.conv2d_backward(gy, x, w, geometry, (False, True, True),
                                              algorithm)
        _check(grads, [None, *expected[2:]], [None, *bounds[2:]], np.float64)


def test_partial_buffer_is_capped(monkeypatch, small_tiles):
    monkeypatch.setattr(cuda_conv, "_PARTIAL_BYTES", 1)
    x, w, b, gy, args, geometry = _arrays(CASES["stride1-pad1-two-channel-tiles"],
                                          np.float64)
    expected, bounds = _reference(x, w, b, gy, args)
    for algorithm in cuda_conv.ALGORITHMS:
        grads = fastpool_cuda.conv2d_backward(gy, x, w, geometry, (False, True, True),
                                              algorithm)
        _check(grads, [None, *expected[2:]], [None, *bounds[2:]], np.float64)


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("algorithm", cuda_conv.ALGORITHMS)
def test_deterministic_at_any_launch_size(algorithm, small_tiles):
    x, w, b, gy, args, geometry = _arrays(CASES["stride1-pad1-two-channel-tiles"],
                                          np.float32)
    with launch_limits(threads_per_block=32, max_blocks=3):
        first = _kernel_results(x, w, b, gy, geometry, algorithm)
        again = _kernel_results(x, w, b, gy, geometry, algorithm)
    with launch_limits(threads_per_block=64, max_blocks=2):
        limited = _kernel_results(x, w, b, gy, geometry, algorithm)
    for a, b_, c in zip(first, again, limited):
        np.testing.assert_array_equal(a, b_)
        np.testing.assert_array_equal(a, c)


# ----------------------------------------------------------------------------- API paths

@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False),
                                  (False, False, True), (True, False, True),
                                  (False, False, False)])
def test_output_mask(mask):
    x, w, b, gy, args, _ = _arrays(CASES["stride2-pair-pad-groups-dilation"], np.float64)
    expected, bounds = _reference(x, w, b, gy, args)
    grads = fastpool.conv2d_backward(gy, x, w, **args, output_mask=mask, device="cuda")
    assert isinstance(grads, fastpool.Conv2dGrads)
    assert [g is not None for g in grads] == list(mask)
    _check(grads, expected[1:], bounds[1:], np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype):
    x = np.zeros((0, 4, 6, 6), dtype)
    w = np.ones((6, 2, 3, 3), dtype)
    y = fastpool.conv2d(x, w, np.ones(6, dtype), stride=2, groups=2, device="cuda")
    assert y.shape == (0, 6, 2, 2) and y.dtype == dtype
    gi, gw, gb = fastpool.conv2d_backward(np.zeros((0, 6, 2, 2), dtype), x, w, stride=2,
                                          groups=2, device="cuda")
    assert gi.shape == x.shape and gi.dtype == dtype
    np.testing.assert_array_equal(gw, np.zeros(w.shape, dtype))
    np.testing.assert_array_equal(gb, np.zeros(6, dtype))
    assert gw.dtype == gb.dtype == dtype


def test_device_arrays_stay_on_the_device():
    x, w, b, gy, args, _ = _arrays(CASES["depthwise"], np.float32)
    d_x, d_w, d_b, d_gy = (cuda.to_device(a) for a in (x, w, b, gy))
    y = fastpool.conv2d(d_x, d_w, d_b, **args)  # "auto": GPU input runs on the GPU
    assert _dispatch.array_kind(y) == "numba"
    grads = fastpool.conv2d_backward(d_gy, d_x, d_w, **args)
    assert all(_dispatch.array_kind(g) == "numba" for g in grads)
    host = [fastpool.conv2d(x, w, b, **args, device="cuda"),
            *fastpool.conv2d_backward(gy, x, w, **args, device="cuda")]
    assert all(isinstance(h, np.ndarray) for h in host)
    for device_result, host_result in zip([y, *grads], host):
        np.testing.assert_array_equal(device_result.copy_to_host(), host_result)


@pytest.mark.parametrize("algorithm", cuda_conv.ALGORITHMS)
def test_non_contiguous_device_inputs(algorithm, small_tiles, small_launches):
    x, w, b, gy, args, geometry = _arrays(CASES["stride1-pad1-two-channel-tiles"],
                                          np.float64)
    expected, bounds = _reference(x, w, b, gy, args)

    def strided(a):  # a view of every other element along the last axis
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        wide[..., ::2] = a
        # Numba's device arrays take no Ellipsis (on a real GPU; the simulator's do).
        view = cuda.to_device(wide)[(slice(None),) * (a.ndim - 1) + (slice(None, None, 2),)]
        assert not view.is_c_contiguous()
        return view

    d_x, d_w, d_gy = strided(x), strided(w), strided(gy)
    d_b = cuda.to_device(np.stack([b, b], axis=1))[:, 0]
    y = fastpool_cuda.conv2d_forward(d_x, d_w, d_b, geometry, algorithm)
    grads = fastpool_cuda.conv2d_backward(d_gy, d_x, d_w, geometry, (True, True, True),
                                          algorithm)
    _check([r.copy_to_host() for r in (y, *grads)], expected, bounds, np.float64)

    # Unbatched: the 3-D view is copied to a contiguous array before the kernels.
    x0 = x[0]
    geometry0 = _params.conv_window(x0, w, b, 2, **args)[3]
    y0 = fastpool_cuda.conv2d_forward(d_x[0], d_w, d_b, geometry0, algorithm)
    _check([y0.copy_to_host()], [expected[0][0]], [bounds[0][0]], np.float64)


# ----------------------------------------------------------------------------- choices

def test_choose_algorithm():
    def chosen(x_shape, w_shape, **args):
        x, w = np.zeros(x_shape, np.float32), np.zeros(w_shape, np.float32)
        return cuda_conv.choose_algorithm(_params.conv_window(x, w, None, 2, **args)[3])

    assert chosen((1, 64, 9, 9), (64, 64, 3, 3), padding=1) == "tiled"
    assert chosen((1, 8, 9, 9), (8, 8, 1, 1)) == "tiled"
    assert chosen((1, 64, 9, 9), (64, 1, 3, 3), groups=64) == "direct"  # depthwise
    assert chosen((1, 4, 9, 9), (64, 4, 1, 1)) == "direct"              # 4 taps
    assert chosen((1, 64, 9, 9), (4, 64, 3, 3)) == "direct"             # 4 channels


def test_bad_algorithm_and_tiles_raise():
    x, w, b, gy, args, geometry = _arrays(CASES["pointwise-valid"], np.float32)
    with pytest.raises(ValueError, match="algorithm"):
        fastpool_cuda.conv2d_forward(x, w, b, geometry, "winograd")
    with pytest.raises(ValueError, match="tile configuration"):
        with cuda_conv.use_tiles(cuda_conv.TileConfig(64, 64, 16, 4, 3)):
            pass
    # Valid layouts beyond a GPU's limits, which the simulator would run anyway:
    # 66 KiB and 50 KiB of shared memory in float64 (48 KiB allowed), 4096 threads.
    for too_big in [(128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 64, 1, 1)]:
        with pytest.raises(ValueError, match="bytes of static shared memory"):
            cuda_conv.TileConfig(*too_big).check()
    assert cuda_conv.PRODUCTION_TILES.check() is cuda_conv.PRODUCTION_TILES  # within them
    with cuda_conv.use_tiles(SMALL_TILES):
        assert cuda_conv.current_tiles() == SMALL_TILES
    assert cuda_conv.current_tiles() == cuda_conv.PRODUCTION_TILES


def test_taps_are_uploaded_once_per_geometry(monkeypatch):
    """The taps table goes to the GPU once per geometry (and context), not on every
    call: each upload was a synchronous copy that made the host wait for all queued
    GPU work. Results are unchanged by the reuse."""
    from fastpool.cuda import conv as cuda_conv
    cuda_conv._taps_on.cache_clear()
    rng = np.random.default_rng(5)
    host_x, host_w = rng.random((1, 2, 6, 5)), rng.standard_normal((3, 2, 3, 3))
    x, w = cuda.to_device(host_x), cuda.to_device(host_w)
    uploads = []
    real = cuda.to_device
    monkeypatch.setattr(cuda_conv.cuda, "to_device",
                        lambda a, *args, **kw: uploads.append(a.shape) or real(a, *args,
                                                                                **kw))
    first = fastpool.conv2d(x, w, padding=1).copy_to_host()
    assert uploads == [(2 * 3 * 3, 4)]
    again = fastpool.conv2d(x, w, padding=1).copy_to_host()
    assert uploads == [(2 * 3 * 3, 4)]
    np.testing.assert_array_equal(again, first)
    np.testing.assert_allclose(first, fastpool.conv2d(host_x, host_w, padding=1,
                                                      device="cpu"), rtol=1e-12)
    fastpool.conv2d(x, w, padding=2)  # padding is not part of the table
    fastpool.conv2d(x, w, dilation=2, padding=2)
    assert uploads.count((2 * 3 * 3, 4)) == 2
