"""The N-D engine: time of one call of the 1-D and 3-D ops and of channels-last pooling.

Over device ("cpu", "cuda") x case x dtype. A case is an op on one shape: a small one
(which the CI smoke run times) and issue 14's benchmark shapes. Channels-last cases
pass an array whose strides are those of an ``(N, H, W, C)`` buffer, as image data
usually comes; their results are channels-last too. On "cuda" the arrays live on the
GPU and the timed body waits for it. ``setup`` makes the data and calls the op once,
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
}


def _channels_last(a):
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


class NdForward:
    """Forward of one N-D case."""

    params = [DEVICES, list(ND_CASES), DTYPES]
    param_names = ["device", "case", "dtype"]
    processes = 1
    repeat = (3, 7, 10.0)
    timeout = 300

    def setup(self, device, case, dtype):
        require_device(device)
        op, shape, arg = ND_CASES[case]
        if op.endswith("channels_last") and device != "cpu":
            raise NotImplementedError("channels-last results are host-only for now")
        pin_threads()
        self.device = device
        self.sync = synchronizer(device)
        self.__dict__.update(memo(("NdForward", device, case, dtype),
                                  lambda: self.prepare(op, shape, arg, dtype)))

    def prepare(self, op, shape, arg, dtype):
        name = op.split()[0]
        x = uniform(shape, dtype, rng())
        if op.endswith("channels_last"):
            x = _channels_last(x)
        if "pool" in name:
            (x,) = to_device(self.device, x)
            k, s, p = arg

            def call():
                getattr(fastpool, name)(x, k, s, p, device=self.device)
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
