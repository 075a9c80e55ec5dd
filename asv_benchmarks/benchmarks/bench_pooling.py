"""Pooling: time of one call of each public pooling function, forward and backward.

Every class runs over device ("cpu", "cuda") x shape (``common.POOL_SHAPES``: a small
case and three layers of common CNNs, with their kernel size, stride and padding) x
dtype ("float32", "float64"). The input is uniform in [0, 1) (valid for stochastic
pooling, no ties for max pooling), built with a fixed seed. ``setup`` calls each
timed function once, so compile (or on-disk cache load) time is not timed. On "cuda"
the arrays live on the GPU and the timed body waits for the GPU. Times include
allocating the result, as a user's call does.
"""

from .common import (  # first: common pins the thread pools
    DEVICES, DTYPES, POOL_SHAPES, memo, normal, pin_threads, pool_out_shape,
    require_device, rng, synchronizer, to_device, uniform)

import fastpool


class _Pool:
    """Base: params, timing attributes, and ``setup`` (data + warm-up call, made once
    per benchmark process through ``common.memo``; asv re-runs ``setup`` before every
    sample). One process per benchmark, 3 to 7 samples of one call each."""

    params = [DEVICES, list(POOL_SHAPES), DTYPES]
    param_names = ["device", "shape", "dtype"]
    processes = 1
    repeat = (3, 7, 10.0)
    timeout = 300

    def setup(self, device, shape, dtype):
        require_device(device)
        pin_threads()
        x_shape, self.k, self.s, self.p = POOL_SHAPES[shape]
        self.device = device
        self.sync = synchronizer(device)
        self.__dict__.update(memo((type(self).__name__, device, shape, dtype),
                                  lambda: self.prepare(x_shape, dtype)))

    def forward_data(self, x_shape, dtype):
        """The input ``x`` on the device."""
        return to_device(self.device, uniform(x_shape, dtype, rng()))[0]

    def backward_data(self, x_shape, dtype, indices=None):
        """``dict(x, grad, idx)`` on the device: the input, a normal output gradient,
        and (``indices="max"`` or ``"stochastic"``) the forward's indices."""
        k, s, p = self.k, self.s, self.p
        x, grad = to_device(self.device, uniform(x_shape, dtype, rng()),
                            normal(pool_out_shape(x_shape, k, s, p), dtype, rng(1)))
        idx = None
        if indices == "max":
            _, idx = fastpool.max_pool2d(x, k, s, p, return_indices=True,
                                         device=self.device)
        elif indices == "stochastic":
            _, idx = fastpool.stochastic_pool2d(x, k, s, p, seed=1, return_indices=True,
                                                device=self.device)
        return dict(x=x, grad=grad, idx=idx)


class MaxPool2dForward(_Pool):
    """``max_pool2d`` forward, without and with the int64 argmax indices."""

    def prepare(self, x_shape, dtype):
        x = self.forward_data(x_shape, dtype)
        fastpool.max_pool2d(x, self.k, self.s, self.p, device=self.device)
        fastpool.max_pool2d(x, self.k, self.s, self.p, return_indices=True,
                            device=self.device)
        self.sync()
        return dict(x=x)

    def time_max_pool2d(self, device, shape, dtype):
        """max_pool2d(x, k, s, p)"""
        fastpool.max_pool2d(self.x, self.k, self.s, self.p, device=device)
        self.sync()

    def time_max_pool2d_indices(self, device, shape, dtype):
        """max_pool2d(x, k, s, p, return_indices=True)"""
        fastpool.max_pool2d(self.x, self.k, self.s, self.p, return_indices=True,
                            device=device)
        self.sync()


class MaxPool2dBackward(_Pool):
    """``max_pool2d_backward`` with the forward's indices (no argmax recomputation)."""

    def prepare(self, x_shape, dtype):
        d = self.backward_data(x_shape, dtype, indices="max")
        fastpool.max_pool2d_backward(d["grad"], d["x"], self.k, self.s, self.p,
                                     indices=d["idx"], device=self.device)
        self.sync()
        return d

    def time_max_pool2d_backward(self, device, shape, dtype):
        """max_pool2d_backward(grad, x, k, s, p, indices=idx)"""
        fastpool.max_pool2d_backward(self.grad, self.x, self.k, self.s, self.p,
                                     indices=self.idx, device=device)
        self.sync()


