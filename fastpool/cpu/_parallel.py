"""Parallel launches of serial kernel bodies, through one compiled parallel loop.

The pooling kernels are specialised on their window's constants (one compile per
geometry, ``Window.constants``). Compiled with ``parallel=True``, each of them went
through Numba's parfor passes and had its loop body compiled a second time as a gufunc:
about four times the cost of the same code compiled serially (measured: 10-13 s against
2.7-3.4 s for one max or average forward on this 2-core machine), and almost all of a
first test run's time.

So each specialised kernel is compiled serially, as a *body* ``body(*args, worker,
workers)`` that does worker ``worker``'s fixed share of the work, and a single parallel
loop, ``_run``, compiled once per tuple of argument *types* (not per geometry), calls
the body through its address on ``workers`` threads of Numba's threading layer. The
values and the order of every operation are the body's own, so results are the same as
before and identical at any thread count. Launch cost is that of any parallel region
(a few microseconds); a single worker calls the body directly.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# Compile options of a kernel body: the kernels' own (``_pool_common.JIT``), serial.
BODY_JIT = dict(cache=True, boundscheck=False, error_model="numpy", nogil=True)


@intrinsic
def _call(typingctx, address, args):
    """Call the compiled Numba function at ``address`` (Numba's calling convention,
    returning None) with the values of the tuple ``args``; 1 if it raised, else 0."""
    signature = types.int64(address, args)

    def codegen(context, builder, sig, values):
        argtypes = list(args.types)
        function_type = context.call_conv.get_function_type(types.none, argtypes)
        pointer = builder.inttoptr(values[0], function_type.as_pointer())
        members = cgutils.unpack_tuple(builder, values[1], len(argtypes))
        status, _ = context.call_conv.call_function(builder, pointer, types.none,
                                                    argtypes, members)
        return builder.select(status.is_ok, context.get_constant(types.int64, 0),
                              context.get_constant(types.int64, 1))

    return signature, codegen


@njit(parallel=True, cache=True, nogil=True)
def _run(address, workers, args):
    failed = 0
    for worker in prange(workers):
        failed += _call(address, args + (np.int64(worker), np.int64(workers)))
    return failed


def _type_key(value):
    if isinstance(value, np.ndarray):
        return value.dtype, value.ndim, value.flags.num
    return type(value)


def _describe(value):
    """A description of a closure constant that is the same in every process."""
    if isinstance(value, (bool, int, float, str, type(None), np.dtype, np.generic)):
        return repr(value)
    if isinstance(value, tuple):
        return "(" + ",".join(_describe(v) for v in value) + ")"
    function = getattr(value, "py_func", value)
    name = getattr(function, "__qualname__", None)
    if name is None:
        return type(value).__qualname__
    # a helper made by a factory too: its own constants
    cells = getattr(function, "__closure__", None) or ()
    inner = ",".join(_describe(c.cell_contents) for c in cells)
    return f"{getattr(function, '__module__', '')}.{name}[{inner}]"


def _named_for_its_constants(body):
    """``body``, compiled under a name that includes its closure's constants.

    The bodies are closures made by factories, one per geometry (the constants), all
    with one ``__qualname__``. Numba names a compiled function by its qualified name,
    argument types and a counter that restarts in every process, so two geometries'
    bodies loaded from the disk cache (compiled in different processes) can carry the
    same symbol, and the address looked up by that name (``Kernel._address``) can be
    the other geometry's function: measured, a process that loaded such a pair wrote
    out of bounds and crashed. With the constants in the name, equal symbols mean
    equal code. The body is made again from its Python function so that its cache
    files carry the name too (entries under the old name are never read)."""
    function = body.py_func
    cells = function.__closure__
    if not cells:
        return body
    digest = hashlib.sha1("|".join(_describe(c.cell_contents) for c in cells)
                          .encode()).hexdigest()[:12]
    function.__qualname__ = f"{function.__qualname__}_{digest}"
    return njit(**BODY_JIT)(function)


class Kernel:
    """``kernel(*args, workers)``: ``body(*args, worker, workers)`` for every ``worker``
    in ``range(workers)``, in parallel. ``body`` is a serial ``njit`` function returning
    nothing; its address is looked up once per tuple of argument types."""

    __slots__ = ("body", "_addresses")

    def __init__(self, body):
        self.body = _named_for_its_constants(body)
        self._addresses = {}

    def launch(self, workers, *args):
        """``self(*args, workers)``, cheaper for one worker (no slicing of ``args``)."""
        if workers <= 1:
            self.body(*args, 0, 1)
        else:
            self(*args, workers)

    def __call__(self, *args):
        if args[-1] <= 1:  # one worker: the body itself, no parallel region
            self.body(*args[:-1], 0, 1)
            return
        workers = args[-1]
        args = args[:-1]
        key = tuple(map(_type_key, args))
        address = self._addresses.get(key)
        if address is None:
            address = self._addresses[key] = self._address(args)
        failed = _run(address, workers, args)
        if failed:
            # The kernels' bodies raise nothing but a failed scratch allocation.
            raise MemoryError(f"{failed} of {workers} workers of kernel "
                              f"{self.body.py_func.__qualname__} could not allocate "
                              "their scratch buffers")

    def _address(self, args):
        argtypes = tuple(numba.typeof(a) for a in args) + (types.int64, types.int64)
        self.body.compile(argtypes)
        result = self.body.overloads[argtypes]
        if result.signature.return_type != types.none:
            raise TypeError(f"kernel body {self.body.py_func.__qualname__} must return None")
        return result.library.get_pointer_to_function(result.fndesc.llvm_func_name)


def parallel_kernel(body):
    """The ``Kernel`` running ``body`` (decorate a body's ``njit`` function with it)."""
    return Kernel(body)
