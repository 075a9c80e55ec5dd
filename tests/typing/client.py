"""Code a user might write, type-checked by ``mypy --strict`` in tests/test_typing.py
(never run). ``assert_type`` pins what a type checker infers; the lines marked
``type: ignore[...]`` must be errors (mypy's ``warn_unused_ignores``, part of
``--strict``, fails if they are not)."""

from typing import Any, Tuple

import numpy as np
from numpy.typing import NDArray
from typing_extensions import assert_type

import fastpool

x32: NDArray[np.float32] = np.zeros((2, 3, 8, 8), np.float32)
x64: NDArray[np.float64] = np.zeros((2, 3, 8, 8))
seq64: NDArray[np.float64] = np.zeros((3, 8))

# A float32 array in, float32 out; indices int64. float16 keeps its dtype too.
assert_type(fastpool.max_pool2d(x32, 2), NDArray[np.float32])
assert_type(fastpool.avg_pool2d(x32.astype(np.float16), 2), NDArray[np.float16])
assert_type(fastpool.avg_pool3d(x64, 2, ceil_mode=True), NDArray[np.float64])
assert_type(fastpool.max_pool2d(x32, 3, 2, 1, return_indices=True),
            Tuple[NDArray[np.float32], NDArray[np.int64]])
assert_type(fastpool.max_pool1d(seq64, 3, 2, 1, 1, False, True),
            Tuple[NDArray[np.float64], NDArray[np.int64]])
y, picks = fastpool.stochastic_pool2d(x32, 2, seed=3, return_indices=True)
assert_type(picks, NDArray[np.int64])
assert_type(fastpool.stochastic_pool2d(x32, 2, training=False), NDArray[np.float32])
assert_type(fastpool.adaptive_avg_pool2d(x32, (None, 1)), NDArray[np.float32])
assert_type(fastpool.adaptive_max_pool2d(x32, 1, True),
            Tuple[NDArray[np.float32], NDArray[np.int64]])
g = fastpool.max_pool2d_backward(np.ones((2, 3, 4, 4), np.float32), x32, 2, indices=picks)
assert_type(g, NDArray[np.float32])
assert_type(fastpool.max_unpool2d(y, picks, 2), NDArray[np.float32])

# Convolution: padding may be a string; backward returns the named tuple.
w = np.zeros((4, 3, 3, 3), np.float32)
out: Any = fastpool.conv2d(x32, w, padding="same", device="cpu")
grads = fastpool.conv2d_backward(out, x32, w, padding="same")
assert_type(grads, fastpool.Conv2dGrads)
assert_type(fastpool.conv_transpose2d(x32, w.transpose(1, 0, 2, 3), stride=2),
            NDArray[np.float32])

# Any other array kind (CuPy, a torch tensor): a result of its kind, typed Any.
other: Any = object()
assert_type(fastpool.max_pool2d(other, 2), Any)

# Devices.
assert_type(fastpool.cuda_available(), bool)
with fastpool.use_device("cpu"):
    assert_type(fastpool.get_device(), str)

# Errors a type checker catches before anything runs.
fastpool.max_pool2d(x32, 2, device="gpu")  # type: ignore[call-overload]
fastpool.avg_pool2d(x32, 2, padding="same")  # type: ignore[arg-type]
fastpool.max_pool2d(x32, 2, return_indice=True)  # type: ignore[call-overload]
fastpool.adaptive_avg_pool2d(x32, 1, True)  # type: ignore[call-overload]
