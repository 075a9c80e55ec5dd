"""CUDA backend: numba.cuda kernels mirroring ``fastpool.cpu``'s launcher names and
signatures.

The kernel modules (``conv``, ``pooling``) take and return Numba device arrays.
The names exported here wrap them with ``fastpool._dispatch.on_device``: host inputs are
copied to the GPU and results copied back to NumPy; GPU inputs (Numba device arrays,
CuPy arrays, torch CUDA tensors) are used in place and results come back as the same
kind of array, with no host round trip. Importing this package imports ``numba.cuda``;
``fastpool._dispatch.backend`` does so only when a call asks for the GPU. Under Numba's
CUDA simulator it also repairs the simulator's shared-array allocator (``_simulator``).
"""

import functools as _functools

import numpy as _np
from numba import config as _numba_config

if not hasattr(_np, "row_stack"):
    # numba-cuda up to at least 0.30.4 registers an overload for np.row_stack when it
    # compiles its first kernel; NumPy 2.5 removed that alias of np.vstack, so every GPU
    # kernel then failed to compile with "module 'numpy' has no attribute 'row_stack'"
    # (seen on an H200 machine with NumPy 2.5.2, 2026-12-04). The alias is put back
    # before any kernel compiles; it is NumPy's own vstack.
    _np.row_stack = _np.vstack

from fastpool._dispatch import on_device
from fastpool._geometry import CHANNELS_LAST as _CHANNELS_LAST
from fastpool._geometry import Window as _Window
from fastpool.cuda._launch import in_layout as _in_layout
from fastpool.cuda import conv as _conv
from fastpool.cuda import conv3d as _conv3d
from fastpool.cuda import conv_reproducible as _conv_reproducible
from fastpool.cuda import conv_transpose as _conv_transpose
from fastpool.cuda import pooling as _pooling

if _numba_config.ENABLE_CUDASIM:
    from fastpool.cuda._simulator import serialise_shared_arrays

    serialise_shared_arrays()



def _following_layout(launcher):
    """A convolution launcher (which computes channels-first) whose result shaped like
    an input or output of the call (the forward's ``y``, the backward's ``grad_input``)
    comes back in the call's memory format (``Window.layout``), converted on the GPU."""
    @_functools.wraps(launcher)
    def run(*args):
        window = next(a for a in args if isinstance(a, _Window))
        result = launcher(*args)
        if window.layout != _CHANNELS_LAST:
            return result
        first = result[0] if isinstance(result, tuple) else result
        if first is not None:
            first = _in_layout(first, True, 1 if window.batched else 0)
        return (first,) + tuple(result[1:]) if isinstance(result, tuple) else first

    return run


conv2d_forward = on_device(_following_layout(_conv.conv2d_forward))
conv2d_backward = on_device(_following_layout(_conv.conv2d_backward))
conv3d_forward = on_device(_following_layout(_conv3d.conv3d_forward))
conv3d_backward = on_device(_following_layout(_conv3d.conv3d_backward))
conv_transpose_forward = on_device(_following_layout(_conv_transpose.conv_transpose_forward))
conv_transpose_backward = on_device(_following_layout(_conv_transpose.conv_transpose_backward))
max_pool_forward = on_device(_pooling.max_pool_forward)
max_pool_backward = on_device(_pooling.max_pool_backward)
avg_pool_forward = on_device(_pooling.avg_pool_forward)
avg_pool_backward = on_device(_pooling.avg_pool_backward)
stochastic_pool_forward = on_device(_pooling.stochastic_pool_forward)
stochastic_pool_backward = on_device(_pooling.stochastic_pool_backward)
adaptive_avg_pool_forward = on_device(_pooling.adaptive_avg_pool_forward)
adaptive_avg_pool_backward = on_device(_pooling.adaptive_avg_pool_backward)
adaptive_max_pool_forward = on_device(_pooling.adaptive_max_pool_forward)
adaptive_max_pool_backward = on_device(_pooling.adaptive_max_pool_backward)
adaptive_stochastic_pool_forward = on_device(_pooling.adaptive_stochastic_pool_forward)
adaptive_stochastic_pool_backward = on_device(_pooling.adaptive_stochastic_pool_backward)
max_unpool_forward = on_device(_pooling.max_unpool_forward)
max_unpool_backward = on_device(_pooling.max_unpool_backward)
# Reproducible weight and bias gradients (``fastpool._reproducible``).
conv_weight_folds = on_device(_conv_reproducible.conv_weight_folds)
channel_sum_folds = on_device(_conv_reproducible.channel_sum_folds)
max_abs = on_device(_conv_reproducible.max_abs)  # host values: one wait for the GPU
finish_folds = on_device(_conv_reproducible.finish_folds)

# Launchers whose kernels read and write float16 arrays themselves (widening each load,
# rounding each store once, through float32 as the CPU does): ``fastpool._half`` gives
# the others float32 copies, and every launcher float32 copies of bfloat16 (Numba's CUDA
# target has no bfloat16 array type).
HALF_NATIVE = {"float16": frozenset({"max_pool_forward", "max_pool_backward",
                                     "avg_pool_forward", "avg_pool_backward",
                                     "stochastic_pool_forward",
                                     "stochastic_pool_backward"})}

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
