"""Parallel CPU convolution kernels (Numba + BLAS) and their launchers.

Launchers take host arrays already validated by ``fastpool._params.conv_window`` and
its rank-2 ``Window``; arrays are ``(N, C, H, W)`` (the public layer adds and removes the
batch axis of unbatched input).

Algorithms, chosen per problem by ``choose_algorithm`` (the README lists them):

``"pointwise"``  1x1 kernel, stride 1, no padding: one GEMM per (image, group, band of
                 rows) straight on the input, ``y = W_g @ x[n, g]`` (with the 6x16
                 GEMM tile, planes not a multiple of 16 pixels are copied with rows
                 on cache lines; the 8x48 tile reads them in place, ``ALIGN_B_ROWS``).
``"rows"``       stride 1 along H: gather the ``KW`` column shifts of a band of input
                 rows once (``C_g * KW`` rows), then one accumulating GEMM per kernel
                 row ``i``, whose operand is the same buffer offset by ``i * DH`` rows.
                 A third of im2col's copying for a 3x3 kernel.
``"im2col"``     anything else: gather the whole ``C_g * KH * KW`` column matrix of a
                 band, one GEMM.
                 These two run fastpool's own GEMM (``fastpool.cpu._microkernel``):
                 each output one chain of fused multiply-adds, the same bits however
                 the work is cut; batch-1 layers with a weight larger than L2 run the
                 whole plane, threads taking blocks of output channels
                 (``_forward_by_channel_blocks``). The others call BLAS.
``"winograd"``   3x3 kernel, stride 1, no dilation, at least 8 channels per group:
                 Winograd F(2x2, 3x3), 16 GEMMs over channels x tiles.
``"direct"``     one input channel per group (depthwise and channel multipliers), or
                 planes too big for BLAS's 32-bit sizes: plain loops vectorised along
                 output columns. A GEMM with ``K = KH * KW`` would be all overhead.
                 Depthwise convolutions of channels-last buffers run in place, their
                 loops vectorised across channels (``_channels_last_direct``), and so
                 do channels-first 3x3 forwards and stride-1 input gradients of small
                 planes, in blocks of 16 channels transposed inside the kernel
                 (``_depthwise_blocks``, ``_Problem.depthwise_blocks``), and strided
                 input gradients of many small planes, through one copy in and one
                 out (``_Problem.depthwise_by_channels``); the same bits.

One module per concern: ``_planner`` (the problem as the kernels see it, the choice of
algorithm, band and chunk sizes), ``_gemm`` (pointwise, rows, im2col: column gathering
and the GEMM kernels), ``_winograd`` and ``_winograd_grad`` (its weight gradient),
``_direct`` (row kernels and padded-plane unit-stride kernels), ``_channels_last`` (pointwise convolutions of channels-last
buffers, in place), ``_channels_last_direct`` (depthwise convolutions of channels-last
buffers, in place), ``_depthwise_blocks`` (channels-first depthwise convolutions in
blocks of channels turned channels-last); this module holds the launchers.

Backward: with stride 1 the input gradient is the forward convolution of
``grad_output`` with the flipped, channel-transposed kernel, so it runs on the forward
algorithms; with a stride it is ``W_g^T @ grad_output`` scattered back (col2im) by one
thread per (image, group). The weight gradient sums per-chunk partial products over
fixed chunks of images (the chunking depends only on the shapes), added in chunk order;
where the forward runs on Winograd, the weight gradient does too (``_winograd_grad``:
16 GEMMs over the tiles in the transform domain, fixed chunks of tile rows, either
layout in place with the same bits).
Every result is therefore identical at any thread count; nothing uses atomics.

Geometry is runtime data: one compiled kernel per dtype serves every shape, kernel
size, stride, padding and dilation (they are memory- or BLAS-bound, so constant
folding buys little here, unlike the pooling kernels).
"""

from __future__ import annotations

import math

import numpy as np

from fastpool._threading import loop_on_one_thread, thread_count
from fastpool.cpu._arrays import channels_last, contiguous
from fastpool._geometry import CHANNELS_LAST
from fastpool.cpu._blas import single_threaded_blas
from fastpool.cpu._flip import flipped_transposed
from fastpool._malloc import kept_empty
from fastpool.cpu.conv import (_channels_last, _channels_last_direct, _channels_last_gemm,
                               _channels_last_pointwise)
from fastpool.cpu.conv import _channels_last_backward, _channels_last_taps, _depthwise_blocks
from fastpool.cpu.conv import _winograd_grad
from fastpool.cpu.conv._direct import (_direct_backward_input, _direct_backward_weight,
                                       _direct_backward_weight_planes,
                                       _direct_forward, _direct_forward_planes)
