"""``fastpool.cpu._vector_width``: kernels that call ``narrow_vectors()`` compile without
512-bit vectors they do not write themselves; other code compiles as before.

Functions here are compiled afresh (``cache=False``: Numba shows no code of functions
loaded from its disk cache). Where Numba compiles for a CPU whose 512-bit code LLVM
does not avoid by itself, the unmarked control function must show 512-bit registers,
else the comparison proves nothing and is skipped.
"""

import re

import numpy as np
import pytest
from numba import njit

import fastpool.cpu  # noqa: F401  (installs the wrapper)
from fastpool.cpu import _vector_width as vw


def _mean_rows(x, narrow):
    """``x`` of shape (rows, C) float32: each row doubled, divided by ``sizes[row]`` (int64) in
    float64 and rounded once (the average kernels' rule), through a scratch row from ``np.empty``,
    whose Numba runtime helper LLVM inlines (and with it, once, dropped the attribute)."""
    rows, C = x.shape
    U = np.uint64  # unsigned indices, as the kernels write them: no wraparound code

    def body(x, out, sizes):
        if narrow:
            vw.narrow_vectors()
        acc = np.empty(C, x.dtype)
        for r in range(rows):
            for c in range(C):
                acc[U(c)] = x[U(r), U(c)] + x[U(r), U(c)]
            size = sizes[U(r)]
            for c in range(C):
                out[U(r), U(c)] = np.float64(acc[U(c)]) / size

    return njit(cache=False)(body)


def _zmm(function):
    return len(re.findall(r"%zmm\d+", function.inspect_asm(function.signatures[0])))


def test_installed():
    assert vw.installed()


def test_narrow_kernel_has_no_512_bit_code_and_the_same_bits():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 67)).astype(np.float32)
    wide, narrow = _mean_rows(x, False), _mean_rows(x, True)
    out_wide, out_narrow = np.empty_like(x), np.empty_like(x)
    sizes = np.array([3, 5, 7, 9, 2**40 + 1])
    wide(x, out_wide, sizes)
    narrow(x, out_narrow, sizes)
    want = ((np.float64(x) + np.float64(x)).astype(np.float32).astype(np.float64)
            / sizes[:, None]).astype(np.float32)
    np.testing.assert_array_equal(out_wide.view(np.int32), want.view(np.int32))
    np.testing.assert_array_equal(out_narrow.view(np.int32), want.view(np.int32))
    if _zmm(wide) == 0:
        pytest.skip("Numba's code uses no 512-bit registers on this CPU")
    assert _zmm(narrow) == 0


def test_kernels_that_write_wide_vectors_keep_them_when_narrowed():
    """``allow_vector_bits`` (the GEMM tile's codegen) wins over ``narrow_vectors``."""
    from fastpool.cpu._microkernel import FROM_ROW_INIT, VECTORS, _full_3

    if VECTORS != 3:
        pytest.skip("the tile is 256-bit on this CPU")

    @njit(cache=False)
    def tile(a, b, c, init):
        vw.narrow_vectors()
        _full_3(8, 16, a, 0, 16, 1, b, 0, 48, c, 0, 48, 48, init, 0, FROM_ROW_INIT)

    rng = np.random.default_rng(8)
    a = rng.standard_normal(128).astype(np.float32)
    b = rng.standard_normal(768).astype(np.float32)
    c = np.zeros(384, np.float32)
    tile(a, b, c, np.zeros(8, np.float32))
    code = tile.inspect_asm(tile.signatures[0])
    assert len(re.findall(r"vfmadd\w+\s+[^\n]*%zmm", code)) >= 24


def test_fastpool_narrowed_kernel_in_a_fresh_process(tmp_path):
    """The channels-last global average (``narrow_vectors()``, float64 division),
    compiled in a process with an empty disk cache, has no 512-bit code where an
    unmarked copy of it has."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import re, types
        import numpy as np
        from numba import njit
        from fastpool.cpu import pool_adaptive, _vector_width
        body = pool_adaptive.global_avg_channels_last.body
        x = np.ones((1, 49, 512), np.float32)
        out = np.empty((1, 512), np.float32)
        body(x, out, np.float32(0), 512, 0, 1)
        def zmm(f):
            return len(re.findall(r"%zmm", f.inspect_asm(f.signatures[0])))
        # the same code without the call: narrow_vectors() replaced by a no-op
        source = body.py_func
        g = dict(source.__globals__, narrow_vectors=njit(lambda: None))
        copy = types.FunctionType(source.__code__, g, "copy")
        control = njit(cache=False)(copy)
        control(x, out, np.float32(0), 512, 0, 1)
        print(zmm(body), zmm(control))
    """)
    env = dict(__import__("os").environ, NUMBA_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    narrowed, control = map(int, result.stdout.split()[-2:])
    if control == 0:
        pytest.skip("Numba's code uses no 512-bit registers on this CPU")
    assert narrowed == 0


def test_narrowed_text():
    text = "\n".join([
        "define void @a(ptr %x) local_unnamed_addr #0 {",
        "define void @b(ptr %x) #1 {",
        "define void @c(ptr %x) {",
        "define void @d(ptr %x) local_unnamed_addr {",
        "define void @e(ptr %x) personality ptr @p {",
        "declare void @f(ptr) #0",
        "attributes #0 = { nounwind }",
        f'attributes #1 = {{ "{vw.ATTRIBUTE}"="512" }}',
    ])
    lines = vw.narrowed(text).split("\n")
    assert lines[0] == "define void @a(ptr %x) local_unnamed_addr #2 {"
    assert lines[1] == "define void @b(ptr %x) #1 {"  # asked for 512: kept
    assert lines[2] == "define void @c(ptr %x) #3 {"
    assert lines[3] == "define void @d(ptr %x) local_unnamed_addr #3 {"
    assert lines[4] == "define void @e(ptr %x) personality ptr @p {"  # left alone
    assert lines[5] == "declare void @f(ptr) #0"
    assert lines[8] == f'attributes #2 = {{ nounwind "{vw.ATTRIBUTE}"="0" }}'
    assert lines[9] == f'attributes #3 = {{ "{vw.ATTRIBUTE}"="0" }}'
    assert len(lines) == 10


def test_allow_vector_bits_only_widens():
    from llvmlite import ir

    module = ir.Module()
    function = ir.Function(module, ir.FunctionType(ir.VoidType(), []), "f")
    builder = ir.IRBuilder(function.append_basic_block())
    vw.allow_vector_bits(builder, 512)
    vw.allow_vector_bits(builder, 256)
    assert vw._width(function.attributes) == 512
    assert f'"{vw.ATTRIBUTE}"="512"' in str(module)
