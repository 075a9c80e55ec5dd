"""Transposed convolution (1-D to 3-D) on either device, from the convolution kernels.

A transposed convolution is the input gradient of the convolution it transposes
(``Window`` of ``_params.conv_transpose_window``: from the result to ``x``), so:

- forward: ``y = conv_input_grad(x, weight) + bias``: the convolution's input-gradient
  algorithms (with stride 1 the forward algorithms on the flipped kernel: GEMM,
  Winograd, direct; with a stride, GEMM and col2im), not a separate col2im;
- backward: ``grad_x = conv(grad_y, weight)`` (the forward algorithms),
  ``grad_weight`` = the convolution's weight gradient with ``x`` as its output
  gradient and ``grad_y`` as its input, ``grad_bias`` = ``grad_y`` summed over N and
  space.

3-D runs through ``fastpool._conv3d`` (2-D convolutions of the depth taps). The device's ``slabs``
module supplies the 2-D launchers and the array steps (``fastpool.cpu.slabs`` /
``fastpool.cuda.slabs``), as for conv3d; ``fastpool.cpu.conv_transpose`` and
``fastpool.cuda.conv_transpose`` bind them.
"""

from __future__ import annotations

from fastpool import _conv3d, _geometry


def _planar(w):
    """A rank-1 ``Window`` as the rank-2 one of height 1 (the 2-D kernels run 1-D
    convolutions, as conv1d does); other ranks as they are."""
    if w.rank != 1:
        return w
    return _geometry.Window(
        rank=2, batch=w.batch, channels=w.channels, out_channels=w.out_channels,
        batched=w.batched, layout=w.layout, in_size=(1,) + w.in_size,
        out_size=(1,) + w.out_size, kernel=(1,) + w.kernel, stride=(1,) + w.stride,
        pad_lo=(0,) + w.pad_lo, pad_hi=(0,) + w.pad_hi, dilation=(1,) + w.dilation,
        groups=w.groups)


def _weight(slabs, weight, w):
    return slabs.contiguous(weight).reshape(tuple(weight.shape[:2]) + w.kernel)


def _volume(slabs, a, w, channels, spatial):
    """``a`` as a batched, channels-first 4-D (rank 2) or 5-D (rank 3) array."""
    return slabs.contiguous(a).reshape((w.batch, channels) + tuple(spatial))


def _input_grad(slabs, grad_output, weight, w):
    """The convolution's input gradient; ``grad_output`` also stands in for the
    convolution's input, which only the weight gradient reads (its dtype is used)."""
    if w.rank == 3:
        return _conv3d.backward(slabs, grad_output, grad_output, weight, w,
                                (True, False, False))[0]
    return slabs.conv2d_backward(grad_output, slabs.shape_only(grad_output, w), weight,
                                 w, (True, False, False))[0]


def launch_forward(slabs, x, weight, bias, window):
    """A device's ``conv_transpose_forward``: ``y`` of ``window.input_shape``."""
    w = _planar(window)
    y = _input_grad(slabs, _volume(slabs, x, w, w.out_channels, w.out_size),
                    _weight(slabs, weight, w), w).reshape((w.batch, w.channels) + w.in_size)
    if bias is not None and w.batch:
        slabs.add_bias(y, bias)
    return y.reshape(window.input_shape)


def launch_backward(slabs, grad_output, x, weight, window, output_mask):
    """A device's ``conv_transpose_backward``: ``(grad_x, grad_weight, grad_bias)``,
    None where ``output_mask`` is False."""
    w = _planar(window)
    want_input, want_weight, want_bias = output_mask
    grad_y = _volume(slabs, grad_output, w, w.channels, w.in_size)
    shape = tuple(weight.shape)
    weight = _weight(slabs, weight, w)
    grad_x = grad_weight = grad_bias = None
    if want_input:
        if w.rank == 3:
            grad_x = _conv3d.forward(slabs, grad_y, weight, None, w)
        else:
            grad_x = slabs.conv2d_forward(grad_y, weight, None, w)
        grad_x = grad_x.reshape(window.output_shape)
    if want_weight:
        x = _volume(slabs, x, w, w.out_channels, w.out_size)
        if w.rank == 3:
            grad_weight = _conv3d.backward(slabs, x, grad_y, weight, w,
                                           (False, True, False))[1]
        else:
            grad_weight = slabs.conv2d_backward(x, grad_y, weight, w,
                                                (False, True, False))[1].reshape(shape)
    if want_bias:
        grad_bias = slabs.bias_grad(grad_y.reshape(grad_y.shape[:2] + (1,) * (5 - grad_y.ndim)
                                                   + grad_y.shape[2:]), w)
    return grad_x, grad_weight, grad_bias
