"""The per-call path (issue 16): validation memoised per geometry, and work too small to
split run on the calling thread alone. Neither may change a result or let bad input
through."""

import numba
import numpy as np
import pytest

import fastpool
import reference as ref
from conftest import assert_close
from fastpool import _geometry, _params, _threading


def _fresh_memo():
    """A separate memo for the test: the validator undecorated, decorated again."""
    return _params.memoised(1)(_params.pool_window.__wrapped__)


def test_a_repeated_call_returns_the_remembered_geometry():
    validate = _fresh_memo()
    x = np.zeros((2, 3, 9, 8), np.float32)
    x1, w1 = validate(x, 2, 3, 2, 1, 1, False)
    x2, w2 = validate(np.ones_like(x), 2, 3, 2, 1, 1, False)
    assert x1 is x and w2 is w1  # same shapes, strides, dtype, arguments
    # any difference in shape, strides, dtype or an argument is a new geometry
    assert validate(x[:, :, :8], 2, 3, 2, 1, 1, False)[1] is not w1
    assert validate(x.astype(np.float64), 2, 3, 2, 1, 1, False)[1] is not w1
    cl = _geometry.channels_last_copy(x, 1)
    w_cl = validate(cl, 2, 3, 2, 1, 1, False)[1]
    assert w_cl is not w1 and w_cl.layout == _geometry.CHANNELS_LAST
    assert validate(x, 2, 3, 2, 0, 1, False)[1].out_size == (4, 3)
    assert validate(x, 2, (3, 3), 2, 1, 1, False)[1] is not w1


@pytest.mark.parametrize("good, bad, error", [
    # (a call that is valid and remembered, an equal-comparing call that is not valid)
    (dict(kernel_size=1), dict(kernel_size=True), TypeError),
    (dict(kernel_size=(1, 2)), dict(kernel_size=(True, 2)), TypeError),
    (dict(ceil_mode=True), dict(ceil_mode=1), TypeError),
    (dict(stride=2), dict(stride=2.0), TypeError),
])
def test_a_remembered_geometry_never_lets_an_invalid_argument_through(good, bad, error):
    x = np.zeros((1, 2, 6, 6), np.float32)
    args = dict(kernel_size=2, stride=None, padding=0, dilation=1, ceil_mode=False)
    fastpool.max_pool2d(x, **dict(args, **good))
    fastpool.max_pool2d(x, **dict(args, **good))
    with pytest.raises(error):
        fastpool.max_pool2d(x, **dict(args, **bad))


def test_converted_inputs_are_validated_every_time():
    validate = _fresh_memo()
    x = np.zeros((1, 2, 6, 6), np.dtype(">f4"))  # byte-swapped: converted, not kept
    y1, w1 = validate(x, 2, 2, None, 0, 1, False)
    y2, w2 = validate(x, 2, 2, None, 0, 1, False)
    assert y1 is not x and w2 is not w1
    listed = validate(np.zeros((1, 1, 4, 4)), 2, [2, 2], None, 0, 1, False)[1]
    assert listed.kernel == (2, 2)  # an unhashable argument: validated in full


def test_memoised_calls_compute_the_reference():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 7, 9))
    w = rng.standard_normal((4, 3, 3, 3))
    for _ in range(3):
        assert_close(fastpool.max_pool2d(x, 3, 2, 1), ref.max_pool(x, 3, 2, 1)[0], x.dtype)
        assert_close(fastpool.conv2d(x, w, padding=1), ref.conv2d(x, w, padding=1),
                     x.dtype)
    # the same shapes with other strides (a view): not the remembered geometry
    wide = rng.standard_normal((2, 3, 7, 18))[..., ::2]
    assert_close(fastpool.max_pool2d(wide, 3, 2, 1), ref.max_pool(wide, 3, 2, 1)[0],
                 wide.dtype)


