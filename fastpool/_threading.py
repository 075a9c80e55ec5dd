"""Numba threading layer: fork- and thread-safe by default.

Numba's parallel kernels run on one of three threading layers, fixed for the process at
its first parallel compile or launch. On Linux the default pick is GNU OpenMP (``omp``),
which kills a ``fork()``-started child that runs a parallel region after the parent
did ("fork() called from a process already using GNU OpenMP, this is unsafe"): the
default ``multiprocessing`` start method and PyTorch's ``DataLoader`` workers. So
fastpool picks the layer itself, once, when it is imported:

1. If the user chose one (``NUMBA_THREADING_LAYER``, Numba's config file, or
   ``numba.config.THREADING_LAYER`` set before importing fastpool), that choice stands.
2. Else ``tbb`` (Intel oneTBB, the ``tbb`` wheel, a dependency where wheels exist):
   fork-safe and thread-safe. Numba's ``tbbpool`` extension links ``libtbb.so.12`` by
   name, and a pip-installed ``tbb`` puts it in the environment's ``lib/``, which the
   loader does not search, so it is loaded here first (``RTLD_GLOBAL``).
3. Else ``workqueue``: fork-safe, but it aborts when two threads launch kernels at
   once; :func:`serialised` then lets one fastpool call at a time into the kernels.

If Numba's threads were already started before fastpool was imported, the layer
cannot change any more and fastpool uses whatever runs. ``python -m fastpool info``
prints the layer in use. The costs measured for each layer are in the README
("Reliability").
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading

ENV_VAR = "NUMBA_THREADING_LAYER"
# Layers Numba documents as safe for concurrent launches from several threads.
THREAD_SAFE_LAYERS = ("tbb", "omp")

_TBB_NAMES = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}

_lock = threading.RLock()
_state = {"chosen_by": None, "thread_safe": None}


def _tbb_candidates():
    """Paths where the ``tbb`` wheel (or conda) may have put the oneTBB library."""
    name = _TBB_NAMES.get(sys.platform, "libtbb.so.12")
    seen = []
    try:
        from importlib import metadata
        for file in metadata.files("tbb") or ():
            if file.name == name:
                seen.append(str(file.locate()))
    except Exception:  # no tbb distribution, or unreadable metadata
        pass
    for prefix in (sys.prefix, sys.base_prefix, os.environ.get("CONDA_PREFIX")):
        if prefix:
            seen.append(os.path.join(prefix, "lib", name))
            seen.append(os.path.join(prefix, "Library", "bin", name))
    return [path for i, path in enumerate(seen) if path not in seen[:i]]


def load_tbb():
    """Load oneTBB globally and import Numba's ``tbbpool``; whether that worked."""
    for path in _tbb_candidates():
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
                break
            except OSError:
                continue
    try:
        from numba.np.ufunc import tbbpool  # noqa: F401  needs libtbb.so.12 loaded
        from numba.np.ufunc.parallel import _check_tbb_version_compatible
        _check_tbb_version_compatible()
    except Exception:  # ImportError, or a oneTBB too old for this Numba
        return False
    return True


def configure():
    """Pick the threading layer (module docstring); returns who chose it:
    ``"user"``, ``"fastpool"`` or ``"running"`` (threads already started)."""
    from numba import config
    from numba.np.ufunc import parallel

    tbb = load_tbb()  # also lets a user's "tbb", "safe" or "default" find it
    if parallel._is_initialized:
        chosen_by = "running"
    elif str(config.THREADING_LAYER).lower() != "default":
        chosen_by = "user"
    else:
        config.THREADING_LAYER = "tbb" if tbb else "workqueue"
        chosen_by = "fastpool"
    _state["chosen_by"] = chosen_by
    return chosen_by


def active_layer():
    """The threading layer in use, or None before Numba has started its threads."""
    import numba
    try:
        return numba.threading_layer()
    except ValueError:  # threads not launched yet
        return None


def _thread_safe():
    known = _state["thread_safe"]
    if known is None:
        layer = active_layer()
        if layer is None:
            return False  # not started: the first launch decides; serialise it
        known = _state["thread_safe"] = layer in THREAD_SAFE_LAYERS
    return known


def serialised(launcher):
    """Wrap a CPU launcher so that, on a layer that is not thread-safe (``workqueue``),
    one call at a time runs its kernels; on ``tbb`` and ``omp`` it adds one check."""
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        if _thread_safe():
            return launcher(*args, **kwargs)
        with _lock:
            return launcher(*args, **kwargs)
    return run


def describe():
    """One line for ``python -m fastpool info``."""
    layer = active_layer() or "not started"
    who = {"user": "chosen by the user (NUMBA_THREADING_LAYER or numba.config)",
           "fastpool": "chosen by fastpool",
           "running": "already running when fastpool was imported",
           None: "fastpool not configured"}[_state["chosen_by"]]
    return f"{layer} ({who})"
