"""A reduction in a fixed order of interleaved partial sums, as vector code.

Global average pooling defines its sum order as ``LANES`` interleaved partial sums:
partial ``j`` adds elements ``j, j + LANES, j + 2 * LANES, ...`` in order, starting
from ``+0``; the partials are then folded pairwise (``p[j] += p[j + width]`` for
``width = LANES / 2, ..., 1``) and ``p[0]`` is the sum. Channels-last inputs and the
GPU follow the same order with other loops, so every path gives the same bits.

Numba's loop vectoriser does not keep such partials in registers (it cannot prove the
accumulator and the input apart and unrolls to scalar adds, 0.4x PyTorch), so
``interleaved_sum`` writes the loop in LLVM IR: one vector of ``LANES`` lanes, one
vector add per ``LANES`` elements, the tail loaded lane by lane (never past the last
element), the fold as vector halves. Lane-wise vector adds are the scalar IEEE adds,
and a tail lane left at ``+0`` adds nothing (a sum started at ``+0`` is never ``-0``),
so the result is the formula's bit for bit (``tests/test_adaptive.py`` checks it
against a plain-loop version).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# One AVX-512 vector of float32 (two of float64).
LANES = 16


@intrinsic
def interleaved_sum(typingctx, x, start, count):
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
        vector = ir.VectorType(element, LANES)
        align = context.get_abi_sizeof(element)
        intp = context.get_value_type(types.intp)
        begin = context.cast(builder, args[1], start_type, types.intp)
        count = context.cast(builder, args[2], count_type, types.intp)
        zero = ir.Constant(vector, [ir.Constant(element, 0.0)] * LANES)
        lanes = ir.Constant(intp, LANES)
        base = builder.gep(array.data, [begin])

        partials = cgutils.alloca_once_value(builder, zero)
        full = builder.sdiv(count, lanes)
        with cgutils.for_range(builder, full) as loop:
            where = builder.gep(base, [builder.mul(loop.index, lanes)])
            block = builder.load(builder.bitcast(where, vector.as_pointer()), align=align)
            builder.store(builder.fadd(builder.load(partials), block), partials)

        # Constant lane numbers keep the tail in registers (a variable insert index goes
        # through the stack and stalls on store forwarding: 4x slower on 7x7 planes).
        done = builder.mul(full, lanes)
        rest = builder.sub(count, done)
        tail = cgutils.alloca_once_value(builder, zero)
        for lane in range(LANES - 1):
            with builder.if_then(builder.icmp_signed(">", rest, ir.Constant(intp, lane))):
                where = builder.gep(base, [builder.add(done, ir.Constant(intp, lane))])
                value = builder.load(where, align=align)
                builder.store(builder.insert_element(
                    builder.load(tail), value, ir.Constant(ir.IntType(32), lane)), tail)

        folded = builder.fadd(builder.load(partials), builder.load(tail))
        width = LANES // 2
        while width:
            low, high = (ir.Constant(ir.VectorType(ir.IntType(32), width),
                                     list(range(first, first + width)))
                         for first in (0, width))
            folded = builder.fadd(builder.shuffle_vector(folded, folded, low),
                                  builder.shuffle_vector(folded, folded, high))
            width //= 2
        return builder.extract_element(folded, ir.Constant(ir.IntType(32), 0))

    return x.dtype(x, start, count), codegen
