"""A reduction in a fixed order of interleaved partial sums, as vector code.

Global average pooling defines its sum order as ``LANES`` interleaved partial sums:
partial ``j`` adds elements ``j, j + LANES, j + 2 * LANES, ...`` in order, starting
from ``+0``; the partials are then folded pairwise (``p[j] += p[j + width]`` for
``width = LANES / 2, ..., 1``) and ``p[0]`` is the sum. Channels-last inputs and the
GPU follow the same order with other loops, so every path gives the same bits.

Numba's loop vectoriser does not keep such partials in registers (it cannot prove the
accumulator and the input apart and unrolls to scalar adds, 0.4x PyTorch), so
``interleaved_sum`` writes the loop in LLVM IR: the ``LANES`` partials as 32-byte
vectors (``interleaved_sum_wide``: 64-byte), one vector add per vector of elements, the
tail loaded lane by lane (never past the last element), the fold as whole vectors and
then vector halves; ``interleaved_column_sums`` does the same for a chunk of
channels-last columns, one vector of columns per partial. Lane-wise vector adds are
the scalar IEEE adds,
and a tail lane left at ``+0`` adds nothing (a sum started at ``+0`` is never ``-0``),
so the result is the formula's bit for bit (``tests/test_adaptive.py`` checks it
against a plain-loop version).
"""

from __future__ import annotations

import functools

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from fastpool.cpu._vector_width import allow_vector_bits

# One AVX-512 vector of float32 (two of float64): the sum order, whatever the vectors.
LANES = 16
# Bytes per vector of the code: 32, AVX2's, though this CPU has AVX-512. A machine
# with AVX-512 runs 512-bit code at a lower clock licence, and after about a millisecond
# without it the core leaves that licence; the next 512-bit code then waits for it
# again. On the Intel Xeon of 2026-12-07 a global average of 512@7 took 5.6-6.0 us in
# a loop of calls and 8.9-9.9 us after 1 ms of other work (the layer suite times each
# call so), PyTorch 6-7 us either way; fastpool's other small pooling calls, on
# LLVM's 256-bit code, did not change. The same partials in the same order, so the
# same bits.
_VECTOR_BYTES = 32
# Elements in a call, at least, for the 64-byte code: with a 1 ms pause before each
# call, new (32-byte) against old (64-byte), 2 threads: (8,256,56,56) float32 650 ->
# 740 us, float64 1250 -> 1450; (32,2048,7,7) float64 840 -> 916 (float32 445 ->
# 425); 2048@7 at batch 1 float32 14.9 -> 10.9 us. Level in a loop of calls.
WIDE_FROM = 1 << 20


def _zeroed(builder, vector, zero):
    """A ``vector`` slot on the stack, set to ``zero`` where the builder is."""
    slot = cgutils.alloca_once(builder, vector)
    builder.store(zero, slot)
    return slot


def _interleaved_sum(vector_bytes):
    """``interleaved_sum`` as code of ``vector_bytes``-byte vectors."""
    return intrinsic(functools.partial(_typer, vector_bytes))


