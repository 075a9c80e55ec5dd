"""fastpool's own GEMM: a register-blocked micro-kernel written as LLVM vector IR, and
the loops around it, for Numba kernels.

``tile(mr, kc, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, n_valid, init,
init_off, nr, start)`` does ``C[i, j] = s[i, j] + sum over k < kc of A[i, k] *
B[k, j]`` for an ``MR x NR`` tile of C (``mr <= MR`` rows, the first ``n_valid`` of
``NR`` columns; ``s`` is C itself, ``init[init_off + i]`` or ``init[init_off + j]``,
as ``start`` says), where

- ``A`` is read in place, ``A[i, k]`` at ``a[a_off + i*lda + k*a_step]`` (a weight
  matrix's rows, ``a_step = 1``, or its columns; no packing: each value is broadcast
  once per use anyway);
- ``B``'s row ``k`` is at ``b[b_off + k*ldb:]`` (columns gathered by the caller; rows
  starting on cache lines run faster, ``padded``);
- the tile of C lives in ``MR * NR / lanes`` vector registers for the whole ``k`` loop,
  read (if it starts from C) before it and written after it, masked to ``n_valid``
  columns. ``gemm_batch`` runs the tiles over whole products, ``k`` in slabs of ``KC``.

Why not BLAS: every element of C here is one chain of fused multiply-adds,
``c = fma(A[i, k], B[k, j], c)`` for ``k = 0, 1, ...`` in order, starting from C's
value, whatever the tile, the panel, the matrix sizes, the blocking of ``k`` (a partial
chain is stored and loaded exactly) or the thread that runs it. A BLAS GEMM's rounding
depends on its matrix sizes and thread count (OpenBLAS 0.3.30's ``sgemm``, measured:
different bits for one product computed whole, in row blocks, in column blocks, or on 1
and 2 threads), so a convolution computed in pieces -- bands, blocks of channels,
spatial chunks of a Dask array -- could not give the whole call's bits. ``llvm.fma``
is exact fused multiply-add on every machine (a libm call where the CPU has no FMA),
so the bits do not depend on the CPU either.

Numba cannot express SIMD vectors, and LLVM does not vectorise a register tile written
as scalar Python code (tried: 96 scalar accumulators compiled to scalar FMAs and
spills, 3.7 GFLOP/s). Emitted as vector IR, the 6 x 16 tile ran at 90-100 GFLOP/s
(float32) and 46-49 (float64) on one core of the project's first (AVX2) machine with
packed operands in cache; ``gemm_batch`` on conv-sized products (B's rows on cache
lines) at 86-89, against 90 for OpenBLAS's ``sgemm``. Where the CPU has 32 vector
registers (AVX-512) the tile is 8 rows by 3 vectors (``MR``, ``VECTORS``): with
32-byte vectors, 8 x 24, on one core of a Zen 4 machine 91-111 GFLOP/s against 74-95
for 6 x 16. There the vectors are 64 bytes (``_BYTES``; 8 x 48 float32, 8 x 24
float64) since 2026-12-07: on one core of an Intel Xeon with two 512-bit FMA units
(LLVM names it ``rocketlake``), ``gemm_batch`` alone, 105-126 GFLOP/s with 32-byte
vectors against 145-204 with 64-byte ones (PyTorch's one-thread 2048^3 ``matmul``:
198). LLVM's ``prefer-256-bit`` tuning of such CPUs applies to its own vectorising,
not to vector types written out, as here, in functions that, like Numba's, carry no
``"min-legal-vector-width"`` attribute: the tile compiles to 512-bit fused
multiply-adds (``tests/test_microkernel.py`` checks the code).

A panel's last one or two columns (a 7x7 plane's 49th pixel: 48 = 1 x 48), with A
read by rows, run as ``_columns`` in float32 where the tile has 8 rows: vectors across
the 8 rows, A's rows transposed in registers 8 steps of ``k`` at a time, one fused
multiply-add per column and step instead of one per row (the same chains, so the same
bits). One core, 160 x 49 by 960 against 48 columns: +15% time instead of +20%; 1x1
convolutions on 7x7 planes at batch 1, 1.07x-1.19x. With 3 or 4 columns it gained
nothing (the transposes cost what the fused multiply-adds saved).

Kernels call ``gemm_batch`` by a symbol name, so it is compiled once per dtype (here, at
import: ``fastpool.cpu`` imports the convolution modules at the first convolution, so
``import fastpool`` compiles nothing), not again with each of them, and a change to the
tile reaches every kernel without clearing caches. Numba's disk cache checks only the
file of the function it loads, though, and the small inline helpers (``padded``,
``aligned_empty``, ``MR``; ``_transpose._transpose8`` into ``gemm_batch`` itself) and
``gemm_taps`` (with the tile) are compiled into their callers: after changing those clear
``fastpool/cpu/**/__pycache__`` (after changing ``gemm_batch``'s arguments, raise
``_ABI``).
"""

from __future__ import annotations

import functools

import numpy as np

from llvmlite import binding as llvm, ir
from numba import njit, types
from numba.core import cgutils, errors
from numba.extending import intrinsic, overload

from fastpool.cpu._vector_width import allow_vector_bits