class AvgPool2dForward(_Pool):
    """``avg_pool2d`` forward (count_include_pad=True, PyTorch's default)."""

    def prepare(self, x_shape, dtype):
        x = self.forward_data(x_shape, dtype)
        fastpool.avg_pool2d(x, self.k, self.s, self.p, device=self.device)
        self.sync()
        return dict(x=x)

    def time_avg_pool2d(self, device, shape, dtype):
        """avg_pool2d(x, k, s, p)"""
        fastpool.avg_pool2d(self.x, self.k, self.s, self.p, device=device)
        self.sync()


class AvgPool2dBackward(_Pool):
    """``avg_pool2d_backward`` (count_include_pad=True)."""

    def prepare(self, x_shape, dtype):
        d = self.backward_data(x_shape, dtype)
        fastpool.avg_pool2d_backward(d["grad"], d["x"], self.k, self.s, self.p,
                                     device=self.device)
        self.sync()
        return d

    def time_avg_pool2d_backward(self, device, shape, dtype):
        """avg_pool2d_backward(grad, x, k, s, p)"""
        fastpool.avg_pool2d_backward(self.grad, self.x, self.k, self.s, self.p,
                                     device=device)
        self.sync()


class StochasticPool2dTrainForward(_Pool):
    """``stochastic_pool2d`` training forward with indices (fixed seed)."""

    def prepare(self, x_shape, dtype):
        x = self.forward_data(x_shape, dtype)
        fastpool.stochastic_pool2d(x, self.k, self.s, self.p, training=True, seed=1,
                                   return_indices=True, device=self.device)
        self.sync()
        return dict(x=x)

    def time_stochastic_pool2d_train_indices(self, device, shape, dtype):
        """stochastic_pool2d(x, k, s, p, training=True, seed=1, return_indices=True)"""
        fastpool.stochastic_pool2d(self.x, self.k, self.s, self.p, training=True, seed=1,
                                   return_indices=True, device=device)
        self.sync()


class StochasticPool2dInferForward(_Pool):
    """``stochastic_pool2d`` inference forward (``sum a^2 / sum a`` per window)."""

    def prepare(self, x_shape, dtype):
        x = self.forward_data(x_shape, dtype)
        fastpool.stochastic_pool2d(x, self.k, self.s, self.p, training=False,
                                   device=self.device)
        self.sync()
        return dict(x=x)

    def time_stochastic_pool2d_infer(self, device, shape, dtype):
        """stochastic_pool2d(x, k, s, p, training=False)"""
        fastpool.stochastic_pool2d(self.x, self.k, self.s, self.p, training=False,
                                   device=device)
        self.sync()


class StochasticPool2dTrainBackward(_Pool):
    """``stochastic_pool2d_backward`` in training mode, with the forward's indices."""

    def prepare(self, x_shape, dtype):
        d = self.backward_data(x_shape, dtype, indices="stochastic")
        fastpool.stochastic_pool2d_backward(d["grad"], d["x"], self.k, self.s, self.p,
                                            training=True, indices=d["idx"],
                                            device=self.device)
        self.sync()
        return d

    def time_stochastic_pool2d_train_backward(self, device, shape, dtype):
        """stochastic_pool2d_backward(grad, x, k, s, p, training=True, indices=idx)"""
        fastpool.stochastic_pool2d_backward(self.grad, self.x, self.k, self.s, self.p,
                                            training=True, indices=self.idx,
                                            device=device)
        self.sync()


class StochasticPool2dInferBackward(_Pool):
    """``stochastic_pool2d_backward`` in inference mode (depends on ``x``'s values)."""

    def prepare(self, x_shape, dtype):
        d = self.backward_data(x_shape, dtype)
        fastpool.stochastic_pool2d_backward(d["grad"], d["x"], self.k, self.s, self.p,
                                            training=False, device=self.device)
        self.sync()
        return d

    def time_stochastic_pool2d_infer_backward(self, device, shape, dtype):
        """stochastic_pool2d_backward(grad, x, k, s, p, training=False)"""
        fastpool.stochastic_pool2d_backward(self.grad, self.x, self.k, self.s, self.p,
                                            training=False, device=device)
        self.sync()
