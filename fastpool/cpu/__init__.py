"""CPU backend: parallel Numba kernels. ``fastpool.cuda`` mirrors these names.

Each launcher is wrapped by ``fastpool._threading.serialised``: on a threading layer
that is not thread-safe (``workqueue``) one call at a time enters the kernels.
"""

from fastpool._threading import serialised
from fastpool.cpu import conv as _conv
from fastpool.cpu import conv3d as _conv3d
from fastpool.cpu import conv_transpose as _conv_transpose
from fastpool.cpu import pooling as _pooling

conv2d_forward = serialised(_conv.conv2d_forward)
conv2d_backward = serialised(_conv.conv2d_backward)
conv3d_forward = serialised(_conv3d.conv3d_forward)
conv3d_backward = serialised(_conv3d.conv3d_backward)
conv_transpose_forward = serialised(_conv_transpose.conv_transpose_forward)
conv_transpose_backward = serialised(_conv_transpose.conv_transpose_backward)
max_pool_forward = serialised(_pooling.max_pool_forward)
max_pool_backward = serialised(_pooling.max_pool_backward)
avg_pool_forward = serialised(_pooling.avg_pool_forward)
avg_pool_backward = serialised(_pooling.avg_pool_backward)
stochastic_pool_forward = serialised(_pooling.stochastic_pool_forward)
stochastic_pool_backward = serialised(_pooling.stochastic_pool_backward)
adaptive_avg_pool_forward = serialised(_pooling.adaptive_avg_pool_forward)
adaptive_avg_pool_backward = serialised(_pooling.adaptive_avg_pool_backward)
adaptive_max_pool_forward = serialised(_pooling.adaptive_max_pool_forward)
adaptive_max_pool_backward = serialised(_pooling.adaptive_max_pool_backward)
adaptive_stochastic_pool_forward = serialised(_pooling.adaptive_stochastic_pool_forward)
adaptive_stochastic_pool_backward = serialised(_pooling.adaptive_stochastic_pool_backward)
max_unpool_forward = serialised(_pooling.max_unpool_forward)
max_unpool_backward = serialised(_pooling.max_unpool_backward)

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
    "conv_transpose_backward",
    "conv_transpose_forward",
    "avg_pool_backward",
    "avg_pool_forward",
    "max_pool_backward",
    "max_pool_forward",
    "max_unpool_backward",
    "max_unpool_forward",
    "stochastic_pool_backward",
    "stochastic_pool_forward",
]
