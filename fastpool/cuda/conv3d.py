"""GPU launchers of 3-D convolution, mirroring ``fastpool.cpu.conv3d``: the depth
decomposition of ``fastpool._conv3d`` with ``fastpool.cuda.slabs``."""

from __future__ import annotations

from fastpool import _conv3d
from fastpool.cuda import slabs
from fastpool.cuda._launch import contiguous


def _volumes(a, w, channels, spatial):
    return contiguous(a).reshape((w.batch, channels) + tuple(spatial))


def conv3d_forward(x, weight, bias, window):
    w = window
    y = _conv3d.forward(slabs, _volumes(x, w, w.channels, w.in_size), contiguous(weight),
                        bias, w)
    return y.reshape(w.output_shape)


def conv3d_backward(grad_output, x, weight, window, output_mask):
    w = window
    grad_input, grad_weight, grad_bias = _conv3d.backward(
        slabs, _volumes(grad_output, w, w.out_channels, w.out_size),
        _volumes(x, w, w.channels, w.in_size), contiguous(weight), w, output_mask)
    if grad_input is not None:
        grad_input = grad_input.reshape(w.input_shape)
    return grad_input, grad_weight, grad_bias
