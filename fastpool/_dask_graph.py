"""Task graphs of windowed ops on Dask arrays: each output (forward) or input-gradient
(backward) chunk is one task calling the in-memory op on the slice ``_dask_plan``
chose, assembled from the input chunks it spans.

Runners (``run(x, context, *extra)`` forward, ``run(grad_output, x, indices, context,
*extra)`` backward) are module-level functions bound with ``functools.partial``, so the
graphs pickle for ``dask.distributed``. ``extra`` are keys of one-chunk arrays (a
convolution's weight and bias): one key each, sent once to each worker that needs it.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from dask.array.core import Array, concatenate3
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from fastpool import _geometry
from fastpool._dask_plan import Axis, Piece, blocks_spanning


class Context(NamedTuple):
    """Where a task's call sits in the whole array: the first batch and channel of its
    block, and per spatial axis its piece."""

    n0: int
    c0: int
    pieces: Tuple[Piece, ...]
    in_size: Tuple[int, ...]


def namespace(array) -> Any:
    """The array module of ``array`` (``numpy``, or ``cupy`` for CuPy chunks)."""
    return sys.modules.get(type(array).__module__.split(".")[0], np)


def starts(chunks: Sequence[int]) -> List[int]:
    return list(itertools.accumulate((0,) + tuple(chunks)))


def _nested(name, lead, spans):
    """Nested list of keys ``(name, *lead, i, j, ...)`` over the block ranges ``spans``
    (one per spatial axis), shaped for ``concatenate3`` (leading axes of length 1)."""
    def level(prefix, rest):
        if not rest:
            return (name,) + prefix
        first, stop = rest[0]
        return [level(prefix + (i,), rest[1:]) for i in range(first, stop)]
    inner = level(tuple(lead), list(spans))
    for _ in lead:
        inner = [inner]
    return inner


def _channels_last(array):
    return array.ndim >= 3 and _geometry.memory_format(
        array.shape, array.strides, array.itemsize) == _geometry.CHANNELS_LAST


def assemble(blocks, region):
    """The array of nested ``blocks`` (or one block) cut to ``region`` (slices).

    Channels-last chunks give a channels-last array (``concatenate3`` and slicing
    would not), so the op runs in the layout the chunks have."""
    first = blocks
    while isinstance(first, list):
        first = first[0]
    array = concatenate3(blocks) if isinstance(blocks, list) and _count(blocks) > 1 \
        else first
    array = array[region]
    if _channels_last(first) and not _channels_last(array):
        xp = namespace(array)
        array = xp.moveaxis(xp.ascontiguousarray(xp.moveaxis(array, 1, -1)), -1, 1)
    return array


def _count(nested):
    return sum(_count(b) for b in nested) if isinstance(nested, list) else 1


def _span(chunks, lo, hi):
    first, stop, offset = blocks_spanning(chunks, lo, hi)
    return (first, stop), slice(offset, offset + hi - lo)


def copy_region(array, region):
    """``array[region]`` as its own array (a view would keep the whole alive),
    keeping its memory layout."""
    part = array[region]
    return part.copy(order="K") if part.shape != array.shape else part


# ----------------------------------------------------------------------------- forward

def _run_forward(run, blocks, region, keep, context, *extra):
    result = run(assemble(blocks, region), context, *extra)
    if isinstance(result, tuple):
        return tuple(copy_region(r, keep) for r in result)
    return copy_region(result, keep)


def _output_block(x, plans, block):
    """For output block ``block`` (its spatial indices) of the forward ``plans``: its
    pieces, the input blocks they span, the region of them the call reads, and what
    the call's result keeps."""
    pieces = tuple(plans[i][1][b] for i, b in enumerate(block))
    spans, region = zip(*(_span(x.chunks[2 + i], p.lo, p.hi)
                          for i, p in enumerate(pieces)))
    keep = (slice(None), slice(None)) + tuple(
        slice(p.skip, p.skip + p.count) for p in pieces)
    return pieces, spans, (slice(None), slice(None)) + tuple(region), keep


