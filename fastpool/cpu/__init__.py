"""CPU backend: parallel Numba kernels. ``fastpool.cuda`` mirrors these names.

Each launcher is wrapped by ``fastpool._threading.serialised``: on a threading layer
that is not thread-safe (``workqueue``) one call at a time enters the kernels, and a
call whose estimated work is too small to split runs on one thread.
"""

import importlib
import math

from fastpool import _malloc, _threading
from fastpool.cpu import _vector_width

# Before any kernel compiles: kernels that call ``narrow_vectors()`` get no 512-bit
# vectors they do not write themselves.
_vector_width.install()

from fastpool.cpu import conv_reproducible as _conv_reproducible  # noqa: E402
from fastpool.cpu import pooling as _pooling  # noqa: E402

# Scratch buffers allocated in each call stay mapped between calls (``_malloc``).
_malloc.tune()

# Single-thread nanoseconds per unit of work, measured roughly on this project's
# machine (docs/site/performance.md): a window tap of pooling, a multiply-add of
# convolution (GEMM-vectorised), an element read or written.
_NS_PER_TAP, _NS_PER_MAC, _NS_PER_ELEMENT = 0.5, 0.05, 0.25


def _elements(volume):
    return volume.batch * (volume.channels * math.prod(volume.in_size)
                           + volume.out_channels * math.prod(volume.out_size))


def _outputs(volume):
    return volume.batch * volume.out_channels * math.prod(volume.out_size)


def _memory_cost(volume):
    return _NS_PER_ELEMENT * _elements(volume)


def _pool_cost(window):
    return (_NS_PER_TAP * _outputs(window) * math.prod(window.kernel)
            + _memory_cost(window))


# The 2-D max and average pooling forwards split over threads only from 12.5x
# ``SMALL_WORK_NS`` of estimated work (250 us). Timed as the layer suite times a call
# (after 12 ms of other work, so the second thread sleeps; 2026-12-07, Intel Xeon,
# float32, batch 1, both layouts), ``_pool_cost`` came to 2.2x-6.1x a forward's real
# single-thread time, and two threads beat one only from about 70-90 us of real work:
# 2x2 s2 of 512@14 (estimated 82 us) 19-31 us on one thread against 26-50 on two; 2x2
# avg of 256@28 (163) 40 against 50-61; 2x2 of 512@28 (326) 90-95 against 74-108;
# 256@56 (652) 207-235 against 126-176. 1-D and 3-D forwards were not measured so and
# keep the common threshold.
_POOL_FORWARD_SPLIT = 12.5


def _pool_forward_cost(window):
    """``_pool_cost`` as ``serialised`` compares it with ``SMALL_WORK_NS``: 2-D
    forwards' estimates over ``_POOL_FORWARD_SPLIT``."""
    cost = _pool_cost(window)
    return cost / _POOL_FORWARD_SPLIT if window.rank == 2 else cost


# ... and their backwards from 15x (300 us): timed so (2026-12-07, twenty-seventh
# session, Intel Xeon, float32, both layouts, one worker against two, us), estimates
# of 41-272 us ran faster on one thread in 30 of 36 cases (2x2 max of (1, 64, 28, 28)
# 24 against 41 NCHW; 3x3 s2 max of (1, 64, 56, 56), estimated 272, 86 / 134 NCHW,
# 124 / 222 channels-last; 2x2 average of (32, 16, 10, 10), LeNet-5's, 33 / 59 and 42
# / 95), two threads won on channels-last (32, 6, 28, 28) (2x2 max 143 / 108), and
# from estimates of 326 on (2, 64, 56, 56) they won in every case, 1.3x-2.1x.
_POOL_BACKWARD_SPLIT = 15.0


def _pool_backward_cost(window):
    """``_pool_cost`` over ``_POOL_BACKWARD_SPLIT`` for 2-D max and average
    backwards."""
    cost = _pool_cost(window)
    return cost / _POOL_BACKWARD_SPLIT if window.rank == 2 else cost


