"""fastpool's own GEMM (``fastpool.cpu._microkernel``): every element of C is the chain
of fused multiply-adds ``c = fma(A[i, k], B[k, j], c)`` over ``k`` in order from its
row's start value, checked exactly against that chain computed with exact rational
arithmetic, and so the same bits however the product is cut."""

from fractions import Fraction

import numpy as np
import pytest
from numba import njit

from fastpool.cpu._microkernel import (B_SLAB_BYTES, COLUMN_TILE_WIDTH, FROM_C,
                                      FROM_COLUMN_INIT, FROM_ROW_INIT, KC, KC_NARROW, MC,
                                      MC_BYTES, MR, NARROW, VECTORS, _COLUMN_TILES,
                                      aligned_host, block_rows, gemm_add, gemm_batch,
                                      gemm_taps, lanes, padded_host, panel_width,
                                      streams_b)


@njit(cache=True)
def _product(a, b, c, init, ldb, count, b_step, c_step, start=FROM_ROW_INIT):
    m, k = a.shape
    n = c.shape[-1]
    gemm_batch(m, n, k, a.reshape(-1), 0, k, 1, b.reshape(-1), 0, ldb, c.reshape(-1), 0,
               n, init, 0, count, b_step, c_step, start)


def _own(a, b, init, ldb=None, aligned=False):
    """``init + a @ b[t]`` for every ``t`` of ``b`` (``count x k x n``), through
    ``gemm_batch`` with B's rows ``ldb`` apart."""
    count, k, n = b.shape
    ldb = n if ldb is None else ldb
    flat = aligned_host(count * k * ldb, b.dtype) if aligned else np.empty(
        count * k * ldb, b.dtype)
    flat[:] = np.nan  # padding B's rows must never be read
    flat.reshape(count, k, ldb)[:, :, :n] = b
    c = np.full((count, a.shape[0], n), np.nan, a.dtype)
    _product(a, flat, c, init, ldb, count, k * ldb, a.shape[0] * n)
    return c


def _round(value, dtype):
    """``value`` (a Fraction) rounded to nearest-even in ``dtype``."""
    near = dtype.type(float(value))  # float() rounds correctly; a float32 may then be off
    candidates = [near, np.nextafter(near, dtype.type(np.inf)),
                  np.nextafter(near, dtype.type(-np.inf))]
    best = min(candidates, key=lambda v: (abs(Fraction(float(v)) - value),
                                          int(v.view(f"u{dtype.itemsize}")) & 1))
    return best


def _chains(a, b, init):
    """The exact chains of fused multiply-adds, one rounding per step."""
    dtype = a.dtype
    m, k = a.shape
    n = b.shape[1]
    out = np.empty((m, n), dtype)
    for i in range(m):
        for j in range(n):
            c = init[i]
            for p in range(k):
                c = _round(Fraction(float(a[i, p])) * Fraction(float(b[p, j]))
                           + Fraction(float(c)), dtype)
            out[i, j] = c
    return out