# Where a tile's chains start (``gemm_batch``'s ``start``): C's values, ``init`` per
# row, ``init`` per column.
FROM_C, FROM_ROW_INIT, FROM_COLUMN_INIT = 0, 1, 2


def _thirty_two_vector_registers():
    """Whether Numba compiles for a CPU with AVX-512's 32 vector registers (its
    features: the host's, or ``NUMBA_CPU_FEATURES``)."""
    from numba import config
    from numba.core.codegen import get_host_cpu_features

    features = config.CPU_FEATURES
    if features is None:
        features = get_host_cpu_features()
    return {"+avx512f", "+avx512vl"} <= set(features.split(","))


# A tile is MR rows by VECTORS vectors: its accumulators, one vector of B per column
# vector and one broadcast of A must fit in the registers. With 32 (AVX-512), 8 x 3:
# 24 accumulators (measured here with 256-bit vectors). With 16 (AVX2), 6 x 2: 12;
# 8 x 3 there spills (one core of this project's Zen 4 machine compiled for AVX2,
# float32, conv-sized products: 6 x 2 86-110 GFLOP/s, 8 x 3 49-73). For AVX-512, 8 x 3
# against 6 x 2: 91-111 against 74-95 (float32), 45-56 against 39-47 (float64); 6 x 3
# in between (docs/site/performance.md).
MR, VECTORS = (8, 3) if _thirty_two_vector_registers() else (6, 2)
# Whether B's rows starting on cache lines (``padded``) gains enough to pay for copying
# B into such rows. One core, float32, rows of 49 values (7x7 planes) in place against
# padded: 6 x 16 compiled for AVX2 68-74 against 81-85 GFLOP/s; 8 x 24 86-90 against
# 82-92. With the 8 x 48 tile (64-byte vectors, 2026-12-07, Intel Xeon, batch 1, 2
# threads) copying made 1x1 layers on 14x14 and 7x7 planes 1.2x-2x slower.
ALIGN_B_ROWS = VECTORS < 3
# Bytes per vector of the tile: AVX-512's 64 where the tile has 32 registers, AVX2's 32
# (LLVM splits vectors wider than the CPU's).
_BYTES = 64 if VECTORS == 3 else 32


def lanes(itemsize):
    """Values per vector for a dtype of ``itemsize`` bytes."""
    return _BYTES // itemsize


def panel_width(itemsize):
    """``NR``: columns of a tile."""
    return VECTORS * lanes(itemsize)


_LINE = 64  # bytes of a cache line


@njit(inline="always")
def padded(n, like):
    """``n`` rounded up to an odd number of whole cache lines of ``like``'s dtype: a
    row stride for B whose rows each start on a line (measured on this project's
    machine, one core, float32: 74-75 -> 86-89 GFLOP/s on conv-sized products;
    OpenBLAS: 90) and whose rows do not all fall in a few sets of the L1 cache, as
    they do at a stride of a power of two (392 x 512 by 2048: 56 GFLOP/s at a stride
    of 2048 values, 80 at 2064; 64 x 576 by 1024: 68 and 88)."""
    per_line = _LINE // like.itemsize
    lines = (n + per_line - 1) // per_line
    return (lines + 1 - lines % 2) * per_line


