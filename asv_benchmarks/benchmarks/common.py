"""Shared pieces of the asv suite: thread pinning, shapes, data builders, devices.

Importing this module pins the thread pools, so every benchmark module imports it
before anything else that could load NumPy's BLAS:

- ``OPENBLAS_NUM_THREADS=1``, set before NumPy is imported (only one thread pool
  runs at a time; fastpool's GEMM convolutions also limit BLAS to one thread per
  Numba worker themselves);
- ``OMP_WAIT_POLICY=PASSIVE`` unless already set (idle OpenMP workers of Numba's or
  PyTorch's pool sleep instead of spinning on the other pool's cores);
- Numba's worker count (and PyTorch's, in the speed-up tracks) = ``THREADS`` =
  ``FASTPOOL_BENCH_THREADS`` if set, else ``min(2, numba.config.NUMBA_NUM_THREADS)``.
  ``THREADS`` is fixed here, at import; it is applied by ``pin_threads()``, which every
  ``setup`` calls first. It must not be applied at import: asv imports the suite once
  in a server process and forks one child per benchmark, and
  ``numba.set_num_threads`` starts Numba's OpenMP threading layer, after which GNU
  OpenMP kills every forked child ("fork() called from a process already using GNU
  OpenMP, this is unsafe").

Only fastpool's public API is used, so the suite also runs against older commits.
"""

import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402

import fastpool  # noqa: E402

THREADS = int(os.environ.get("FASTPOOL_BENCH_THREADS", "0")) or min(
    2, numba.config.NUMBA_NUM_THREADS)


def pin_threads():
    """Apply ``THREADS`` to Numba (call from ``setup``, never at import: see above)."""
    numba.set_num_threads(THREADS)


DEVICES = ["cpu", "cuda"]
DTYPES = ["float32", "float64"]

# Pooling cases: name -> (x shape, kernel_size, stride, padding).
POOL_SHAPES = {
    "small (8,16,32,32) k2s2": ((8, 16, 32, 32), 2, 2, 0),
    "(32,64,112,112) k3s2p1": ((32, 64, 112, 112), 3, 2, 1),
    "(32,128,56,56) k2s2": ((32, 128, 56, 56), 2, 2, 0),
    "(8,512,14,14) k3s1p1": ((8, 512, 14, 14), 3, 1, 1),
}
POOL_BIG = "(32,64,112,112) k3s2p1"

# Convolution cases: name -> (x shape, weight shape, stride, padding, groups).
CONV_SHAPES = {
    "small 3x3 16->16 (4,16,32,32) p1": ((4, 16, 32, 32), (16, 16, 3, 3), 1, 1, 1),
    "3x3 64->64 (32,64,56,56) p1": ((32, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1),
    "7x7 s2 3->64 (32,3,224,224) p3": ((32, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1),
    "3x3 256->256 (32,256,14,14) p1": ((32, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1),
    "1x1 256->512 (32,256,28,28)": ((32, 256, 28, 28), (512, 256, 1, 1), 1, 0, 1),
    "depthwise 3x3 (32,128,56,56) p1 g128": ((32, 128, 56, 56), (128, 1, 3, 3), 1, 1, 128),
}
CONV_3X3 = "3x3 64->64 (32,64,56,56) p1"
CONV_DEPTHWISE = "depthwise 3x3 (32,128,56,56) p1 g128"

SEED = 1234


def rng(offset=0):
    """A fixed-seed generator, so every run and every commit sees the same data."""
    return np.random.default_rng(SEED + offset)


def uniform(shape, dtype, generator):
    """Values in [0, 1): non-negative (stochastic pooling's domain), almost surely no
    ties (max pooling's argmax then does not depend on tie-breaking). Drawn in ``dtype``
    directly: no float64 temporary, which would dominate the ``peakmem_`` figures."""
    return generator.random(shape, dtype=dtype)


def normal(shape, dtype, generator, scale=1.0):
    """Standard normal values times ``scale``, drawn in ``dtype`` directly."""
    a = generator.standard_normal(shape, dtype=dtype)
    if scale != 1.0:
        a *= scale
    return a


def pool_out_shape(x_shape, k, s, p):
    """Output shape of a pool (dilation 1, floor mode)."""
    n, c, h, w = x_shape
    return (n, c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)


def conv_out_shape(x_shape, w_shape, stride, padding):
    """Output shape of a convolution (dilation 1)."""
    n, _, h, w = x_shape
    c_out, _, kh, kw = w_shape
    return (n, c_out, (h + 2 * padding - kh) // stride + 1,
            (w + 2 * padding - kw) // stride + 1)


def require_device(device):
    """Skip (``NotImplementedError``) a ``"cuda"`` case without a real GPU.

    Numba's CUDA simulator counts as no GPU: timing it would be meaningless.
    """
    if device == "cuda":
        if numba.config.ENABLE_CUDASIM or not fastpool.cuda_available():
            raise NotImplementedError("no CUDA GPU")


def to_device(device, *arrays):
    """The arrays as the timed call should see them: NumPy for ``"cpu"``, Numba device
    arrays for ``"cuda"`` (so no host transfer is timed). ``None`` stays ``None``."""
    if device != "cuda":
        return arrays
    from fastpool._dispatch import to_device as copy_to_gpu  # keeps channels-last strides

    return tuple(None if a is None else copy_to_gpu(a) for a in arrays)


def synchronizer(device):
    """A callable the timed body calls after the kernel: waits for the GPU on
    ``"cuda"`` (kernel launches are asynchronous), does nothing on ``"cpu"``."""
    if device != "cuda":
        return _nothing
    import numba.cuda

    return numba.cuda.synchronize


def _nothing():
    pass


def pin_torch_threads(torch):
    """Give PyTorch the same thread count as Numba (both pools never run at once)."""
    torch.set_num_threads(THREADS)


def import_torch():
    """``torch``, or ``NotImplementedError`` (asv: skipped) when it is not installed."""
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch is not installed")
    pin_torch_threads(torch)
    return torch


def require_conv():
    """Skip on commits that predate fastpool's convolution."""
    if not hasattr(fastpool, "conv2d"):
        raise NotImplementedError("this fastpool has no conv2d")


_MEMO = {}


def memo(key, build):
    """``build()``, made once per process for ``key`` (only the last key is kept).

    asv runs ``setup`` again before every timed sample. The benchmarks never modify
    their inputs, so ``setup`` builds the data and makes the warm-up (compiling) call
    once per process through this, and the re-runs cost nothing.
    """
    if key not in _MEMO:
        _MEMO.clear()
        _MEMO[key] = build()
    return _MEMO[key]