_CHAIN_SHAPES = [(7, 5, 19), (6, 3, 16), (1, 1, 1), (13, 4, 9), (5, 2, 3), (7, 5, 8),
                 (4, 3, 4), (2, KC + 3, 3), (2, KC_NARROW + 3, 3), (1, KC_NARROW + 2, 70),
                 (9, 3, 24), (17, 2, 12), (8, 2, 25),
                 # a panel's last 1-2 columns by vectors across rows (``_columns``):
                 # steps of k in blocks of 8 and a tail, 8 rows and fewer; 3-4
                 # columns (the one-vector tile) beside them
                 (8, 19, 49), (5, 16, 26), (11, 9, 28), (3, 24, 51), (10, 13, 50),
                 # the same for 16-lane (512-bit) float32 vectors: panels of 48
                 (9, 3, 32), (7, 4, 48), (6, 5, 45), (8, 16, 97), (6, 24, 98)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, k, n", _CHAIN_SHAPES)
def test_each_element_is_one_chain_of_fused_multiply_adds(dtype, m, k, n):
    rng = np.random.default_rng(20261205)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    init = rng.standard_normal(m).astype(dtype)
    got = _own(a, b[None], init)[0]
    np.testing.assert_array_equal(got, _chains(a, b, init))
    # and not the separately rounded products and sums (the chain is what is tested)
    if dtype == np.float32:
        plain = init[:, None].astype(dtype).copy()
        for p in range(k):
            plain = plain + a[:, p:p + 1] * b[p:p + 1, :]
        assert not np.array_equal(got, plain) or k == 1


@pytest.mark.skipif(not _COLUMN_TILES, reason="the last-column kernel needs 8-row tiles")
def test_last_columns_by_rows_are_covered():
    """The shapes above reach ``_columns`` (a panel's last 1 to ``COLUMN_TILE_WIDTH``
    columns, float32) with steps of ``k`` in whole blocks of 8 and with a tail, and
    with full and part tiles of rows."""
    nr = panel_width(4)
    reach = [(m, k, n % nr) for m, k, n in _CHAIN_SHAPES
             if 0 < n % nr <= COLUMN_TILE_WIDTH]
    assert {last for _, _, last in reach} == set(range(1, COLUMN_TILE_WIDTH + 1))
    assert any(k >= 8 and k % 8 for _, k, _ in reach)
    assert any(k >= 8 and k % 8 == 0 for _, k, _ in reach)
    assert any(m % MR for m, k, _ in reach if k >= 8)
    assert any(m >= MR for m, k, _ in reach if k >= 8)


def test_tiles_of_every_width_are_covered():
    """The shapes above reach tiles of every vector count, full and masked: for each
    dtype, some ``n`` ends a panel with exactly ``v`` vectors' columns and some with
    fewer, for ``v = 1 .. VECTORS``."""
    widths = [n for _, _, n in _CHAIN_SHAPES]
    for itemsize in (4, 8):
        lane, nr = lanes(itemsize), panel_width(itemsize)
        last = {n % nr or nr for n in widths}
        for v in range(1, VECTORS + 1):
            assert v * lane in last
            assert any((v - 1) * lane < n < v * lane for n in last)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_bits_however_the_product_is_cut(dtype):
    """Tiles, panels, slabs of ``k`` (more than ``KC_NARROW``), blocks of ``MC`` rows,
    blocks of rows and columns (the wide product's loops against the narrow one's),
    products batched or one by one, B's row stride: one set of bits."""
    rng = np.random.default_rng(5)
    m, k, n = MC + 2 * MR + 5, KC_NARROW + 37, NARROW * panel_width(4) + 37
    assert n > NARROW * panel_width(np.dtype(dtype).itemsize)  # the whole product is wide
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((3, k, n)).astype(dtype)
    init = rng.standard_normal(m).astype(dtype)
    whole = _own(a, b, init)
    assert np.allclose(whole[1], init[:, None] + a.astype(np.float64) @ b[1], rtol=1e-4,
                       atol=1e-3)
    np.testing.assert_array_equal(
        whole, _own(a, b, init, ldb=padded_host(n, dtype), aligned=True))
    for t in range(3):
        np.testing.assert_array_equal(whole[t], _own(a, b[t:t + 1], init)[0])
    for rows in (slice(0, 1), slice(1, MR + 2), slice(MR + 2, MC + 1), slice(MC + 1, m)):
        np.testing.assert_array_equal(whole[:, rows], _own(a[rows], b, init[rows]))
    for cols in (slice(0, 1), slice(1, 17), slice(17, 30), slice(30, n), slice(9, 70)):
        np.testing.assert_array_equal(whole[:, :, cols],
                                      _own(a, np.ascontiguousarray(b[:, :, cols]), init))


def test_blocks_of_rows_where_b_comes_from_memory():
    """Products whose B fits in L2 keep blocks of ``MC`` rows; larger ones are cut into
    as few blocks as ``MC_BYTES`` of A allow, of nearly equal whole tiles."""
    assert not streams_b(196, KC, 1, 8)
    assert block_rows(512, 196, KC, 1, 8) == MC
    assert streams_b(784, KC, 1, 8) and streams_b(196, KC, 8, 8)
    for m, kc, itemsize in [(512, KC, 8), (128, KC, 8), (600, KC, 8), (1030, 64, 4),
                            (3, 5, 8), (4000, KC, 4)]:
        rows = block_rows(m, 1 << 20, kc, 1, itemsize)
        blocks = -(-m // rows)
        assert rows % MR == 0 and rows * kc * itemsize <= max(MC_BYTES, MR * kc * itemsize)
        fewest = -(-m * kc * itemsize // MC_BYTES)
        assert fewest <= blocks <= fewest + 1  # + 1: blocks of whole tiles
        assert rows - MR < -(-m // blocks) <= rows  # near-equal blocks
    assert block_rows(128, 1 << 20, KC, 1, 8) == -(-128 // MR) * MR  # one block, not 96 + 32
    assert block_rows(0, 1 << 20, KC, 1, 8) > 0  # an empty product's loops stay valid


def test_same_bits_with_tall_blocks_and_copied_panels():
    """Where B comes from memory (``streams_b``): blocks of rows as tall as
    ``MC_BYTES`` allow and B's panels copied before use, the same bits as every other
    cut of the product."""
    rng = np.random.default_rng(6)
    dtype = np.float64
    # wide, and B larger than B_SLAB_BYTES for 3 products but not for 1 (either tile)
    k, count = KC + 37, 3
    n = max(NARROW * panel_width(8) + 37, B_SLAB_BYTES // (2 * KC * 8) + 37)
    assert streams_b(n, KC, count, 8) and not streams_b(n, KC, 1, 8)
    m = MC_BYTES // (KC * 8) + 2 * MR + 5  # two tall blocks
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((count, k, n)).astype(dtype)
    init = rng.standard_normal(m).astype(dtype)
    whole = _own(a, b, init)
    assert np.allclose(whole, init[:, None] + a @ b, rtol=1e-12, atol=1e-10)
    np.testing.assert_array_equal(whole, _own(a, b, init, ldb=n + 5))
    for t in range(count):  # one product: B in L2, blocks of MC, read in place
        np.testing.assert_array_equal(whole[t], _own(a, b[t:t + 1], init)[0])
    for rows in (slice(0, MR + 3), slice(MR + 3, m)):
        np.testing.assert_array_equal(whole[:, rows], _own(a[rows], b, init[rows]))


def test_no_rows_where_b_comes_from_memory():
    """An empty product (no rows of A) whose B would stream from memory does nothing."""
    b = np.ones((1, KC, B_SLAB_BYTES // (KC * 8) + 1))
    c = _own(np.zeros((0, KC)), b, np.zeros(0))
    assert c.shape == (1, 0, b.shape[2])


def test_empty_inner_dimension_gives_the_start_values():
    a = np.zeros((4, 0), np.float32)
    b = np.zeros((1, 0, 5), np.float32)
    init = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(_own(a, b, init)[0], np.repeat(init[:, None], 5, 1))


@njit(cache=True)
def _add(a, b, c):
    m, k = a.shape
    n = c.shape[1]
    gemm_add(m, n, k, a.reshape(-1), 0, k, b.reshape(-1), 0, n, c.reshape(-1), 0, n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cut", [0, 1, 5, KC, KC + 9])
@pytest.mark.parametrize("n", [21, 49, 50])
def test_adding_a_product_goes_on_with_each_chain(dtype, cut, n):
    """``gemm_add`` over the rest of ``k`` after a product over its first ``cut``
    gives the one product's bits (a convolution's kernel rows summed in turn)."""
    rng = np.random.default_rng(11)
    m, k = 2 * MR + 1, KC + 23
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    init = rng.standard_normal(m).astype(dtype)
    whole = _own(a, b[None], init)[0]
    c = _own(np.ascontiguousarray(a[:, :cut]), b[None, :cut], init)[0]
    _add(np.ascontiguousarray(a[:, cut:]), np.ascontiguousarray(b[cut:]), c)
    np.testing.assert_array_equal(c, whole)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, k, n", [(7, 5, 19), (13, KC + 3, 37), (3, 0, 5),
                                     (9, 20, 50)])
def test_chains_may_start_from_a_value_per_column(dtype, m, k, n):
    """``FROM_COLUMN_INIT``: each column's chains start from its own value (a
    channels-last output's bias): the chains of the product turned over."""
    rng = np.random.default_rng(23)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    init = rng.standard_normal(n).astype(dtype)
    c = np.full((m, n), np.nan, dtype)
    _product(a, b, c, init, n, 1, 0, 0, FROM_COLUMN_INIT)
    turned = _own(np.ascontiguousarray(b.T), np.ascontiguousarray(a.T)[None], init)[0]
    np.testing.assert_array_equal(c, turned.T)
    if k:
        np.testing.assert_array_equal(c, _chains(b.T, a.T, init).T)


@njit(cache=True)
def _product_by_columns(at, b, c, init):
    """``init + A @ B`` with ``A`` read by columns from ``at`` (``A^T``, ``k x m``)."""
    k, m = at.shape
    n = c.shape[1]
    gemm_batch(m, n, k, at.reshape(-1), 0, 1, m, b.reshape(-1), 0, n, c.reshape(-1), 0,
               n, init, 0, 1, 0, 0, FROM_ROW_INIT)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [5, 40, 200])
def test_a_read_by_columns_gives_the_same_bits(dtype, n):
    """``A[i, k]`` at ``i + k*m`` (a weight read transposed, in place) against ``A``
    by rows: the narrow and the wide products' loops, ``k`` over several slabs."""
    rng = np.random.default_rng(31)
    m, k = 2 * MR + 3, KC_NARROW + 11
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    init = rng.standard_normal(m).astype(dtype)
    c = np.full((m, n), np.nan, dtype)
    _product_by_columns(np.ascontiguousarray(a.T), b, c, init)
    np.testing.assert_array_equal(c, _own(a, b[None], init)[0])


@njit(cache=True)
def _product_by_taps(a, a_off, lda, taps, b, c, init, start):
    m, n = c.shape
    gemm_taps(m, n, taps.size, a, a_off, lda, taps, b.reshape(-1), 0, n, c.reshape(-1),
              0, n, init, 0, start)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, k, n", [(7, 5, 19), (MR, 27, 32), (MR + 1, KC + 9, 20),
                                     (1, 1, 1), (9, 3, 2 * panel_width(4) + 1), (4, 0, 3)])
@pytest.mark.parametrize("start", [FROM_ROW_INIT, FROM_COLUMN_INIT, FROM_C])
def test_a_at_a_table_of_offsets_gives_the_same_chains(dtype, m, k, n, start):
    """``gemm_taps``: ``A[i, k]`` at ``a[a_off + i*lda + taps[k]]`` (offsets in any
    order, repeated too), each element the exact chain from its start (a row's or a
    column's value, or C's), over several slabs of ``k`` and partial tiles."""
    rng = np.random.default_rng(37)
    lda, a_off = 5, 3
    taps = rng.permutation(4 * k + 8)[:k].astype(np.intp)
    if k > 2:
        taps[1] = taps[2]  # an implicit GEMM's taps may share a value
    a = rng.standard_normal(a_off + (m - 1) * lda + 4 * k + 8).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    init = rng.standard_normal(max(m, n)).astype(dtype)
    c = rng.standard_normal((m, n)).astype(dtype)
    before = c.copy()
    _product_by_taps(a, a_off, lda, taps, b, c, init, start)
    gathered = np.array([[a[a_off + i * lda + t] for t in taps] for i in range(m)],
                        dtype).reshape(m, k)
    if start == FROM_ROW_INIT:
        expected = _chains(gathered, b, init[:m])
    elif start == FROM_COLUMN_INIT:
        expected = _chains(b.T, gathered.T, init[:n]).T if m and n else c
    else:
        expected = np.array([[_chains(gathered[i:i + 1], b[:, j:j + 1],
                                      before[i, j:j + 1])[0, 0] for j in range(n)]
                             for i in range(m)], dtype).reshape(m, n)
    if k == 0 and start == FROM_C:
        expected = before
    elif k == 0:
        expected = np.broadcast_to(init[:m, None] if start == FROM_ROW_INIT else init[:n],
                                   (m, n))
    np.testing.assert_array_equal(c, expected)


# The features of an AVX2 machine (Haswell's), for a child process compiling for one.
_AVX2 = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+lzcnt,+mmx,+movbe,"
         "+popcnt,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")
_SHAPES = [(13, 300, 49), (9, KC_NARROW + 7, 130), (3, 5, 7)]

_CHILD = """
import sys
import numpy as np
from fastpool.cpu import _microkernel as mk
assert (mk.MR, mk.VECTORS, mk.ALIGN_B_ROWS) == (6, 2, True), (mk.MR, mk.VECTORS)
out = {}
data = np.load(sys.argv[1])
for key in sorted({k.split('_')[0] for k in data.files}):
    a, b, init = data[key + '_a'], data[key + '_b'], data[key + '_init']
    m, k = a.shape
    n = b.shape[1]
    c = np.full(m * n, np.nan, a.dtype)
    mk.gemm_batch(m, n, k, a.reshape(-1), 0, k, 1, b.reshape(-1), 0, n, c, 0, n, init, 0,
                  1, 0, 0, mk.FROM_ROW_INIT)
    out[key] = c.reshape(m, n)
np.savez(sys.argv[2], **out)
"""


def test_the_avx2_tile_gives_the_same_bits(tmp_path):
    """A child process compiling for AVX2 (``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES``)
    takes the 6x16 tile
    (and asks for B's rows on cache lines, ``ALIGN_B_ROWS``); its products have the
    bits of this process's (the 8x48 tile where this CPU has AVX-512): each element is
    the same chain whatever the tile. Skipped on CPUs without AVX2 and FMA, which could
    not run that code."""
    import os
    import subprocess
    import sys

    from numba.core.codegen import get_host_cpu_features
    host = set(get_host_cpu_features().split(","))
    if not {"+avx2", "+fma"} <= host:
        pytest.skip("this CPU cannot run code compiled for AVX2")
    rng = np.random.default_rng(20261206)
    arrays, expected = {}, {}
    for dtype in (np.float32, np.float64):
        for index, (m, k, n) in enumerate(_SHAPES):
            key = f"{np.dtype(dtype).name}{index}"
            a = rng.standard_normal((m, k)).astype(dtype)
            b = rng.standard_normal((k, n)).astype(dtype)
            init = rng.standard_normal(m).astype(dtype)
            arrays.update({key + "_a": a, key + "_b": b, key + "_init": init})
            expected[key] = _own(a, b[None], init)[0]
    np.savez(tmp_path / "in.npz", **arrays)
    # the CPU's name too: features given alone are added to the host CPU's own
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=_AVX2,
               NUMBA_CACHE_DIR=str(tmp_path / "c"))
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    assert sorted(got.files) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.skipif(lanes(4) != 16, reason="64-byte vectors only where the CPU has AVX-512")
def test_the_tile_compiles_to_512_bit_fused_multiply_adds():
    """Where the tile's vectors are 64 bytes, its code uses 512-bit registers (LLVM
    would split them into 256-bit halves for a function marked with a smaller
    ``"min-legal-vector-width"``, as clang marks C functions; Numba marks none): 24
    fused multiply-adds on 512-bit registers, and the exact chains. Compiled afresh
    (Numba shows no code of functions loaded from its disk cache)."""
    import re

    from fastpool.cpu._microkernel import _full_3

    @njit(cache=False)
    def full_tile(a, b, c, init):
        _full_3(8, 16, a, 0, 16, 1, b, 0, 48, c, 0, 48, 48, init, 0, FROM_ROW_INIT)

    rng = np.random.default_rng(20261207)
    a = rng.standard_normal((8, 16)).astype(np.float32)
    b = rng.standard_normal((16, 48)).astype(np.float32)
    init = rng.standard_normal(8).astype(np.float32)
    c = np.full((8, 48), np.nan, np.float32)
    full_tile(a.reshape(-1), b.reshape(-1), c.reshape(-1), init)
    np.testing.assert_array_equal(c, _chains(a, b, init))
    code = full_tile.inspect_asm(full_tile.signatures[0])
    assert len(re.findall(r"vfmadd\w+\s+[^\n]*%zmm", code)) >= 24


@pytest.mark.parametrize("bad", ["float size", "read-only C", "mixed dtypes", "2-D"])
def test_gemm_batch_refuses_other_argument_types(bad):
    """The one registered signature per dtype: anything else is a typing error at
    compile time, not a cast that would write a read-only array or truncate a size."""
    from numba.core.errors import TypingError

    @njit
    def call(m, a, b, c):
        gemm_batch(m, 2, 2, a, 0, 2, 1, b, 0, 2, c, 0, 2, a, 0, 1, 0, 0, FROM_ROW_INIT)

    a = np.ones(4)
    args = {"float size": (2.0, a, a, np.zeros(4)),
            "read-only C": (2, a, a, np.zeros(4)),
            "mixed dtypes": (2, a, a.astype(np.float32), np.zeros(4)),
            "2-D": (2, a, a, np.zeros((2, 2)))}[bad]
    if bad == "read-only C":
        args[3].flags.writeable = False
    with pytest.raises(TypingError, match="gemm_batch"):
        call(*args)