@njit(inline="always")
def aligned_empty(n, like):
    """An uninitialised array of ``n`` values of ``like``'s dtype starting on a cache
    line."""
    per_line = _LINE // like.itemsize
    raw = np.empty(n + per_line, like.dtype)
    skip = (-(raw.ctypes.data // like.itemsize)) % per_line
    return raw[skip:skip + n]


def aligned_host(n, dtype):
    """``aligned_empty`` for Python callers."""
    per_line = _LINE // np.dtype(dtype).itemsize
    raw = np.empty(n + per_line, dtype)
    skip = (-(raw.ctypes.data // raw.itemsize)) % per_line
    return raw[skip:skip + n]


@functools.lru_cache(maxsize=None)
def _tile(partial, vectors):
    """The micro-kernel intrinsic for tiles ``vectors`` vectors wide. ``partial``: fewer
    valid columns than that, so B and C are read and C written with masks (nothing past
    them is touched). One-vector tiles finish panels of at most one vector's columns
    (a 7x7 plane's 49th pixel: a two-vector tile there wasted 31 of 32 columns).

    Rows past ``mr`` compute a copy of row ``mr - 1`` (reading only valid rows of A and
    C) and are not stored: a variant per row count took twice the compile time (2.4 s
    for the twelve). ``start``: the chains start from C (``FROM_C``), from
    ``init[init_off + i]`` per row (``FROM_ROW_INIT``: a bias, or zeros) or from
    ``init[init_off + j]`` per column (``FROM_COLUMN_INIT``: a channels-last
    output's bias), read with C's masks."""

    @intrinsic
    def tile(typingctx, mr, kc, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc,
             n_valid, init, init_off, start):
        if not (all(isinstance(t, types.Array) for t in (a, b, c, init))
                and a.dtype in (types.float32, types.float64)
                and all(t.dtype == a.dtype for t in (b, c, init))):
            return None
        if isinstance(a_step, types.Array) and not (
                a_step.ndim == 1 and a_step.layout == "C" and a_step.dtype == types.intp):
            return None  # read as consecutive values
        dtype = a.dtype
        signature = types.void(mr, kc, a, a_off, lda, a_step, b, b_off, ldb, c, c_off,
                               ldc, n_valid, init, init_off, start)
        width = lanes(dtype.bitwidth // 8)

        def codegen(context, builder, sig, args):
            tys = sig.args
            intp = context.get_value_type(types.intp)
            i32 = ir.IntType(32)
            vty = ir.VectorType(context.get_value_type(dtype), width)
            vptr = vty.as_pointer()
            mty = ir.VectorType(ir.IntType(1), width)
            itemsize = dtype.bitwidth // 8
            allow_vector_bits(builder, 8 * _BYTES)
            align = ir.Constant(i32, itemsize)
            suffix = f"v{width}f{dtype.bitwidth}"

            def value(index):  # argument ``index`` as an intp
                return context.cast(builder, args[index], tys[index], types.intp)

            def at(index, offset_index):  # pointer to array ``index`` at an offset
                data = context.make_array(tys[index])(context, builder, args[index]).data
                return builder.gep(data, [value(offset_index)])

            def const(number):
                return ir.Constant(intp, number)

            def function(name, ret, params):
                return cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ret, params), name)

            fma = function(f"llvm.fma.{suffix}", vty, [vty, vty, vty])
            masked_load = function(f"llvm.masked.load.{suffix}.p0{suffix}", vty,
                                   [vptr, i32, mty, vty])
            masked_store = function(f"llvm.masked.store.{suffix}.p0{suffix}",
                                    ir.VoidType(), [vty, vptr, i32, mty])

            def splat(scalar, ty):
                vec = builder.insert_element(ir.Constant(ty, ir.Undefined), scalar,
                                             ir.Constant(i32, 0))
                return builder.shuffle_vector(
                    vec, ir.Constant(ty, ir.Undefined),
                    ir.Constant(ir.VectorType(i32, width), [0] * width))

            a0, b0, c0 = at(2, 3), at(6, 7), at(9, 10)
            lda, ldb, ldc = value(4), value(8), value(11)
            a_step = None if isinstance(tys[5], types.Array) else value(5)
            kc_i, valid = value(1), value(12)
            last_row = builder.sub(value(0), const(1))
            lanes_ids = ir.Constant(ir.VectorType(intp, width), list(range(width)))
            masks = [builder.icmp_signed("<", lanes_ids, splat(
                builder.sub(valid, const(v * width)), ir.VectorType(intp, width)))
                for v in range(vectors)]
            zeros = ir.Constant(vty, [0.0] * width)
            # row i of the tile reads row min(i, mr - 1) of A, C and init
            rows = [builder.select(builder.icmp_signed("<", const(i), value(0)), const(i),
                                   last_row) for i in range(MR)]

            def slot(base, row_stride, i, v):
                row = builder.gep(base, [builder.mul(row_stride, rows[i])])
                return builder.bitcast(builder.gep(row, [const(v * width)]), vptr)

            def load(pointer, v):
                if partial:
                    return builder.call(masked_load, [pointer, align, masks[v], zeros])
                instruction = builder.load(pointer)
                instruction.align = itemsize
                return instruction

            def store(vector, pointer, v):
                if partial:
                    builder.call(masked_store, [vector, pointer, align, masks[v]])
                else:
                    builder.store(vector, pointer).align = itemsize

            init0 = at(13, 14)
            mode = context.cast(builder, args[15], tys[15], types.intp)
            # chains from init never read C: it may be a fresh output, and a pass over it
            # costs as much as the products on layers with few input channels
            from_init = builder.append_basic_block("tile.init")
            from_columns = builder.append_basic_block("tile.columns")
            from_c = builder.append_basic_block("tile.c")
            started = builder.append_basic_block("tile.start")
            switch = builder.switch(mode, from_c)
            switch.add_case(const(FROM_ROW_INIT), from_init)
            switch.add_case(const(FROM_COLUMN_INIT), from_columns)
            builder.position_at_end(from_init)
            inits = []
            for i in range(MR):
                first = splat(builder.load(builder.gep(init0, [rows[i]])), vty)
                inits.extend([first] * vectors)
            builder.branch(started)
            builder.position_at_end(from_columns)
            columns = [load(builder.bitcast(builder.gep(init0, [const(v * width)]), vptr), v)
                       for v in range(vectors)]
            builder.branch(started)
            builder.position_at_end(from_c)
            loaded = [load(slot(c0, ldc, i, v), v) for i in range(MR) for v in range(vectors)]
            builder.branch(started)
            builder.position_at_end(started)
            start = []
            for index, (first, other) in enumerate(zip(inits, loaded)):
                phi = builder.phi(vty)
                phi.add_incoming(first, from_init)
                phi.add_incoming(columns[index % vectors], from_columns)
                phi.add_incoming(other, from_c)
                start.append(phi)
            a_rows = [builder.gep(a0, [builder.mul(lda, rows[i])]) for i in range(MR)]

            entry = builder.block
            loop = builder.append_basic_block("tile.loop")
            done = builder.append_basic_block("tile.done")
            builder.cbranch(builder.icmp_signed(">", kc_i, const(0)), loop, done)

            builder.position_at_end(loop)
            k = builder.phi(intp)
            k.add_incoming(const(0), entry)
            acc = []
            for first in start:
                phi = builder.phi(vty)
                phi.add_incoming(first, entry)
                acc.append(phi)
            b_row = builder.gep(b0, [builder.mul(k, ldb)])
            b_k = [load(builder.bitcast(builder.gep(b_row, [const(v * width)]), vptr), v)
                   for v in range(vectors)]
            new = []
            if isinstance(tys[5], types.Array):  # A's offsets of each step of k
                a_k = builder.load(builder.gep(
                    context.make_array(tys[5])(context, builder, args[5]).data, [k]))
            else:
                a_k = builder.mul(k, a_step)
            for i in range(MR):
                a_ik = splat(builder.load(builder.gep(a_rows[i], [a_k])), vty)
                for v in range(vectors):
                    new.append(builder.call(fma, [a_ik, b_k[v], acc[i * vectors + v]]))
            k_next = builder.add(k, const(1))
            k.add_incoming(k_next, loop)
            for phi, last in zip(acc, new):
                phi.add_incoming(last, loop)
            builder.cbranch(builder.icmp_signed("<", k_next, kc_i), loop, done)

            builder.position_at_end(done)
            results = []
            for first, last in zip(start, new):  # phis first: LLVM wants them on top
                result = builder.phi(vty)
                result.add_incoming(first, entry)
                result.add_incoming(last, loop)
                results.append(result)
            for i in range(MR):
                if i == 0:
                    for v in range(vectors):
                        store(results[v], slot(c0, ldc, 0, v), v)
                    continue
                write = builder.append_basic_block(f"tile.row{i}")
                after = builder.append_basic_block(f"tile.after{i}")
                builder.cbranch(builder.icmp_signed("<", const(i), value(0)), write, after)
                builder.position_at_end(write)
                for v in range(vectors):
                    store(results[i * vectors + v], slot(c0, ldc, i, v), v)
                builder.branch(after)
                builder.position_at_end(after)
            return context.get_dummy_value()

        return signature, codegen

    return tile


# A panel's last columns, at most this many, with A read by rows (``a_step`` 1), run
# as ``_columns``: float32 on CPUs whose tile has 8 rows (AVX-512's), one vector of 8
# lanes holding the 8 rows.
COLUMN_TILE_WIDTH = 2
_COLUMN_TILES = MR == 8


@functools.lru_cache(maxsize=None)
def _columns(count):
    """The micro-kernel intrinsic for the last ``count`` columns of a panel, vectors
    across the tile's rows: in a one-vector tile (``_tile(True, 1)``) each of the 8
    rows takes a broadcast and a fused multiply-add per step of ``k`` for one valid
    column in a vector of 8 or 16 lanes (a 7x7 plane's 49th pixel); here A's rows are
    loaded 8 steps of ``k`` at a time and transposed in registers, and each column
    takes one fused multiply-add per step for all 8 rows. Each element's chain is the
    same ``c = fma(A[i, k], B[k, j], c)`` over ``k`` in order, so the bits are the
    tile's.
    float32 only (8 lanes), ``a_step`` 1; rows past ``mr`` compute a copy of row ``mr -
    1`` and are not stored, as in ``_tile``."""
    from fastpool.cpu._transpose import _transpose8

    @intrinsic
    def columns(typingctx, mr, kc, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, init,
                init_off, start):
        if not (all(isinstance(t, types.Array) for t in (a, b, c, init))
                and all(t.dtype == types.float32 for t in (a, b, c, init))):
            return None
        signature = types.void(mr, kc, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, init,
                               init_off, start)

        def codegen(context, builder, sig, args):
            tys = sig.args
            intp = context.get_value_type(types.intp)
            i32 = ir.IntType(32)
            f32 = ir.FloatType()
            vty = ir.VectorType(f32, 8)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty, vty, vty]), "llvm.fma.v8f32")

            def value(index):
                return context.cast(builder, args[index], tys[index], types.intp)

            def at(index, offset_index):
                data = context.make_array(tys[index])(context, builder, args[index]).data
                return builder.gep(data, [value(offset_index)])

            def const(number):
                return ir.Constant(intp, number)

            def scalar(pointer):
                instruction = builder.load(pointer)
                instruction.align = 4
                return instruction

            def splat(number):
                vec = builder.insert_element(ir.Constant(vty, ir.Undefined), number,
                                             ir.Constant(i32, 0))
                return builder.shuffle_vector(vec, ir.Constant(vty, ir.Undefined),
                                              ir.Constant(ir.VectorType(i32, 8), [0] * 8))

            def gathered(pointers):
                vec = ir.Constant(vty, ir.Undefined)
                for i, pointer in enumerate(pointers):
                    vec = builder.insert_element(vec, scalar(pointer), ir.Constant(i32, i))
                return vec

            a0, b0, c0, init0 = at(2, 3), at(5, 6), at(8, 9), at(11, 12)
            lda, ldb, ldc = value(4), value(7), value(10)
            kc_i = value(1)
            last_row = builder.sub(value(0), const(1))
            rows = [builder.select(builder.icmp_signed("<", const(i), value(0)), const(i),
                                   last_row) for i in range(8)]
            a_rows = [builder.gep(a0, [builder.mul(lda, rows[i])]) for i in range(8)]
            c_rows = [builder.gep(c0, [builder.mul(ldc, rows[i])]) for i in range(8)]

            mode = value(13)
            from_init = builder.append_basic_block("columns.init")
            from_columns = builder.append_basic_block("columns.columns")
            from_c = builder.append_basic_block("columns.c")
            started = builder.append_basic_block("columns.start")
            switch = builder.switch(mode, from_c)
            switch.add_case(const(FROM_ROW_INIT), from_init)
            switch.add_case(const(FROM_COLUMN_INIT), from_columns)
            builder.position_at_end(from_init)
            per_row = gathered([builder.gep(init0, [rows[i]]) for i in range(8)])
            builder.branch(started)
            builder.position_at_end(from_columns)
            per_column = [splat(scalar(builder.gep(init0, [const(j)])))
                          for j in range(count)]
            builder.branch(started)
            builder.position_at_end(from_c)
            loaded = [gathered([builder.gep(c_rows[i], [const(j)]) for i in range(8)])
                      for j in range(count)]
            builder.branch(started)
            builder.position_at_end(started)
            start = []
            for j in range(count):
                phi = builder.phi(vty)
                phi.add_incoming(per_row, from_init)
                phi.add_incoming(per_column[j], from_columns)
                phi.add_incoming(loaded[j], from_c)
                start.append(phi)
            acc = [cgutils.alloca_once_value(builder, v) for v in start]

            def step(k, column):  # one step of k for every column, A's column given
                b_row = builder.gep(b0, [builder.mul(k, ldb)])
                for j in range(count):
                    b_kj = splat(scalar(builder.gep(b_row, [const(j)])))
                    builder.store(builder.call(fma, [column, b_kj, builder.load(acc[j])]),
                                  acc[j])

            blocks = builder.sdiv(kc_i, const(8))
            with cgutils.for_range(builder, blocks) as loop:
                k0 = builder.mul(loop.index, const(8))
                loads = []
                for i in range(8):
                    pointer = builder.bitcast(builder.gep(a_rows[i], [k0]), vty.as_pointer())
                    instruction = builder.load(pointer)
                    instruction.align = 4
                    loads.append(instruction)
                for kk, column in enumerate(_transpose8(builder, loads)):
                    step(builder.add(k0, const(kk)), column)
            done = builder.mul(blocks, const(8))
            with cgutils.for_range(builder, builder.sub(kc_i, done)) as loop:
                k = builder.add(done, loop.index)
                step(k, gathered([builder.gep(a_rows[i], [k]) for i in range(8)]))

            for j in range(count):
                result = builder.load(acc[j])
                for i in range(8):
                    element = builder.extract_element(result, ir.Constant(i32, i))
                    pointer = builder.gep(c0, [builder.add(builder.mul(ldc, const(i)),
                                                           const(j))])
                    if i == 0:
                        builder.store(element, pointer).align = 4
                        continue
                    with builder.if_then(builder.icmp_signed("<", const(i), value(0))):
                        builder.store(element, pointer).align = 4
            return context.get_dummy_value()

        return signature, codegen

    return columns