from fastpool.cpu._microkernel import (ALIGN_B_ROWS, MR, aligned_host, padded_host,
                                       panel_width)
from fastpool.cpu.conv._gemm import (_bias_grad, _gather_images, _gemm_backward_input,
                                     _transpose_groups,
                                     _gemm_backward_weight, _gemm_channel_blocks,
                                     _gemm_forward, _sum_partials)
from fastpool.cpu.conv._planner import (_NAMES, ALGORITHMS, DIRECT, IM2COL, POINTWISE,
                                        ROWS, WINOGRAD, _Problem)
from fastpool.cpu.conv._winograd import _winograd_forward, winograd_weight


def _batched_output_shape(window):
    return (window.batch, window.out_channels) + window.out_size


def _no_bias(dtype):
    """A zero bias of one element for kernels told ``has_bias=False`` (they never read
    or write it then); shared, so a small call allocates nothing for it. Writeable:
    Numba compiles read-only arrays as another type, another specialisation."""
    found = _NO_BIAS.get(dtype)
    if found is None:
        found = _NO_BIAS[dtype] = np.zeros(1, dtype)
    return found


_NO_BIAS = {}


def _forward_problem(window):
    """``window``'s forward problem, built once per geometry."""
    return window.derived("conv", _Problem.forward)


def _input_grad_problem(window):
    """``window``'s stride-1 input-gradient problem, built once per geometry."""
    return window.derived("conv_input_grad", _Problem.input_grad)


def choose_algorithm(window):
    """Name of the algorithm ``conv2d_forward``/``conv2d_backward`` use for ``window``
    (a rank-2 ``Window``)."""
    return _NAMES[_forward_problem(window).algorithm()]


def valid_algorithms(window):
    """Names of every algorithm that can run ``window`` (tests run them all)."""
    return _forward_problem(window).valid_names()


def _algorithm_code(window, algorithm):
    """``None`` (choose per problem) or the code of a named algorithm valid here."""
    if algorithm is None:
        return None
    if algorithm not in valid_algorithms(window):
        raise ValueError(f"algorithm {algorithm!r} cannot run this convolution; valid: "
                         f"{valid_algorithms(window)}")
    return ALGORITHMS[algorithm]


def _pointwise_pixels(x, w, algorithm):
    """The ``(M, C)`` pixel matrix of a channels-last input whose pointwise convolution
    runs in place (``_channels_last_pointwise``, ``_channels_last``), or None: another
    algorithm pinned, another layout, an empty batch, or an array that is not exactly a
    channels-last buffer (conv3d's and the transposed convolutions' inner calls pass
    channels-first ones), or one input channel a group (depthwise: the channels-first
    call runs the direct kernel, which rounds each product before adding the bias)."""
    if (algorithm not in (None, "pointwise") or w.layout != CHANNELS_LAST
            or w.batch == 0 or not _forward_problem(w).pointwise_applies()
            or w.channels == w.groups):
        return None
    x2d = _channels_last.pixels(x if _batched(x) else x[None])
    # The kernels trust these shapes: never hand them a matrix of another geometry.
    return x2d if x2d is not None and x2d.shape == (w.batch * math.prod(w.in_size),
                                                     w.channels) else None


