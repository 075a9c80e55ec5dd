"""numba.cuda convolution kernels and their launchers, mirroring ``fastpool.cpu.conv``.

Launchers take Numba device arrays already validated by ``fastpool._params`` plus the
rank-2 ``Window`` of ``_params.conv_window`` and return Numba device arrays
(``fastpool.cuda`` adds the transfers). Kernels index ``(N, C, H, W)`` arrays of any
strides.

Algorithms
----------
Per group ``g`` a convolution is the GEMM ``Y_g[m, p] = sum_k W_g[m, k] * X_g[k, p]``:
``m`` an output channel of the group, ``p = (n, oh, ow)`` an output pixel of any image,
``k = (c, i, j)`` an input channel of the group and a kernel tap, ``X_g`` the implicit
im2col matrix (never built). A small per-call table ``taps[k] = (c, i*DH, j*DW)`` turns
``k`` into an input offset without divisions in the kernels.

``"tiled"`` (forward)
    Shared-memory implicit GEMM (``TileConfig``; production: ``BM x BN = 64`` output
    channels x 64 pixels per block of 256 threads, stages of ``BK = 16`` reduction
    steps, a ``4 x 4`` register micro-tile per thread). Per stage each thread loads
    ``BK*BN/threads`` entries of the input patch (consecutive threads read consecutive
    pixels: coalesced) and as many weights into registers, stores them to shared
    memory, then updates its micro-tile from it, its operands read as 128-bit vectors.
    The next stage's global loads are issued before the current stage's arithmetic,
    so their latency hides behind it. Weights are first rearranged on the device into
    ``(groups, K, M_g)`` so both shared tiles fill without bank conflicts. Blocks walk
    the tiles in a grid-stride loop, channel tiles fastest (neighbouring blocks share
    an input patch in L2).
``"direct"`` (forward)
    One thread per output element, summing its ``K`` products in tap order. For
    depthwise and other convolutions with fewer than 8 output channels or taps per
    group, where a 64-row tile would be mostly idle.

Backward:

- input gradient, stride 1: the forward convolution of ``grad_output`` with the
  flipped, channel-transposed kernel and padding ``d*(k-1) - pad`` (which may be
  negative: a crop), so it runs on the kernels above (as on the CPU);
- input gradient, other strides: gather form, one thread per input element summing the
  ``grad_output * weight`` products of the taps that read it, in a fixed order;
- weight gradient: the GEMM ``dW_g[m, k] = sum_p dY_g[m, p] * X_g[k, p]``. ``"tiled"``
  uses the same tiling (64 output channels x 64 taps, 16 pixels per stage) with a
  fixed split of the pixel range into ``S`` contiguous slices, about 1024 blocks in
  all (``S`` depends only on the shapes); each block writes its slice's partial sums
  into ``partial[s]``.
  ``"direct"`` gives one thread to each ``(s, weight element)`` summing the pixels
  ``p = s (mod S)`` (consecutive threads read consecutive pixels);
- bias gradient: as the direct weight gradient, one thread per ``(s, channel)``.

Partial sums are then added by one thread per result, ``s = 0, 1, ..., S-1`` in order.
Every sum therefore runs in an order fixed by the shapes (and the tile configuration)
alone, not by the launch size: no float atomics, and results are identical from run
to run and under any ``launch_limits``.

Geometry is runtime data: one compile per dtype (and tile configuration) serves every
shape, kernel size, stride, padding and dilation.

One module per concern, named as their CPU counterparts where the concepts match:
``_tiles`` (``TileConfig`` and the choice of configuration), ``_tiled`` (the tiled GEMM
kernels), ``_direct`` (the one-thread-per-result kernels: direct forward and weight
gradient, strided input gradient, bias gradient, partial sums, weight rearrangement);
this module holds the launchers and the split-K sizing.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import config, cuda

from fastpool.cuda import _stream
from fastpool.cuda._launch import batched, contiguous, launch
from fastpool.cuda.conv._direct import _gemm_weights, _simple_kernels
from fastpool.cuda.conv._tiled import _tiled_forward_kernel, _tiled_weight_grad_kernel
from fastpool.cuda.conv._tiles import (  # noqa: F401 (the tile configuration's API)
    MAX_STATIC_SHARED_BYTES, MAX_THREADS_PER_BLOCK, PRODUCTION_TILES, TileConfig,
    current_tiles, use_tiles)

TILED, DIRECT = "tiled", "direct"
ALGORITHMS = (TILED, DIRECT)

# The tiled GEMMs need this many rows (output channels per group) and reduction taps;
# below it most of a 64-row tile would compute zeros.
_TILED_MIN = 8
# Split-K partial sums: aim for this many blocks (tiled) or threads (direct, bias),
# and keep the partial buffer under this many bytes.
_TARGET_BLOCKS = 1024
_TARGET_THREADS = 1 << 16
_PARTIAL_BYTES = 64 << 20


# ----------------------------------------------------------------------------- launchers

def _ceil_div(a, b):
    return -(-a // b)


def _taps(channels, kernel_h, kernel_w, dilation_h, dilation_w, in_h, in_w):
    """``taps[k] = (c, i*DH, j*DW, flat offset of that tap in a C-contiguous input of
    in_h x in_w planes)`` for ``k = (c*KH + i)*KW + j``, on the device: made once per
    geometry and context. Uploading it on every call was a synchronous copy from
    pageable memory on the default stream, so every convolution waited on the host for
    all the GPU work queued before it."""
    return _taps_on(channels, kernel_h, kernel_w, dilation_h, dilation_w, in_h, in_w,
                    _context_key())


def _context_key():
    """The current CUDA context (Numba keeps one object per device until it is closed,
    so a context made after ``cuda.close()`` misses the cache); under the simulator,
    which makes a new context object per call, the device."""
    if config.ENABLE_CUDASIM:
        return cuda.get_current_device()
    return cuda.current_context()


@functools.lru_cache(maxsize=64)
def _taps_on(channels, kernel_h, kernel_w, dilation_h, dilation_w, in_h, in_w, context):
    # ``context`` only keys the cache; the upload goes to the current context.
    c, i, j = np.meshgrid(np.arange(channels), np.arange(kernel_h), np.arange(kernel_w),
                          indexing="ij")
    dh, dw = i.ravel() * dilation_h, j.ravel() * dilation_w
    offset = (c.ravel() * in_h + dh) * in_w + dw
    table = np.stack([c.ravel(), dh, dw, offset], axis=1).astype(np.int64)
    # Waited for once here: a copy from pageable memory may return before its DMA is
    # done, and later calls read the table from any stream, unordered with the copy's.
    stream = cuda.stream()
    table = cuda.to_device(table, stream=stream)
    stream.synchronize()
    return table


@functools.lru_cache(maxsize=None)
def _no_bias(dtype):
    """The bias argument of a call without one (the kernels never read it): an empty
    array, which allocates nothing, made once per dtype."""
    return cuda.device_array(0, dtype)


def _flat(array):
    """A 4-D device array's elements as a flat C-ordered vector (copied when its
    strides are not C-contiguous): the tiled kernels index flat arrays."""
    array = contiguous(array)
    return array.reshape(array.size)


def _pick(algorithm, rows, depth):
    """The algorithm for a GEMM of ``rows`` output channels and reduction ``depth``
    per group (``algorithm`` None) or the one asked for."""
    if algorithm is None:
        return TILED if min(rows, depth) >= _TILED_MIN else DIRECT
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return algorithm


def _launch_tiles(kernel, tiles, n_tiles, *args):
    """One block of ``tiles.threads`` per tile, at most the launch limit's block count
    (the kernels' grid-stride loops over tiles do the rest)."""
    threads = tiles.threads
    launch(kernel, n_tiles * threads, *args, threads_per_block=threads, fixed_block=True)


def _convolve(x, weight, bias, y, groups, stride, pad, dilation, flip, algorithm):
    """``y = conv(x, weight) + bias`` on 4-D arrays; with ``flip`` the convolution with
    the flipped, channel-transposed ``weight`` (a stride-1 input gradient)."""
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    out_per_group = out_channels // groups
    channels, rows = (out_per_group, in_per_group) if flip else (in_per_group,
                                                                  out_per_group)
    depth = channels * kernel_h * kernel_w
    wk = _stream.empty((groups, depth, rows), x.dtype)
    launch(_gemm_weights, wk.size, weight, wk, flip)
    _, in_channels, in_h, in_w = x.shape
    taps = _taps(channels, kernel_h, kernel_w, *dilation, in_h, in_w)
    has_bias = bias is not None
    if not has_bias:
        bias = _no_bias(np.dtype(x.dtype))
    if _pick(algorithm, rows, depth) == TILED:
        tiles = current_tiles()
        pixels = y.shape[0] * y.shape[2] * y.shape[3]
        n_tiles = groups * _ceil_div(rows, tiles.block_m) * _ceil_div(pixels, tiles.block_n)
        _launch_tiles(_tiled_forward_kernel(np.dtype(x.dtype), tiles), tiles, n_tiles,
                      _flat(x), in_channels, in_h, in_w, wk.reshape(wk.size), bias,
                      has_bias, y, taps, groups, *stride, *pad)
    else:
        launch(_simple_kernels(np.dtype(x.dtype)).direct_forward, y.size, x, wk, bias,
               has_bias, y, taps, *stride, *pad)


def _splits(pixels, most, partial_size, itemsize):
    """Number of pixel slices for split-K partial sums: about ``most``, at most one per
    pixel (or stage), and a partial buffer of at most ``_PARTIAL_BYTES``."""
    return max(1, min(most, pixels, _PARTIAL_BYTES // (partial_size * itemsize)))


def _sum_partials(partial, out):
    """``out = partial.sum(axis=0)``, adding the slices in order; nothing when there is
    one slice, which is ``out`` itself (reshaped)."""
    if partial.shape[0] > 1:
        size = out.size
        launch(_simple_kernels(np.dtype(out.dtype)).sum_partials, size,
               partial.reshape(partial.shape[0], size), out.reshape(size))


def _weight_grad(x, grad_output, weight_shape, w, algorithm):
    out_channels, in_per_group, kernel_h, kernel_w = weight_shape
    depth = in_per_group * kernel_h * kernel_w
    out_per_group = out_channels // w.groups
    grad_weight = _stream.empty(weight_shape, x.dtype)
    taps = _taps(in_per_group, kernel_h, kernel_w, *w.dilation, *w.in_size)
    pixels = w.batch * w.out_size[0] * w.out_size[1]
    placement = (w.groups, *w.stride, *w.pad_lo)
    size = out_channels * depth
    if _pick(algorithm, out_per_group, depth) == TILED:
        tiles = current_tiles()
        stages = _ceil_div(pixels, tiles.block_k)
        tiles_per_slice = (w.groups * _ceil_div(out_per_group, tiles.block_m)
                           * _ceil_div(depth, tiles.block_n))
        splits = _splits(stages, _ceil_div(_TARGET_BLOCKS, tiles_per_slice), size,
                         x.dtype.itemsize)
        stages_per_slice = _ceil_div(stages, splits)
        splits = _ceil_div(stages, stages_per_slice)  # no empty slice
        partial = (grad_weight.reshape(1, out_channels, depth) if splits == 1 else
                   _stream.empty((splits, out_channels, depth), x.dtype))
        _launch_tiles(_tiled_weight_grad_kernel(np.dtype(x.dtype), tiles), tiles,
                      splits * tiles_per_slice, _flat(x), w.channels, *w.in_size,
                      _flat(grad_output), *w.out_size, taps, partial, *placement,
                      stages_per_slice * tiles.block_k)
    else:
        splits = _splits(pixels, _ceil_div(_TARGET_THREADS, size), size, x.dtype.itemsize)
        partial = (grad_weight.reshape(1, out_channels, depth) if splits == 1 else
                   _stream.empty((splits, out_channels, depth), x.dtype))
        launch(_simple_kernels(np.dtype(x.dtype)).direct_weight_grad, splits * size, x,
               grad_output, taps, partial, *placement)
    _sum_partials(partial, grad_weight)
    return grad_weight


def _bias_grad(grad_output):
    """``grad_output`` (``(N, C_out, OH, OW)``) summed over N, OH and OW."""
    batch, out_channels, out_h, out_w = grad_output.shape
    grad_bias = _stream.empty(out_channels, grad_output.dtype)
    pixels = batch * out_h * out_w
    splits = _splits(pixels, _ceil_div(_TARGET_THREADS, out_channels), out_channels,
                     grad_output.dtype.itemsize)
    partial = (grad_bias.reshape(1, out_channels) if splits == 1 else
               _stream.empty((splits, out_channels), grad_output.dtype))
    launch(_simple_kernels(np.dtype(grad_output.dtype)).bias_grad, splits * out_channels,
           grad_output, partial)
    _sum_partials(partial, grad_bias)
    return grad_bias


def _input_grad(grad_output, weight, w, algorithm):
    grad_input = _stream.empty((w.batch, w.channels) + w.in_size, grad_output.dtype)
    if w.stride == (1, 1):
        pad = tuple(d * (k - 1) - p for k, d, p in zip(w.kernel, w.dilation, w.pad_lo))
        _convolve(grad_output, weight, None, grad_input, w.groups, (1, 1), pad,
                  w.dilation, True, algorithm)
    else:
        _pick(algorithm, 0, 0)  # checks the name; strided input gradients gather
        launch(_simple_kernels(np.dtype(grad_output.dtype)).direct_input_grad,
               grad_input.size, grad_output, weight, grad_input, w.groups, *w.stride,
               *w.dilation, *w.pad_lo)
    return grad_input


def choose_algorithm(window):
    """Name of the algorithm ``conv2d_forward`` uses for ``window`` (a rank-2
    ``Window``)."""
    w = window
    return _pick(None, w.out_channels // w.groups,
                 w.channels // w.groups * w.kernel[0] * w.kernel[1])


def conv2d_forward(x, weight, bias, window, algorithm=None):
    """``y`` of shape ``window.output_shape``. ``algorithm`` (``"tiled"`` or
    ``"direct"``) overrides ``choose_algorithm``; tests use it to cover both paths."""
    w = window
    x = batched(x, (w.batch, w.channels) + w.in_size)
    y = _stream.empty((w.batch, w.out_channels) + w.out_size, x.dtype)
    if w.batch > 0:
        _convolve(x, weight, bias, y, w.groups, w.stride, w.pad_lo, w.dilation, False,
                  algorithm)
    return y.reshape(w.output_shape)


def conv2d_backward(grad_output, x, weight, window, output_mask, algorithm=None):
    """``(grad_input, grad_weight, grad_bias)``, None where ``output_mask`` is False.
    ``algorithm`` forces the GEMMs' algorithm, as in ``conv2d_forward``."""
    w = window
    want_input, want_weight, want_bias = output_mask
    grad_output = batched(grad_output, (w.batch, w.out_channels) + w.out_size)
    x = batched(x, (w.batch, w.channels) + w.in_size)
    empty = w.batch == 0
    grad_input = grad_weight = grad_bias = None
    if want_input:
        grad_input = (_stream.empty(x.shape, x.dtype) if empty
                      else _input_grad(grad_output, weight, w, algorithm))
        grad_input = grad_input.reshape(w.input_shape)
    if want_weight:
        grad_weight = (_stream.zeros(weight.shape, x.dtype) if empty
                       else _weight_grad(x, grad_output, weight.shape, w, algorithm))
    if want_bias:
        grad_bias = (_stream.zeros(w.out_channels, x.dtype) if empty
                     else _bias_grad(grad_output))
    return grad_input, grad_weight, grad_bias
