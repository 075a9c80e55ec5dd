"""fastpool quickstart: every function once, with checks anyone can read.

Run:  python -m pip install . && python examples/quickstart.py
"""

import numpy as np

import fastpool

rng = np.random.default_rng(0)
x = rng.random((8, 16, 32, 32), dtype=np.float32)  # (N, C, H, W), non-negative like ReLU

# Max pooling with PyTorch-style indices (flat h * W + w inside each (n, c) plane).
y, idx = fastpool.max_pool2d(x, kernel_size=3, stride=2, padding=1, return_indices=True)
assert y.shape == (8, 16, 16, 16) and idx.dtype == np.int64
assert np.array_equal(y, np.take_along_axis(x.reshape(8, 16, -1), idx.reshape(8, 16, -1),
                                            axis=2).reshape(y.shape))
grad_x = fastpool.max_pool2d_backward(np.ones_like(y), x, 3, 2, 1, indices=idx)
print(f"max_pool2d        {x.shape} -> {y.shape}; backward routes {grad_x.sum():.0f} "
      f"gradient units to the maxima")

# Average pooling: 2x2 windows, stride 2, equals the mean of each block.
a = fastpool.avg_pool2d(x, 2)
assert np.allclose(a, x.reshape(8, 16, 16, 2, 16, 2).mean(axis=(3, 5)), rtol=1e-6)
grad_x = fastpool.avg_pool2d_backward(np.ones_like(a), x, 2)
assert np.allclose(grad_x, 0.25)
print(f"avg_pool2d        {x.shape} -> {a.shape}; backward spreads 1/4 to each cell")

# Stochastic pooling: training samples one element per window with p = a / sum(a)...
s, picked = fastpool.stochastic_pool2d(x, 2, seed=1234, return_indices=True)
again = fastpool.stochastic_pool2d(x, 2, seed=1234)
assert np.array_equal(s, again)  # same seed, same picks
grad_x = fastpool.stochastic_pool2d_backward(np.ones_like(s), x, 2, indices=picked)
# ...and inference outputs the probability-weighted average sum(a^2) / sum(a).
e = fastpool.stochastic_pool2d(x, 2, training=False)
blocks = x.reshape(8, 16, 16, 2, 16, 2).astype(np.float64)
assert np.allclose(e, (blocks**2).sum(axis=(3, 5)) / blocks.sum(axis=(3, 5)), rtol=1e-6)
grad_e = fastpool.stochastic_pool2d_backward(np.ones_like(e), x, 2, training=False)
print(f"stochastic_pool2d {x.shape} -> {s.shape}; train picks reproducible by seed, "
      f"inference = sum(a^2)/sum(a)")

# Convolution (cross-correlation, as in every framework) with bias, 'same' padding.
weight = rng.standard_normal((24, 16, 3, 3)).astype(np.float32) * 0.1
bias = np.zeros(24, np.float32)
c = fastpool.conv2d(x, weight, bias, padding="same")
padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
assert np.allclose(c, np.einsum("nchwij,ocij->nohw", windows, weight), atol=1e-5)
grads = fastpool.conv2d_backward(np.ones_like(c), x, weight, padding="same")
assert np.allclose(grads.grad_bias, c[:, 0].size)  # d(sum y)/d(bias) = N * H * W
print(f"conv2d            {x.shape} * {weight.shape} -> {c.shape}; gradients "
      f"{grads.grad_input.shape}, {grads.grad_weight.shape}, {grads.grad_bias.shape}")
depthwise = fastpool.conv2d(x, weight[:16, :1], stride=2, padding=1, groups=16)
print(f"depthwise conv2d  {x.shape} -> {depthwise.shape} (groups = channels)")

# Every pool also exists for 1 and 3 spatial axes: sequences (N, C, L) and volumes
# (N, C, D, H, W), with the same arguments.
seq = rng.random((4, 8, 100), dtype=np.float32)
p1 = fastpool.max_pool1d(seq, 4)
assert np.array_equal(p1, seq.reshape(4, 8, 25, 4).max(axis=3))
vol = rng.random((2, 4, 8, 16, 16), dtype=np.float32)
p3 = fastpool.avg_pool3d(vol, 2)
assert np.allclose(p3, vol.reshape(2, 4, 4, 2, 8, 2, 8, 2).mean(axis=(3, 5, 7)), rtol=1e-6)
s3 = fastpool.stochastic_pool3d(vol, (1, 2, 2), seed=5)
print(f"max_pool1d        {seq.shape} -> {p1.shape}; avg_pool3d {vol.shape} -> {p3.shape}; "
      f"stochastic_pool3d -> {s3.shape}")

# Memory format follows the input: channels-last (NHWC) data stays channels-last.
nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
y_last = fastpool.max_pool2d(nhwc.transpose(0, 3, 1, 2), 2)
assert np.array_equal(y_last, fastpool.max_pool2d(x, 2))
assert y_last.transpose(0, 2, 3, 1).flags.c_contiguous  # an NHWC buffer again
print(f"channels-last in  -> channels-last out, strides {y_last.strides}")

with fastpool.use_device("cpu"):
    fastpool.max_pool2d(x, 2)
print(f"device: {fastpool.get_device()!r} (auto picks the GPU only for GPU arrays); "
      f"cuda available: {fastpool.cuda_available()}")
if fastpool.cuda_available():
    # The same calls on the GPU: NumPy in, NumPy out; the same picks for the same seed.
    small = x[:2, :4]
    assert np.array_equal(fastpool.max_pool2d(small, 2, device="cuda"),
                          fastpool.max_pool2d(small, 2, device="cpu"))
    assert np.array_equal(fastpool.stochastic_pool2d(small, 2, seed=7, device="cuda"),
                          fastpool.stochastic_pool2d(small, 2, seed=7, device="cpu"))
    print("GPU results match the CPU's")
print("quickstart OK")
