"""One window geometry for every op: any spatial rank (1, 2, 3), either memory format.

``Window`` holds what a kernel needs about where windows sit: per spatial axis the
input and output sizes, kernel, stride, padding before and after, dilation; the batch,
the channels, whether the call was batched, and the memory format. Every op (pooling
and convolution, forward and backward) and both devices read it, and the output-size
rule is written once (``output_size``). Kernels see every rank as three spatial axes:
``volume3`` and friends pad the leading axes with a neutral one (size 1, kernel 1,
stride 1, no padding), which compile-time constants fold away, so a 1-D or 2-D op runs
the 3-D kernel with no cost and no copy of its code.

Memory format follows the input's strides, as PyTorch's does (``memory_format``): an
input whose strides are those of a channels-last buffer (NLC / NHWC / NDHWC viewed as
``(N, C, *spatial)``) is computed in that layout and its results come back in it.
"""

from __future__ import annotations

import functools

import numpy as np

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"


def output_size(size, kernel, stride, pad_lo, pad_hi, dilation, ceil_mode=False):
    """Output length along one axis (PyTorch's rule, docs/design.md section 2).

    ``out = floor((size + pad_lo + pad_hi - ek + (stride - 1 if ceil_mode else 0))
    / stride) + 1`` with the effective kernel ``ek = dilation * (kernel - 1) + 1``; in
    ``ceil_mode`` the last window must start inside the input or the leading padding,
    else it is dropped.
    """
    effective = dilation * (kernel - 1) + 1
    out = (size + pad_lo + pad_hi - effective + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad_lo:
        out -= 1
    return out


def memory_format(shape, strides, itemsize):
    """``CHANNELS_LAST`` when an ``(N, C, *spatial)`` array's strides are those of a
    C-contiguous ``(N, *spatial, C)`` buffer, else ``CHANNELS_FIRST`` (also for a
    C-contiguous array, and where both readings fit, as PyTorch decides: a single
    channel or a single spatial element is channels-first).

    ``shape`` and ``strides`` include the batch axis; byte strides.
    """
    n, c, *spatial = shape
    if c == 1 or all(s == 1 for s in spatial):
        return CHANNELS_FIRST
    expected = itemsize
    # Channels vary fastest, then the spatial axes from last to first, then the batch.
    order = [1] + list(range(len(shape) - 1, 1, -1)) + [0]
    for axis in order:
        if shape[axis] != 1 and strides[axis] != expected:
            return CHANNELS_FIRST
        expected *= shape[axis]
    return CHANNELS_LAST


def channels_last_copy(array, channel_axis):
    """``array`` (NumPy) with the same shape and values and channels-last strides: one
    copy into an ``(N, *spatial, C)`` buffer, viewed back in the caller's axis order."""
    moved = np.ascontiguousarray(np.moveaxis(array, channel_axis, -1))
    return np.moveaxis(moved, -1, channel_axis)


class Volume:
    """The shapes of one op's input and output: any spatial rank, either memory format.
    Tuples have one entry per spatial axis, in the user's order (``D, H, W`` / ``H, W``
    / ``L``); ``in3``/``out3`` pad them to three axes with leading 1s (the kernels' view).
    Treat it as immutable."""

    __slots__ = ("rank", "batch", "channels", "out_channels", "batched", "layout",
                 "in_size", "out_size", "in3", "out3", "_derived")

    def __init__(self, *, rank, batch, channels, out_channels, batched, layout, in_size,
                 out_size):
        self.rank = rank
        self.batch = batch
        self.channels = channels
        self.out_channels = out_channels
        self.batched = batched
        self.layout = layout
        self.in_size = in_size
        self.out_size = out_size
        lead = 3 - rank
        self.in3 = (1,) * lead + in_size
        self.out3 = (1,) * lead + out_size
        self._derived = {}

    def derived(self, key, make):
        """``make(self)``, computed once per geometry: validation hands the same object
        to every call of the same geometry (``fastpool._params.memoised``), so launchers
        keep what they derive from it (interior ranges, divisors) here."""
        found = self._derived.get(key)
        if found is None:
            found = self._derived[key] = make(self)
        return found

    def __repr__(self):
        names = [n for c in type(self).__mro__ for n in getattr(c, "__slots__", ())]
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in names
                           if not n.endswith("3") and n not in ("constants", "_derived"))
        return f"{type(self).__name__}({fields})"

    def _shape(self, channels, spatial):
        shape = (channels,) + tuple(spatial)
        return (self.batch,) + shape if self.batched else shape

    @property
    def input_shape(self):
        """The input's shape as the user passed it: ``(N, C, *spatial)`` or
        unbatched ``(C, *spatial)``."""
        return self._shape(self.channels, self.in_size)

    @property
    def output_shape(self):
        return self._shape(self.out_channels, self.out_size)

    @property
    def planes(self):
        return self.batch * self.channels


