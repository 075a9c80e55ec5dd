"""Which input each chunk of a windowed op reads, along one spatial axis (pure
Python; ``fastpool.dask`` builds its task graphs from it).

A chunk is computed by the in-memory op on a slice of the whole input, called with
the whole call's padding, kernel, stride, dilation and ``ceil_mode``, and the outputs
it needs cut out of the result. The slice starts on the stride grid, early enough
that the outputs kept never see the slice's own (false) leading padding, and ends
where the last kept window ends, or at the input's end, where the real trailing
padding and ``ceil_mode`` rule apply just as in the whole call. So every kept output
is computed from the same cells, with the same divisor (average pooling's
``count_include_pad`` windows are clipped at ``in + p`` only at the real end), and in
the same order as in the whole call: the results are bitwise equal, whatever the
chunking, with no rechunking to a stride-aligned grid.

Backward, an input chunk's gradient is the in-memory backward of the slice that
covers every output whose window touches the chunk: those outputs carry their
gradients, the slice's other outputs carry zeros (adding ``+0.0`` changes no sum that
starts from zero), and the chunk's cells are cut out of the slice's gradient.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

from fastpool import _geometry


class Piece(NamedTuple):
    """One call along an axis: input ``[lo, hi)`` of the whole array; of the call's
    ``out`` outputs, ``[skip, skip + count)`` are the whole call's ``[first, first +
    count)``."""

    lo: int
    hi: int
    skip: int
    first: int
    count: int
    out: int


class Axis(NamedTuple):
    """One spatial axis of a ``_geometry.Window``: input ``size``, ``kernel``,
    ``stride``, padding ``pad_lo``/``pad_hi``, ``dilation``, ``ceil_mode``."""

    size: int
    kernel: int
    stride: int
    pad_lo: int
    pad_hi: int
    dilation: int
    ceil_mode: bool

    @classmethod
    def of(cls, window, axis: int) -> "Axis":
        return cls(window.in_size[axis], window.kernel[axis], window.stride[axis],
                   window.pad_lo[axis], window.pad_hi[axis], window.dilation[axis],
                   window.ceil_mode)

    @property
    def extent(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def outputs(self, size: Optional[int] = None) -> int:
        """Output length of an input of ``size`` (default: the whole axis)."""
        return _geometry.output_size(self.size if size is None else size, self.kernel,
                                     self.stride, self.pad_lo, self.pad_hi,
                                     self.dilation, self.ceil_mode)

    def piece(self, first: int, stop: int, tile: int = 1) -> Piece:
        """The call computing whole-axis outputs ``[first, stop)``.

        ``tile``: the op computes outputs in tiles of this many from its first output
        (Winograd convolution), each output's rounding depending on its tile's input:
        the call then starts on the whole call's tile grid and its tiles holding kept
        outputs read only real cells."""
        s, p = self.stride, self.pad_lo
        lead = -(-(-(-p // s)) // tile) * tile  # skip * s >= p, on the tile grid
        skip = min(first, lead + (first - lead) % tile)
        if (first - skip) * s >= self.size:
            # Kept outputs read trailing padding only (a convolution's padding may
            # exceed its kernel): start at the last cell's grid point instead.
            skip = first - (self.size - 1) // s // tile * tile
        lo = (first - skip) * s
        last = first - skip + -(-(stop - first + skip) // tile) * tile
        # At least one cell: kept outputs may read leading padding only.
        hi = min(self.size, max(lo + 1, (last - 1) * s - p + self.extent))
        return Piece(lo, hi, skip, first, stop - first, self.outputs(hi - lo))

    def forward(self, chunks: Sequence[int], tile: int = 1
                ) -> Tuple[Tuple[int, ...], List[Piece]]:
        """Output chunks for input ``chunks`` and their pieces: output ``o`` goes with
        the input chunk holding cell ``o * stride`` (input chunks of a multiple of the
        stride give output chunks of the quotient, as regular as the input's); empty
        ones are merged away."""
        total = self.outputs()
        bounds = [0]
        start = 0
        for size in chunks[:-1]:
            start += size
            b = min(total, -(-start // self.stride))
            if b > bounds[-1]:
                bounds.append(b)
        if total > bounds[-1]:
            bounds.append(total)
        pieces = [self.piece(a, b, tile) for a, b in zip(bounds, bounds[1:])]
        return tuple(b - a for a, b in zip(bounds, bounds[1:])), pieces

    def touching(self, lo: int, hi: int) -> Tuple[int, int]:
        """Outputs ``[q0, q1)`` whose windows span any of input ``[lo, hi)``."""
        s, p = self.stride, self.pad_lo
        q0 = max(0, -(-(lo + p - self.extent + 1) // s))
        q1 = min(self.outputs(), (hi - 1 + p) // s + 1)
        return q0, max(q0, q1)

    def backward(self, chunks: Sequence[int], tile: int = 1) -> List[Optional[Piece]]:
        """Per input chunk, the piece whose backward gives its gradient (None: no
        window touches the chunk, its gradient is zero). ``tile``: the gradient is
        computed in tiles of input cells (a stride-1 Winograd input gradient), so
        the chunk's outermost tiles must see all their outputs' gradients too."""
        pieces = []
        start = 0
        for size in chunks:
            lo, hi = start // tile * tile, min(self.size, -(-(start + size) // tile) * tile)
            q0, q1 = self.touching(lo, hi)
            pieces.append(self.piece(q0, q1, tile) if q1 > q0 else None)
            start += size
        return pieces


def blocks_spanning(chunks: Sequence[int], lo: int, hi: int) -> Tuple[int, int, int]:
    """``(first block, stop block, offset of lo in the first block)`` of the chunks
    holding ``[lo, hi)``."""
    start = 0
    first = None
    for i, size in enumerate(chunks):
        if first is None and lo < start + size:
            first, offset = i, lo - start
        if hi <= start + size:
            return first, i + 1, offset
        start += size
    raise ValueError(f"[{lo}, {hi}) is outside chunks {tuple(chunks)}")
