"""3-D convolution as 2-D ones over the depth taps, on either device.

``y[:, :, od] = bias + sum over depth taps a of conv2d(x[:, :, od*sD - pD + a*dD],
weight[:, :, a])``.

Where a group has more than one channel the depth taps are stacked as channels.
Output depth ``od`` of image ``n`` becomes one 2-D image of ``KD * C`` channels
(group ``g``'s channels ``(a, c)`` in tap-major order, zeros for taps outside the
input), and one 2-D convolution with the weight laid out alike (``(C_out, KD * C_g,
KH, KW)``) gives every output depth at once: a single GEMM or Winograd of ``KD`` times
the depth of each tap's, and no sums of partial outputs. (conv3d 3x3x3 32->32 on (4,
32, 16, 56, 56), 2 threads: 75-79 ms by taps, 59-61 ms stacked; PyTorch 70 ms.) The
stacked images are made and convolved in blocks of output depths, at most the input's
size at a time; each block's result is put in place. The backward is the 2-D backward
of the same blocks: the grad_output slices of a block as its images' gradient, the
stacked input gradient added back to the input depths (each depth's terms in
output-depth order, so the sum does not depend on the blocks), the blocks' weight
gradients summed in order and laid out as the weight (backward of the shape above:
192 -> 154 ms, PyTorch's about 115). Where the planes run on Winograd the CPU computes
the weight gradient without stacking (``slabs.fused_weight_grad``: the depth-aware
Winograd weight gradient, each input slice transformed once); with stride 1 on every
axis and padding within the kernel's reach, the input gradient is the forward
convolution of ``grad_output`` with the flipped, channel-transposed weight
(``_input_grad_window``, ``slabs.input_grad_weight``; the GPU keeps the blocks).

Depthwise convolutions (one channel per group: the 2-D direct kernels need that) go
tap by tap: for each tap ``a`` the input depth slices it reads (one per
output depth that stays inside the input) are gathered into one batch of 2-D images,
the 2-D convolution runs on that batch with the tap's 2-D weight, and the result is
added into those output depths. The backward's input gradient scatters each tap's 2-D
input gradient back to its depth slices, and the weight gradient of tap ``a`` is the
2-D weight gradient of its batch. Taps are taken in order and each addition covers
whole slices, so every result is deterministic. Scratch: one gathered batch (at most
the input's size) and one 2-D result (at most the output's size) at a time.

The device's ``slabs`` module (``fastpool.cpu.slabs`` / ``fastpool.cuda.slabs``,
mirrored names) supplies the gather, stack, place, accumulate and scatter steps (and
their inverses) and the device's 2-D launchers.
"""

from __future__ import annotations

from fastpool import _geometry


def _plane_window(w, batch, taps=1):
    """The rank-2 ``Window`` of the 2-D convolution one depth tap runs, over ``batch``
    gathered images (batched, channels-first); ``taps``: of ``taps`` depth taps
    stacked as channels."""
    return _geometry.Window(
        rank=2, batch=batch, channels=w.channels * taps, out_channels=w.out_channels,
        batched=True, layout=_geometry.CHANNELS_FIRST, in_size=w.in_size[1:],
        out_size=w.out_size[1:], kernel=w.kernel[1:], stride=w.stride[1:],
        pad_lo=w.pad_lo[1:], pad_hi=w.pad_hi[1:], dilation=w.dilation[1:],
        groups=w.groups)


