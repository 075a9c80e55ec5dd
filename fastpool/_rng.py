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


_PYTHON_FUNCTIONS = (("mix64", _mix64), ("plane_key", _plane_key), ("uniform", _uniform))


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


def uniform_host(seed, n, c, oh, ow):
    """Draw the ``u`` of window ``(n, c, oh, ow)`` from Python (for tests and debugging)."""
    return float(uniform(np.uint64(plane_key(np.uint64(seed), n, c)), oh, ow))