def _typer(vector_bytes, typingctx, x, start, count):
    """``x[start:start + count]`` (``x`` 1-D, contiguous) summed in the order above,
    in ``x``'s dtype."""
    # Typed for C-contiguous 1-D float arrays only: the loads read ``x.data`` by
    # element offset, ignoring strides.
    if not (isinstance(x, types.Array) and isinstance(x.dtype, types.Float)
            and x.ndim == 1 and x.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        array_type, start_type, count_type = signature.args
        array = context.make_array(array_type)(context, builder, args[0])
        element = context.get_data_type(array_type.dtype)
        align = context.get_abi_sizeof(element)
        # The LANES partials as 32-byte vectors (see _VECTOR_BYTES): partial j in
        # vector j // width, lane j % width.
        width = min(LANES, vector_bytes // align)
        parts = LANES // width
        vector = ir.VectorType(element, width)
        allow_vector_bits(builder, 8 * align * width)
        intp = context.get_value_type(types.intp)
        begin = context.cast(builder, args[1], start_type, types.intp)
        count = context.cast(builder, args[2], count_type, types.intp)
        zero = ir.Constant(vector, [ir.Constant(element, 0.0)] * width)
        lanes = ir.Constant(intp, LANES)
        base = builder.gep(array.data, [begin])

        # Zeroed here, not in the function's entry block (``alloca_once_value``): a
        # kernel holding both codes would run the 64-byte stores on every call.
        partials = [_zeroed(builder, vector, zero) for _ in range(parts)]
        full = builder.sdiv(count, lanes)
        with cgutils.for_range(builder, full) as loop:
            first = builder.mul(loop.index, lanes)
            for v, partial in enumerate(partials):
                where = builder.gep(base, [builder.add(first, ir.Constant(intp, v * width))])
                block = builder.load(builder.bitcast(where, vector.as_pointer()),
                                     align=align)
                builder.store(builder.fadd(builder.load(partial), block), partial)

        # Constant lane numbers keep the tail in registers (a variable insert index goes
        # through the stack and stalls on store forwarding: 4x slower on 7x7 planes).
        done = builder.mul(full, lanes)
        rest = builder.sub(count, done)
        tails = [_zeroed(builder, vector, zero) for _ in range(parts)]
        for lane in range(LANES - 1):
            v, i = divmod(lane, width)
            with builder.if_then(builder.icmp_signed(">", rest, ir.Constant(intp, lane))):
                where = builder.gep(base, [builder.add(done, ir.Constant(intp, lane))])
                value = builder.load(where, align=align)
                builder.store(builder.insert_element(
                    builder.load(tails[v]), value, ir.Constant(ir.IntType(32), i)),
                    tails[v])

        vectors = [builder.fadd(builder.load(p), builder.load(t))
                   for p, t in zip(partials, tails)]
        # the fold's first steps (p[j] += p[j + half] for half >= width) add whole
        # vectors, the rest halves of one
        while len(vectors) > 1:
            half = len(vectors) // 2
            vectors = [builder.fadd(vectors[v], vectors[v + half]) for v in range(half)]
        folded = vectors[0]
        half = width // 2
        while half:
            low, high = (ir.Constant(ir.VectorType(ir.IntType(32), half),
                                     list(range(first, first + half)))
                         for first in (0, half))
            folded = builder.fadd(builder.shuffle_vector(folded, folded, low),
                                  builder.shuffle_vector(folded, folded, high))
            half //= 2
        return builder.extract_element(folded, ir.Constant(ir.IntType(32), 0))

    return x.dtype(x, start, count), codegen


# The sum as 32-byte vector code (``_VECTOR_BYTES``), and as 64-byte (AVX-512) code for
# calls large enough to pay for the licence change: ``WIDE_FROM``.
interleaved_sum = _interleaved_sum(_VECTOR_BYTES)
interleaved_sum_wide = _interleaved_sum(64)


# Bytes of columns ``interleaved_column_sums`` sums at once: one 32-byte vector.
COLUMN_BYTES = _VECTOR_BYTES


@intrinsic
def interleaved_column_sums(typingctx, x, start, stride, count, out, out_start):
    """``out[out_start + i] = `` the interleaved sum (the order above) of ``x[start + r *
    stride + i]`` over rows ``r < count``, for the ``COLUMN_BYTES // itemsize`` columns
    ``i``: a channels-last global average's chunk of channels. The ``LANES`` partials are one
    vector of columns each, kept in registers (the kernel's partials in memory cost a
    load and a store per element); partial ``j`` takes rows ``j, j + LANES, ...``
    starting from ``+0``, and the fold adds whole vectors, so each column's sum is the
    formula's bit for bit. ``x`` and ``out`` 1-D, C-contiguous, one float dtype; reads
    only the given rows and columns."""
    if not (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                and isinstance(a.dtype, types.Float) for a in (x, out))
            and x.dtype == out.dtype and out.mutable
            and all(isinstance(v, types.Integer) for v in (start, stride, count, out_start))):
        return None

    def codegen(context, builder, signature, args):
        tys = signature.args
        element = context.get_data_type(tys[0].dtype)
        align = context.get_abi_sizeof(element)
        width = _VECTOR_BYTES // align
        vector = ir.VectorType(element, width)
        intp = context.get_value_type(types.intp)

        def value(index):
            return context.cast(builder, args[index], tys[index], types.intp)

        data = context.make_array(tys[0])(context, builder, args[0]).data
        out = context.make_array(tys[4])(context, builder, args[4]).data
        base, stride, count = builder.gep(data, [value(1)]), value(2), value(3)
        zero = ir.Constant(vector, [ir.Constant(element, 0.0)] * width)
        lanes = ir.Constant(intp, LANES)

        def row(index):  # the chunk of row ``index`` as a vector
            where = builder.gep(base, [builder.mul(index, stride)])
            return builder.load(builder.bitcast(where, vector.as_pointer()), align=align)

        partials = [_zeroed(builder, vector, zero) for _ in range(LANES)]
        full = builder.sdiv(count, lanes)
        with cgutils.for_range(builder, full) as loop:
            first = builder.mul(loop.index, lanes)
            for j, partial in enumerate(partials):
                block = row(builder.add(first, ir.Constant(intp, j)))
                builder.store(builder.fadd(builder.load(partial), block), partial)
        done = builder.mul(full, lanes)
        rest = builder.sub(count, done)
        for j in range(LANES - 1):
            with builder.if_then(builder.icmp_signed(">", rest, ir.Constant(intp, j))):
                block = row(builder.add(done, ir.Constant(intp, j)))
                builder.store(builder.fadd(builder.load(partials[j]), block), partials[j])
        vectors = [builder.load(p) for p in partials]
        while len(vectors) > 1:  # p[j] += p[j + half], half = LANES / 2, ..., 1
            half = len(vectors) // 2
            vectors = [builder.fadd(vectors[j], vectors[j + half]) for j in range(half)]
        target = builder.gep(out, [value(5)])
        builder.store(vectors[0], builder.bitcast(target, vector.as_pointer()),
                      align=align)
        return context.get_dummy_value()

    return types.void(x, start, stride, count, out, out_start), codegen
