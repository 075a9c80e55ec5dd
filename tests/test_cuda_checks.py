"""``fastpool.deferred_checks()``: GPU calls that must report bad input queue their
checks instead of waiting for the GPU, and the block's end reads them back.

Runs under Numba's CUDA simulator here (and on a real GPU where there is one): what is
checked is fastpool's side, that no flag is read inside the block, that the block's end
raises the first call's error, and that the results of good input are unchanged.
"""

import numpy as np
import pytest

import fastpool
from fastpool.cuda import _launch


@pytest.fixture
def readbacks(monkeypatch):
    """How many error flags were read back (each is a host wait)."""
    count = [0]
    read = _launch.flag_raised

    def counting(flag):
        count[0] += 1
        return read(flag)

    monkeypatch.setattr(_launch, "flag_raised", counting)
    return count


def _inputs():
    rng = np.random.default_rng(11)
    x = rng.random((2, 3, 6, 6)).astype(np.float32)
    gy = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    _, idx = fastpool.max_pool2d(x, 2, return_indices=True)
    return x, gy, idx


def _device(a):
    from numba import cuda
    return cuda.to_device(a)


def test_good_input_waits_for_no_flag_inside_the_block(readbacks):
    x, gy, idx = _inputs()
    with fastpool.deferred_checks():
        y, s_idx = fastpool.stochastic_pool2d(_device(x), 2, seed=3, return_indices=True)
        g = fastpool.max_pool2d_backward(_device(gy), _device(x), 2, indices=_device(idx))
        u = fastpool.max_unpool2d(_device(gy), _device(idx), 2)
        assert readbacks[0] == 0
    expected = fastpool.stochastic_pool2d(x, 2, seed=3, return_indices=True)
    np.testing.assert_array_equal(y.copy_to_host(), expected[0])
    np.testing.assert_array_equal(s_idx.copy_to_host(), expected[1])
    np.testing.assert_array_equal(g.copy_to_host(),
                                  fastpool.max_pool2d_backward(gy, x, 2, indices=idx))
    np.testing.assert_array_equal(u.copy_to_host(), fastpool.max_unpool2d(gy, idx, 2))
    # Outside a block each of those calls reads its flag back at once.
    readbacks[0] = 0
    fastpool.stochastic_pool2d(_device(x), 2, seed=3)
    assert readbacks[0] == 1


@pytest.mark.parametrize("bad", ["stochastic", "indices", "unpool"])
def test_the_blocks_end_raises_the_first_bad_calls_error(readbacks, bad):
    x, gy, idx = _inputs()
    wrong = idx.copy()
    wrong[0, 0, 0, 0] = 35  # in the plane, outside its own window (and unpooled: 6x6)
    wrong_unpool = idx.copy()
    wrong_unpool[0, 0, 0, 0] = 36  # outside the 6x6 unpooled plane
    calls = {
        "stochastic": lambda: fastpool.stochastic_pool2d(_device(x - 1), 2, seed=1),
        "indices": lambda: fastpool.max_pool2d_backward(_device(gy), _device(x), 2,
                                                        indices=_device(wrong)),
        "unpool": lambda: fastpool.max_unpool2d(_device(gy), _device(wrong_unpool), 2),
    }
    messages = {"stochastic": "non-negative|negative", "indices": "own window",
                "unpool": "outside"}
    with pytest.raises(ValueError, match=messages[bad]):
        with fastpool.deferred_checks():
            fastpool.avg_pool2d(_device(x), 2)  # no check
            calls[bad]()
            fastpool.stochastic_pool2d(_device(x), 2, seed=1)  # good: checked too
            assert readbacks[0] == 0
    # Outside the block the same call raises at once.
    with pytest.raises(ValueError, match=messages[bad]):
        calls[bad]()


def test_an_exception_in_the_block_goes_on_and_skips_the_checks(readbacks):
    x, *_ = _inputs()
    with pytest.raises(KeyError):
        with fastpool.deferred_checks():
            fastpool.stochastic_pool2d(_device(x - 1), 2, seed=1)
            raise KeyError("the caller's own error")
    assert readbacks[0] == 0


def test_cpu_calls_check_at_once_and_blocks_nest():
    x, *_ = _inputs()
    with fastpool.deferred_checks():
        with pytest.raises(ValueError):
            fastpool.stochastic_pool2d(x - 1, 2, seed=1)  # NumPy, CPU: at once
    with pytest.raises(ValueError):
        with fastpool.deferred_checks():
            with fastpool.deferred_checks():
                fastpool.avg_pool2d(_device(x), 2)
            fastpool.stochastic_pool2d(_device(x - 1), 2, seed=1)
