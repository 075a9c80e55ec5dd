"""A tiny U-Net-style encoder-decoder from fastpool ops, trained with NumPy and fastpool only.

It learns to denoise 16x16 images of random rectangles: conv -> ReLU -> max_pool (with
indices) -> conv -> ReLU -> global average (a gating signal) -> conv_transpose (stride 2,
the learned upsampling) concatenated with max_unpool (the pooling's indices put the
encoder's maxima back, SegNet-style) and the skip connection -> conv -> output. Every
backward pass is written out from fastpool's ``*_backward`` functions.

Run:  python -m pip install ".[examples]" && python examples/unet_denoise.py
"""

import argparse

import numpy as np

import fastpool

SIZE = 16


def make_images(rng, n):
    """``(noisy, clean)``, both ``(n, 1, SIZE, SIZE)``: one or two rectangles each."""
    clean = np.zeros((n, 1, SIZE, SIZE), np.float32)
    for k in range(n):
        for _ in range(rng.integers(1, 3)):
            top, left = rng.integers(0, SIZE - 4, 2)
            h, w = rng.integers(3, SIZE - max(top, left) + 1, 2)
            clean[k, 0, top:top + h, left:left + w] = rng.uniform(0.5, 1.0)
    noisy = clean + rng.normal(0, 0.3, clean.shape).astype(np.float32)
    return noisy, clean


class UNet:
    def __init__(self, rng):
        def he(shape, fan_in):
            return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

        self.params = {
            "enc": he((8, 1, 3, 3), 9), "enc_b": np.zeros(8, np.float32),
            "mid": he((16, 8, 3, 3), 72), "mid_b": np.zeros(16, np.float32),
            "gate": np.zeros((16, 16), np.float32),
            "up": he((16, 8, 2, 2), 64), "up_b": np.zeros(8, np.float32),  # (C_in, C_out)
            "dec": he((1, 24, 3, 3), 216), "dec_b": np.zeros(1, np.float32),
        }

    def forward(self, x):
        p = self.params
        e = fastpool.conv2d(x, p["enc"], p["enc_b"], padding=1)          # (N, 8, 16, 16)
        er = np.maximum(e, 0)
        pooled, idx = fastpool.max_pool2d(er, 2, return_indices=True)     # (N, 8, 8, 8)
        m = fastpool.conv2d(pooled, p["mid"], p["mid_b"], padding=1)      # (N, 16, 8, 8)
        mr = np.maximum(m, 0)
        g = fastpool.adaptive_avg_pool2d(mr, 1)[:, :, 0, 0]              # (N, 16) global
        gate = 1.0 / (1.0 + np.exp(-(g @ p["gate"])))                     # channel gates
        mg = mr * gate[:, :, None, None]
        u = fastpool.conv_transpose2d(mg, p["up"], p["up_b"], stride=2)   # (N, 8, 16, 16)
        unpooled = fastpool.max_unpool2d(pooled, idx, 2)                  # (N, 8, 16, 16)
        cat = np.concatenate([u, unpooled, er], axis=1)                   # (N, 24, 16, 16)
        y = fastpool.conv2d(cat, p["dec"], p["dec_b"], padding=1)        # (N, 1, 16, 16)
        return y, (x, e, er, pooled, idx, m, mr, g, gate, mg, cat)

    def backward(self, dy, cache):
        p = self.params
        x, e, er, pooled, idx, m, mr, g, gate, mg, cat = cache
        grads = {}
        dcat, grads["dec"], grads["dec_b"] = fastpool.conv2d_backward(dy, cat, p["dec"],
                                                                      padding=1)
        du, dunpooled, der = dcat[:, :8], dcat[:, 8:16], dcat[:, 16:]
        dmg, grads["up"], grads["up_b"] = fastpool.conv_transpose2d_backward(
            np.ascontiguousarray(du), mg, p["up"], stride=2)
        dpooled = fastpool.max_unpool2d_backward(np.ascontiguousarray(dunpooled), pooled,
                                                 idx, 2)
        dgate = (dmg * mr).sum(axis=(2, 3))
        dz = dgate * gate * (1 - gate)
        grads["gate"] = g.T @ dz
        dg = dz @ p["gate"].T
        dmr = dmg * gate[:, :, None, None] + fastpool.adaptive_avg_pool2d_backward(
            dg[:, :, None, None].astype(mr.dtype), mr, 1)
        dm = dmr * (m > 0)
        dpooled2, grads["mid"], grads["mid_b"] = fastpool.conv2d_backward(
            dm, pooled, p["mid"], padding=1)
        der = der + fastpool.max_pool2d_backward(dpooled + dpooled2, er, 2, indices=idx)
        _, grads["enc"], grads["enc_b"] = fastpool.conv2d_backward(
            der * (e > 0), x, p["enc"], padding=1, output_mask=(False, True, True))
        return grads


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    net = UNet(rng)
    noisy_test, clean_test = make_images(rng, 64)
    baseline = float(np.mean((noisy_test - clean_test) ** 2))
    adam = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in net.params.items()}
    for step in range(1, args.steps + 1):
        noisy, clean = make_images(rng, 16)
        y, cache = net.forward(noisy)
        loss = float(np.mean((y - clean) ** 2))
        grads = net.backward((2 * (y - clean) / y.size).astype(y.dtype), cache)
        for k, v in net.params.items():  # Adam, lr 1e-2
            m, s = adam[k]
            m[...] = 0.9 * m + 0.1 * grads[k]
            s[...] = 0.999 * s + 0.001 * grads[k] ** 2
            v -= (1e-2 * (m / (1 - 0.9**step)) / (np.sqrt(s / (1 - 0.999**step)) + 1e-8)
                  ).astype(np.float32)
        if step % 40 == 0 or step == 1:
            print(f"step {step:4d}  mse {loss:.4f}")
    test = float(np.mean((net.forward(noisy_test)[0] - clean_test) ** 2))
    print(f"test mse {test:.4f} (the noisy input's: {baseline:.4f})")
    assert test < 0.5 * baseline, "the U-Net should at least halve the noise"
    return test


if __name__ == "__main__":
    main()
