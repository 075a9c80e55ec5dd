"""The N-D engine: time of one call of the 1-D and 3-D ops (stochastic pooling
included), of channels-last pooling and convolution and of the ops on the engine (adaptive pooling, transposed convolution, unpooling).

Over device ("cpu", "cuda") x case x dtype. A case is an op on one shape: a small one
(which the CI smoke run times) and issue 14's benchmark shapes. Channels-last cases
pass an array whose strides are those of an ``(N, H, W, C)`` buffer, as image data
usually comes; their results are channels-last too, on either device. On "cuda" the
arrays live on the GPU (copied in their layout) and the timed body waits for it. ``setup`` makes the data and calls the op once,
so compile (or cache load) time is not timed.
"""

from .common import (  # first: common pins the thread pools
    DEVICES, DTYPES, memo, normal, pin_threads, require_device, rng, synchronizer,
    to_device, uniform)

import numpy as np

import fastpool

# name -> (op, x shape, argument): pools take (kernel, stride, padding); convolutions
# a weight shape, with padding 1.
ND_CASES = {
    "small max_pool3d (2,4,8,16,16) k3s2p1": ("max_pool3d", (2, 4, 8, 16, 16), (3, 2, 1)),
    "small conv1d (4,16,256) k3": ("conv1d", (4, 16, 256), (16, 16, 3)),
    "conv1d (32,64,4096) k3": ("conv1d", (32, 64, 4096), (64, 64, 3)),
    "max_pool3d (8,32,32,64,64) k3s2p1": ("max_pool3d", (8, 32, 32, 64, 64), (3, 2, 1)),
    "avg_pool3d (8,32,32,64,64) k3s2p1": ("avg_pool3d", (8, 32, 32, 64, 64), (3, 2, 1)),
    "conv3d 3x3x3 (4,32,16,56,56)": ("conv3d", (4, 32, 16, 56, 56), (32, 32, 3, 3, 3)),
    "max_pool2d channels_last (32,64,112,112) k3s2p1": (
        "max_pool2d channels_last", (32, 64, 112, 112), (3, 2, 1)),
    "avg_pool2d channels_last (32,64,112,112) k3s2p1": (
        "avg_pool2d channels_last", (32, 64, 112, 112), (3, 2, 1)),
    "max_pool1d (32,64,4096) k3s2p1": ("max_pool1d", (32, 64, 4096), (3, 2, 1)),
    "avg_pool1d (32,64,4096) k3s2p1": ("avg_pool1d", (32, 64, 4096), (3, 2, 1)),
    "max_pool3d channels_last (8,32,32,64,64) k3s2p1": (
        "max_pool3d channels_last", (8, 32, 32, 64, 64), (3, 2, 1)),
    "avg_pool3d channels_last (8,32,32,64,64) k3s2p1": (
        "avg_pool3d channels_last", (8, 32, 32, 64, 64), (3, 2, 1)),
    "max_pool1d channels_last (32,64,4096) k3s2p1": (
        "max_pool1d channels_last", (32, 64, 4096), (3, 2, 1)),
    "avg_pool1d channels_last (32,64,4096) k3s2p1": (
        "avg_pool1d channels_last", (32, 64, 4096), (3, 2, 1)),
    "small conv2d channels_last (4,16,28,28) 3x3": (
        "conv2d channels_last", (4, 16, 28, 28), (16, 16, 3, 3)),
    "conv1d channels_last (32,64,4096) k3": (
        "conv1d channels_last", (32, 64, 4096), (64, 64, 3)),
    "conv2d channels_last 3x3 (32,64,56,56)": (
        "conv2d channels_last", (32, 64, 56, 56), (64, 64, 3, 3)),
    "conv3d channels_last 3x3x3 (4,32,16,56,56)": (
        "conv3d channels_last", (4, 32, 16, 56, 56), (32, 32, 3, 3, 3)),
    "stochastic_pool1d (32,64,4096) k3s2p1": ("stochastic_pool1d", (32, 64, 4096),
                                              (3, 2, 1)),
    "stochastic_pool3d (8,32,32,64,64) k3s2p1": ("stochastic_pool3d",
                                                 (8, 32, 32, 64, 64), (3, 2, 1)),
    # issue 15's ops
    "small adaptive_avg_pool2d (8,64,7,7) -> 1": ("adaptive_avg_pool2d", (8, 64, 7, 7), 1),
    "adaptive_avg_pool2d (32,2048,7,7) -> 1": ("adaptive_avg_pool2d", (32, 2048, 7, 7), 1),
    "adaptive_avg_pool2d channels_last (32,2048,7,7) -> 1": (
        "adaptive_avg_pool2d channels_last", (32, 2048, 7, 7), 1),
    "conv_transpose2d 64->32 k4 s2 p1 (16,64,64,64)": (
        "conv_transpose2d", (16, 64, 64, 64), (64, 32, 4, 4)),
    "max_unpool2d k2 (32,64,56,56)": ("max_unpool2d", (32, 64, 56, 56), 2),
}


