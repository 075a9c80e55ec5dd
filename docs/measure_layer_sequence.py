"""Batch-1 layers called back to back, as a network's forward runs them: 14 calls
(MobileNetV2's blocks on 14x14 and 7x7 planes, ResNet-18's 3x3 256@14 and 512@7,
LeNet-5's 5x5 6->16@14, two max poolings), float32, NCHW; median of 300 sequences
after 20 untimed. Run per threading layer, each in its own process::

    for L in tbb omp workqueue; do NUMBA_THREADING_LAYER=$L \
        python docs/measure_layer_sequence.py; done

Figures in docs/site/performance.md ("Why small calls stay on one thread")."""
import time

import numpy as np

import fastpool
import numba

rng = np.random.default_rng(0)


def conv(ci, co, h, k, stride=1, groups=1):
    x = rng.standard_normal((1, ci, h, h), dtype=np.float32)
    w = rng.standard_normal((co, ci // groups, k, k), dtype=np.float32) * 0.1
    return lambda: fastpool.conv2d(x, w, stride=stride, padding=k // 2, groups=groups)


def pool(c, h, k, stride):
    x = rng.standard_normal((1, c, h, h), dtype=np.float32)
    return lambda: fastpool.max_pool2d(x, k, stride)


layers = [conv(64, 384, 14, 1), conv(384, 384, 14, 3, groups=384), conv(384, 64, 14, 1),
          conv(96, 576, 14, 1), conv(576, 576, 14, 3, groups=576), conv(576, 96, 14, 1),
          conv(160, 960, 7, 1), conv(960, 960, 7, 3, groups=960), conv(960, 160, 7, 1),
          conv(256, 256, 14, 3), conv(512, 512, 7, 3), pool(64, 56, 2, 2),
          conv(6, 16, 14, 5), pool(16, 10, 2, 2)]


def sequence():
    start = time.perf_counter()
    for layer in layers:
        layer()
    return time.perf_counter() - start


for _ in range(20):
    sequence()
times = [sequence() for _ in range(300)]
print(numba.threading_layer(), f"{np.median(times) * 1e3:.3f} ms per sequence")
