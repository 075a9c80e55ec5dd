"""Counter-based uniform generator keyed by ``(seed, n, c, oh, ow)``.

Stochastic pooling draws one ``u ~ U[0, 1)`` per output window. The draw is a pure
function of the key, so results do not depend on how work is split across threads or
devices. The construction is SplitMix64's: a per-plane key hashed from
``(seed, n, c)``, then ``mix64(key + counter * GAMMA)`` with the counter
``(oh << 32) | ow``; the top 53 bits give a float64 in ``[0, 1)``.

The functions below are plain Python on ``numpy.uint64`` scalars. The CPU kernels call
their ``numba.njit`` versions; the GPU kernels compile the very same Python functions
as CUDA device functions (``compile_with``), so both devices draw identical numbers.
All arithmetic is uint64 (wrapping); mixing in a signed int would turn it into float64
under Numba's typing rules, hence the explicit casts.
"""

import functools
import types
from typing import NamedTuple

import numpy as np
from numba import njit

GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_S11 = np.uint64(11)
_LOW32 = np.uint64(0xFFFFFFFF)
_TWO_POW_MINUS_53 = 1.0 / 9007199254740992.0


def _mix64(z):
    z = (z ^ (z >> _S30)) * _MUL1
    z = (z ^ (z >> _S27)) * _MUL2
    return z ^ (z >> _S31)


def _plane_key(seed, n, c):
    key = mix64(np.uint64(seed) + GAMMA)
    key = mix64((key ^ np.uint64(n)) + GAMMA)
    return mix64((key ^ np.uint64(c)) + GAMMA)


def _uniform(key, oh, ow):
    counter = (np.uint64(oh) << _S32) | (np.uint64(ow) & _LOW32)
    bits = mix64(key + counter * GAMMA)
    # bits >> 11 < 2**53 fits int64 exactly; signed conversion is the cheaper one.
    return np.float64(np.int64(bits >> _S11)) * _TWO_POW_MINUS_53


def _keyed_plane(key, n, c):
    """``plane_key`` of local plane ``(n, c)`` under a kernel key (``kernel_key``)."""
    return plane_key(key[0], np.uint64(n) + key[1], np.uint64(c) + key[2])


def _keyed_uniform(plane, key, od, oh, ow):
    """``uniform`` of local output position ``(od, oh, ow)`` under a kernel key: the
    counter of the global position ``((od + od0) * OH + oh + oh0, ow + ow0)``."""
    row = (np.uint64(od) + key[3]) * key[6] + np.uint64(oh) + key[4]
    return uniform(plane, row, np.uint64(ow) + key[5])


_PYTHON_FUNCTIONS = (("mix64", _mix64), ("plane_key", _plane_key), ("uniform", _uniform),
                     ("keyed_plane", _keyed_plane), ("keyed_uniform", _keyed_uniform))


class Origin(NamedTuple):
    """A seed and where a piece of a larger array sits in it: ``(n, c, od, oh, ow)``
    offsets of the piece's first output and the whole output's height ``out_h``.

    Stochastic kernels given an ``Origin`` instead of a plain seed draw what the whole
    array's call draws at those global positions (``fastpool.dask`` runs each chunk
    so)."""

    seed: int
    n: int = 0
    c: int = 0
    od: int = 0
    oh: int = 0
    ow: int = 0
    out_h: int = 0


def kernel_key(seed, out_h):
    """The seven uint64 a stochastic kernel draws with: ``(seed, n0, c0, od0, oh0, ow0,
    OH)``; ``seed`` an int (a whole array of output height ``out_h``) or an ``Origin``."""
    if not isinstance(seed, Origin):
        seed = Origin(seed, out_h=out_h)
    elif seed.out_h < 1:
        # 0 would key every depth of a 3-D output alike.
        raise ValueError(f"Origin.out_h must be the whole output's height, got {seed.out_h}")
    return tuple(np.uint64(v) for v in seed)


def kernel_key_array(seed, out_h):
    """``kernel_key`` as the uint64 array the CPU kernels take."""
    return np.array(kernel_key(seed, out_h), dtype=np.uint64)


def _wrapping_quietly(function):
    """Run ``function`` as plain Python on NumPy scalars with uint64 wrap-around allowed
    (NumPy warns on it; compiled code wraps silently)."""
    @functools.wraps(function)
    def run(*args):
        with np.errstate(over="ignore"):
            return function(*args)

    return run


def compile_with(decorator, interpreted=False):
    """Compile the generator's Python functions with ``decorator`` (e.g. a CUDA device jit).

    Each function is rebuilt from the same code object over a private namespace in
    which the names it calls are bound to their compiled versions. ``interpreted``:
    the decorator runs them as Python (Numba's CUDA simulator), so silence NumPy's
    overflow warnings on the intended uint64 wrap-around.
    """
    namespace = dict(globals())
    compiled = {}
    for name, function in _PYTHON_FUNCTIONS:
        rebuilt = types.FunctionType(function.__code__, namespace, name)
        if interpreted:
            rebuilt = _wrapping_quietly(rebuilt)
        compiled[name] = namespace[name] = decorator(rebuilt)
    return types.SimpleNamespace(**compiled)


# CPU versions: module globals, so the names inside the functions resolve to them.
mix64 = njit(inline="always", cache=True)(_mix64)
plane_key = njit(inline="always", cache=True)(_plane_key)
uniform = njit(inline="always", cache=True)(_uniform)
keyed_plane = njit(inline="always", cache=True)(_keyed_plane)
keyed_uniform = njit(inline="always", cache=True)(_keyed_uniform)


def uniform_host(seed, n, c, oh, ow):
    """Draw the ``u`` of window ``(n, c, oh, ow)`` from Python (for tests and debugging)."""
    return float(uniform(np.uint64(plane_key(np.uint64(seed), n, c)), oh, ow))