# Tiles of one, two and three vectors' columns, all columns valid or fewer (masked).
_full_1, _partial_1 = _tile(False, 1), _tile(True, 1)
_full_2, _partial_2 = _tile(False, 2), _tile(True, 2)
_full_3, _partial_3 = _tile(False, 3), _tile(True, 3)


def _last_columns(mr, kc, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, n_valid, init,
                  init_off, start):
    """The last ``n_valid <= COLUMN_TILE_WIDTH`` columns of a panel, A read by rows:
    ``_columns`` where it applies (float32, 8-row tiles), else the one-vector tile."""
    raise NotImplementedError("used inside Numba kernels only")


@overload(_last_columns, inline="always")
def _last_columns_impl(mr, kc, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, n_valid,
                       init, init_off, start):
    if _COLUMN_TILES and getattr(a, "dtype", None) == types.float32:
        one, two = _columns(1), _columns(2)

        def by_rows(mr, kc, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, n_valid, init,
                    init_off, start):
            if n_valid == 1:
                one(mr, kc, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, init, init_off,
                    start)
            else:
                two(mr, kc, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, init, init_off,
                    start)
        return by_rows

    def one_vector(mr, kc, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, n_valid, init,
                   init_off, start):
        _partial_1(mr, kc, a, a_off, lda, 1, b, b_off, ldb, c, c_off, ldc, n_valid, init,
                   init_off, start)
    return one_vector


