"""Every public op on small fixed inputs, for the process- and thread-level tests.

``every_op()`` returns ``{name: zero-argument callable}``; each callable returns a tuple
of NumPy arrays. ``digest()`` turns the results into bytes, so results computed in a
forked child, a DataLoader worker or another thread can be compared bitwise with the
parent's. Geometries are among ``conftest.GEOMETRIES`` (already compiled and cached);
the convolutions cover the direct, rows, im2col and Winograd algorithms, conv1d and
conv3d and a transposed convolution; the pools include 1-D, 3-D, channels-last and
adaptive calls and unpooling.
"""

from __future__ import annotations

import hashlib

import numpy as np

import fastpool


def _arrays(result):
    if isinstance(result, tuple):
        return tuple(np.asarray(r) for r in result if r is not None)
    return (np.asarray(result),)


def every_op(dtype=np.float32, seed=2026):
    rng = np.random.default_rng(seed)
    x = rng.random((2, 8, 9, 10)).astype(dtype)  # >= 0, as stochastic pooling needs
    w = rng.standard_normal((8, 8, 3, 3)).astype(dtype)
    w_small = rng.standard_normal((6, 8, 2, 3)).astype(dtype)
    w_depthwise = rng.standard_normal((8, 1, 3, 3)).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    pool = dict(kernel_size=3, stride=2, padding=1)
    go_pool = rng.standard_normal((2, 8, 5, 5)).astype(dtype)
    _, max_indices = fastpool.max_pool2d(x, **pool, return_indices=True)
    _, picks = fastpool.stochastic_pool2d(x, **pool, seed=5, return_indices=True)
    go_conv = rng.standard_normal((2, 8, 9, 10)).astype(dtype)
    go_strided = rng.standard_normal((2, 6, 4, 4)).astype(dtype)
    go_depthwise = rng.standard_normal((2, 8, 9, 10)).astype(dtype)
    v = rng.random((2, 3, 4, 5, 6)).astype(dtype)  # 1-D and 3-D ops, channels-last
    v_last = np.moveaxis(np.ascontiguousarray(np.moveaxis(v, 1, -1)), -1, 1)
    w3 = rng.standard_normal((4, 3, 2, 3, 3)).astype(dtype)
    w1 = rng.standard_normal((4, 3, 3)).astype(dtype)
    ops = {
        "conv2d winograd": lambda: fastpool.conv2d(x, w, b, padding=1),
        "conv2d im2col": lambda: fastpool.conv2d(x, w_small, stride=2),
        "conv2d direct": lambda: fastpool.conv2d(x, w_depthwise, padding=1, groups=8),
        "conv2d_backward winograd": lambda: fastpool.conv2d_backward(go_conv, x, w,
                                                                     padding=1),
        "conv2d_backward im2col": lambda: fastpool.conv2d_backward(go_strided, x,
                                                                   w_small, stride=2),
        "conv2d_backward direct": lambda: fastpool.conv2d_backward(
            go_depthwise, x, w_depthwise, padding=1, groups=8),
        "max_pool2d": lambda: fastpool.max_pool2d(x, **pool, return_indices=True),
        "max_pool2d_backward": lambda: fastpool.max_pool2d_backward(go_pool, x, **pool),
        "max_pool2d_backward indices": lambda: fastpool.max_pool2d_backward(
            go_pool, x, **pool, indices=max_indices),
        "avg_pool2d": lambda: fastpool.avg_pool2d(x, **pool),
        "avg_pool2d_backward": lambda: fastpool.avg_pool2d_backward(go_pool, x, **pool),
        "stochastic_pool2d train": lambda: fastpool.stochastic_pool2d(
            x, **pool, seed=5, return_indices=True),
        "stochastic_pool2d_backward train": lambda: fastpool.stochastic_pool2d_backward(
            go_pool, x, **pool, indices=picks),
        "stochastic_pool2d infer": lambda: fastpool.stochastic_pool2d(
            x, **pool, training=False),
        "stochastic_pool2d_backward infer": lambda: fastpool.stochastic_pool2d_backward(
            go_pool, x, **pool, training=False),
        "max_pool3d channels-last": lambda: fastpool.max_pool3d(v_last, **pool,
                                                                return_indices=True),
        "avg_pool1d": lambda: fastpool.avg_pool1d(v[:, :, 0, 0], **pool),
        "stochastic_pool3d": lambda: fastpool.stochastic_pool3d(v, **pool, seed=3),
        "conv1d": lambda: fastpool.conv1d(v[:, :, 0, 0], w1, padding=1),
        "conv3d": lambda: fastpool.conv3d(v, w3, padding=1),
        "conv3d_backward": lambda: fastpool.conv3d_backward(
            fastpool.conv3d(v, w3, padding=1), v, w3, padding=1),
        "adaptive_avg_pool2d": lambda: fastpool.adaptive_avg_pool2d(x, (4, 3)),
        "adaptive_avg_pool3d_backward channels-last": lambda: (
            fastpool.adaptive_avg_pool3d_backward(
                fastpool.adaptive_avg_pool3d(v_last, (3, 2, 4)), v_last, (3, 2, 4))),
        "adaptive_max_pool1d": lambda: fastpool.adaptive_max_pool1d(
            v[:, :, 0, 0], 4, return_indices=True),
        "adaptive_max_pool2d_backward": lambda: fastpool.adaptive_max_pool2d_backward(
            go_pool[:, :, :3, :4], x, (3, 4)),
        "max_unpool2d": lambda: fastpool.max_unpool2d(
            fastpool.max_pool2d(x, **pool), max_indices, **pool, output_size=x.shape[2:]),
        "conv_transpose2d_backward": lambda: fastpool.conv_transpose2d_backward(
            fastpool.conv_transpose2d(x, w, stride=2, padding=1), x, w, stride=2,
            padding=1),
    }
    return {name: (lambda op=op: _arrays(op())) for name, op in ops.items()}


def digest(arrays):
    """Bytes that change with any bit, dtype or shape of ``arrays``."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def run_all(dtype=np.float32):
    """``{name: digest}`` of every op, computed in this process."""
    return {name: digest(op()) for name, op in every_op(dtype).items()}