def _strided_pointwise_pixels(x, w, weight_bytes, algorithm):
    """For a channels-last input of a 1x1 convolution with a stride and no padding
    (ResNets' shortcuts), the ``(M_out, C)`` matrix of the pixels it reads (a copy:
    each pixel's channels are one contiguous run), on which it is a pointwise
    convolution; else None (as ``_pointwise_pixels``; or where ``_channels_last_gemm``
    runs it better: more than ``STRIDED_PIXELS`` output pixels, or
    ``_channels_last_pointwise.applies``)."""
    if (algorithm is not None or w.layout != CHANNELS_LAST or w.batch == 0
            or w.channels == w.groups):
        return None
    p = _forward_problem(w)
    if not (p.kernel_h == p.kernel_w == 1 and p.pad_top == p.pad_left == 0
            and (p.stride_h, p.stride_w) != (1, 1)
            and p.out_h == (p.in_h - 1) // p.stride_h + 1
            and p.out_w == (p.in_w - 1) // p.stride_w + 1):
        return None
    pixels4 = (x if _batched(x) else x[None]).transpose(0, 2, 3, 1)
    if (w.batch * p.out_h * p.out_w > _channels_last_pointwise.STRIDED_PIXELS
            or pixels4.shape != (w.batch, p.in_h, p.in_w, w.channels)
            or not pixels4.flags.c_contiguous or not _channels_last_pointwise.applies(
                w.batch * p.out_h * p.out_w, weight_bytes // w.groups)):
        return None
    return _channels_last_pointwise.sampled_pixels(
        pixels4, (p.stride_h, p.stride_w), (p.out_h, p.out_w), thread_count())


def _depthwise_pixels(x, w, algorithm):
    """The ``(N, H, W, C)`` buffer of a channels-last input whose depthwise convolution
    (one channel per group, as many outputs as inputs) runs in place
    (``_channels_last_direct``), or None, as ``_pointwise_pixels``."""
    if (algorithm is not None or w.layout != CHANNELS_LAST or w.batch == 0
            or not w.groups == w.channels == w.out_channels):
        return None
    x4 = _channels_last_direct.pixels(x, _batched(x))
    return x4 if x4 is not None and x4.shape == ((w.batch,) + w.in_size
                                                 + (w.channels,)) else None


def _depthwise_in_blocks(w, algorithm, problem, dtype):
    """Whether a channels-first depthwise convolution's ``problem`` (its forward, or
    its stride-1 input gradient's) runs on ``_depthwise_blocks``
    (``_Problem.depthwise_blocks``). Same bits as the channels-first kernels."""
    return (algorithm is None and w.layout != CHANNELS_LAST and w.batch > 0
            and w.groups == w.channels == w.out_channels
            and problem.depthwise_blocks(dtype.itemsize))


def _depthwise_by_channels(x, w, algorithm):
    """The ``(N, H, W, C)`` channels-last copy of a channels-first input (or
    ``grad_output``) of a depthwise convolution whose forward (or input gradient) runs
    faster on the channels-last kernels, copies in and out included
    (``_Problem.depthwise_by_channels``), or None. Same bits: those kernels add each
    output's terms in the channels-first kernels' order."""
    if (algorithm is not None or w.layout == CHANNELS_LAST or w.batch == 0
            or not w.groups == w.channels == w.out_channels
            or not _forward_problem(w).depthwise_by_channels()):
        return None
    x4 = channels_last(x if _batched(x) else x[None], 1)
    return x4.transpose(0, 2, 3, 1)


def _channels_last_input(x, w, algorithm, algorithms):
    """The batched ``(N, C, H, W)`` channels-last input of a convolution whose
    algorithm (chosen, or pinned by ``algorithm``) is one of ``algorithms``, to be read
    in place, or None, as ``_pointwise_pixels``. im2col and pointwise read it through
    ``_channels_last_gemm``; Winograd reads it through the strides of the view (the
    same kernel, another Numba specialisation, so the channels-first bits)."""
    if w.layout != CHANNELS_LAST or w.batch == 0:
        return None
    code = _algorithm_code(w, algorithm)
    if (code if code is not None else _forward_problem(w).algorithm()) not in algorithms:
        return None
    x4 = x if _batched(x) else x[None]
    if (x4.shape != (w.batch, w.channels) + w.in_size
            or not x4.transpose(0, 2, 3, 1).flags.c_contiguous or not x4.flags.writeable
            or not x4.dtype.isnative):
        return None
    return x4


def _batched(a):
    """Whether ``a`` has a batch axis. Read from the array, not from the window: the
    transposed convolutions' launchers pass batched (N, C, H, W) arrays with the
    window of an unbatched call."""
    return a.ndim == 4


def _threads_for(tasks):
    """Workers for a kernel body with ``tasks`` equal tasks."""
    return max(1, min(thread_count(), tasks))


def _check(status):
    if status[0] != 0:
        raise RuntimeError(f"BLAS gemm failed with status {status[0]}")


def _run_forward(problem, x, weight, bias, y, algorithm=None):
    algorithm = problem.algorithm() if algorithm is None else algorithm
    has_bias = bias is not None
    bias = contiguous(bias) if has_bias else _no_bias(x.dtype)
    if algorithm == DIRECT:
        weight = contiguous(weight)
        planes = problem.plane_args
        if planes is not None:
            _direct_forward_planes(x, weight, bias, has_bias, y, *planes,
                                   _threads_for(x.shape[0] * y.shape[1]))
        else:
            loop_on_one_thread(_direct_forward, x, weight, bias, has_bias, y,
                               *problem.args)
        return y
    if algorithm == WINOGRAD:
        # planes as volumes one slice deep (views)
        threads = thread_count()
        _winograd_forward(x[:, :, None], winograd_weight(weight),
                          bias if has_bias else np.zeros(y.shape[1], x.dtype),
                          y[:, :, None], problem.winograd_band_tile_rows(x.itemsize),
                          problem.winograd_images(x.itemsize, threads),
                          problem.winograd_out_blocks(x.itemsize, threads), problem.groups,
                          problem.pad_top, problem.pad_left, 1, 1, 0, threads)
        return y
    if problem.whole_plane_columns(algorithm, x.itemsize):
        _forward_by_channel_blocks(problem, x, weight, bias if has_bias else None, y,
                                   algorithm)
        return y
    if (algorithm == POINTWISE and ALIGN_B_ROWS
            and y.shape[2] * y.shape[3] * x.itemsize % 64
            and problem.forward_channel_blocks(
                problem.forward_band_rows(IM2COL, x.itemsize)) == 1):
        # planes whose rows of pixels do not fill whole cache lines are copied, as
        # im2col with a 1x1 kernel, into rows that start on lines (``padded``): same
        # products, same bits (8 images of 1x1 960->320 on 7x7: 2.06 -> 1.93 ms with
        # the 6x16 tile; the 8x24 tile reads them in place faster: 8 images of 1x1
        # 384->64 on 14x14 0.49 -> 0.39 ms, 960->160 on 7x7 0.81 -> 0.68). Not where
        # blocks of output channels would each copy the band again (batch 1 of 1x1
        # 960->160 on 7x7: 0.19 ms in place, 0.35 copied per block).
        algorithm = IM2COL
    rows = problem.forward_band_rows(algorithm, x.itemsize)
    threads = thread_count()
    images = (problem.im2col_images(x.itemsize, threads)
              if algorithm == IM2COL and rows >= problem.out_h else 1)
    _gemm_forward(x, problem.gemm_weight(weight, algorithm), bias, has_bias, y,
                  algorithm, rows, problem.forward_channel_blocks(rows), images,
                  *problem.args, threads)
    return y


# Blocks of output channels per thread in ``_forward_by_channel_blocks``: pointwise
# forwards, and im2col's (one block: a thread's tiles of rows then share each slab of
# the columns while it is in L2, where four blocks read it four times; 2026-12-07,
# Intel Xeon, batch 1, 2 threads, one process, interleaved, two runs: 3x3 512->512 on
# 7x7 1.07-1.11x, 3x3 s2 256->256 on 28x28 1.06-1.11x, 512->512 on 14x14 1.04-1.05x,
# 128->256 on 28x28 1.03-1.04x, 256->512 on 14x14 0.96-1.00x; the pointwise layers
# 0.94-1.10x either way, so they keep four).
_BLOCKS_PER_THREAD = 4
_IM2COL_BLOCKS_PER_THREAD = 1
# Images per GEMM of the im2col input gradient, at most, and the bytes of their
# columns and gradient rows (batch 8 of 3x3 s2 512->512 on 14x14: 14.3 ms one image
# per GEMM, BLAS; 16.9 with fastpool's GEMM, 13.4-14.2 in runs of 2-4 images).
_IMAGES_PER_GEMM = 4
_RUN_BYTES = 2 << 20


def _forward_by_channel_blocks(problem, x, weight, bias, y, algorithm):
    """``y = conv(x, weight) (+ bias)`` by groups and chunks of images: the chunk's
    whole column matrices, gathered by all threads (for "pointwise", the input itself,
    or where the GEMM tile gains from it, ``ALIGN_B_ROWS``, the input copied with its
    rows on cache lines), then the group's output channels in blocks, one GEMM each
    over every image of the chunk."""
    N, C, H, W = x.shape
    G = problem.groups
    Cg = C // G
    OH, OW = y.shape[2], y.shape[3]
    starts = bias if bias is not None else np.zeros(y.shape[1], x.dtype)
    w = contiguous(weight).reshape(-1)
    tiles = -(-(y.shape[1] // G) // MR)
    per_thread = _IM2COL_BLOCKS_PER_THREAD if algorithm == IM2COL else _BLOCKS_PER_THREAD
    parts = max(1, min(tiles, per_thread * thread_count()))
    chunk = problem.column_images(x.itemsize)
    in_place = algorithm == POINTWISE and not ALIGN_B_ROWS
    if in_place:
        # the copy cost 10-20% of batch-1 1x1 layers on 7x7 planes (960->320: 0.027-0.035
        # of 0.24 ms), rows of 49 values in place cost the 8x24 tile 1-2%
        b, b_step, ldb = x.reshape(-1), C * H * W, H * W
    else:
        ldb = padded_host(OH * OW, x.dtype)
        b_step = Cg * problem.kernel_h * problem.kernel_w * ldb
        b = aligned_host(b_step * min(chunk, N), x.dtype)
    for n0 in range(0, N, chunk):
        count = min(chunk, N - n0)
        for g in range(G):
            b_off = (n0 * C + g * Cg) * H * W if in_place else 0
            if not in_place:
                _gather_images(x, b, n0, count, g, *problem.args, OH, OW,
                               _threads_for(count * Cg))
            _gemm_channel_blocks(w, b, b_off, b_step, ldb, starts, y, n0, count, g, G,
                                 parts, _threads_for(parts))


def _forward_channels_last(x, weight, bias, w, algorithm):
    """``conv2d_forward`` of a channels-last input read in place (its routes in
    order), or None where it is copied to channels-first."""
    x2d = _pointwise_pixels(x, w, algorithm)
    if x2d is None:
        x2d = _strided_pointwise_pixels(x, w, weight.nbytes, algorithm)
    elif not _channels_last_pointwise.applies(x2d.shape[0], weight.nbytes // w.groups):
        x2d = None  # the channels-last im2col below, on the pixels gathered
    if x2d is not None:
        y = _channels_last_pointwise.forward(
            x2d, weight, bias, (w.batch, w.out_channels) + w.out_size, w.groups,
            thread_count())
        return y if _batched(x) else y[0]
    x4 = _depthwise_pixels(x, w, algorithm)
    if x4 is not None:
        y = _channels_last_direct.forward(x4, weight, bias,
                                          _forward_problem(w),
                                          thread_count())
        return y if _batched(x) else y[0]
    x_cl = _channels_last_input(x, w, algorithm, (WINOGRAD,))
    if x_cl is not None:
        # The transform reads each channel's rows at the stride of the pixels and
        # writes each output at that stride: no copy of the input or the output (batch
        # 1 of 3x3 64->64 on 56x56: 2.8 ms copied, 1.7 in place; channels-first 1.6).
        y = np.empty((w.batch,) + w.out_size + (w.out_channels,),
                     x.dtype).transpose(0, 3, 1, 2)
        _run_forward(_forward_problem(w), x_cl, weight, bias, y, WINOGRAD)
        return y if _batched(x) else y[0]
    problem = _forward_problem(w)
    if _channels_last_taps.applies(problem, x.dtype):
        # few channels: im2col's or rows' chains read in place, no columns gathered
        x_cl = _channels_last_input(x, w, algorithm, (IM2COL, ROWS))
        if x_cl is not None:
            code = _algorithm_code(w, algorithm)
            by_rows = (code if code is not None else problem.algorithm()) == ROWS
            y = _channels_last_taps.forward(x_cl, weight, bias, problem, thread_count(),
                                            by_rows)
            return y if _batched(x) else y[0]
    # One kernel row (conv1d): `rows` adds each output's taps in im2col's order (input
    # channel, kernel column), so the channels-last im2col gives its bits ((32, 64,
    # 4096) k3: 47 ms with the copies, 30 in place; channels-first 24).
    x_cl = _channels_last_input(x, w, algorithm, (IM2COL, POINTWISE, ROWS)
                                if w.kernel[0] == 1 else (IM2COL, POINTWISE))
    if x_cl is not None:
        rows = problem.forward_band_rows(IM2COL, x.itemsize)
        y = _channels_last_gemm.forward(x_cl, weight, bias, problem, rows,
                                        problem.forward_channel_blocks(rows),
                                        thread_count())
        return y if _batched(x) else y[0]
    return None


def conv2d_forward(x, weight, bias, window, algorithm=None):
    """``y`` of shape ``window.output_shape``. ``algorithm`` (a name from
    ``ALGORITHMS``) overrides ``choose_algorithm``; tests use it to cover every path."""
    w = window
    if w.layout == CHANNELS_LAST:
        y = _forward_channels_last(x, weight, bias, w, algorithm)
        if y is not None:
            return y
    if _depthwise_in_blocks(w, algorithm, _forward_problem(w), x.dtype):
        y = _depthwise_blocks.forward(
            contiguous(x).reshape((w.batch, w.channels) + w.in_size), weight, bias,
            _forward_problem(w), thread_count())
        return y if _batched(x) else y[0]
    x = contiguous(x)
    if not _batched(x):  # the array's batching, not the window's (``_batched``)
        x = x[None]
    y = np.empty(w.derived("conv_output", _batched_output_shape), x.dtype)
    if w.batch > 0:
        _run_forward(_forward_problem(w), x, weight, bias, y,
                     _algorithm_code(w, algorithm))
    return y if w.batched else y[0]


def _input_grad(grad_output, weight, w, algorithm):
    grad_input = np.empty((w.batch, w.channels) + w.in_size, grad_output.dtype)
    problem = _forward_problem(w)
    if algorithm == DIRECT and not problem.unit_stride_planes():
        loop_on_one_thread(_direct_backward_input, grad_output, contiguous(weight),
                           grad_input, *problem.args)
    elif algorithm != IM2COL and w.stride == (1, 1):
        transposed = _input_grad_problem(w)
        _run_forward(transposed, grad_output, flipped_transposed(weight, w.groups), None,
                     grad_input, DIRECT if algorithm == DIRECT else None)
    else:
        _col2im_input_grad(problem, grad_output, weight, grad_input)
    return grad_input


# One image's im2col input gradient reads ``W_g^T`` by columns in place, once per panel
# of output pixels, unless the weight times those panels (at most 4 counted) reaches
# this: then it is copied by rows first (``_transpose_groups``), the same products.
# 2026-12-07, Intel Xeon, 2 threads, batch 1, in place -> copied, ms: float64 3x3
# 512->512 on 14x14 21.5-22.6 -> 11.1-11.4, on 7x7 4.8-5.1 -> 4.0, stride 2 on 14x14
# 5.1-5.2 -> 4.0; float32 512->512 on 14x14 6.2-6.3 -> 5.7-5.9; against, float32
# 512->512 on 7x7 1.8 -> 2.2-2.3, 256->512 stride 2 on 14x14 0.93 -> 1.24-1.27,
# float64 256->256 on 7x7 0.81-0.85 -> 1.08. (Panels of 48 float32 columns, the AVX-512
# tile's; on AVX2, 16-column panels make more layers copy: unmeasured there.)
_COPY_WEIGHT_PANEL_BYTES = 32 << 20


def _copied_at_batch_one(weight, pixels):
    panels = -(-pixels // panel_width(weight.itemsize))
    return weight.nbytes * min(panels, 4) >= _COPY_WEIGHT_PANEL_BYTES


def _col2im_input_grad(problem, grad_output, weight, grad_input):
    """``grad_input = col2im(W_g^T @ grad_output)`` (``_gemm_backward_input``): blocks
    of input channels where images and groups are fewer than the threads; ``W_g^T``
    read in place by columns for one image (``_copied_at_batch_one``: large ones
    copied), copied once for several; runs of whole
    images as one GEMM, equal runs per thread, in ``_RUN_BYTES``."""
    N = grad_input.shape[0]
    G = problem.groups
    blocks = min(problem.channels_per_group, -(-thread_count() // max(N * G, 1)))
    weight = contiguous(weight)
    K = weight.size // max(weight.shape[0], 1)
    if N > 1 or _copied_at_batch_one(weight, problem.out_h * problem.out_w):
        a = np.empty(weight.size, weight.dtype)
        _transpose_groups(weight, a, G, weight.shape[0] // G,
                          _threads_for(G * -(-weight.shape[0] // 16)))
        a_row, a_col = weight.shape[0] // G, 1
    else:
        a, a_row, a_col = weight.reshape(-1), 1, K
    per_image = ((problem.channels_per_group * problem.kernel_h * problem.kernel_w
                  + problem.outputs_per_group) * problem.out_h * problem.out_w
                 * grad_output.itemsize)
    most = max(1, min(_IMAGES_PER_GEMM, _RUN_BYTES // max(per_image, 1)))
    share = N // thread_count()
    images = -(-share // -(-share // most)) if share > 1 else 1
    rows = (problem.out_h if images > 1
            else problem.band_rows(IM2COL, grad_output.itemsize))
    _gemm_backward_input(grad_output, a, a_row, a_col, grad_input, rows, blocks, images,
                         *problem.args, _threads_for(-(-N // images) * G * blocks))


def _winograd_weight_grad(x, grad_output, weight_shape, w):
    """The weight gradient by ``_winograd_grad`` (either layout, in place), or None
    where its bands would not fit."""
    found = _winograd_grad.weight_grad(x[:, :, None], grad_output[:, :, None], 1, 1, 0,
                                       w.pad_lo[0], w.pad_lo[1], w.groups,
                                       thread_count())
    return None if found is None else found.reshape(weight_shape)


def _weight_grad(x, grad_output, weight_shape, w, algorithm):
    if algorithm == WINOGRAD:
        found = _winograd_weight_grad(x, grad_output, weight_shape, w)
        if found is not None:
            return found
        algorithm = ROWS  # the GEMMs reduce over pixels
    grad_weight = np.empty(weight_shape, x.dtype)
    problem = _forward_problem(w)
    if algorithm == DIRECT:
        p = problem
        if p.plane_args is not None:
            _direct_backward_weight_planes(x, grad_output, grad_weight, *p.plane_args,
                                           _threads_for(p.out_channels))
        else:
            loop_on_one_thread(_direct_backward_weight, x, grad_output, grad_weight,
                               *problem.args)
        return grad_weight
    chunks = problem.weight_grad_chunks(grad_weight.nbytes)
    partial = kept_empty((chunks, grad_weight.size), x.dtype)
    status = np.zeros(1, np.int32)
    with single_threaded_blas(x.dtype):
        _gemm_backward_weight(x, grad_output, partial, algorithm,
                              problem.band_rows(algorithm, x.itemsize), status,
                              *problem.args, _threads_for(chunks))
    _check(status)
    if algorithm == ROWS:
        O, Cg, KH, KW = weight_shape
        summed = np.empty((KH, O, Cg, KW), x.dtype)
        loop_on_one_thread(_sum_partials, partial, summed)
        grad_weight[...] = summed.transpose(1, 2, 0, 3)
    else:
        loop_on_one_thread(_sum_partials, partial, grad_weight)
    return grad_weight


def _channels_last_grads(grad_output, x_cl, weight, w, output_mask, algorithm):
    """``conv2d_backward`` of the batched channels-last input ``x_cl``, in place
    (``_channels_last_backward``): the weight and bias gradients always, the input
    gradient where its channels-first path is a Winograd or im2col forward or col2im
    (else on one channels-first copy of ``grad_output``); results channels-last."""
    want_input, want_weight, want_bias = output_mask
    shape = (w.batch, w.out_channels) + w.out_size
    gy = grad_output.reshape(shape)
    gy4 = _channels_last_direct.pixels(gy, True)
    if gy4 is None:  # one copy into the layout of the call
        gy4 = np.ascontiguousarray(gy.transpose(0, 2, 3, 1))
        gy = gy4.transpose(0, 3, 1, 2)
    grad_input = grad_weight = grad_bias = None
    code = _algorithm_code(w, algorithm)
    if code is None:
        code = _forward_problem(w).backward_algorithm()
    if want_input:
        transposed = _input_grad_problem(w)
        # the channels-first path's choice (``_input_grad``)
        col2im = (not (code == DIRECT and not _forward_problem(w).unit_stride_planes())
                  and (code == IM2COL or w.stride != (1, 1)))
        inner = (transposed.algorithm() if not col2im and code != DIRECT else None)
        if col2im:
            grad_input = _channels_last_backward.input_grad_col2im(
                gy4, weight, _forward_problem(w), thread_count())
        elif inner == WINOGRAD:
            grad_input = np.empty((w.batch,) + w.in_size + (w.channels,),
                                  gy.dtype).transpose(0, 3, 1, 2)
            _run_forward(transposed, gy, flipped_transposed(weight, w.groups), None,
                         grad_input, WINOGRAD)
        elif inner == IM2COL:
            rows = transposed.forward_band_rows(IM2COL, gy.itemsize)
            grad_input = _channels_last_gemm.forward(
                gy, flipped_transposed(weight, w.groups), None, transposed, rows,
                transposed.forward_channel_blocks(rows), thread_count())
        else:  # the channels-first kernels, on one copy of grad_output
            grad_input = _input_grad(contiguous(gy), weight, w, code)
        grad_input = grad_input.reshape(w.input_shape)
    if want_weight and code == WINOGRAD:
        # the channels-first path's kernel through the strides: its bits
        grad_weight = _winograd_weight_grad(x_cl, gy, weight.shape, w)
    if want_weight and grad_weight is None:
        grad_weight = _channels_last_backward.weight_grad(
            x_cl.transpose(0, 2, 3, 1), gy4, weight.shape, _forward_problem(w),
            thread_count(), lambda partial, out: loop_on_one_thread(_sum_partials,
                                                                    partial, out))
    if want_bias:
        grad_bias = np.empty(w.out_channels, gy.dtype)
        loop_on_one_thread(_channels_last_direct._bias_grad,
                           gy4.reshape(-1, w.out_channels), grad_bias)
    return grad_input, grad_weight, grad_bias


def conv2d_backward(grad_output, x, weight, window, output_mask, algorithm=None):
    """``(grad_input, grad_weight, grad_bias)``, ``None`` where ``output_mask`` is
    False."""
    w = window
    # (a pinned algorithm runs the channels-first backward: pinned, the pointwise
    # forward goes here, its weight gradient would be BLAS's)
    x2d = _pointwise_pixels(x, w, algorithm) if algorithm is None else None
    if x2d is not None:
        batched = grad_output if _batched(grad_output) else grad_output[None]
        grad_y2d = _channels_last.pixels(batched)
        if grad_y2d is None:  # one copy into the layout of the call
            grad_y2d = np.ascontiguousarray(np.moveaxis(batched, 1, -1)).reshape(
                -1, w.out_channels)
        mask = output_mask
        grad_input = None
        if output_mask[0] and _channels_last_pointwise.input_grad_applies(
                x2d.shape[0], weight.nbytes):
            grad_input = _channels_last_pointwise.input_grad(
                grad_y2d, weight, (w.batch, w.channels) + w.in_size, w.groups,
                thread_count())
            mask = (False,) + tuple(output_mask[1:])
        grads = (None, None, None)
        if any(mask):
            with single_threaded_blas(x2d.dtype):
                grads = _channels_last.backward(grad_y2d, x2d, weight, w, mask,
                                                thread_count(), _check)
        if grad_input is not None:
            grads = (grad_input,) + tuple(grads[1:])
        if grads[0] is not None and not _batched(x):
            grads = (grads[0][0],) + grads[1:]
        return grads
    x4 = _depthwise_pixels(x, w, algorithm)
    if x4 is not None:
        gy4 = _channels_last_direct.pixels(grad_output, _batched(grad_output))
        shape = (w.batch, w.out_channels) + w.out_size
        if gy4 is None or gy4.shape != (shape[:1] + shape[2:] + shape[1:2]):
            # one copy into the layout of the call
            gy4 = np.ascontiguousarray(np.moveaxis(grad_output.reshape(shape), 1, -1))
        grads = _channels_last_direct.backward(gy4, x4, weight,
                                               _forward_problem(w),
                                               _input_grad_problem(w),
                                               output_mask, thread_count())
        if grads[0] is not None and not _batched(x):
            grads = (grads[0][0],) + grads[1:]
        return grads
    x_cl = _channels_last_input(x, w, algorithm, ALGORITHMS.values())
    if x_cl is not None:
        return _channels_last_grads(grad_output, x_cl, weight, w, output_mask,
                                    algorithm)
    want_input, want_weight, want_bias = output_mask
    grad_output = contiguous(grad_output).reshape((w.batch, w.out_channels) + w.out_size)
    if want_weight:  # only the weight gradient reads x: no copy of it otherwise
        x = contiguous(x).reshape((w.batch, w.channels) + w.in_size)
    code = _algorithm_code(w, algorithm)
    if code is None:
        code = _forward_problem(w).backward_algorithm()
    grad_input = grad_weight = grad_bias = None
    if want_input:
        # As ``_input_grad``: the direct kernels scatter (in another order) where the
        # forward's padded plane is too large, even if the transposed one is not.
        in_blocks = (tuple(w.stride) == (1, 1) and w.batch > 0
                     and _forward_problem(w).unit_stride_planes()
                     and _depthwise_in_blocks(w, algorithm, _input_grad_problem(w),
                                              grad_output.dtype))
        gy4 = None if in_blocks else _depthwise_by_channels(grad_output, w, algorithm)
        if w.batch == 0:
            grad_input = np.zeros((0, w.channels) + w.in_size, grad_output.dtype)
        elif in_blocks:
            # The forward of grad_output with the flipped kernel (module docstring).
            grad_input = _depthwise_blocks.forward(
                grad_output, np.ascontiguousarray(weight[:, :, ::-1, ::-1]), None,
                _input_grad_problem(w), thread_count())
        elif gy4 is not None:
            grad_input = contiguous(_channels_last_direct.backward(
                gy4, None, weight, _forward_problem(w), _input_grad_problem(w),
                (True, False, False), thread_count())[0])
        else:
            grad_input = _input_grad(grad_output, weight, w, code)
        grad_input = grad_input.reshape(w.input_shape)
    if want_weight:
        if w.batch == 0:
            grad_weight = np.zeros(weight.shape, grad_output.dtype)
        else:
            grad_weight = _weight_grad(x, grad_output, weight.shape, w, code)
    if want_bias:
        grad_bias = np.empty(w.out_channels, grad_output.dtype)
        if w.batch == 0:
            grad_bias[:] = 0
        else:
            _bias_grad(grad_output, grad_bias, _threads_for(w.out_channels))
    return grad_input, grad_weight, grad_bias