def depth_taps(w):
    """``(a, lo, hi, first)`` per depth tap ``a`` that reads the input: output depths
    ``[lo, hi)`` read input depths ``first, first + sD, ...``."""
    D, OD = w.in_size[0], w.out_size[0]
    KD, SD, PD, DD = w.kernel[0], w.stride[0], w.pad_lo[0], w.dilation[0]
    for a in range(KD):
        lo = max(0, -(-(PD - a * DD) // SD))
        hi = min(OD, (D - 1 + PD - a * DD) // SD + 1)
        if lo < hi:
            yield a, lo, hi, lo * SD - PD + a * DD


def stacks(w):
    """Whether the forward stacks the depth taps as channels: where a group has more
    than one channel (the 2-D direct kernels that depthwise taps run need one)."""
    return w.channels // w.groups > 1


def forward(slabs, x, weight, bias, w, like=None):
    """``y`` of shape ``(N, C_out, OD, OH, OW)`` for a batched 5-D ``x``, in the memory
    format of ``like`` (default ``x``)."""
    N = w.batch
    like = x if like is None else like
    if not stacks(w):
        y = slabs.filled_as(like, (N, w.out_channels) + w.out_size, x.dtype, bias)
        if N > 0:
            with slabs.planned(planes(w)):
                _forward_taps(slabs, x, weight, w, y)
        return y
    y = slabs.empty_as(like, (N, w.out_channels) + w.out_size, x.dtype)
    if N > 0:
        with slabs.planned(planes(w)):
            _forward_stacked(slabs, x, weight, bias, w, y)
    return y


def planes(w):
    """The 2-D window whose algorithms every 2-D convolution of the call runs: all the
    output depths as one batch of stacked images where the taps stack, else of one
    tap's images (a block's or a tap's own batch, the depths it reaches, differs from
    block to block, tap to tap and from a Dask chunk to the whole call)."""
    batch = w.batch * w.out_size[0]
    return _plane_window(w, batch, w.kernel[0] if stacks(w) else 1)


def _forward_taps(slabs, x, weight, w, y):
    N = w.batch
    for a, lo, hi, first in depth_taps(w):
        count = hi - lo
        images = slabs.gather(x, first, w.stride[0], count)
        part = slabs.conv2d_forward(images, slabs.weight_tap(weight, a), None,
                                    _plane_window(w, N * count))
        del images  # before the next tap allocates its own
        slabs.accumulate(y, part, lo)
        del part


def _stacked_blocks(w):
    """``(images, block)``: the stacked images of a call (``N * OD``) and how many are
    stacked at a time (at most the input's size; blocks of equal size)."""
    images = w.batch * w.out_size[0]
    block = max(1, w.batch * w.in_size[0] // w.kernel[0])
    return images, -(-images // -(-images // block))


def _forward_stacked(slabs, x, weight, bias, w, y):
    images, block = _stacked_blocks(w)
    taps = w.kernel[0]
    weight2d = slabs.stacked_weight(weight)
    if slabs.fused_forward(x, weight2d, bias, w, y, _plane_window(w, images, taps)):
        return
    stacked = slabs.empty((block, taps * w.channels) + w.in_size[1:], x.dtype)
    for first in range(0, images, block):
        count = min(block, images - first)
        slabs.stack(x, stacked[:count], first, w)
        part = slabs.conv2d_forward(stacked[:count], weight2d, bias,
                                    _plane_window(w, count, taps))
        slabs.place(y, part, first)
        del part


def _input_grad_window(w):
    """The window of the input gradient of ``w`` as a forward convolution of
    ``grad_output`` with the flipped, channel-transposed weight (stride 1 on every
    axis: padding ``dilation * (kernel - 1) - padding`` on each side), or None where a
    stride, or a padding past the kernel's reach, forbids."""
    if any(s != 1 for s in w.stride):
        return None
    reach = tuple(d * (k - 1) for d, k in zip(w.dilation, w.kernel))
    lo = tuple(r - p for r, p in zip(reach, w.pad_lo))
    hi = tuple(r - p for r, p in zip(reach, w.pad_hi))
    if min(lo + hi) < 0:
        return None
    return _geometry.Window(
        rank=3, batch=w.batch, channels=w.out_channels, out_channels=w.channels,
        batched=True, layout=w.layout, in_size=w.out_size, out_size=w.in_size,
        kernel=w.kernel, stride=w.stride, pad_lo=lo, pad_hi=hi, dilation=w.dilation,
        groups=w.groups)


def backward(slabs, grad_output, x, weight, w, output_mask):
    """``(grad_input, grad_weight, grad_bias)``, None where not asked for."""
    want_input, want_weight, want_bias = output_mask
    N = w.batch
    transposed = _input_grad_window(w) if want_input and stacks(w) else None
    flipped = (slabs.input_grad_weight(weight, w.groups) if transposed is not None
               and N > 0 else None)
    grad_input = (slabs.filled_as(x, (N, w.channels) + w.in_size, grad_output.dtype,
                                  None) if want_input and flipped is None else None)
    grad_weight = (slabs.filled(tuple(weight.shape), grad_output.dtype, None)
                   if want_weight else None)
    grad_bias = slabs.bias_grad(grad_output, w) if want_bias else None
    if N == 0 or not (want_input or want_weight):
        return grad_input, grad_weight, grad_bias
    with slabs.planned(planes(w)):
        if flipped is not None:
            # in the plan of the call's planes, as every 2-D convolution of the call
            grad_input = forward(slabs, grad_output, flipped, None, transposed, like=x)
            output_mask = (False, want_weight, False)
            if not want_weight:
                return grad_input, grad_weight, grad_bias
        if stacks(w):
            _backward_stacked(slabs, grad_output, x, weight, w, output_mask, grad_input,
                              grad_weight)
        else:
            _backward_taps(slabs, grad_output, x, weight, w, output_mask, grad_input,
                           grad_weight)
    return grad_input, grad_weight, grad_bias


def _backward_stacked(slabs, grad_output, x, weight, w, output_mask, grad_input,
                      grad_weight):
    """The backward of ``_forward_stacked``: per block of output depths, the 2-D
    backward of the stacked images; the input gradient's stacked channels are added
    back to their depths (output depths in order), the weight gradient's blocks
    summed in order and laid out as ``weight``."""
    want_input, want_weight, _ = output_mask
    images, block = _stacked_blocks(w)
    taps = w.kernel[0]
    if want_weight:
        found = slabs.fused_weight_grad(x, grad_output, w, _plane_window(w, images, taps))
        if found is not None:
            grad_weight[...] = found
            want_weight = False
            if not want_input:
                return
    stacked_shape = (block, taps * w.channels) + w.in_size[1:]
    stacked = slabs.empty(stacked_shape, x.dtype) if want_weight else None
    grads = slabs.empty((block, w.out_channels) + w.out_size[1:], grad_output.dtype)
    weight2d = slabs.stacked_weight(weight)
    total = None
    for first in range(0, images, block):
        count = min(block, images - first)
        plane = _plane_window(w, count, taps)
        slabs.unplace(grad_output, grads[:count], first)
        if want_weight:
            slabs.stack(x, stacked[:count], first, w)
        part_input, part_weight, _ = slabs.conv2d_backward(
            grads[:count], stacked[:count] if want_weight else slabs.shape_only(x, plane),
            weight2d, plane, (want_input, want_weight, False))
        if want_input:
            slabs.unstack_add(grad_input, part_input, first, w)
        if want_weight:
            if total is None:
                total = part_weight
            else:
                slabs.add_into(total, part_weight)
        del part_input, part_weight
    if want_weight:
        slabs.put_stacked_weight(grad_weight, total)


def _backward_taps(slabs, grad_output, x, weight, w, output_mask, grad_input,
                   grad_weight):
    want_input, want_weight, _ = output_mask
    N = w.batch
    for a, lo, hi, first in depth_taps(w):
        count = hi - lo
        plane = _plane_window(w, N * count)
        grads = slabs.gather(grad_output, lo, 1, count)
        images = slabs.gather(x, first, w.stride[0], count) if want_weight else None
        part_input, part_weight, _ = slabs.conv2d_backward(
            grads, images if want_weight else slabs.shape_only(x, plane),
            slabs.weight_tap(weight, a), plane, (want_input, want_weight, False))
        del grads, images
        if want_input:
            slabs.scatter_add(grad_input, part_input, first, w.stride[0])
        if want_weight:
            slabs.put_weight_tap(grad_weight, a, part_weight)
        del part_input, part_weight


def _volumes(slabs, a, w, channels, spatial):
    return slabs.volumes(a, w, (w.batch, channels) + tuple(spatial))


def launch_forward(slabs, x, weight, bias, window):
    """A device's ``conv3d_forward`` launcher: any-rank-validated arrays in, the
    caller's shape out (channels-last volumes stay channels-last on the CPU:
    ``slabs.volumes``)."""
    w = window
    y = forward(slabs, _volumes(slabs, x, w, w.channels, w.in_size),
                slabs.contiguous(weight), bias, w)
    return y.reshape(w.output_shape)


def launch_backward(slabs, grad_output, x, weight, window, output_mask):
    """A device's ``conv3d_backward`` launcher."""
    w = window
    grad_input, grad_weight, grad_bias = backward(
        slabs, _volumes(slabs, grad_output, w, w.out_channels, w.out_size),
        _volumes(slabs, x, w, w.channels, w.in_size), slabs.contiguous(weight), w,
        output_mask)
    if grad_input is not None:
        grad_input = grad_input.reshape(w.input_shape)
    return grad_input, grad_weight, grad_bias