def _by_rows(a_step):
    """Whether A is read by rows (``a_step`` 1; not a table of offsets)."""
    raise NotImplementedError("used inside Numba kernels only")


@overload(_by_rows, inline="always")
def _by_rows_impl(a_step):
    if isinstance(a_step, types.Array):
        return lambda a_step: False
    return lambda a_step: a_step == 1


@njit(inline="always")
def tile(mr, kc, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, n_valid, init,
         init_off, nr, start):
    """``C[:mr, :n_valid] (+)= A[:mr, :kc] @ B[:kc, :n_valid]`` (module docstring),
    ``A[i, k]`` at ``a[a_off + i*lda + k*a_step]`` (or, ``a_step`` an intp array,
    ``a[a_off + i*lda + a_step[k]]``: ``gemm_taps``), ``B`` row ``k`` at
    ``b[b_off + k*ldb:]``; ``1 <= mr <= MR``, ``1 <= n_valid <= nr``
    (``nr = panel_width(itemsize)``); ``start`` as for the intrinsic (``_tile``). The
    tile is as many vectors wide as ``n_valid`` columns need (a panel's last columns:
    a 7x7 plane's 49th pixel in a one-vector tile, not a three-vector one)."""
    width = nr // VECTORS
    vectors = (n_valid + width - 1) // width
    if vectors * width == n_valid:
        if vectors == 3:
            _full_3(mr, kc, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, n_valid,
                    init, init_off, start)
        elif vectors == 2:
            _full_2(mr, kc, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, n_valid,
                    init, init_off, start)
        else:
            _full_1(mr, kc, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, n_valid,
                    init, init_off, start)
    elif vectors == 3:
        _partial_3(mr, kc, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, n_valid,
                   init, init_off, start)
    elif vectors == 2:
        _partial_2(mr, kc, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, n_valid,
                   init, init_off, start)
    elif n_valid <= COLUMN_TILE_WIDTH and _by_rows(a_step):
        _last_columns(mr, kc, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, n_valid, init,
                      init_off, start)
    else:
        _partial_1(mr, kc, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, n_valid,
                   init, init_off, start)