class Window(Volume):
    """Where the windows of one op sit (pooling and convolution): per spatial axis the
    kernel, stride, padding before and after, dilation; ``ceil_mode`` and ``groups``.
    The three-axis views the kernels read (``kernel3``, ...) are made once here, since
    a call reads them several times."""

    __slots__ = ("kernel", "stride", "pad_lo", "pad_hi", "dilation", "ceil_mode", "groups",
                 "kernel3", "stride3", "dilation3", "pad_lo3", "pad_hi3", "constants")

    def __init__(self, *, rank, batch, channels, out_channels, batched, layout, in_size,
                 out_size, kernel, stride, pad_lo, pad_hi, dilation, ceil_mode=False,
                 groups=1):
        super().__init__(rank=rank, batch=batch, channels=channels,
                         out_channels=out_channels, batched=batched, layout=layout,
                         in_size=in_size, out_size=out_size)
        self.kernel = kernel
        self.stride = stride
        self.pad_lo = pad_lo
        self.pad_hi = pad_hi
        self.dilation = dilation
        self.ceil_mode = ceil_mode
        self.groups = groups
        lead = 3 - rank
        self.kernel3 = (1,) * lead + kernel
        self.stride3 = (1,) * lead + stride
        self.dilation3 = (1,) * lead + dilation
        self.pad_lo3 = (0,) * lead + pad_lo
        self.pad_hi3 = (0,) * lead + pad_hi
        # What pooling kernels are specialised on: kernel, stride and dilation of the
        # three axes (compile-time constants, so the loops unroll and vectorise).
        self.constants = self.kernel3 + self.stride3 + self.dilation3


@functools.lru_cache(maxsize=256)
def adaptive_bounds(size, out):
    """PyTorch's adaptive windows along one axis: output ``i`` pools input positions
    ``[floor(i * size / out), ceil((i + 1) * size / out))`` (never empty). Memoised
    (read-only arrays): a network calls the same sizes over and over."""
    i = np.arange(out, dtype=np.int64)
    starts, ends = (i * size) // out, -((-(i + 1) * size) // out)
    starts.flags.writeable = ends.flags.writeable = False
    return starts, ends


@functools.lru_cache(maxsize=256)
def adaptive_cover(size, out):
    """For each input position, the outputs ``[first, last)`` whose adaptive windows
    hold it (consecutive, as the windows' starts and ends both grow with ``i``)."""
    starts, ends = adaptive_bounds(size, out)
    t = np.arange(size, dtype=np.int64)
    first = np.searchsorted(ends, t, side="right").astype(np.int64)
    last = np.searchsorted(starts, t, side="right").astype(np.int64)
    first.flags.writeable = last.flags.writeable = False
    return first, last


class AdaptiveWindow(Volume):
    """Adaptive pooling's windows (``adaptive_bounds`` per axis): ``starts3[a]`` and
    ``ends3[a]`` for the three axes ``(D, H, W)`` (neutral leading axes: one window of
    the whole size-1 axis), and for the backward ``first3[a]``/``last3[a]``, the
    outputs covering each input position. Arrays are int64 and read-only, shared by
    every call of the same sizes."""

    __slots__ = ()

    def _tables(self, table, which):
        return tuple(table(n, o)[which] for n, o in zip(self.in3, self.out3))

    starts3 = property(lambda self: self._tables(adaptive_bounds, 0))
    ends3 = property(lambda self: self._tables(adaptive_bounds, 1))
    first3 = property(lambda self: self._tables(adaptive_cover, 0))
    last3 = property(lambda self: self._tables(adaptive_cover, 1))

    @property
    def is_global(self):
        """One window over the whole input (``output_size = 1``): a plain reduction."""
        return self.out3 == (1, 1, 1)
