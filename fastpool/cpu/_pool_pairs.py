"""2x2 stride-2 max pooling of channels-first rows as vector code.

Where 2x2 windows of stride 2 tile a channels-first input exactly (``max_forward_tiled``),
output row ``r`` reads input rows ``2r`` and ``2r + 1``, both ``W = 2 * OW`` long and
contiguous, and its outputs are maxima of neighbouring pairs in them. Written as a
loop over the row's outputs, LLVM vectorises it only where a row has more outputs than
its vector loop takes at once (16): the 7 and 14 outputs of a VGG's last pooling
layers ran scalar, about 50 cycles a row ((1, 512, 14, 14) on one thread: 52 us,
slower than ONNX Runtime's 59 us on two). ``max2x2_rows`` writes the rows in LLVM IR:
per chunk of ``LANES`` outputs, one vector load of ``2 * LANES`` inputs from each of the
two rows, the pairs split into even and odd lanes by shuffles, the last chunk of a row
read and written with masks (nothing outside the row is touched). Rows of more than
``PAIRS_WIDEST`` outputs keep the loop, which LLVM vectorises well there.

The four taps are folded in ``max_forward``'s order ``(0, 0), (0, 1), (1, 0), (1, 1)``
with its rule (``replaces``: larger wins, the first NaN wins and stays) as lane-wise
compares and selects, so every output is the scalar kernel's bit for bit (signed zeros
and NaN payloads included).
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from fastpool.cpu import _half_bits as hb
from fastpool.cpu._pool_common import U, replaces

_BYTES = 32  # outputs per chunk: one 256-bit vector of them

# Rows of more outputs than this keep the loop LLVM vectorises: the vector code here
# gained on 7-28 outputs a row, not on 56 and lost on 112 (one thread, (1, 64, 224,
# 224): 1.31 -> 1.54 ms; docs/measure_2026_12_06.py pairs).
PAIRS_WIDEST = 32


@intrinsic
def _max2x2_rows_vector(typingctx, xf, of, r_lo, r_hi, OW):
    """``of[r * OW + q] = max of xf[4r*OW + 2q + {0, 1, 2*OW, 2*OW + 1}]`` (in that
    order, ``replaces``) for rows ``r_lo <= r < r_hi`` and ``q < OW``; arrays 1-D,
    C-contiguous, one float dtype."""
    if not (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                and isinstance(a.dtype, types.Float) for a in (xf, of))
            and xf.dtype == of.dtype and of.mutable
            and all(isinstance(v, types.Integer) for v in (r_lo, r_hi, OW))):
        return None
    signature = types.void(xf, of, r_lo, r_hi, OW)

    def codegen(context, builder, sig, args):
        tys = sig.args
        intp = context.get_value_type(types.intp)
        i32 = ir.IntType(32)
        element = context.get_data_type(xf.dtype)
        itemsize = context.get_abi_sizeof(element)
        lanes = _BYTES // itemsize
        out_ty = ir.VectorType(element, lanes)
        in_ty = ir.VectorType(element, 2 * lanes)
        in_mask_ty = ir.VectorType(ir.IntType(1), 2 * lanes)
        out_mask_ty = ir.VectorType(ir.IntType(1), lanes)
        align = ir.Constant(i32, itemsize)
        bits = f"f{8 * itemsize}"

        def function(name, ret, params):
            return cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ret, params), name)

        def masked(ty, mask_ty):
            suffix = f"v{ty.count}{bits}"
            load = function(f"llvm.masked.load.{suffix}.p0{suffix}", ty,
                            [ty.as_pointer(), i32, mask_ty, ty])
            store = function(f"llvm.masked.store.{suffix}.p0{suffix}", ir.VoidType(),
                             [ty, ty.as_pointer(), i32, mask_ty])
            return load, store

        masked_load, _ = masked(in_ty, in_mask_ty)
        _, masked_store = masked(out_ty, out_mask_ty)

        def value(index):
            return context.cast(builder, args[index], tys[index], types.intp)

        def data(index):
            return context.make_array(tys[index])(context, builder, args[index]).data

        def const(number):
            return ir.Constant(intp, number)

        x_data, o_data = data(0), data(1)
        r_lo_v, r_hi_v, ow_v = value(2), value(3), value(4)
        width = builder.mul(ow_v, const(2))
        full = builder.sdiv(ow_v, const(lanes))
        rest = builder.sub(ow_v, builder.mul(full, const(lanes)))

        def splat(number, count):
            ty = ir.VectorType(intp, count)
            vec = builder.insert_element(ir.Constant(ty, ir.Undefined), number,
                                         ir.Constant(i32, 0))
            return builder.shuffle_vector(vec, ir.Constant(ty, ir.Undefined),
                                          ir.Constant(ir.VectorType(i32, count),
                                                      [0] * count))

        in_mask = builder.icmp_signed(
            "<", ir.Constant(ir.VectorType(intp, 2 * lanes), list(range(2 * lanes))),
            splat(builder.mul(rest, const(2)), 2 * lanes))
        out_mask = builder.icmp_signed(
            "<", ir.Constant(ir.VectorType(intp, lanes), list(range(lanes))),
            splat(rest, lanes))
        zeros = ir.Constant(in_ty, [ir.Constant(element, 0.0)] * (2 * lanes))
        even = ir.Constant(ir.VectorType(i32, lanes), list(range(0, 2 * lanes, 2)))
        odd = ir.Constant(ir.VectorType(i32, lanes), list(range(1, 2 * lanes, 2)))

        def fold(best, tap):
            # replaces(tap, best): tap > best, or tap is the first NaN
            larger = builder.fcmp_ordered(">", tap, best)
            first_nan = builder.and_(builder.fcmp_unordered("uno", tap, tap),
                                     builder.fcmp_ordered("ord", best, best))
            return builder.select(builder.or_(larger, first_nan), tap, best)

        def chunk(src, dst, tail):
            rows = []
            for offset in (src, builder.add(src, width)):
                pointer = builder.bitcast(builder.gep(x_data, [offset]), in_ty.as_pointer())
                if tail:
                    rows.append(builder.call(masked_load, [pointer, align, in_mask, zeros]))
                else:
                    rows.append(builder.load(pointer, align=itemsize))
            taps = []
            for row in rows:
                taps.append(builder.shuffle_vector(row, row, even))
                taps.append(builder.shuffle_vector(row, row, odd))
            best = taps[0]
            for tap in taps[1:]:
                best = fold(best, tap)
            pointer = builder.bitcast(builder.gep(o_data, [dst]), out_ty.as_pointer())
            if tail:
                builder.call(masked_store, [best, pointer, align, out_mask])
            else:
                builder.store(best, pointer).align = itemsize

        rows = builder.sub(r_hi_v, r_lo_v)
        with cgutils.for_range(builder, rows) as row_loop:
            r = builder.add(r_lo_v, row_loop.index)
            src0 = builder.mul(r, builder.mul(width, const(2)))
            dst0 = builder.mul(r, ow_v)
            with cgutils.for_range(builder, full) as loop:
                step = builder.mul(loop.index, const(lanes))
                chunk(builder.add(src0, builder.mul(step, const(2))),
                      builder.add(dst0, step), False)
            with builder.if_then(builder.icmp_signed(">", rest, const(0))):
                done = builder.mul(full, const(lanes))
                chunk(builder.add(src0, builder.mul(done, const(2))),
                      builder.add(dst0, done), True)
        return context.get_dummy_value()

    return signature, codegen


def max2x2_rows(xf, of, r_lo, r_hi, OW):
    """Output rows ``[r_lo, r_hi)`` of 2x2 stride-2 max pooling tiling flat
    channels-first planes (module docstring): ``of[r * OW + q]`` from ``xf[4r*OW +
    2q + {0, 1, 2*OW, 2*OW + 1}]``, as ``max_forward``. Float arrays run the vector
    code; half-precision bits a scalar loop."""
    raise NotImplementedError("used inside Numba kernels only")


@overload(max2x2_rows, inline="always")
def _max2x2_rows(xf, of, r_lo, r_hi, OW):
    if isinstance(getattr(xf, "dtype", None), types.Float):
        def vector(xf, of, r_lo, r_hi, OW):
            _max2x2_rows_vector(xf, of, r_lo, r_hi, OW)
        return vector

    def scalar(xf, of, r_lo, r_hi, OW):
        W = 2 * OW
        for r in range(r_lo, r_hi):
            base = 2 * r * W
            for q in range(OW):
                best = hb.wide(xf[U(base + 2 * q)])
                for k in (1, W, W + 1):
                    v = hb.wide(xf[U(base + 2 * q + k)])
                    best = v if replaces(v, best) else best
                of[U(r * OW + q)] = hb.narrow(best, of)
    return scalar


@njit(cache=True, boundscheck=False, error_model="numpy", nogil=True)
def max2x2_rows_for_tests(xf, of, r_lo, r_hi, OW):
    """``max2x2_rows`` as a callable for the tests."""
    max2x2_rows(xf, of, r_lo, r_hi, OW)
