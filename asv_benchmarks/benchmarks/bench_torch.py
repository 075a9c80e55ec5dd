"""Speed-up over PyTorch (CPU): ``track_speedup_*`` return PyTorch's time divided by
fastpool's (unit "x"; above 1 means fastpool is faster), float32, on the CPU.

Each track times fastpool and its PyTorch peer on the same data, alternating, for
``PAIRS`` pairs (after two untimed warm-up pairs, which also compile the kernels), and
returns the ratio of the medians. Measuring both in one interleaved loop cancels most
of the machine's drift (PyTorch's own times vary by up to 30% between runs on a 2-core
machine), so the ratio is steadier across commits than either time. Both libraries use
``common.THREADS`` threads. Skipped when torch is not installed. For a one-off table
of every op, see ``python -m fastpool bench``.
"""

import time

from .common import (  # first: common pins the thread pools
    CONV_3X3, CONV_DEPTHWISE, CONV_SHAPES, POOL_BIG, POOL_SHAPES, conv_out_shape,
    import_torch, normal, pin_threads, pool_out_shape, require_conv, rng, uniform)

import numpy as np

import fastpool

PAIRS = 9


def interleaved_ratio(ours, peer, pairs=PAIRS):
    """median(peer time) / median(ours time) over ``pairs`` alternating calls."""
    a, b = [], []
    for _ in range(pairs):
        start = time.perf_counter()
        ours()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        peer()
        b.append(time.perf_counter() - start)
    return float(np.median(b) / np.median(a))


def warm(*pairs):
    """Two untimed rounds of every (ours, peer) pair: compile, first touch of memory."""
    for _ in range(2):
        for ours, peer in pairs:
            ours()
            peer()


class _SpeedupTrack:
    """Base: a ``track_`` that times both libraries itself, once per process."""

    unit = "x"
    processes = 1
    repeat = 1
    number = 1
    timeout = 300


class PoolSpeedupVsTorch(_SpeedupTrack):
    """Pooling on (32,64,112,112), k=3, s=2, p=1, float32, against
    ``torch.nn.functional`` (forward) and ``torch.ops.aten`` (backward)."""

    def setup(self):
        torch = import_torch()
        pin_threads()
        F, aten = torch.nn.functional, torch.ops.aten
        x_shape, k, s, p = POOL_SHAPES[POOL_BIG]
        x = uniform(x_shape, "float32", rng())
        _, idx = fastpool.max_pool2d(x, k, s, p, return_indices=True, device="cpu")
        grad = normal(pool_out_shape(x_shape, k, s, p), "float32", rng(1))
        tx, tgrad, tidx = (torch.from_numpy(a) for a in (x, grad, idx))
        self.cases = {
            "max_forward": (lambda: fastpool.max_pool2d(x, k, s, p, device="cpu"),
                            lambda: F.max_pool2d(tx, k, s, p)),
            "avg_forward": (lambda: fastpool.avg_pool2d(x, k, s, p, device="cpu"),
                            lambda: F.avg_pool2d(tx, k, s, p)),
            "max_backward": (
                lambda: fastpool.max_pool2d_backward(grad, x, k, s, p, indices=idx,
                                                     device="cpu"),
                lambda: aten.max_pool2d_with_indices_backward(
                    tgrad, tx, [k, k], [s, s], [p, p], [1, 1], False, tidx)),
            "avg_backward": (
                lambda: fastpool.avg_pool2d_backward(grad, x, k, s, p, device="cpu"),
                lambda: aten.avg_pool2d_backward(tgrad, tx, [k, k], [s, s], [p, p], False,
                                                 True, None)),
        }

    def _ratio(self, name):
        warm(self.cases[name])
        return interleaved_ratio(*self.cases[name])

    def track_speedup_max_pool2d(self):
        """max_pool2d forward vs F.max_pool2d"""
        return self._ratio("max_forward")

    def track_speedup_avg_pool2d(self):
        """avg_pool2d forward vs F.avg_pool2d"""
        return self._ratio("avg_forward")

    def track_speedup_max_pool2d_backward(self):
        """max_pool2d_backward (indices) vs aten.max_pool2d_with_indices_backward"""
        return self._ratio("max_backward")

    def track_speedup_avg_pool2d_backward(self):
        """avg_pool2d_backward vs aten.avg_pool2d_backward"""
        return self._ratio("avg_backward")


class ConvSpeedupVsTorch(_SpeedupTrack):
    """conv2d float32, no bias, against ``F.conv2d`` (forward) and
    ``aten.convolution_backward`` with output_mask (True, True, False) (backward):
    3x3 64->64 on (32,64,56,56) padding 1, and depthwise 3x3 on (32,128,56,56)
    padding 1, groups 128."""

    def setup(self):
        require_conv()
        self.torch = import_torch()
        pin_threads()

    def _case(self, name, backward):
        torch = self.torch
        x_shape, w_shape, stride, padding, groups = CONV_SHAPES[name]
        generator = rng()
        x = normal(x_shape, "float32", generator)
        w = normal(w_shape, "float32", generator, scale=0.1)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        if not backward:
            return (lambda: fastpool.conv2d(x, w, None, stride, padding, 1, groups,
                                            device="cpu"),
                    lambda: torch.nn.functional.conv2d(tx, tw, None, stride, padding, 1,
                                                       groups))
        grad = normal(conv_out_shape(x_shape, w_shape, stride, padding), "float32",
                      generator)
        tgrad = torch.from_numpy(grad)
        return (lambda: fastpool.conv2d_backward(grad, x, w, stride, padding, 1, groups,
                                                 output_mask=(True, True, False),
                                                 device="cpu"),
                lambda: torch.ops.aten.convolution_backward(
                    tgrad, tx, tw, None, [stride, stride], [padding, padding], [1, 1],
                    False, [0, 0], groups, [True, True, False]))

    def _ratio(self, name, backward=False):
        pair = self._case(name, backward)
        warm(pair)
        return interleaved_ratio(*pair)

    def track_speedup_conv2d_3x3(self):
        """conv2d 3x3 64->64 forward vs F.conv2d"""
        return self._ratio(CONV_3X3)

    def track_speedup_conv2d_backward_3x3(self):
        """conv2d_backward 3x3 64->64 (input+weight) vs aten.convolution_backward"""
        return self._ratio(CONV_3X3, backward=True)

    def track_speedup_conv2d_depthwise(self):
        """conv2d depthwise 3x3 forward vs F.conv2d"""
        return self._ratio(CONV_DEPTHWISE)
