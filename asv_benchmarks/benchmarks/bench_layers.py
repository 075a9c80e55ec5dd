"""Headline rows of the layer suite (``python -m fastpool bench --suite layers``): one
call of a real network's layer, in NCHW and channels-last, on the CPU; and the fixed
cost of a call on a tiny input.

Over case x layout (float32). A case is one layer at batch 1 or 32; its ``small``
cases are what the CI smoke run times. Channels-last cases pass an array whose strides
are those of an ``(N, H, W, C)`` buffer. ``setup`` makes the data and calls the op
once, so compile (or cache load) time is not timed. Only the public API is used.
"""

from .common import pin_threads, rng  # first: common pins the thread pools

import numpy as np

import fastpool

# name -> (kind, x shape, argument): pools (kernel, stride, padding); conv (out
# channels, kernel, stride, padding, groups); global average pooling None.
LAYER_CASES = {
    "small fixed cost max_pool2d k2 (1,1,4,4)": ("max", (1, 1, 4, 4), (2, 2, 0)),
    "small fixed cost conv2d 3x3 (1,1,4,4)": ("conv", (1, 1, 4, 4), (1, 3, 1, 1, 1)),
    "small lenet5 avgpool 2x2 b1 (1,6,28,28)": ("avg", (1, 6, 28, 28), (2, 2, 0)),
    "resnet18 maxpool 3x3 s2 b1 (1,64,112,112)": ("max", (1, 64, 112, 112), (3, 2, 1)),
    "resnet18 conv 3x3 64->64 b1 (1,64,56,56)": ("conv", (1, 64, 56, 56), (64, 3, 1, 1, 1)),
    "resnet18 conv 3x3 64->64 b32 (32,64,56,56)": (
        "conv", (32, 64, 56, 56), (64, 3, 1, 1, 1)),
    "resnet50 conv 1x1 256->64 b1 (1,256,56,56)": (
        "conv", (1, 256, 56, 56), (64, 1, 1, 0, 1)),
    "resnet50 global avg b32 (32,2048,7,7)": ("global_avg", (32, 2048, 7, 7), None),
    "mobilenet_v2 dw 3x3 b1 (1,144,56,56)": ("conv", (1, 144, 56, 56), (144, 3, 1, 1, 144)),
    "vgg16 conv 3x3 512->512 b1 (1,512,14,14)": ("conv", (1, 512, 14, 14),
                                                 (512, 3, 1, 1, 1)),
    # 2026-12-06: 2x2 max rows as vector code; small pointwise planes on the whole
    # plane; channels-last im2col in transposed blocks (docs/site/performance.md)
    "vgg16 maxpool 2x2 s2 b1 (1,512,14,14)": ("max", (1, 512, 14, 14), (2, 2, 0)),
    "mobilenet_v2 conv 1x1 960->160 b1 (1,960,7,7)": ("conv", (1, 960, 7, 7),
                                                      (160, 1, 1, 0, 1)),
    "resnet18 conv 3x3 s2 64->128 b1 (1,64,56,56)": ("conv", (1, 64, 56, 56),
                                                     (128, 3, 2, 1, 1)),
    # 2026-12-06, sixteenth session: channels-last first layers gather from a
    # channels-first copy of their 3 channels
    "resnet18 conv 7x7 s2 3->64 stem b1 (1,3,224,224)": ("conv", (1, 3, 224, 224),
                                                         (64, 7, 2, 3, 1)),
}
LAYOUTS = ["nchw", "channels_last"]


class LayerForward:
    """Forward of one layer."""

    params = [list(LAYER_CASES), LAYOUTS]
    param_names = ["case", "layout"]
    processes = 1
    repeat = (3, 11, 10.0)
    timeout = 300

    def setup(self, case, layout):
        pin_threads()
        kind, shape, arg = LAYER_CASES[case]
        x = rng().standard_normal(shape).astype(np.float32)
        if layout == "channels_last":
            x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
        if kind == "conv":
            out, k, stride, padding, groups = arg
            w = rng(1).standard_normal((out, shape[1] // groups, k, k)).astype(np.float32)

            def call():
                fastpool.conv2d(x, w, stride=stride, padding=padding, groups=groups)
        elif kind == "global_avg":
            def call():
                fastpool.adaptive_avg_pool2d(x, 1)
        else:
            k, s, p = arg
            pool = fastpool.max_pool2d if kind == "max" else fastpool.avg_pool2d

            def call():
                pool(x, k, s, p)
        call()
        self.call = call

    def time_forward(self, case, layout):
        """the layer's forward"""
        self.call()