def _channels_last(a):
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


class _NdCases:
    """One call on an N-D case of ``cases``, made (data and a first call) in ``setup``
    by the subclass's ``prepare``."""

    cases = ND_CASES
    param_names = ["device", "case", "dtype"]
    processes = 1
    repeat = (3, 7, 10.0)
    timeout = 300

    def setup(self, device, case, dtype):
        require_device(device)
        op, shape, arg = self.cases[case]
        pin_threads()
        self.device = device
        self.sync = synchronizer(device)
        self.__dict__.update(memo((type(self).__name__, device, case, dtype),
                                  lambda: self.prepare(op, shape, arg, dtype)))


class NdForward(_NdCases):
    """Forward of one N-D case."""

    params = [DEVICES, list(ND_CASES), DTYPES]

    def prepare(self, op, shape, arg, dtype):
        name = op.split()[0]
        x = uniform(shape, dtype, rng())
        if op.endswith("channels_last"):
            x = _channels_last(x)
        if name.startswith("adaptive"):
            (x,) = to_device(self.device, x)

            def call():
                getattr(fastpool, name)(x, arg, device=self.device)
        elif name == "max_unpool2d":
            big = uniform(shape[:2] + tuple(n * arg for n in shape[2:]), dtype, rng(2))
            pooled, indices = to_device(self.device, *fastpool.max_pool2d(
                big, arg, return_indices=True, device="cpu"))

            def call():
                fastpool.max_unpool2d(pooled, indices, arg, device=self.device)
        elif name == "conv_transpose2d":
            x, w = to_device(self.device, x, normal(arg, dtype, rng(1), scale=0.1))

            def call():
                fastpool.conv_transpose2d(x, w, stride=2, padding=1, device=self.device)
        elif "pool" in name:
            (x,) = to_device(self.device, x)
            k, s, p = arg
            seeded = dict(seed=1) if name.startswith("stochastic") else {}

            def call():
                getattr(fastpool, name)(x, k, s, p, device=self.device, **seeded)
        else:
            x, w = to_device(self.device, x, normal(arg, dtype, rng(1), scale=0.1))

            def call():
                getattr(fastpool, name)(x, w, padding=1, device=self.device)
        call()
        self.sync()
        return dict(call=call)

    def time_forward(self, device, case, dtype):
        """the op's forward on the case"""
        self.call()
        self.sync()


# name -> (op, x shape, argument), as ``ND_CASES``: the ops whose backward is timed.
ND_BACKWARD_CASES = {name: case for name, case in ND_CASES.items()
                     if case[0] in ("conv1d", "conv3d", "max_pool3d", "avg_pool3d")
                     or case[0].startswith("conv") and case[0].endswith("channels_last")}


class NdBackward(_NdCases):
    """Backward of one N-D case: pooling's input gradient (max from the forward's
    indices), convolution's input and weight gradients."""

    cases = ND_BACKWARD_CASES
    params = [DEVICES, list(ND_BACKWARD_CASES), DTYPES]

    def prepare(self, op, shape, arg, dtype):
        x = uniform(shape, dtype, rng())
        if op.startswith("conv"):
            name = op.split()[0]
            last = _channels_last if op.endswith("channels_last") else (lambda a: a)
            x = last(x)
            w = normal(arg, dtype, rng(1), scale=0.1)
            y = getattr(fastpool, name)(x, w, padding=1, device="cpu")
            x, w, g = to_device(self.device, x, w, last(normal(y.shape, dtype, rng(2))))
            backward = getattr(fastpool, f"{name}_backward")

            def call():
                backward(g, x, w, padding=1, output_mask=(True, True, False),
                         device=self.device)
        else:
            k, s, p = arg
            if op == "max_pool3d":
                y, indices = fastpool.max_pool3d(x, k, s, p, return_indices=True,
                                                 device="cpu")
                x, g, indices = to_device(self.device, x, normal(y.shape, dtype, rng(2)),
                                          indices)

                def call():
                    fastpool.max_pool3d_backward(g, x, k, s, p, indices=indices,
                                                 device=self.device)
            else:
                y = fastpool.avg_pool3d(x, k, s, p, device="cpu")
                x, g = to_device(self.device, x, normal(y.shape, dtype, rng(2)))

                def call():
                    fastpool.avg_pool3d_backward(g, x, k, s, p, device=self.device)
        call()
        self.sync()
        return dict(call=call)

    def time_backward(self, device, case, dtype):
        """the op's backward on the case"""
        self.call()
        self.sync()