def forward(x: Array, window, run: Callable, name: str, *, out_channels=None,
            metas: Sequence[Any], extra: Sequence[Array] = (), tile: int = 1
            ) -> List[Array]:
    """Arrays of ``run`` over ``x`` (batched, ``(N, C, *spatial)``) chunk by chunk.

    ``out_channels``: the result's channel count when it differs from ``x``'s (then
    ``x``'s channels must be one chunk). ``metas``: one empty array per result of
    ``run`` (several: ``run`` returns a tuple). ``tile``: see ``Axis.piece``."""
    rank = x.ndim - 2
    axes = [Axis.of(window, i) for i in range(rank)]
    plans = [axis.forward(x.chunks[2 + i], tile) for i, axis in enumerate(axes)]
    channel_chunks = x.chunks[1] if out_channels is None else (out_channels,)
    chunks = (x.chunks[0], channel_chunks) + tuple(p[0] for p in plans)
    token = tokenize(x, name, window.in_size, window.kernel, window.stride,
                     window.pad_lo, window.pad_hi, window.dilation, window.ceil_mode,
                     run, [e.name for e in extra])
    pair = f"{name}-{token}"
    n_starts, c_starts = starts(x.chunks[0]), starts(x.chunks[1])
    extra_keys = tuple((e.name,) + (0,) * e.ndim for e in extra)
    tasks = {}
    for index in itertools.product(*(range(len(c)) for c in chunks)):
        bn, bc, *bo = index
        pieces, spans, region, keep = _output_block(x, plans, bo)
        context = Context(n_starts[bn], c_starts[bc] if out_channels is None else 0,
                          pieces, window.in_size)
        blocks = _nested(x.name, (bn, bc if out_channels is None else 0), spans)
        tasks[(pair,) + index] = (_run_forward, run, blocks, region, keep,
                                  context) + extra_keys
    return _results(pair, tasks, chunks, metas, [x, *extra])


def _results(pair, tasks, chunks, metas, dependencies):
    graph = HighLevelGraph.from_collections(pair, tasks, dependencies=dependencies)
    if len(metas) == 1:
        return [Array(graph, pair, chunks, meta=metas[0])]
    outputs = []
    for i, meta in enumerate(metas):
        name = f"{pair}-{i}"
        layer = {(name,) + key[1:]: (_item, key, i) for key in tasks}
        g = HighLevelGraph.from_collections(
            name, layer, dependencies=[Array(graph, pair, chunks, meta=metas[0])])
        outputs.append(Array(g, name, chunks, meta=meta))
    return outputs


def _item(pair, i):
    return pair[i]


# ----------------------------------------------------------------------------- backward

def _run_backward(run, go_blocks, go_region, x_blocks, x_region, ix_blocks, block_shape,
                  context, dtype, *extra):
    go = assemble(go_blocks, go_region)
    xp = namespace(go)
    pieces = context.pieces
    call_out = go.shape[:2] + tuple(p.out for p in pieces)
    call_in = (go.shape[0], block_shape[1]) + tuple(p.hi - p.lo for p in pieces)
    keep = (slice(None), slice(None)) + tuple(
        slice(p.skip, p.skip + p.count) for p in pieces)
    sub_go = xp.zeros(call_out, dtype=go.dtype)
    sub_go[keep] = go
    x = (assemble(x_blocks, x_region) if x_blocks is not None
         else shape_stand_in(call_in, dtype, xp))
    indices = None
    if ix_blocks is not None:
        indices = local_indices(assemble(ix_blocks, go_region), context, call_out, keep)
    grads = run(sub_go, x, indices, context, *extra)
    return place(grads, block_shape, context)