# Rows of B per slab: a tile's rows of A (MR x KC) stay in L1 across a slab's panels.
KC = 256
# Rows of A per block: a block's rows of a slab (MC x KC) stay in L2 while each panel of
# B (KC x NR) is read from L1 by every tile of the block, and B is read again for each
# block ...
MC = 96
# ... unless the products' slabs of B (all ``count`` of them) are larger than this (half
# of a 2 MiB L2): B then comes from memory for each block, and blocks are as tall as
# ``MC_BYTES`` of A allow, cut into equal blocks (not 96 + 32 for 128 rows). One core
# pair, float64, 512 x 784 by 256 (a 1x1 256->512 layer on 28x28), per image: 96-row
# blocks 78 ms for 32 images, one 512-row block 63 (OpenBLAS's dgemm: 52-54). Where B's
# slab fits in L2, taller blocks ran slower (512 x 196 by 4608: 0.95x).
B_SLAB_BYTES = 1 << 20
MC_BYTES = 1 << 20
# Rows of A per block, at least, for ``_wide`` to copy B's panels (if they are whole
# slabs high, ``k >= KC``). Measured at batch 32, two threads, the same build copying
# and not: 1x1 256->512 on 28x28 float64 1.14x, 512->1024 on 28x28 float64 1.13x,
# float32 0.98x; blocks of 64 rows (256->64 on 56x56) 0.68x float32, 0.82x float64; 64
# rows of B (64->256 on 56x56, float64, blocks of 256) 0.78x, 128 rows 0.98x.
COPY_ROWS = 256


@njit(inline="always")
def streams_b(n, kc, count, itemsize):
    """Whether the slabs of B of ``count`` products ``n`` wide (``kc`` rows) come from
    memory for each block of A (larger than ``B_SLAB_BYTES``)."""
    return count * kc * n * itemsize > B_SLAB_BYTES


