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

from numba import config as _numba_config

from fastpool._dispatch import on_device
from fastpool.cuda import conv as _conv
from fastpool.cuda import conv3d as _conv3d
from fastpool.cuda import pooling as _pooling

if _numba_config.ENABLE_CUDASIM:
    from fastpool.cuda._simulator import serialise_shared_arrays

    serialise_shared_arrays()

conv2d_forward = on_device(_conv.conv2d_forward)
conv2d_backward = on_device(_conv.conv2d_backward)
conv3d_forward = on_device(_conv3d.conv3d_forward)
conv3d_backward = on_device(_conv3d.conv3d_backward)
max_pool_forward = on_device(_pooling.max_pool_forward)
max_pool_backward = on_device(_pooling.max_pool_backward)
avg_pool_forward = on_device(_pooling.avg_pool_forward)
avg_pool_backward = on_device(_pooling.avg_pool_backward)
stochastic_pool_forward = on_device(_pooling.stochastic_pool_forward)
stochastic_pool_backward = on_device(_pooling.stochastic_pool_backward)

__all__ = [
    "conv2d_backward",
    "conv2d_forward",
    "conv3d_backward",
    "conv3d_forward",
    "avg_pool_backward",
    "avg_pool_forward",
    "max_pool_backward",
    "max_pool_forward",
    "stochastic_pool_backward",
    "stochastic_pool_forward",
]
