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
prints the layer in use. The costs measured for each layer are in
docs/site/reliability.md.
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


# Numba's names for layer choices that can only start a thread-safe layer.
_THREAD_SAFE_CHOICES = THREAD_SAFE_LAYERS + ("safe", "threadsafe")


def _thread_safe():
    known = _state["thread_safe"]
    if known is None:
        layer = active_layer()
        if layer is None:
            # Not started (a process whose calls were all small never starts it):
            # the configured choice may already say; else the first launch decides,
            # and until then calls are serialised.
            from numba import config
            if str(config.THREADING_LAYER).lower() not in _THREAD_SAFE_CHOICES:
                return False
            known = True
        else:
            known = layer in THREAD_SAFE_LAYERS
        _state["thread_safe"] = known
    return known


# Work (estimated single-thread nanoseconds, ``cost`` of ``serialised``) below which a
# call runs on the calling thread alone: waking a second thread costs about 10 us on
# an idle machine (measured: avg_pool2d on (1, 6, 28, 28), 17.5 us on one thread, 26 us
# on two), and far more when another process holds that thread's core.
SMALL_WORK_NS = 20_000


def _thread_count_functions():
    """Numba's per-thread ``(get, set)`` of the thread count, without the argument
    checks of ``numba.get_num_threads``/``set_num_threads`` (0.5 us per call pair instead
    of 2 us); the public functions where Numba's internals differ."""
    import numba
    from numba.np.ufunc import parallel
    numba.get_num_threads()  # starts the pool, which binds the internal functions
    get, set_ = (getattr(parallel, "_get_num_threads", None),
                 getattr(parallel, "_set_num_threads", None))
    if callable(get) and callable(set_):
        return get, set_
    return numba.get_num_threads, numba.set_num_threads


_counts = []


class _Calls(threading.local):
    # True while this thread runs a call too small to split whose launcher sizes every
    # kernel from ``thread_count()`` (``serialised(..., loops=False)``): one worker,
    # without changing Numba's thread count (a get and two sets: 0.9 us a call).
    one_worker = False


_calls = _Calls()


def thread_count():
    """This thread's Numba thread count (``numba.get_num_threads()`` without its lock
    and checks: kernels ask it on every call); 1 inside a call too small to split."""
    if _calls.one_worker:
        return 1
    if not _counts:
        _counts.append(_thread_count_functions())
    return _counts[0][0]()


def one_worker():
    """Whether this thread runs a call too small to split (``thread_count() == 1``
    without Numba's count being 1): parallel loops and copies should run serially."""
    return _calls.one_worker


def loop_on_one_thread(kernel, *args):
    """``kernel(*args)`` for a Numba parallel loop (``prange``) reached by a launcher of
    ``serialised(..., loops=False)``: on one thread in a call too small to split."""
    if _calls.one_worker:
        return _one_thread(kernel, args, {})
    return kernel(*args)


def _one_thread(launcher, args, kwargs):
    """Run ``launcher`` with this thread's Numba thread count at 1, then restore it
    (the count is per calling thread, so other threads' calls are unaffected)."""
    if not _counts:
        _counts.append(_thread_count_functions())
    get, set_ = _counts[0]
    before = get()
    if before == 1:
        return launcher(*args, **kwargs)
    set_(1)
    try:
        return launcher(*args, **kwargs)
    finally:
        set_(before)


def _one_worker(launcher, args, kwargs):
    """Run ``launcher`` with ``thread_count()`` at 1 on this thread (``_Calls``)."""
    if _calls.one_worker:  # nested in another small call
        return launcher(*args, **kwargs)
    _calls.one_worker = True
    try:
        return launcher(*args, **kwargs)
    finally:
        _calls.one_worker = False


def serialised(launcher, cost=None, loops=True):
    """Wrap a CPU launcher so that, on a layer that is not thread-safe (``workqueue``),
    one call at a time runs its kernels; on ``tbb`` and ``omp`` it adds one check.

    ``cost(volume)`` estimates the call's single-thread work in nanoseconds from the
    ``fastpool._geometry.Volume`` among its arguments; work under ``SMALL_WORK_NS``
    runs on one thread (docs/design.md section 5): with ``loops`` (the launcher may run
    Numba parallel loops or BLAS directly) by setting Numba's thread count to 1 for the
    call; without, by making ``thread_count()`` answer 1 on this thread, which is
    cheaper: the launcher's kernels (``fastpool.cpu._parallel``) then run one worker,
    and its parallel loops and copies go through ``loop_on_one_thread``/``one_worker``.
    """
    from fastpool._geometry import Volume

    one_thread = _one_thread if loops else _one_worker

    # One flat wrapper: every layer of Python call (and ``*args`` forwarding) costs a
    # fixed 0.3-0.5 us, which a small call pays on top of its kernel.
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        small = False
        if cost is not None:
            for a in args:
                if isinstance(a, Volume):
                    # once per geometry: validation hands every call of it the same
                    # object (1 us a call otherwise)
                    estimate = a.derived(cost, cost)
                    # the estimates are float32's; 8-byte items fill half the vector
                    # lanes and move twice the bytes: twice the time
                    if getattr(args[0], "itemsize", 4) == 8:
                        estimate *= 2
                    small = estimate < SMALL_WORK_NS
                    break
        if _state["thread_safe"] or _thread_safe():
            if not small:
                return launcher(*args, **kwargs)
            if loops or _calls.one_worker:
                return one_thread(launcher, args, kwargs)
            _calls.one_worker = True  # ``_one_worker``, spelt out: a call less
            try:
                return launcher(*args, **kwargs)
            finally:
                _calls.one_worker = False
        with _lock:
            if small:
                return one_thread(launcher, args, kwargs)
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
