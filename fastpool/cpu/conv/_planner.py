"""How one CPU convolution runs: the problem as the kernels see it, the algorithm codes
and their choice, and the sizes of the bands of work (``fastpool.cpu.conv`` has the
overview of the algorithms).

The kernels freeze the algorithm codes and read ``_JIT``/``_U`` at compile time, and
Numba's disk cache only watches the file that defines a kernel: after changing them
here, clear ``fastpool/cpu/conv/__pycache__``.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np

from fastpool._threading import thread_count
from fastpool.cpu._arrays import contiguous
from fastpool.cpu._microkernel import padded_host

# What every kernel module of the package compiles with; ``_U`` casts flat indices known
# to be >= 0 (Numba's negative-index wraparound code would block vectorisation).
_JIT = dict(parallel=True, cache=True, boundscheck=False, error_model="numpy", nogil=True)
_U = np.uint64

POINTWISE, ROWS, IM2COL, DIRECT, WINOGRAD = 0, 1, 2, 3, 4
ALGORITHMS = {"pointwise": POINTWISE, "rows": ROWS, "im2col": IM2COL, "direct": DIRECT,
              "winograd": WINOGRAD}
_NAMES = {code: name for name, code in ALGORITHMS.items()}

# Winograd F(2x2, 3x3) needs enough channels per group for its 16 GEMMs (K = C_g) to pay.
_WINOGRAD_MIN_CHANNELS = 8
# ... and enough output pixels (all images) to pay for transforming the weight
# (16 * C_out * C_g values): measured on 2 threads, batch 1, 3x3 256->256 on 14x14 ran at
# 158 GFLOP/s with Winograd and 185 with im2col; on 28x28 at 337 and 191. Since
# 2026-12-07 (a vectorised weight transform; threads sharing a small plane's band,
# ``winograd_out_blocks``) 196 pixels (a 14x14 plane) suffice with at least
# ``_WINOGRAD_WIDE_CHANNELS`` channels per group: Intel Xeon, 2 threads, batch 1,
# interleaved, Winograd against im2col, 3x3 C->C on 14x14: C = 64 0.118 against 0.137
# ms, 128 0.346 / 0.386, 256 1.136 / 1.263, 512 4.06 / 4.21 (channels-last alike);
# 32 0.066 / 0.060; 256 on 12x12 0.99 / 0.87 (too few pixels); 4 images of 256 on
# 7x7 1.24 / 1.56. Forwards only: the backward of those layers (input and weight
# gradients) ran slower on Winograd (64 on 14x14 0.63 against 0.42 ms, 256 4.3 / 3.7).
_WINOGRAD_MIN_PIXELS = 256
_WINOGRAD_WIDE_MIN_PIXELS = 196
_WINOGRAD_WIDE_CHANNELS = 64
# "rows" gathers a third of im2col's columns, but its GEMMs (K = C_g * KW, N = band
# pixels) are too thin on narrow outputs: measured at batch 1, 3x3 256->256, im2col ran
# at 185 GFLOP/s on 14x14 against 85 for rows, 208 against 194 on 56x56, equal on 112.
_ROWS_MIN_WIDTH = 56
# ... and deep enough (K = C_g * KW) to pay for loading and storing C once per kernel
# row: batch 1 of 3x3 3->64 on 224x224 (K = 9) ran in 2.61 ms on "rows", 1.30 on im2col
# (fastpool's own GEMM, 2 threads); 3x3 4->16 on 64x64 (K = 12) in 0.24 and 0.26.
_ROWS_MIN_DEPTH = 12
# Narrower forwards still run "rows" when im2col's gathering outweighs the GEMMs: a
# kernel at least 3 high and 5 wide, GEMMs at most this deep (K = C_g * KW) and enough
# pixels in all images. Measured 2026-12-05 (docs/measure_rows_narrow.py), 2 threads,
# float32, forward time of rows / im2col: LeNet's 5x5 6->16@14 at batch 32 0.77, batch
# 8 0.87, batch 4 (400 pixels) 0.98, batch 1 (100) 1.14; 5x5 16->32@28 0.93, 32->64@14
# 0.88, 64->64@14 0.89, 128->128@14 (K = 640) 0.96; 3x5 32->32@20 0.85; 3x3
# 256->256@14 batch 1 (K = 768) 1.61; 3x3 4->16@28 batch 8 0.99 to 1.68 in three runs.
# The backward keeps im2col there: rows' input and weight gradients ran 1.1-1.8x slower
# on the same layers.
# Channels-last inputs take rows too, through a channels-first copy (2 threads, same
# day): LeNet's at batch 32 0.216 ms in place on im2col, 0.197 copied; 5x5 16->32@28
# batch 8 2.20 and 1.49; 5x5 3->6@32 batch 16 0.351 and 0.191. Since 2026-12-07 those
# of at most 48 channels run rows' chains in place (``_channels_last_taps``): LeNet's
# at batch 32 0.28 -> 0.20 ms (Intel Xeon; PyTorch ``channels_last`` 0.16).
_ROWS_NARROW_MAX_DEPTH = 640
_ROWS_NARROW_MIN_PIXELS = 400
# Transformed input + output per Winograd band, at least: more than L2, as the 16 GEMMs
# (K = C_g) run faster on more tiles.
_WINOGRAD_BYTES = 1 << 21
# Planes of fewer Winograd tiles than this, with fewer images x groups than threads, are
# shared by the threads through blocks of output channels of at least
# ``_WINOGRAD_MIN_BLOCK`` (``winograd_out_blocks``), not cut into bands. 2026-12-07,
# Intel Xeon, 2 threads, batch 1, interleaved, bands against blocks: 3x3 256->256 on
# 14x14 (49 tiles) 1.24 -> 1.17 ms, 512->512 4.86 -> 4.11, 512->512 on 7x7 3.41 ->
# 2.57; on 28x28 (196 tiles) even: 128 0.84 / 0.81, 256 2.64 / 2.60, 512 9.75 / 9.93.
_WINOGRAD_SHARED_TILES = 128
_WINOGRAD_MIN_BLOCK = 32
# Gathered columns per band: half of a 2 MiB L2, leaving room for the GEMM's panels.
_COLUMN_BYTES = 1 << 20
# An image's whole im2col matrix, gathered once and shared by the threads, at most.
_WHOLE_COLUMN_BYTES = 16 << 20
# Pointwise GEMMs read the input in place (no gathering): larger bands run faster.
_POINTWISE_BYTES = 4 << 20
# BLAS sizes are 32-bit ints.
_BLAS_LIMIT = 2**31 - 1
# Forward tasks (image, group, band of rows) to aim for at least: batch-1 layers were
# one band, so one thread of two ran (1x1 256->64 on 56x56: 1.13 ms, ORT 0.34 ms).
_MIN_FORWARD_TASKS = 8
# Output pixels a plane, at most, of a pointwise forward that runs the whole plane
# (``whole_plane_columns``) whatever its weight: a band of a 7x7 or 14x14 plane ends
# in a part-empty panel of the GEMM tile, and each band reads the weight again. With
# at least this many output channels a group, so the threads have blocks of them to
# share (measured: 64 to 960).
_WHOLE_POINTWISE_PIXELS = 196
_WHOLE_POINTWISE_CHANNELS = 64
_MIN_BAND_PIXELS = 64
# ... then blocks of output channels, of at least this many (GEMM rows), for the rest.
_MIN_BLOCK_CHANNELS = 16
# Output planes of at most this many pixels run several images per im2col GEMM
# (``_Problem.im2col_images``).
_IMAGES_MAX_PIXELS = 64
# Weight-gradient partial sums: at most this many chunks of images, and this many bytes.
_MAX_CHUNKS = 16
_PARTIAL_BYTES = 64 << 20
# Stride-1 direct kernels (``_direct``) work on zero-padded copies of whole planes up to
# this many elements; larger planes use the row kernels.
_PADDED_PLANE_LIMIT = 1 << 22
# Channels-first depthwise convolutions run on the channels-last kernels, copies in and
# out included (``_Problem.depthwise_by_channels``), where the output planes have at
# most ``_BY_CHANNELS_MAX_PIXELS`` pixels (rows of at most 8 columns, or fewer rows),
# there are at least ``_BY_CHANNELS_MIN_PLANES`` (image, channel) planes (fewer: the
# channels-last kernel's fixed cost loses) and the input has at most
# ``_BY_CHANNELS_MAX_ELEMENTS`` elements (more: the copies go to memory). Measured on
# 2 threads, float32, best of 40, channels-first kernel -> copies and channels-last
# kernel: 3x3 s2 576@14 batch 1 0.089 -> 0.067 ms, batch 8 0.62 -> 0.26; 3x3 960@7
# batch 1 0.089 -> 0.073, batch 16 1.22 -> 0.55; but 64@8 0.016 -> 0.023, 576@14 (14x14
# outputs) 0.094 -> 0.094, batch 32 of 3x3 s2 576@14 2.45 -> 2.61, of 3x3 576@14 2.7 ->
# 5.6 (docs/site/performance.md).
_BY_CHANNELS_MAX_PIXELS = 64
_BY_CHANNELS_MIN_PLANES = 256
_BY_CHANNELS_MAX_ELEMENTS = 1 << 21
# Channels-first depthwise 3x3 forwards (and stride-1 input gradients) run on
# ``_depthwise_blocks`` (blocks of 16 channels turned channels-last inside one kernel)
# where the output planes have at most ``_BLOCKS_MAX_PIXELS`` pixels (half as many for
# 8-byte items) and there are at least ``_BLOCKS_MIN_CHANNELS`` channels (each task
# computes 16 lanes); other kernel sizes where ``depthwise_by_channels`` holds. Old
# build (6035867: channels-first plane kernels, or copies around the channels-last
# kernel) against new in one process, 2 threads, interleaved medians of 25, float32,
# ms (``python docs/measure_2026_12_06.py blocks``; two runs): batch 1 3x3 576@14
# 0.130-0.187 -> 0.103-0.105, s2 0.102-0.159 -> 0.084-0.096, 960@7 0.113-0.144 ->
# 0.077-0.106, 192@28 0.167-0.243 -> 0.162-0.207, s2 144@56 0.268 -> 0.189-0.219,
# 144@56 0.332-0.375 -> 0.298-0.378, s2 96@112 0.451-0.663 -> 0.374-0.570; batch 8
# of 960@7 0.434-0.524 -> 0.223-0.261; batch 32 of 144@56 13.99 -> 13.21, of s2
# 96@112 19.1 -> 16.8. Float64 192@28 0.207 -> 0.195 (at 56x56, not taken: 144@56
# 0.465 -> 0.441 with the same kernels on both sides, the noise). Not taken: fewer
# channels (16@28 0.026 -> 0.028), 5x5 s2 144@56 (0.200 -> 0.321: the general tap
# loop, ``_columns``).
_BLOCKS_MAX_PIXELS = 56 * 56
_BLOCKS_MIN_CHANNELS = 32


def _memoised(method):
    """``method``'s result, computed once per problem shape and arguments and kept in
    ``_PLANS`` (shapes and this module's sizes alone decide a plan; tests that change
    the sizes give ``_PLANS`` a fresh dict). Inside ``planned_as`` (a Dask chunk sized
    as the whole call) it is computed afresh. A batch-1 call of a small layer spent
    about 3 us of its 25 recomputing these (LeNet-5's 5x5 6->16 on 14x14)."""
    name = method.__name__

    def memoised(self, *args):
        if _PINNED.problems is not None:
            return method(self, *args)
        key = (self._key, name) + args
        plans = _PLANS
        found = plans.get(key, _MISSING)
        if found is _MISSING:
            if len(plans) >= _PLANS_LIMIT:
                plans.clear()
            found = plans[key] = method(self, *args)
        return found

    memoised.__name__ = name
    memoised.__doc__ = method.__doc__
    return memoised


_PLANS = {}
_PLANS_LIMIT = 4096
_MISSING = object()


class _Problem:
    """One convolution as the kernels see it. ``pad_top``/``pad_left`` may be negative
    (the input-gradient problem of a heavily padded convolution crops instead)."""

    def __init__(self, in_shape, out_hw, weight_shape, groups, stride, pad, dilation):
        self._key = (tuple(in_shape), tuple(out_hw), tuple(weight_shape), groups,
                     tuple(stride), tuple(pad), tuple(dilation))
        self.batch, self.in_channels, self.in_h, self.in_w = in_shape
        self.out_h, self.out_w = out_hw
        self.out_channels, self.channels_per_group, self.kernel_h, self.kernel_w = \
            weight_shape
        self.groups = groups
        self.stride_h, self.stride_w = stride
        self.pad_top, self.pad_left = pad
        self.dilation_h, self.dilation_w = dilation

    kind = None

    @classmethod
    def forward(cls, w):
        """The convolution of the rank-2 ``Window`` ``w`` itself."""
        problem = cls((w.batch, w.channels) + w.in_size, w.out_size,
                      (w.out_channels, w.channels // w.groups) + w.kernel, w.groups,
                      w.stride, w.pad_lo, w.dilation)
        problem.kind = "forward"
        return problem

    @classmethod
    def input_grad(cls, w):
        """Stride-1 input gradient of ``w`` as a forward convolution of ``grad_output``
        (padding ``d*(k-1) - pad``, a crop where negative)."""
        problem = cls((w.batch, w.out_channels) + w.out_size, w.in_size,
                      (w.channels, w.out_channels // w.groups) + w.kernel, w.groups,
                      (1, 1), tuple(d * (k - 1) - p
                                    for k, d, p in zip(w.kernel, w.dilation, w.pad_lo)),
                      w.dilation)
        problem.kind = "input_grad"
        return problem

    @property
    def outputs_per_group(self):
        return self.out_channels // self.groups

    @property
    def args(self):
        """Geometry arguments shared by every kernel."""
        return (self.groups, self.kernel_h, self.kernel_w, self.stride_h, self.stride_w,
                self.dilation_h, self.dilation_w, self.pad_top, self.pad_left,
                *self.column_range())

    def column_range(self):
        """Per kernel column ``j``: output columns ``[lo[j], hi[j])`` whose tap
        ``ow*SW + j*DW - pad_left`` lies inside the input row (computed once per
        problem; kernels only read them)."""
        found = getattr(self, "_columns", None)
        if found is None:
            found = self._columns = self._column_range()
        return found

    def _column_range(self):
        lo = np.empty(self.kernel_w, np.int64)
        hi = np.empty(self.kernel_w, np.int64)
        for j in range(self.kernel_w):
            offset = j * self.dilation_w - self.pad_left
            first = min(max(-(offset // self.stride_w), 0), self.out_w)  # ceil(-off/SW)
            last = -((offset - self.in_w) // self.stride_w)            # ceil((W-off)/SW)
            lo[j], hi[j] = first, min(max(last, first), self.out_w)
        return lo, hi

    def algorithm(self):
        """The algorithm code for this problem, or, inside ``planned_as``, the one the
        whole call's problem of the same kind gets."""
        pinned = _PINNED.codes
        if pinned is not None and self.kind in pinned:
            return pinned[self.kind]
        return self.choose()

    def choose(self):
        """The algorithm code this problem's sizes choose (once per problem)."""
        found = getattr(self, "_chosen", None)
        if found is None:
            found = self._chosen = self._choose()
        return found

    def backward_algorithm(self):
        """The algorithm code of the backward of the forward problem ``self`` (its input
        and weight gradients): ``algorithm()``'s, except where only the forward gains
        from "rows" (``_rows``)."""
        pinned = _PINNED.codes
        if pinned is not None and "backward" in pinned:
            return pinned["backward"]
        found = getattr(self, "_chosen_backward", None)
        if found is None:
            found = self._chosen_backward = self._choose(backward=True)
        return found

    def _choose(self, backward=False):
        if (self.channels_per_group == 1
                or max(self.in_h * self.in_w, self.out_h * self.out_w,
                       self.channels_per_group * self.kernel_h * self.kernel_w)
                > _BLAS_LIMIT):
            return DIRECT
        if self.pointwise_applies():
            return POINTWISE
        pixels = self.batch * self.out_h * self.out_w
        if (self.winograd_applies() and self.channels_per_group >= _WINOGRAD_MIN_CHANNELS
                and (pixels >= _WINOGRAD_MIN_PIXELS
                     or (not backward and self.kind == "forward"
                         and pixels >= _WINOGRAD_WIDE_MIN_PIXELS
                         and self.channels_per_group >= _WINOGRAD_WIDE_CHANNELS))):
            return WINOGRAD
        return ROWS if self._rows(backward) else IM2COL

    def _rows(self, backward):
        depth = self.channels_per_group * self.kernel_w
        if self.stride_h != 1 or depth < _ROWS_MIN_DEPTH:
            return False
        if self.out_w >= _ROWS_MIN_WIDTH:
            return True
        return (not backward and self.kind == "forward"
                and self.kernel_h >= 3 and self.kernel_w >= 5
                and depth <= _ROWS_NARROW_MAX_DEPTH
                and self.batch * self.out_h * self.out_w >= _ROWS_NARROW_MIN_PIXELS)

    def valid_names(self):
        """Names of every algorithm that can run this problem (tests run them all)."""
        names = ["direct"]
        if max(self.in_h * self.in_w, self.out_h * self.out_w) <= _BLAS_LIMIT:
            names.append("im2col")
            if self.stride_h == 1:
                names.append("rows")
            if self.winograd_applies():
                names.append("winograd")
            if self.pointwise_applies():
                names.append("pointwise")
        return names

    def pointwise_applies(self):
        """A 1x1 kernel, stride 1, no padding and the output the input's size (a
        transposed convolution's problem can crop its far end: no plain GEMM then)."""
        return (self.kernel_h == self.kernel_w == 1 and self.stride_h == self.stride_w == 1
                and self.pad_top == self.pad_left == 0
                and (self.out_h, self.out_w) == (self.in_h, self.in_w))

    def winograd_applies(self):
        return (self.kernel_h == self.kernel_w == 3 and self.stride_h == self.stride_w == 1
                and self.dilation_h == self.dilation_w == 1)

    def winograd_band_tile_rows(self, itemsize):
        """Tile rows per band: the transformed input and output of a band fit in the
        larger of ``_WINOGRAD_BYTES`` and the group's transformed weight, there are
        enough bands for every thread (with ``winograd_out_blocks``, that many threads
        share each band), and the bands are of equal size."""
        whole = self._whole()
        if whole is not self:
            return whole.winograd_band_tile_rows(itemsize)
        tiles_h = (self.out_h + 1) // 2
        bands = -(-tiles_h // self._winograd_memory_rows(itemsize))
        # a band for every thread (batch 1 of 3x3 64->64 on 56x56: 1.84 ms in one band
        # on one of 2 threads, 0.95 in two)
        threads = thread_count()
        # threads sharing a band by blocks of output channels need fewer bands
        shares = -(-threads // (self.batch * self.groups
                                * self.winograd_out_blocks(itemsize, threads)))
        bands = min(tiles_h, max(bands, shares))
        return -(-tiles_h // bands)  # equal bands: no short last band

    def _winograd_memory_rows(self, itemsize):
        """Most tile rows of a band by the memory rule of ``winograd_band_tile_rows``."""
        tiles_w = (self.out_w + 1) // 2
        tiles_h = (self.out_h + 1) // 2
        per_row = 16 * (self.channels_per_group + self.outputs_per_group) * tiles_w * itemsize
        # Each band reads the group's whole transformed weight: a band's V and M at least
        # as large keep that read from dominating (batch 1 of 3x3 512->512 on 28x28:
        # 22.6 ms in 2 MiB bands, 14.6 in bands of the weight's 16 MiB)
        weight = 16 * self.channels_per_group * self.outputs_per_group * itemsize
        return max(1, min(max(_WINOGRAD_BYTES, weight) // per_row, tiles_h))

    @_memoised
    def winograd_out_blocks(self, itemsize, threads):
        """Blocks of output channels that ``threads`` share a Winograd band in: where
        there are fewer images x groups than threads, a band holds the whole plane
        and the plane has fewer than ``_WINOGRAD_SHARED_TILES`` tiles, one block per
        thread sharing a band (of at least ``_WINOGRAD_MIN_BLOCK`` channels); else 1
        (the threads take bands of their own). Cut into a band per thread, a small
        plane's GEMMs had a short run of columns each (a 14x14 plane's 49 tiles in
        bands of 28 and 21, where a GEMM tile is 48 wide)."""
        whole = self._whole()
        if whole is not self:
            return whole.winograd_out_blocks(itemsize, threads)
        shares = -(-threads // (self.batch * self.groups))
        tiles_h = (self.out_h + 1) // 2
        if (shares < 2 or self._winograd_memory_rows(itemsize) < tiles_h
                or tiles_h * ((self.out_w + 1) // 2) >= _WINOGRAD_SHARED_TILES):
            return 1
        return max(1, min(shares, self.outputs_per_group // _WINOGRAD_MIN_BLOCK))

    @_memoised
    def winograd_images(self, itemsize, threads):
        """Images side by side in a Winograd band: where a band holds a whole plane, as
        many as keep the band's transformed input and output within the larger of
        ``_WINOGRAD_BYTES`` and the group's transformed weight (the rule the bands'
        rows follow), in equal runs that ``threads`` share evenly; else 1. Each band's 16
        GEMMs read the whole transformed weight: with a plane a band, a batch of small
        planes read it once per image (batch 32 of 3x3 512->512 on 7x7, one core: 99 ms
        one image a band, 86.8 three, 81.7 six)."""
        tiles_h = (self.out_h + 1) // 2
        if self.batch < 2 or self.winograd_band_tile_rows(itemsize) < tiles_h:
            return 1
        tiles = tiles_h * ((self.out_w + 1) // 2)
        per_image = 16 * (self.channels_per_group + self.outputs_per_group) * tiles \
            * itemsize
        weight = 16 * self.channels_per_group * self.outputs_per_group * itemsize
        images = max(1, min(self.batch, max(_WINOGRAD_BYTES, weight) // per_image))
        while images > 1 and (self.batch % images
                              or (self.batch // images * self.groups) % threads):
            images -= 1
        return images

    @_memoised
    def im2col_images(self, itemsize, threads):
        """Images side by side in one GEMM of the im2col forward (``_gemm_forward``,
        ``_channels_last_gemm``): for output planes of at most
        ``_IMAGES_MAX_PIXELS`` pixels, where a band holds a whole plane and the
        forward runs one block of output channels, as many as keep their columns
        within the larger of ``_COLUMN_BYTES`` and the group's weight, in equal runs
        that ``threads`` share evenly; else 1. A 7x7 plane is a panel of 48 columns
        and one left over, each pass over the weight's rows; side by side, the
        images' 49s fill whole panels (2026-12-07, Intel Xeon, 2 threads, batch 32,
        interleaved: 3x3 s2 256->512 on 14x14 16.9 -> 14.4 ms, 512->512 33.7 ->
        29.7, 1x1 s2 256->512 1.72 -> 1.50; channels-last 1.11x-1.17x; 14x14 output
        planes gained nothing, 28x28 ones with few channels lost up to 1.4x: the
        copy out of the buffer costs as much as a short product)."""
        rows = self.forward_band_rows(IM2COL, itemsize)
        if (self.batch < 2 or rows < self.out_h
                or self.out_h * self.out_w > _IMAGES_MAX_PIXELS
                or self.forward_channel_blocks(rows) > 1):
            return 1
        k = self.channels_per_group * self.kernel_h * self.kernel_w
        per_image = k * padded_host(self.out_h * self.out_w,
                                    np.dtype(f"f{itemsize}")) * itemsize
        weight = self.outputs_per_group * k * itemsize
        images = max(1, min(self.batch, max(_COLUMN_BYTES, weight) // per_image))
        while images > 1 and (self.batch % images
                              or (self.batch // images * self.groups) % threads):
            images -= 1
        return images

    @functools.cached_property
    def plane_args(self):
        """The plane direct kernels' geometry arguments (``_direct``: zero-padded
        planes split by stride phase), or None where the planes would be larger than
        ``_PADDED_PLANE_LIMIT`` elements."""
        phases_h = self.out_h + self.dilation_h * (self.kernel_h - 1) // self.stride_h
        phases_w = self.out_w + self.dilation_w * (self.kernel_w - 1) // self.stride_w
        if self.stride_h * self.stride_w * phases_h * phases_w > _PADDED_PLANE_LIMIT:
            return None
        return (self.groups, self.kernel_h, self.kernel_w, self.stride_h, self.stride_w,
                self.dilation_h, self.dilation_w, self.pad_top, self.pad_left)

    def depthwise_by_channels(self):
        """Whether a channels-first depthwise convolution runs its forward and input
        gradient on the channels-last kernels (``_channels_last_direct``, vectorised
        across channels) through a copy in and out: planes of at most
        ``_BY_CHANNELS_MAX_PIXELS`` outputs, where the plane kernels' rows are too short
        to vectorise well; used where ``depthwise_blocks`` does not run the problem (the
        strided input gradients). (Its weight gradient stays channels-first: the
        channels-last one sums in another order.)"""
        planes = self.batch * self.in_channels
        return (self.out_h * self.out_w <= _BY_CHANNELS_MAX_PIXELS
                and planes >= _BY_CHANNELS_MIN_PLANES
                and planes * self.in_h * self.in_w <= _BY_CHANNELS_MAX_ELEMENTS)

    def depthwise_blocks(self, itemsize):
        """Whether a channels-first depthwise convolution (this problem: its forward, or
        its stride-1 input gradient's) runs on ``_depthwise_blocks``: a 3x3 kernel on
        planes of at most ``_BLOCKS_MAX_PIXELS`` outputs (half for 8-byte items) and at
        least ``_BLOCKS_MIN_CHANNELS`` channels, or any kernel where
        ``depthwise_by_channels`` holds; and only where the plane kernels read cells
        outside the input as zeros (``plane_args``), as that kernel does."""
        if self.plane_args is None:
            return False
        if self.depthwise_by_channels():
            return True
        return (self.kernel_h == self.kernel_w == 3
                and self.in_channels >= _BLOCKS_MIN_CHANNELS
                and self.out_h * self.out_w * max(itemsize, 4) <= 4 * _BLOCKS_MAX_PIXELS)

    def unit_stride_planes(self):
        """Whether the padded-plane direct kernels apply: stride 1 and a padded plane
        of at most ``_PADDED_PLANE_LIMIT`` elements."""
        padded = ((self.out_h + self.dilation_h * (self.kernel_h - 1))
                  * (self.out_w + self.dilation_w * (self.kernel_w - 1)))
        return self.stride_h == self.stride_w == 1 and padded <= _PADDED_PLANE_LIMIT

    @_memoised
    def band_rows(self, algorithm, itemsize):
        """Output rows per band: the gathered columns fit in ``_COLUMN_BYTES`` (the
        input rows a pointwise GEMM reads, in ``_POINTWISE_BYTES``)."""
        row_bytes = self.out_w * itemsize * self.channels_per_group * self.kernel_w
        if algorithm == POINTWISE:
            rows = _POINTWISE_BYTES // row_bytes
        elif algorithm == ROWS:
            rows = _COLUMN_BYTES // row_bytes - self.dilation_h * (self.kernel_h - 1)
        else:
            rows = _COLUMN_BYTES // (row_bytes * self.kernel_h)
        rows = max(1, min(rows, self.out_h))
        if rows * self.out_w * max(self.channels_per_group * self.kernel_h
                                   * self.kernel_w, 1) > _BLAS_LIMIT:
            rows = max(1, _BLAS_LIMIT // (self.out_w * self.channels_per_group
                                          * self.kernel_h * self.kernel_w))
        return rows

    def _whole(self):
        """Inside ``planned_as``, the whole call's problem of this kind when this one
        is a batch chunk of it (same planes): bands are then sized as for the whole
        call, so the chunk's GEMMs are the whole call's, and round as they do."""
        pinned = _PINNED.problems
        whole = pinned.get(self.kind) if pinned is not None else None
        if whole is not None and (whole.in_h, whole.in_w, whole.out_h, whole.out_w) == (
                self.in_h, self.in_w, self.out_h, self.out_w):
            return whole
        return self

    @_memoised
    def whole_plane_columns(self, algorithm, itemsize):
        """Whether a forward of this problem runs by chunks of images, their columns
        whole and the output channels shared among the threads
        (``_forward_by_channel_blocks``): a pointwise or im2col GEMM of few images and
        groups (batch 1) whose weight is larger than L2 and outweighs its columns (at
        least as many outputs per group as output pixels). Cut into bands, as
        elsewhere, every band read that weight again from memory (512->512 3x3 on
        14x14: 9.4 MB per band; 6.9 -> 6.2-6.4 ms; 1x1 512->2048 on 7x7: 0.92 ->
        0.83 ms). Also a pointwise forward of at most ``_WHOLE_POINTWISE_PIXELS``
        output pixels and at least ``_WHOLE_POINTWISE_CHANNELS`` outputs a group,
        whatever its weight: bands of a 7x7 plane (28 and 21 pixels)
        each end in a part-empty panel of the 8x24 tile and read the weight again
        (2026-12-06, batch 1, interleaved, bands -> whole plane: 1x1 960->160 on 7x7
        one thread 0.247 -> 0.209 ms, two 0.256 -> 0.213; 576->96 on 14x14 two
        threads 0.266 -> 0.233; 28x28 planes neither way, 56x56 and larger 7-9%
        slower on two threads, so bands stay there). Where the weight of an im2col
        forward fits in L2 bands are faster, and so are one GEMM per image at larger
        batches (8 images of 3x3 512->512 on 14x14: 34 against 36-39 ms). fastpool's
        own GEMM gives every output the same bits either way."""
        if not (algorithm in (POINTWISE, IM2COL)
                and self.batch * self.groups < _MIN_FORWARD_TASKS
                and self.column_images(itemsize) > 0):
            return False
        if (algorithm == POINTWISE
                and self.out_h * self.out_w <= _WHOLE_POINTWISE_PIXELS
                and self.outputs_per_group >= _WHOLE_POINTWISE_CHANNELS):
            return True
        per_group = (self.outputs_per_group * self.channels_per_group * self.kernel_h
                     * self.kernel_w * itemsize)
        return (per_group > _COLUMN_BYTES
                and self.outputs_per_group >= self.out_h * self.out_w)

    @_memoised
    def column_images(self, itemsize):
        """Images per chunk of ``_forward_by_channel_blocks``: as many as fit in
        ``_WHOLE_COLUMN_BYTES``; 0 where one image's columns do not."""
        pixels = padded_host(self.out_h * self.out_w, np.dtype(f"f{itemsize}"))
        image = self.channels_per_group * self.kernel_h * self.kernel_w * pixels * itemsize
        return min(self.batch, _WHOLE_COLUMN_BYTES // image)

    @_memoised
    def forward_band_rows(self, algorithm, itemsize):
        """``band_rows``, made smaller when the images and groups alone make fewer than
        ``_MIN_FORWARD_TASKS`` tasks (batch 1), so every thread gets a band. Shapes
        alone decide it, and each output element is one GEMM dot product whatever the
        band, so results do not depend on the thread count."""
        whole = self._whole()
        if whole is not self:
            return whole.forward_band_rows(algorithm, itemsize)
        rows = self.band_rows(algorithm, itemsize)
        per_image = -(-_MIN_FORWARD_TASKS // max(1, self.batch * self.groups))
        split = max(-(-self.out_h // per_image), -(-_MIN_BAND_PIXELS // self.out_w))
        return max(1, min(rows, split))

    @_memoised
    def forward_channel_blocks(self, rows_per_band):
        """Blocks of output channels each forward task computes: 1, or when images,
        groups and bands make fewer than ``_MIN_FORWARD_TASKS`` tasks (small planes at
        batch 1), enough blocks of at least ``_MIN_BLOCK_CHANNELS`` channels to make
        them up. Shapes alone decide it."""
        whole = self._whole()
        if whole is not self:
            return whole.forward_channel_blocks(rows_per_band)
        tasks = self.batch * self.groups * -(-self.out_h // rows_per_band)
        if tasks >= _MIN_FORWARD_TASKS:
            return 1
        wanted = -(-_MIN_FORWARD_TASKS // tasks)
        return max(1, min(wanted, self.outputs_per_group // _MIN_BLOCK_CHANNELS))

    def weight_grad_chunks(self, weight_bytes):
        """Chunks of images whose weight-gradient partial sums are added in order: at
        most ``_MAX_CHUNKS``, one per image, and ``_PARTIAL_BYTES`` of partial sums."""
        return max(1, min(self.batch, _MAX_CHUNKS, _PARTIAL_BYTES // weight_bytes))

    def gemm_weight(self, weight, algorithm):
        """The weight as the GEMMs read it: ``(O, C_g*KH*KW)``, or for ``"rows"``
        ``(KH, O, C_g*KW)`` so each kernel row is one matrix."""
        if algorithm == ROWS:
            return contiguous(weight.transpose(2, 0, 1, 3)).reshape(-1)
        return contiguous(weight).reshape(-1)


class _Pins(threading.local):
    # Class defaults: a thread-local's missing attribute costs a raised and caught
    # AttributeError on every lookup (0.6 us a call).
    codes = problems = None


_PINNED = _Pins()


@contextlib.contextmanager
def planned_as(window):
    """In this thread, choose every algorithm as for the rank-2 ``window``'s own
    problems (its forward, and its stride-1 input gradient), and size the bands of
    problems with its planes as for it.

    ``fastpool.dask`` computes a convolution chunk by chunk, each chunk a call on a
    slice of the whole input; sizes decide the algorithm, and two algorithms round
    differently, so each chunk runs the whole call's algorithms to give its bits."""
    previous = _PINNED.codes, _PINNED.problems
    _PINNED.problems = {"forward": _Problem.forward(window),
                        "input_grad": _Problem.input_grad(window)}
    _PINNED.codes = {kind: problem.choose() for kind, problem in _PINNED.problems.items()}
    _PINNED.codes["backward"] = _PINNED.problems["forward"].backward_algorithm()
    try:
        yield
    finally:
        _PINNED.codes, _PINNED.problems = previous


def planned_unless_pinned(window):
    """``planned_as(window)``, or nothing where this thread runs pinned already (a
    Dask chunk of a 3-D convolution: the whole call's plane, not the chunk's)."""
    return contextlib.nullcontext() if _PINNED.codes is not None else planned_as(window)
