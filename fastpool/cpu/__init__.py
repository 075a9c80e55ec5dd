"""CPU backend: parallel Numba kernels. ``fastpool.cuda`` mirrors these names."""

from fastpool.cpu.conv import conv2d_backward, conv2d_forward
from fastpool.cpu.pooling import (
    avg_pool2d_backward,
    avg_pool2d_forward,
    max_pool2d_backward,
    max_pool2d_forward,
    stochastic_pool2d_backward,
    stochastic_pool2d_forward,
)

__all__ = [
    "conv2d_backward",
    "conv2d_forward",
    "avg_pool2d_backward",
    "avg_pool2d_forward",
    "max_pool2d_backward",
    "max_pool2d_forward",
    "stochastic_pool2d_backward",
    "stochastic_pool2d_forward",
]