def _conv_cost(window):
    macs = _outputs(window) * math.prod(window.kernel) * (window.channels // window.groups)
    return _NS_PER_MAC * macs + _memory_cost(window)


# The 2-D convolution forwards split over threads only from 15x ``SMALL_WORK_NS`` of
# estimated work (300 us), depthwise ones (one input channel a group) from 4.5x (90
# us): as for the pooling forwards, two threads beat one only from about 90-100 us of
# real single-thread work when the call comes after a pause (the layer suite's timing:
# 12 ms of other work, one untimed call, the timed one; 2026-12-07, Intel Xeon, 2
# threads, float32, batch 1, each layer's one- and two-thread times interleaved). The
# estimate is about 3x a GEMM-based forward's real time and about 1x a depthwise
# one's. One thread against two, us: 1x1 192->64 on 14x14 (estimated 133) 49-51
# against 71-77; 1x1 144->32 on 28x28 (215) 64-65 against 78-83; 1x1 384->96 on 14x14
# (385) 106-113 against 85-90; depthwise 3x3 of 960@7 (45) 52-54 against 67-68, 384@14
# (72) 63-77 against 82-108, 576@14 (107) 97-99 against 90-135, 192@28 (143) 127-202
# against 98-127. Called back to back (the second thread awake), two threads were
# 10-15% faster than one on such calls (depthwise 960@7: 50 against 44 us), so this
# costs a tight loop of small calls that much.
_CONV_FORWARD_SPLIT = 15.0
_DEPTHWISE_FORWARD_SPLIT = 4.5


def _conv2d_forward_cost(window):
    """``_conv_cost`` as ``serialised`` compares it with ``SMALL_WORK_NS``: 2-D
    forwards' estimates over ``_CONV_FORWARD_SPLIT`` (``_DEPTHWISE_FORWARD_SPLIT``)."""
    cost = _conv_cost(window)
    if window.rank != 2:
        return cost
    return cost / (_DEPTHWISE_FORWARD_SPLIT if window.channels == window.groups
                   else _CONV_FORWARD_SPLIT)


def _sized(cost, loops=True):
    return lambda launcher: _threading.serialised(launcher, cost, loops)


# Pooling and convolution launchers size every kernel from ``thread_count()`` (their
# parallel loops and the layout copies ask ``_threading`` first; BLAS runs one thread
# inside the kernels), so a small call needs no change of Numba's thread count; the
# unpooling launchers call parallel loops directly.
_conv_launcher = _sized(_conv_cost, loops=False)
_conv2d_forward_launcher = _sized(_conv2d_forward_cost, loops=False)
_pool_launcher = _sized(_pool_cost, loops=False)
_pool_forward_launcher = _sized(_pool_forward_cost, loops=False)
_pool_backward_launcher = _sized(_pool_backward_cost, loops=False)
_adaptive_launcher = _sized(_memory_cost, loops=False)
_memory_launcher = _sized(_memory_cost)

# The convolution launchers are made at their first use (``__getattr__``): importing
# the convolution modules registers fastpool's GEMM with Numba's linker
# (``_microkernel``), which compiles it in a process without a disk cache, and
# ``import fastpool.cpu`` compiles nothing.
_CONV_MODULES = {"conv2d_forward": "conv", "conv2d_backward": "conv",
                 "conv3d_forward": "conv3d", "conv3d_backward": "conv3d",
                 "conv_transpose_forward": "conv_transpose",
                 "conv_transpose_backward": "conv_transpose"}


def __getattr__(name):
    module = _CONV_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    function = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    sized = _conv2d_forward_launcher if name == "conv2d_forward" else _conv_launcher
    launcher = globals()[name] = sized(function)
    return launcher


max_pool_forward = _pool_forward_launcher(_pooling.max_pool_forward)
max_pool_backward = _pool_backward_launcher(_pooling.max_pool_backward)
avg_pool_forward = _pool_forward_launcher(_pooling.avg_pool_forward)
avg_pool_backward = _pool_backward_launcher(_pooling.avg_pool_backward)
stochastic_pool_forward = _pool_launcher(_pooling.stochastic_pool_forward)
stochastic_pool_backward = _pool_launcher(_pooling.stochastic_pool_backward)
adaptive_avg_pool_forward = _adaptive_launcher(_pooling.adaptive_avg_pool_forward)
adaptive_avg_pool_backward = _adaptive_launcher(_pooling.adaptive_avg_pool_backward)
adaptive_max_pool_forward = _adaptive_launcher(_pooling.adaptive_max_pool_forward)
adaptive_max_pool_backward = _adaptive_launcher(_pooling.adaptive_max_pool_backward)
adaptive_stochastic_pool_forward = _adaptive_launcher(_pooling.adaptive_stochastic_pool_forward)
adaptive_stochastic_pool_backward = _adaptive_launcher(_pooling.adaptive_stochastic_pool_backward)
max_unpool_forward = _memory_launcher(_pooling.max_unpool_forward)
max_unpool_backward = _memory_launcher(_pooling.max_unpool_backward)
# Reproducible weight and bias gradients (``fastpool._reproducible``).
conv_weight_folds = _conv_launcher(_conv_reproducible.conv_weight_folds)
channel_sum_folds = _memory_launcher(_conv_reproducible.channel_sum_folds)
max_abs = _threading.serialised(_conv_reproducible.max_abs)
finish_folds = _conv_reproducible.finish_folds

# Per half-precision dtype, the launchers whose kernels read and write arrays of it
# themselves (``cpu/_half_bits.py``: half the bytes of a float32 copy); the others are
# given float32 copies (``fastpool._half``). ``fastpool.cuda`` has its own.
_POOLING = frozenset({"max_pool_forward", "max_pool_backward", "avg_pool_forward",
                      "avg_pool_backward", "stochastic_pool_forward",
                      "stochastic_pool_backward"})
HALF_NATIVE = {"float16": _POOLING, "bfloat16": _POOLING}

__all__ = [
    "adaptive_avg_pool_backward",
    "adaptive_avg_pool_forward",
    "adaptive_max_pool_backward",
    "adaptive_max_pool_forward",
    "adaptive_stochastic_pool_backward",
    "adaptive_stochastic_pool_forward",
    "conv2d_backward",
    "conv2d_forward",
    "conv3d_backward",
    "conv3d_forward",
    "conv_weight_folds",
    "conv_transpose_backward",
    "conv_transpose_forward",
    "avg_pool_backward",
    "avg_pool_forward",
    "channel_sum_folds",
    "finish_folds",
    "max_abs",
    "max_pool_backward",
    "max_pool_forward",
    "max_unpool_backward",
    "max_unpool_forward",
    "stochastic_pool_backward",
    "stochastic_pool_forward",
]
