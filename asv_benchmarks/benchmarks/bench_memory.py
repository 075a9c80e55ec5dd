"""Peak memory (the benchmark process's maximum resident set size, host memory) of
calls on the big shapes, CPU only, float32 and float64.

asv's ``peakmem_`` is the whole process's peak: it includes the interpreter and the
imported libraries and, on a cold Numba cache, the compiler's memory (no warm-up call
is made: it would not lower the peak). With a warm cache the peak is inputs + the
call's result + its workspace, the same every run, so a jump between commits means the
kernels allocate more. Data are drawn in their dtype directly (no float64 temporaries
that would hide the call's footprint).
"""

from .common import (  # first: common pins the thread pools
    CONV_3X3, CONV_SHAPES, DTYPES, POOL_BIG, POOL_SHAPES, conv_out_shape, normal,
    pin_threads, require_conv, rng, uniform)

import fastpool


class PeakMemPool:
    """Pooling on (32,64,112,112), k=3, s=2, p=1."""

    params = [DTYPES]
    param_names = ["dtype"]
    processes = 1
    timeout = 300

    def setup(self, dtype):
        pin_threads()
        x_shape, self.k, self.s, self.p = POOL_SHAPES[POOL_BIG]
        self.x = uniform(x_shape, dtype, rng())

    def peakmem_max_pool2d_indices(self, dtype):
        """max_pool2d(x, 3, 2, 1, return_indices=True)"""
        fastpool.max_pool2d(self.x, self.k, self.s, self.p, return_indices=True,
                            device="cpu")

    def peakmem_max_pool2d_backward(self, dtype):
        """max_pool2d(..., return_indices=True), then max_pool2d_backward(grad, x, 3, 2,
        1, indices=idx) (the larger of the two footprints)"""
        _, idx = fastpool.max_pool2d(self.x, self.k, self.s, self.p, return_indices=True,
                                     device="cpu")
        grad = normal(idx.shape, self.x.dtype, rng(1))
        fastpool.max_pool2d_backward(grad, self.x, self.k, self.s, self.p, indices=idx,
                                     device="cpu")


class PeakMemConv:
    """conv2d 3x3 64->64 on (32,64,56,56), padding 1 (forward, and backward for the
    input and weight gradients), and the 7x7 stride-2 3->64 stem on (32,3,224,224)
    (forward)."""

    params = [DTYPES]
    param_names = ["dtype"]
    processes = 1
    timeout = 300

    def setup(self, dtype):
        require_conv()
        pin_threads()
        self.dtype = dtype

    def _data(self, name, with_grad=False):
        x_shape, w_shape, stride, padding, groups = CONV_SHAPES[name]
        generator = rng()
        x = normal(x_shape, self.dtype, generator)
        w = normal(w_shape, self.dtype, generator, scale=0.1)
        grad = None
        if with_grad:
            grad = normal(conv_out_shape(x_shape, w_shape, stride, padding), self.dtype,
                          generator)
        return x, w, grad, (stride, padding, 1, groups)

    def peakmem_conv2d_3x3(self, dtype):
        """conv2d(x, w, padding=1), 3x3 64->64"""
        x, w, _, geometry = self._data(CONV_3X3)
        fastpool.conv2d(x, w, None, *geometry, device="cpu")

    def peakmem_conv2d_backward_3x3(self, dtype):
        """conv2d_backward(grad, x, w, padding=1, output_mask=(True, True, False))"""
        x, w, grad, geometry = self._data(CONV_3X3, with_grad=True)
        fastpool.conv2d_backward(grad, x, w, *geometry, output_mask=(True, True, False),
                                 device="cpu")

    def peakmem_conv2d_stem_7x7(self, dtype):
        """conv2d(x, w, stride=2, padding=3), 7x7 3->64"""
        x, w, _, geometry = self._data("7x7 s2 3->64 (32,3,224,224) p3")
        fastpool.conv2d(x, w, None, *geometry, device="cpu")
