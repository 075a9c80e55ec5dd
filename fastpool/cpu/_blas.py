"""GEMM with leading dimensions and ``beta``, callable from Numba kernels.

``np.dot`` inside Numba only multiplies whole contiguous matrices and cannot accumulate,
but the convolution kernels need both: they multiply sub-blocks of larger arrays in
place (``lda``/``ldb``/``ldc``) and accumulate several products into one output
(``beta = 1``). ``gemm`` calls the same BLAS entry point Numba's own ``np.dot`` uses,
``numba_xxgemm`` in Numba's helper library, which forwards to SciPy's
``scipy.linalg.cython_blas`` (so SciPy is a dependency). It is resolved by symbol name,
so kernels that call it stay cacheable on disk.

Parallelism comes from the Numba kernels, one BLAS call per thread, so BLAS itself must
run single-threaded while they run: ``single_threaded_blas()``. Two thread pools on the
same cores slow each other down (see docs/design.md section 9), and OpenBLAS's pthreads
build warns that it may hang when called from inside an OpenMP loop.
"""

from __future__ import annotations

import contextlib
import functools
import threading

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _xxgemm(typingctx, trans_a, trans_b, m, n, k, alpha, a, a_offset, lda, b, b_offset,
            ldb, beta, c, c_offset, ldc):
    """Column-major ``c = alpha * op(a) @ op(b) + beta * c`` on array sub-blocks that
    start at element offsets; returns BLAS's status (0 = ok)."""
    arrays = (a, b, c)
    if not (all(isinstance(t, types.Array) for t in arrays)
            and a.dtype in (types.float32, types.float64)
            and b.dtype == a.dtype and c.dtype == a.dtype):
        return None
    dtype = a.dtype
    sig = types.int32(trans_a, trans_b, m, n, k, alpha, a, a_offset, lda, b, b_offset,
                      ldb, beta, c, c_offset, ldc)

    def codegen(context, builder, signature, args):
        (trans_a_v, trans_b_v, m_v, n_v, k_v, alpha_v, a_v, a_off, lda_v, b_v, b_off,
         ldb_v, beta_v, c_v, c_off, ldc_v) = args
        tys = signature.args
        char = ir.IntType(8)
        intp = context.get_value_type(types.intp)
        void_p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.IntType(32), [
            char, char, char, intp, intp, intp, void_p, void_p, intp, void_p, intp,
            void_p, void_p, intp])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")

        def flag(value):
            return builder.select(value, ir.Constant(char, ord("t")),
                                  ir.Constant(char, ord("n")))

        def as_intp(value, ty):
            return context.cast(builder, value, ty, types.intp)

        def scalar_slot(value, ty):
            return builder.bitcast(
                cgutils.alloca_once_value(builder, context.cast(builder, value, ty, dtype)),
                void_p)

        def data(array_value, array_ty, offset, offset_ty):
            array = context.make_array(array_ty)(context, builder, array_value)
            start = builder.gep(array.data, [as_intp(offset, offset_ty)])
            return builder.bitcast(start, void_p)

        kind = ir.Constant(char, ord("s" if dtype == types.float32 else "d"))
        return builder.call(fn, (
            kind, flag(trans_a_v), flag(trans_b_v),
            as_intp(m_v, tys[2]), as_intp(n_v, tys[3]), as_intp(k_v, tys[4]),
            scalar_slot(alpha_v, tys[5]), data(a_v, tys[6], a_off, tys[7]),
            as_intp(lda_v, tys[8]), data(b_v, tys[9], b_off, tys[10]),
            as_intp(ldb_v, tys[11]), scalar_slot(beta_v, tys[12]),
            data(c_v, tys[13], c_off, tys[14]), as_intp(ldc_v, tys[15])))

    return sig, codegen


@njit(inline="always")
def gemm(trans_a, trans_b, m, n, k, a, a_offset, lda, b, b_offset, ldb, beta, c, c_offset,
         ldc):
    """Row-major ``C = op(A) @ op(B) + beta * C`` on sub-blocks of flat arrays.

    ``op(A)`` is ``m x k``: ``A`` is stored row-major from ``a[a_offset]`` with rows
    ``lda`` elements apart, as ``m x k`` (or ``k x m`` when ``trans_a``); likewise
    ``B`` (``k x n``) and ``C`` (``m x n``). All sizes must be below 2**31 (BLAS ``int``).
    Returns BLAS's status, 0 on success.
    """
    # A row-major matrix is its transpose in column-major order, so compute C^T.
    return _xxgemm(trans_b, trans_a, n, m, k, 1.0, b, b_offset, ldb, a, a_offset, lda,
                   beta, c, c_offset, ldc)


@njit(cache=True)
def _resolve_symbols(a, c):
    # The first call resolves SciPy's BLAS functions under the GIL, before any parallel
    # kernel calls them from worker threads.
    return gemm(False, False, 1, 1, 1, a, 0, 1, a, 0, 1, 0.0, c, 0, 1)


_lock = threading.Lock()
_depth = 0
_restore = None
_resolved = set()


@functools.lru_cache(maxsize=1)
def _libraries():
    """threadpoolctl's controllers of every loaded BLAS (each asks and sets its library's
    thread count with one ctypes call)."""
    import scipy.linalg.cython_blas  # noqa: F401  loads the BLAS the kernels call
    from threadpoolctl import ThreadpoolController
    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@contextlib.contextmanager
def single_threaded_blas(dtype):
    """Run the body with every loaded BLAS limited to one thread (re-entrant across
    threads: the first caller in sets the limit, the last one out restores it). Only
    libraries not at one thread already are touched, with their own thread-count calls:
    ``threadpoolctl.limit`` took about 20 us per convolution call."""
    global _depth, _restore
    import numpy as np

    if dtype not in _resolved:
        status = _resolve_symbols(np.ones(1, dtype), np.zeros(1, dtype))
        if status != 0:
            raise RuntimeError(f"BLAS gemm for {np.dtype(dtype)} failed with status {status}")
        _resolved.add(dtype)
    with _lock:
        if _depth == 0:
            _restore = [(library, library.get_num_threads()) for library in _libraries()]
            for library, threads in _restore:
                if threads != 1:
                    library.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for library, threads in _restore:
                    if threads != 1:
                        library.set_num_threads(threads)
                _restore = None