def _volume(outputs):
    return _geometry.Volume(rank=1, batch=1, channels=1, out_channels=1, batched=True,
                            layout=_geometry.CHANNELS_FIRST, in_size=(outputs,),
                            out_size=(outputs,))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_small_work_runs_on_one_thread_and_the_count_is_restored():
    seen = []

    def launcher(x, volume):
        seen.append(numba.get_num_threads())
        return x

    cost = (lambda volume: volume.in_size[0])  # nanoseconds: the test's own rule
    wrapped = _threading.serialised(launcher, cost)
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        wrapped(None, _volume(_threading.SMALL_WORK_NS - 1))
        wrapped(None, _volume(_threading.SMALL_WORK_NS))
        assert seen == [1, 2]
        assert numba.get_num_threads() == 2

        def failing(x, volume):
            raise ValueError("kernel failed")
        with pytest.raises(ValueError):
            _threading.serialised(failing, cost)(None, _volume(1))
        assert numba.get_num_threads() == 2  # restored on errors too
    finally:
        numba.set_num_threads(before)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_eight_byte_items_count_twice_the_work():
    """The cost estimates are float32's: a call whose first array has 8-byte items
    (float64) counts twice the estimate, so it splits from half the float32 size; other
    item sizes (float32, float16) and arguments that are not arrays count it once."""
    seen = []

    def launcher(x, volume):
        seen.append(numba.get_num_threads())
        return x

    cost = (lambda volume: volume.in_size[0])
    wrapped = _threading.serialised(launcher, cost)
    half = _volume(_threading.SMALL_WORK_NS // 2)
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        for x in (np.zeros(1, np.float64), np.zeros(1, np.float32),
                  np.zeros(1, np.float16), None):
            wrapped(x, half)
        wrapped(np.zeros(1, np.float64), _volume(_threading.SMALL_WORK_NS // 2 - 1))
        assert seen == [2, 1, 1, 1, 1]
    finally:
        numba.set_num_threads(before)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_small_work_without_loops_runs_one_worker_and_leaves_numbas_count():
    """A launcher declared free of direct parallel loops (``loops=False``: the pooling
    launchers) sees ``thread_count() == 1`` in a small call while Numba's count stays;
    a parallel loop it reaches through ``loop_on_one_thread`` runs on one thread; the
    flag is cleared after errors, and large calls see the full count."""
    seen = []

    def launcher(x, volume):
        seen.append((_threading.thread_count(), numba.get_num_threads(),
                     _threading.loop_on_one_thread(numba.get_num_threads)))
        return x

    cost = (lambda volume: volume.in_size[0])
    wrapped = _threading.serialised(launcher, cost, loops=False)
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        wrapped(None, _volume(_threading.SMALL_WORK_NS - 1))
        wrapped(None, _volume(_threading.SMALL_WORK_NS))
        assert seen == [(1, 2, 1), (2, 2, 2)]
        assert not _threading.one_worker()

        def failing(x, volume):
            raise ValueError("kernel failed")
        with pytest.raises(ValueError):
            _threading.serialised(failing, cost, loops=False)(None, _volume(1))
        assert not _threading.one_worker() and _threading.thread_count() == 2
    finally:
        numba.set_num_threads(before)


def test_a_configured_thread_safe_layer_needs_no_lock_before_it_starts(monkeypatch):
    """Before Numba's threads start (a process whose calls were all small), a layer
    configured by name as thread-safe lets calls in without the lock, and the answer is
    kept; an open choice serialises until the first launch decides."""
    monkeypatch.setattr(_threading, "active_layer", lambda: None)
    monkeypatch.setitem(_threading._state, "thread_safe", None)
    monkeypatch.setattr(numba.config, "THREADING_LAYER", "default")
    assert _threading._thread_safe() is False
    assert _threading._state["thread_safe"] is None
    monkeypatch.setattr(numba.config, "THREADING_LAYER", "tbb")
    assert _threading._thread_safe() is True
    assert _threading._state["thread_safe"] is True


def test_small_and_large_work_estimates_of_the_cpu_launchers():
    from fastpool import cpu
    x = np.zeros((1, 6, 28, 28), np.float32)
    _, small = _params.pool_window(x, 2, 2, None, 0, 1, False)
    assert cpu._pool_cost(small) < _threading.SMALL_WORK_NS
    _, large = _params.pool_window(np.zeros((32, 64, 112, 112), np.float32), 2, 3, 2, 1,
                                   1, False)
    assert cpu._pool_cost(large) > 100 * _threading.SMALL_WORK_NS
    # a 2-D forward splits from 12.5x the threshold (one thread was faster below it),
    # its backward and other ranks at the threshold
    _, mid = _params.pool_window(np.zeros((1, 512, 14, 14), np.float32), 2, 2, None, 0,
                                 1, False)
    assert cpu._pool_cost(mid) > _threading.SMALL_WORK_NS
    assert cpu._pool_forward_cost(mid) < _threading.SMALL_WORK_NS
    assert cpu._pool_forward_cost(large) > 10 * _threading.SMALL_WORK_NS
    _, three = _params.pool_window(np.zeros((1, 64, 14, 14, 14), np.float32), 3, 2,
                                   None, 0, 1, False)
    assert cpu._pool_forward_cost(three) == cpu._pool_cost(three)
    w = np.zeros((64, 64, 3, 3), np.float32)
    *_, conv = _params.conv_window(np.zeros((1, 64, 56, 56), np.float32), w, None, 2,
                                   1, 1, 1, 1)
    # 116 M multiply-adds: far too much for one thread
    assert cpu._conv_cost(conv) > 100 * _threading.SMALL_WORK_NS
    assert cpu._conv2d_forward_cost(conv) > 5 * _threading.SMALL_WORK_NS
    # a 2-D forward splits from 15x the threshold, a depthwise one from 4.5x (one thread
    # was faster below), backwards and other ranks at the threshold
    *_, pointwise = _params.conv_window(np.zeros((1, 192, 14, 14), np.float32),
                                        np.zeros((64, 192, 1, 1), np.float32), None, 2,
                                        1, 0, 1, 1)
    assert cpu._conv_cost(pointwise) > 5 * _threading.SMALL_WORK_NS
    assert cpu._conv2d_forward_cost(pointwise) < _threading.SMALL_WORK_NS
    *_, depthwise = _params.conv_window(np.zeros((1, 960, 7, 7), np.float32),
                                        np.zeros((960, 1, 3, 3), np.float32), None, 2,
                                        1, 1, 1, 960)
    assert cpu._conv_cost(depthwise) > 2 * _threading.SMALL_WORK_NS
    assert cpu._conv2d_forward_cost(depthwise) < _threading.SMALL_WORK_NS
    *_, wide = _params.conv_window(np.zeros((1, 192, 28, 28), np.float32),
                                   np.zeros((192, 1, 3, 3), np.float32), None, 2, 1, 1,
                                   1, 192)
    assert cpu._conv2d_forward_cost(wide) > _threading.SMALL_WORK_NS
    *_, one_d = _params.conv_window(np.zeros((1, 192, 196), np.float32),
                                    np.zeros((64, 192, 1), np.float32), None, 1, 1, 0, 1,
                                    1)
    assert cpu._conv2d_forward_cost(one_d) == cpu._conv_cost(one_d)


@pytest.mark.parametrize("shape", [(1, 33, 45, 47), (2, 70, 9, 13, 7), (3, 200, 130),
                                   (1, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_copies_between_memory_formats(shape, dtype):
    """The tiled parallel copies (large arrays; sizes not a multiple of the tile) and
    NumPy's (small ones) give the same array."""
    from fastpool.cpu._arrays import channels_last, contiguous
    x = np.random.default_rng(6).standard_normal(shape).astype(dtype)
    cl = _geometry.channels_last_copy(x, 1)
    back = contiguous(cl)
    assert back.flags.c_contiguous and back.dtype == x.dtype
    np.testing.assert_array_equal(back, x)
    again = channels_last(x, 1)
    np.testing.assert_array_equal(again, x)
    assert again.strides == cl.strides


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32, np.uint16,
                                   np.uint8])
def test_transposed_planes_in_vector_blocks(dtype):
    """``_transpose_planes`` moves 8x8 (4-byte items) or 4x4 (8-byte) blocks through
    vector registers and the rest item by item: every item lands in place for planes
    whose sides are and are not multiples of the blocks and of the 32x32 tiles, for
    every item size the copies see (values, int64 indices, float16 bits, masks)."""
    from fastpool.cpu._arrays import _transpose_planes
    rng = np.random.default_rng(7)
    for n, a, b in [(1, 8, 8), (2, 37, 13), (1, 64, 40), (3, 5, 3), (1, 33, 71)]:
        src = (rng.standard_normal((n, a, b)) * 100).astype(dtype)
        dst = np.zeros((n, b, a), dtype)
        _transpose_planes(src, dst)
        np.testing.assert_array_equal(dst, src.transpose(0, 2, 1))
        back = np.zeros_like(src)
        _transpose_planes(dst, back)
        np.testing.assert_array_equal(back, src)


def test_the_shared_zero_bias_is_never_written():
    """Calls without a bias share one zero array per dtype (``_no_bias``): no algorithm
    may write into it, or later calls would add what it wrote."""
    from fastpool.cpu import conv as cpu_conv
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 8, 9, 9))
    w = rng.standard_normal((8, 8, 3, 3))
    *_, window = _params.conv_window(x, w, None, 2, 1, 1, 1, 1)
    want = ref.conv2d(x, w, padding=1)
    for name in cpu_conv.valid_algorithms(window):
        for _ in range(2):
            y = cpu_conv.conv2d_forward(x, w, None, window, algorithm=name)
            assert_close(y, want, x.dtype)
    assert not any(zero.any() for zero in cpu_conv._NO_BIAS.values())
    assert cpu_conv._NO_BIAS[np.dtype(np.float64)].shape == (1,)


def test_an_array_passed_by_keyword_is_validated_without_the_memo():
    validate = _fresh_memo()
    x = np.zeros((1, 2, 6, 6), np.float32)
    got, window = validate(x=x, rank=2, kernel_size=3, stride=2, padding=1, dilation=1,
                           ceil_mode=False)
    assert got is x and window.out_size == (3, 3)
    with pytest.raises(TypeError):
        validate(x=x, rank=2, kernel_size=3, stride=True, padding=1, dilation=1,
                 ceil_mode=False)


def test_the_device_variable_is_read_from_a_replaced_environment(monkeypatch):
    """``FASTPOOL_DEVICE`` is read from the environment's own dict for speed; an
    ``os.environ`` replaced by another mapping is still honoured."""
    import os
    from fastpool import _dispatch
    monkeypatch.setattr(os, "environ", {"FASTPOOL_DEVICE": "CPU"})
    assert _dispatch.get_device() == "cpu"
    monkeypatch.setattr(os, "environ", {})
    assert _dispatch.get_device() == "auto"


def test_conv2d_forward_threads_follow_its_own_estimate(monkeypatch):
    """``fastpool.conv2d`` sizes its threads from ``_conv2d_forward_cost``: a 1x1
    192->64 on 14x14 (estimated 133 us, under 15x the threshold) runs on one worker, a
    1x1 384->96 on 14x14 (385 us) on all of them."""
    from fastpool.cpu.conv import _channels_last_pointwise as clp
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has one thread")
    workers = []
    original = clp.forward
    monkeypatch.setattr(clp, "forward", lambda *a: workers.append(a[-1]) or original(*a))
    saved = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        for c_in, c_out in ((192, 64), (384, 96)):
            x = _geometry.channels_last_copy(np.ones((1, c_in, 14, 14), np.float32), 1)
            fastpool.conv2d(x, np.ones((c_out, c_in, 1, 1), np.float32))
    finally:
        numba.set_num_threads(saved)
    assert workers == [1, 2]
