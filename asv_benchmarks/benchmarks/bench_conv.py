"""Convolution: time of one ``conv2d`` / ``conv2d_backward`` call.

Every class runs over device ("cpu", "cuda") x shape x dtype ("float32", "float64").
The shapes (``common.CONV_SHAPES``) are a small 3x3 16->16 case and, at batch 32, a
3x3 64->64 ResNet block, the 7x7 stride-2 3->64 stem, a 3x3 256->256 layer, a 1x1
256->512 projection and a 3x3 depthwise layer. The float64 cases run at full batch
too (0.6 s per call at most on a 2-core machine, so none is reduced or skipped). No
bias in the forward. Inputs and weights are normal with a fixed seed; ``setup`` calls
the timed function once, so compile (or on-disk cache load) time is not timed. On
"cuda" the arrays live on the GPU and the timed body waits for the GPU. Commits
without ``fastpool.conv2d`` skip.
"""

from .common import (  # first: common pins the thread pools
    CONV_SHAPES, DEVICES, DTYPES, conv_out_shape, memo, normal, pin_threads,
    require_conv, require_device, rng, synchronizer, to_device)

import fastpool


def conv_data(device, shape, dtype, with_grad):
    """``dict(x, w, grad, stride, padding, groups)`` for ``CONV_SHAPES[shape]``, the
    arrays on the device; ``grad`` (the output gradient) only ``with_grad``."""
    x_shape, w_shape, stride, padding, groups = CONV_SHAPES[shape]
    generator = rng()
    x = normal(x_shape, dtype, generator)
    w = normal(w_shape, dtype, generator, scale=0.1)
    grad = None
    if with_grad:
        grad = normal(conv_out_shape(x_shape, w_shape, stride, padding), dtype, generator)
    x, w, grad = to_device(device, x, w, grad)
    return dict(x=x, w=w, grad=grad, stride=stride, padding=padding, groups=groups)


class _Conv:
    """Base: params, timing attributes, and ``setup`` (data + warm-up call, made once
    per benchmark process through ``common.memo``; asv re-runs ``setup`` before every
    sample). One process per benchmark, 3 to 7 samples of one call each."""

    params = [DEVICES, list(CONV_SHAPES), DTYPES]
    param_names = ["device", "shape", "dtype"]
    processes = 1
    repeat = (3, 7, 10.0)
    timeout = 300
    with_grad = True

    def setup(self, device, shape, dtype):
        require_conv()
        require_device(device)
        pin_threads()
        self.device = device
        self.sync = synchronizer(device)
        self.__dict__.update(memo((type(self).__name__, device, shape, dtype), lambda: (
            self.warm(conv_data(device, shape, dtype, self.with_grad)))))

    def warm(self, data):
        """Call the timed function once (compiles or loads the kernels)."""
        self.__dict__.update(data)
        self.run()
        self.sync()
        return data


class Conv2dForward(_Conv):
    """``conv2d(x, w, None, stride, padding, 1, groups)``."""

    with_grad = False

    def run(self):
        fastpool.conv2d(self.x, self.w, None, self.stride, self.padding, 1, self.groups,
                        device=self.device)

    def time_conv2d(self, device, shape, dtype):
        """conv2d forward, no bias"""
        self.run()
        self.sync()


class Conv2dBackward(_Conv):
    """``conv2d_backward`` for the input and weight gradients,
    ``output_mask=(True, True, False)`` (what a layer without bias needs)."""

    def run(self):
        fastpool.conv2d_backward(self.grad, self.x, self.w, self.stride, self.padding, 1,
                                 self.groups, output_mask=(True, True, False),
                                 device=self.device)

    def time_conv2d_backward(self, device, shape, dtype):
        """conv2d_backward, grad_input + grad_weight"""
        self.run()
        self.sync()


class Conv2dBackwardBias(_Conv):
    """``conv2d_backward`` for the bias gradient only, ``output_mask=(False, False,
    True)``: a sum of the output gradient over N, H, W."""

    def run(self):
        fastpool.conv2d_backward(self.grad, self.x, self.w, self.stride, self.padding, 1,
                                 self.groups, output_mask=(False, False, True),
                                 device=self.device)

    def time_conv2d_backward_bias(self, device, shape, dtype):
        """conv2d_backward, grad_bias only"""
        self.run()
        self.sync()


class Conv2dWeightGradReproducible(_Conv):
    """``conv2d_backward(..., output_mask=(False, True, True), reproducible=True)``: the
    weight and bias gradients as exact sums (docs/site/semantics.md), against which
    ``Conv2dWeightGrad`` is the default's price. float32, two shapes only: a call is
    tens of times the default's (seconds at batch 32)."""

    params = [DEVICES, ["small 3x3 16->16 (4,16,32,32) p1", "3x3 64->64 (32,64,56,56) p1"],
              ["float32"]]
    repeat = (2, 3, 20.0)

    def setup(self, device, shape, dtype):
        if not _has_reproducible():
            raise NotImplementedError("this commit has no reproducible=True")
        super().setup(device, shape, dtype)

    def run(self, reproducible=True):
        fastpool.conv2d_backward(self.grad, self.x, self.w, self.stride, self.padding, 1,
                                 self.groups, output_mask=(False, True, True),
                                 reproducible=reproducible, device=self.device)

    def time_conv2d_weight_grad_reproducible(self, device, shape, dtype):
        """conv2d_backward, grad_weight + grad_bias, reproducible=True"""
        self.run()
        self.sync()


class Conv2dWeightGrad(Conv2dWeightGradReproducible):
    """The same gradients by the default sums (the comparison for the class above)."""

    def setup(self, device, shape, dtype):
        _Conv.setup(self, device, shape, dtype)

    def run(self, reproducible=False):
        super().run(reproducible)

    def time_conv2d_weight_grad(self, device, shape, dtype):
        """conv2d_backward, grad_weight + grad_bias, default sums"""
        self.run()
        self.sync()

    time_conv2d_weight_grad_reproducible = None


def _has_reproducible():
    import inspect
    return "reproducible" in inspect.signature(fastpool.conv2d_backward).parameters