@njit(inline="always")
def block_rows(m, n, kc, count, itemsize):
    """Rows of A per block of ``_wide`` (``m`` rows, ``count`` products ``n`` wide,
    slabs of ``kc``)."""
    if m <= 0 or not streams_b(n, kc, count, itemsize):
        return MC
    most = max(MR, MC_BYTES // (kc * itemsize) // MR * MR)
    blocks = (m + most - 1) // most
    return ((m + blocks - 1) // blocks + MR - 1) // MR * MR


# Products at most this many panels wide take their tiles' rows of A as the outer loop.
NARROW = 4
# Rows of B per slab of a narrow product.
KC_NARROW = 512


@njit(inline="always")
def _narrow(m, n, k, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, init,
            init_off, count, b_step, c_step, start, nr):
    """``gemm_batch`` for products of a few panels (small planes): a tile's rows of A
    stay in L1 while B's panels (of every product) come from L2, rather than a block
    of A coming from L2 once per panel. 1 core, float32, 512 x 4608 by 49: 67 -> 75
    GFLOP/s."""
    for k0 in range(0, k, KC_NARROW):
        kc = min(KC_NARROW, k - k0)
        mode = start if k0 == 0 else FROM_C
        for i in range(0, m, MR):
            for t in range(count):
                b_t = b_off + t * b_step + k0 * ldb
                c_t = c_off + t * c_step
                for j in range(0, n, nr):
                    first = init_off + (i if start == FROM_ROW_INIT else j)
                    tile(min(MR, m - i), kc, a, a_off + i * lda + k0 * a_step, lda,
                         a_step, b, b_t + j, ldb, c, c_t + i * ldc + j, ldc,
                         min(nr, n - j), init, first, nr, mode)


@njit(inline="always")
def _wide(m, n, k, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, init,
          init_off, count, b_step, c_step, start, nr):
    """``gemm_batch`` for wider products: each panel of B is read from L1 by every
    tile of a block of A (from L2). Where blocks are tall and panels whole slabs high
    (``COPY_ROWS``), each panel is first copied into contiguous rows (``panel``): 512 x
    784 by 256, float64, 32 products on two cores, 63 -> 58 ms (likely: read in place,
    rows 784 values apart fall in half of L1's sets, and a panel is evicted between
    tiles). The same chains either way, so the same bits."""
    mc = block_rows(m, n, min(KC, k), count, c.itemsize)
    copied = mc >= COPY_ROWS and k >= KC  # (so B comes from memory: MC < COPY_ROWS)
    panel = aligned_empty(KC * nr if copied else 0, c)
    for k0 in range(0, k, KC):
        kc = min(KC, k - k0)
        mode = start if k0 == 0 else FROM_C
        for i0 in range(0, m, mc):
            i1 = min(i0 + mc, m)
            for t in range(count):
                b_t = b_off + t * b_step + k0 * ldb
                c_t = c_off + t * c_step
                for j in range(0, n, nr):
                    cols = min(nr, n - j)
                    source, at, stride = b, b_t + j, ldb
                    if copied:
                        for r in range(kc):
                            row = b_t + j + r * ldb
                            for q in range(cols):
                                panel[r * nr + q] = b[row + q]
                        source, at, stride = panel, 0, nr
                    for i in range(i0, i1, MR):
                        first = init_off + (i if start == FROM_ROW_INIT else j)
                        tile(min(MR, i1 - i), kc, a, a_off + i * lda + k0 * a_step,
                             lda, a_step, source, at, stride, c, c_t + i * ldc + j, ldc,
                             cols, init, first, nr, mode)


@njit(cache=True, boundscheck=False, error_model="numpy", nogil=True)
def _gemm_batch(m, n, k, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, init,
               init_off, count, b_step, c_step, start):
    """``C_t = init + A @ B_t`` for ``t < count`` (``start``: ``FROM_ROW_INIT``,
    ``init[init_off + i]`` starts row ``i``, a bias or zeros; ``FROM_COLUMN_INIT``,
    ``init[init_off + j]`` starts column ``j``; ``FROM_C``: ``C_t += A @ B_t``, each
    chain going on from C's value), the products sharing ``A``: ``A`` (``m x k``,
    ``A[i, k]`` at ``a_off + i*lda + k*a_step``), ``B_t`` (``k x n``, at ``b_off +
    t*b_step``) and ``C_t`` (``m x n``, at ``c_off + t*c_step``) inside flat arrays.
    Each element of C is one chain of fused multiply-adds over ``k`` in order from its
    start, whatever the sizes and the tiling. Each block of ``A`` (``MC x KC``) is read
    from memory once and used from L2 for every product (the images of a batch: a
    weight-heavy layer's weight is read once, not once per image)."""
    nr = VECTORS * (_BYTES // c.itemsize)
    if k == 0:
        if start == FROM_C:
            return
        for t in range(count):
            for i in range(m):
                for j in range(n):
                    c[c_off + t * c_step + i * ldc + j] = init[
                        init_off + (i if start == FROM_ROW_INIT else j)]
        return
    # A literal step of 1 for A read by rows: its addresses fold (5-8% on narrow
    # products).
    if n <= NARROW * nr:
        if a_step == 1:
            _narrow(m, n, k, a, a_off, lda, 1, b, b_off, ldb, c, c_off, ldc, init,
                    init_off, count, b_step, c_step, start, nr)
        else:
            _narrow(m, n, k, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, init,
                    init_off, count, b_step, c_step, start, nr)
    elif a_step == 1:
        _wide(m, n, k, a, a_off, lda, 1, b, b_off, ldb, c, c_off, ldc, init, init_off,
              count, b_step, c_step, start, nr)
    else:
        _wide(m, n, k, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, init,
              init_off, count, b_step, c_step, start, nr)



# ``_gemm_batch`` is compiled once per dtype here and called by name, as an external
# function, from the kernels that use it. Called as a Numba function, it was linked
# into each of them and optimised and compiled again with every one (its tile variants
# are large: about 3 s a dtype): CI's tests took 33 minutes with it linked, 26 without.
def _argument_types(dtype):
    array, i = types.Array(dtype, 1, "C"), types.int64
    return (i, i, i, array, i, i, i, array, i, i, array, i, i, array, i, i, i, i, i)


# Raise when ``_gemm_batch``'s arguments change order, types or meaning. A kernel
# cached before the change names the old symbol: register the old name too, to a small
# function of the old arguments that raises (telling the user to clear the cache).
# Not to nothing: llvmlite's loader crashes the process on a name it cannot resolve
# (tried: a weak declaration checked against null crashes as well).
_ABI = 1


def _symbol(dtype):
    # The module's own name in it: a second copy of the package in one process
    # (docs/measure_builds_interleaved.py) registers its own.
    return f"{__name__}.gemm_batch.{dtype}.v{_ABI}"


def _register(dtype):
    argtypes = _argument_types(dtype)
    _gemm_batch.compile(argtypes)
    result = _gemm_batch.overloads[argtypes]
    address = result.library.get_pointer_to_function(result.fndesc.llvm_func_name)
    llvm.add_symbol(_symbol(dtype), address)


# Before any kernel that calls it is compiled or loaded from the disk cache (its code
# names the symbol, resolved when it is loaded).
for _dtype in (types.float32, types.float64):
    _register(_dtype)


@intrinsic
def _call_gemm_batch(typingctx, arguments):
    """``_gemm_batch(*arguments)`` through its symbol; arrays flat, contiguous and of
    one float dtype."""
    values = getattr(arguments, "types", ())
    places = (3, 7, 10, 13)
    arrays = [values[i] for i in places] if len(values) == 19 else []
    dtype = getattr(arrays[0], "dtype", None) if arrays else None
    if (dtype not in (types.float32, types.float64)
            or any(not isinstance(t, types.Array) or t.ndim != 1 or t.layout != "C"
                   or not t.aligned or t.dtype != dtype for t in arrays)
            or not arrays[2].mutable
            or any(not isinstance(t, types.Integer)
                   for i, t in enumerate(values) if i not in places)):
        raise errors.TypingError(
            "gemm_batch: 19 arguments, the arrays flat, C-contiguous, aligned and of one "
            f"float dtype (C writable), the others integers; got {values}")
    argtypes = _argument_types(dtype)
    signature = types.none(arguments)

    def codegen(context, builder, sig, args):
        function_type = context.call_conv.get_function_type(types.none, argtypes)
        function = cgutils.get_or_insert_function(builder.module, function_type,
                                                  _symbol(dtype))
        members = cgutils.unpack_tuple(builder, args[0], len(argtypes))
        members = [context.cast(builder, v, t, to)
                   for v, t, to in zip(members, values, argtypes)]
        status, _ = context.call_conv.call_function(builder, function, types.none,
                                                    argtypes, members)
        # It raises nothing as compiled, but would under NUMBA_BOUNDSCHECK=1.
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()

    return signature, codegen


@njit(inline="always")
def gemm_batch(m, n, k, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, init,
               init_off, count, b_step, c_step, start):
    """``_gemm_batch``, called by its symbol (compiled once, not with each caller)."""
    _call_gemm_batch((m, n, k, a, a_off, lda, a_step, b, b_off, ldb, c, c_off, ldc, init,
                      init_off, count, b_step, c_step, start))


@njit(inline="always")
def gemm(m, n, k, a, a_off, lda, b, b_off, ldb, c, c_off, ldc, init, init_off):
    """``C = init + A @ B``, ``init[init_off + i]`` starting row ``i``: ``gemm_batch``
    of one product."""
    gemm_batch(m, n, k, a, a_off, lda, 1, b, b_off, ldb, c, c_off, ldc, init, init_off,
               1, 0, 0, FROM_ROW_INIT)


@njit(inline="always")
def gemm_add(m, n, k, a, a_off, lda, b, b_off, ldb, c, c_off, ldc):
    """``C += A @ B``, each element's chain going on from its value in C (a sum over
    several products in a fixed order: one chain, as if they were one product)."""
    gemm_batch(m, n, k, a, a_off, lda, 1, b, b_off, ldb, c, c_off, ldc, c, 0, 1, 0, 0,
               FROM_C)


@njit(cache=True, boundscheck=False, error_model="numpy", nogil=True)
def gemm_taps(m, n, k, a, a_off, lda, taps, b, b_off, ldb, c, c_off, ldc, init, init_off,
              start):
    """``gemm_batch`` of one product whose ``A[i, k]`` is at ``a[a_off + i*lda +
    taps[k]]``: A's columns at any offsets (``taps``, intp), such as a convolution's
    taps in a padded channels-last input, read in place (an implicit GEMM, no columns
    gathered). The same tiles, so each element of C is the same one chain of fused
    multiply-adds over ``k`` in order from its start as ``gemm_batch`` makes. Compiled
    into its callers (not called by a symbol as ``gemm_batch`` is: one kernel uses
    it)."""
    nr = VECTORS * (_BYTES // c.itemsize)
    if k == 0:
        if start != FROM_C:
            for i in range(m):
                for j in range(n):
                    c[c_off + i * ldc + j] = init[
                        init_off + (i if start == FROM_ROW_INIT else j)]
        return
    for k0 in range(0, k, KC):
        kc = min(KC, k - k0)
        mode = start if k0 == 0 else FROM_C
        steps = taps[k0:k0 + kc]
        for i in range(0, m, MR):
            for j in range(0, n, nr):
                first = init_off + (i if start == FROM_ROW_INIT else j)
                tile(min(MR, m - i), kc, a, a_off + i * lda, lda, steps, b,
                     b_off + k0 * ldb + j, ldb, c, c_off + i * ldc + j, ldc,
                     min(nr, n - j), init, first, nr, mode)


def padded_host(n, dtype):
    """``padded`` for Python callers."""
    per_line = _LINE // np.dtype(dtype).itemsize
    lines = -(-n // per_line)
    return (lines + 1 - lines % 2) * per_line