def place(grads, block_shape, context):
    """The cells of a block (``block_shape``, starting at ``context.block_lo``) from
    the gradient of its call's slice: zero where no window reached."""
    lo = context.block_lo
    pieces = context.pieces
    if all(p.lo == a and p.hi == a + s
           for p, a, s in zip(pieces, lo, block_shape[2:])):
        return grads
    xp = namespace(grads)
    out = xp.zeros(grads.shape[:2] + tuple(block_shape[2:]), dtype=grads.dtype)
    dst, src = [slice(None)] * 2, [slice(None)] * 2
    for p, a, s in zip(pieces, lo, block_shape[2:]):
        b0, b1 = max(a, p.lo), min(a + s, p.hi)
        if b1 <= b0:
            return out
        dst.append(slice(b0 - a, b1 - a))
        src.append(slice(b0 - p.lo, b1 - p.lo))
    out[tuple(dst)] = grads[tuple(src)]
    return out


def shape_stand_in(shape, dtype, xp=np):
    """An array of ``shape`` that stores one element: for calls that read only the
    input's shape and dtype."""
    one = xp.zeros(1, dtype=dtype)
    return xp.lib.stride_tricks.as_strided(one, shape, (0,) * len(shape))


def first_taps(pieces: Sequence[Piece], axes: Sequence[Axis], xp) -> Any:
    """Per output of a call, the flat position of its window's first in-input cell
    (a valid index for outputs whose gradient is zero)."""
    flat = xp.zeros((1,) * len(pieces), dtype=np.int64)
    for i, (p, a) in enumerate(zip(pieces, axes)):
        start = xp.arange(p.out, dtype=np.int64) * a.stride - a.pad_lo
        first = start + (-(start // a.dilation)).clip(0) * a.dilation
        shape = [1] * len(pieces)
        shape[i] = p.out
        flat = flat * (p.hi - p.lo) + first.reshape(shape)
    return flat


def local_indices(indices, context, call_out, keep):
    """Whole-volume flat ``indices`` of the kept outputs as flat positions in the
    call's slice; the call's other outputs point at their first cell."""
    xp = namespace(indices)
    pieces = context.pieces
    local = xp.zeros(indices.shape, dtype=np.int64)
    rest = indices.astype(np.int64, copy=True)
    scale = 1
    if indices.size and (int(indices.min()) < 0
                         or int(indices.max()) >= int(np.prod(context.in_size))):
        raise ValueError("indices holds value(s) outside the (n, c) volume; indices must "
                         "be the flat positions returned by the forward pass")
    for p, size in zip(reversed(pieces), reversed(context.in_size)):
        coordinate = rest % size - p.lo
        rest //= size
        if indices.size and (int(coordinate.min()) < 0
                             or int(coordinate.max()) >= p.hi - p.lo):
            raise ValueError("indices holds value(s) that are not a position inside "
                             "their own window; indices must be the flat positions "
                             "returned by the forward pass")
        local += coordinate * scale
        scale *= p.hi - p.lo
    full = xp.empty(call_out, dtype=np.int64)
    full[...] = first_taps(pieces, context.axes, xp)
    full[keep] = local
    return full


class BackwardContext(NamedTuple):
    """A backward task's call: per spatial axis its piece, the whole input's spatial
    size and axes, and where the task's block starts."""

    pieces: Tuple[Piece, ...]
    in_size: Tuple[int, ...]
    axes: Tuple[Axis, ...]
    block_lo: Tuple[int, ...]


def backward(grad_output: Array, x: Array, window, run: Callable, name: str, *,
             read_x: bool, indices: Array = None, whole_channels=False,
             extra: Sequence[Array] = (), tile: int = 1) -> Array:
    """The input gradient of ``x`` (batched) chunk by chunk, in ``x``'s chunks.

    ``read_x``: ``run`` reads ``x``'s values (else it gets a stand-in of the slice's
    shape). ``whole_channels``: the gradient's channels come from all of
    ``grad_output``'s (a convolution), so ``grad_output``'s channels are one chunk."""
    rank = x.ndim - 2
    axes = tuple(Axis.of(window, i) for i in range(rank))
    plans = [axis.backward(x.chunks[2 + i], tile) for i, axis in enumerate(axes)]
    go_channels = (grad_output.shape[1],) if whole_channels else x.chunks[1]
    grad_output = grad_output.rechunk((x.chunks[0], go_channels) + grad_output.chunks[2:])
    if indices is not None:
        indices = indices.rechunk(grad_output.chunks)
    token = tokenize(grad_output, x if read_x else (x.shape, x.chunks, x.dtype), indices,
                     name, window.in_size,
                     window.kernel, window.stride, window.pad_lo, window.pad_hi,
                     window.dilation, window.ceil_mode, run, [e.name for e in extra])
    out = f"{name}-{token}"
    extra_keys = tuple((e.name,) + (0,) * e.ndim for e in extra)
    meta = grad_output._meta
    tasks = {}
    for index in itertools.product(*(range(len(c)) for c in x.chunks)):
        bn, bc, *bi = index
        shape = tuple(x.chunks[a][b] for a, b in enumerate(index))
        pieces = tuple(plans[i][b] for i, b in enumerate(bi))
        if any(p is None for p in pieces):
            tasks[(out,) + index] = (_zeros_like, meta, shape)
            continue
        go_spans, go_region = zip(*(_span(grad_output.chunks[2 + i], p.first,
                                          p.first + p.count)
                                    for i, p in enumerate(pieces)))
        go_lead = (bn, 0 if whole_channels else bc)
        go_region = (slice(None), slice(None)) + tuple(go_region)
        x_blocks = x_region = None
        if read_x:
            x_spans, x_region = zip(*(_span(x.chunks[2 + i], p.lo, p.hi)
                                      for i, p in enumerate(pieces)))
            x_blocks = _nested(x.name, (bn, bc), x_spans)
            x_region = (slice(None), slice(None)) + tuple(x_region)
        ix_blocks = (None if indices is None
                     else _nested(indices.name, go_lead, go_spans))
        block_lo = tuple(starts(x.chunks[2 + i])[b] for i, b in enumerate(bi))
        context = BackwardContext(pieces, window.in_size, axes, block_lo)
        tasks[(out,) + index] = (
            _run_backward, run, _nested(grad_output.name, go_lead, go_spans), go_region,
            x_blocks, x_region, ix_blocks, shape, context, x.dtype) + extra_keys
    dependencies = ([grad_output, *extra] + ([x] if read_x else [])
                    + ([indices] if indices is not None else []))
    graph = HighLevelGraph.from_collections(out, tasks, dependencies=dependencies)
    return Array(graph, out, x.chunks, meta=meta)


def _zeros_like(meta, shape):
    return np.zeros_like(meta, shape=shape)


# ----------------------------------------------------------------------------- parameters

def _run_parameters(run, blocks, region, grad_output, keep, context, weight, *plan):
    x = assemble(blocks, region)
    call_out = grad_output.shape[:2] + tuple(p.out for p in context.pieces)
    sub = namespace(grad_output).zeros(call_out, dtype=grad_output.dtype)
    sub[keep] = grad_output
    return run(sub, x, weight, *plan)


def _sum_parameters(*partials):
    """Chunk sums of ``(grad_weight, grad_bias)``, added in chunk order."""
    total = [None, None]
    for partial in partials:
        for i, value in enumerate(partial):
            if value is not None:
                total[i] = value.copy() if total[i] is None else total[i] + value
    return tuple(total)


def parameter_grads(grad_output: Array, x: Array, weight: Array, window, run: Callable,
                    name: str, plan=None, finish: Optional[Callable] = None
                    ) -> Tuple[Array, Array]:
    """A convolution's ``(grad_weight, grad_bias)``: ``run(grad_output, x, weight)`` per
    output chunk (the forward's pieces), summed. Reductions over the batch and the
    plane, so not in the in-memory kernels' order (equal to rounding).

    With a ``plan`` (a Dask Delayed: ``fastpool._reproducible``'s), ``run(grad_output,
    x, weight, plan)`` returns folds, whose sum is exact in any order, and
    ``finish(sums, plan)`` makes the gradients: the in-memory call's bits."""
    rank = x.ndim - 2
    plans = [Axis.of(window, i).forward(x.chunks[2 + i]) for i in range(rank)]
    chunks = (x.chunks[0], (grad_output.shape[1],)) + tuple(p[0] for p in plans)
    grad_output = grad_output.rechunk(chunks)
    token = tokenize(grad_output, x, weight.name, name, run, window.in_size,
                     window.kernel, window.stride, window.pad_lo, window.dilation)
    part, total = f"{name}-part-{token}", f"{name}-{token}"
    tasks = {}
    weight_key = (weight.name,) + (0,) * weight.ndim
    plan_key = () if plan is None else (plan.key,)
    for index in itertools.product(*(range(len(c)) for c in chunks)):
        bn, _, *bo = index
        pieces, spans, region, keep = _output_block(x, plans, bo)
        tasks[(part,) + index] = (
            _run_parameters, run, _nested(x.name, (bn, 0), spans), region,
            (grad_output.name,) + index, keep, Context(0, 0, pieces, window.in_size),
            weight_key) + plan_key
    summed = (_sum_parameters,) + tuple(k for k in tasks)
    tasks[(total, 0)] = summed if finish is None else (finish, summed) + plan_key
    dependencies = [grad_output, x, weight] + ([] if plan is None else [plan])
    pair = Array(HighLevelGraph.from_collections(total, tasks, dependencies=dependencies),
                 total, ((1,),), meta=np.empty((0,), dtype=object))
    grads = []
    for i, shape in enumerate((weight.shape, (weight.shape[0],))):
        key = f"{name}-{'wb'[i]}-{token}"
        layer = {(key,) + (0,) * len(shape): (_item, (total, 0), i)}
        graph = HighLevelGraph.from_collections(key, layer, dependencies=[pair])
        grads.append(Array(graph, key, tuple((s,) for s in shape), meta=weight._meta))
    return tuple(grads)


# ----------------------------------------------------------------------------- whole planes

def per_block(arrays: Sequence[Array], run: Callable, name: str, chunks, meta,
              extra: Sequence[Array] = ()) -> Array:
    """``run(*blocks, *extra)`` for each block index of ``arrays`` (block grids
    aligned), a block of ``chunks``: for ops whose every output reads its whole
    plane (transposed convolution, unpooling)."""
    token = tokenize(*arrays, name, run, [e.name for e in extra], chunks)
    out = f"{name}-{token}"
    extra_keys = tuple((e.name,) + (0,) * e.ndim for e in extra)
    tasks = {(out,) + index: (run,) + tuple((a.name,) + index for a in arrays) + extra_keys
             for index in itertools.product(*(range(n) for n in arrays[0].numblocks))}
    graph = HighLevelGraph.from_collections(out, tasks,
                                            dependencies=[*arrays, *extra])
    return Array(graph, out, chunks, meta=meta)


def one_block(source: Array, run: Callable, name: str, shape, meta,
              extra: Sequence[Array] = ()) -> Array:
    """One-chunk array of ``shape``: ``run(block, *extra)`` of the one-chunk
    ``source``."""
    token = tokenize(source, name, run, [e.name for e in extra], shape)
    out = f"{name}-{token}"
    task = ((run, (source.name,) + (0,) * source.ndim)
            + tuple((e.name,) + (0,) * e.ndim for e in extra))
    graph = HighLevelGraph.from_collections(out, {(out,) + (0,) * len(shape): task},
                                            dependencies=[source, *extra])
    return Array(graph, out, tuple((s,) for s in shape), meta=meta)


def sum_item(pairs: Array, item: int, shape, meta, name: str) -> Array:
    """One-chunk array of ``shape``: the sum of item ``item`` of ``pairs``' blocks
    (tuples of partial sums of ``shape``), added in block order."""
    from dask.core import flatten
    keys = tuple(flatten(pairs.__dask_keys__()))
    out = f"{name}-{item}-{tokenize(pairs, name, item)}"
    tasks = {(out,) + (0,) * len(shape): (_sum_in_order, item) + keys}
    graph = HighLevelGraph.from_collections(out, tasks, dependencies=[pairs])
    return Array(graph, out, tuple((s,) for s in shape), meta=meta)


def _sum_in_order(item, *pairs):
    total = pairs[0][item].copy()
    for pair in pairs[1:]:
        total += pair[item]
    return total
