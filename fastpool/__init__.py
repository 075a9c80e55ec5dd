"""fastpool: fast 1-D, 2-D and 3-D convolution and pooling kernels (max, average,
stochastic) for CPU and GPU, in Numba.

Importing fastpool compiles nothing and never touches the GPU; kernels are compiled
(or loaded from Numba's on-disk cache) on first use. It does pick Numba's threading
layer (``fastpool._threading``: oneTBB, fork- and thread-safe, unless the user chose
one), since that must happen before Numba starts its threads.
"""

from fastpool import _threading

_threading.configure()

from fastpool._dispatch import (
    CudaUnavailableError,
    cuda_available,
    get_device,
    set_device,
    use_device,
)
from fastpool.adaptive import (
    adaptive_avg_pool1d,
    adaptive_avg_pool1d_backward,
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_backward,
    adaptive_avg_pool3d,
    adaptive_avg_pool3d_backward,
    adaptive_max_pool1d,
    adaptive_max_pool1d_backward,
    adaptive_max_pool2d,
    adaptive_max_pool2d_backward,
    adaptive_max_pool3d,
    adaptive_max_pool3d_backward,
)
from fastpool.unpooling import (
    max_unpool1d,
    max_unpool1d_backward,
    max_unpool2d,
    max_unpool2d_backward,
    max_unpool3d,
    max_unpool3d_backward,
)
from fastpool.transposed import (
    conv_transpose1d,
    conv_transpose1d_backward,
    conv_transpose2d,
    conv_transpose2d_backward,
    conv_transpose3d,
    conv_transpose3d_backward,
)
from fastpool.conv import (
    Conv2dGrads,
    conv1d,
    conv1d_backward,
    conv2d,
    conv2d_backward,
    conv3d,
    conv3d_backward,
)
from fastpool.pooling import (
    avg_pool1d,
    avg_pool1d_backward,
    avg_pool2d,
    avg_pool2d_backward,
    avg_pool3d,
    avg_pool3d_backward,
    max_pool1d,
    max_pool1d_backward,
    max_pool2d,
    max_pool2d_backward,
    max_pool3d,
    max_pool3d_backward,
    stochastic_pool1d,
    stochastic_pool1d_backward,
    stochastic_pool2d,
    stochastic_pool2d_backward,
    stochastic_pool3d,
    stochastic_pool3d_backward,
)

__version__ = "0.1.0"

__all__ = [
    "conv_transpose1d",
    "conv_transpose1d_backward",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "conv_transpose3d",
    "conv_transpose3d_backward",
    "max_unpool1d",
    "max_unpool1d_backward",
    "max_unpool2d",
    "max_unpool2d_backward",
    "max_unpool3d",
    "max_unpool3d_backward",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool1d_backward",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
    "adaptive_avg_pool3d",
    "adaptive_avg_pool3d_backward",
    "adaptive_max_pool1d",
    "adaptive_max_pool1d_backward",
    "adaptive_max_pool2d",
    "adaptive_max_pool2d_backward",
    "adaptive_max_pool3d",
    "adaptive_max_pool3d_backward",
    "Conv2dGrads",
    "CudaUnavailableError",
    "avg_pool1d",
    "avg_pool1d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "avg_pool3d",
    "avg_pool3d_backward",
    "conv1d",
    "conv1d_backward",
    "conv2d",
    "conv2d_backward",
    "conv3d",
    "conv3d_backward",
    "cuda_available",
    "get_device",
    "max_pool1d",
    "max_pool1d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "max_pool3d",
    "max_pool3d_backward",
    "set_device",
    "stochastic_pool1d",
    "stochastic_pool1d_backward",
    "stochastic_pool2d",
    "stochastic_pool2d_backward",
    "stochastic_pool3d",
    "stochastic_pool3d_backward",
    "use_device",
]
