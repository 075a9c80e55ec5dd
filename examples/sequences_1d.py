"""1-D example: a small CNN on sequences (N, C, L), trained with NumPy and fastpool only.

Two classes of noisy signals (5 or 7 cycles per sequence, random phase) are told
apart by conv1d -> ReLU -> max_pool1d -> conv1d -> ReLU -> global avg_pool1d -> linear,
with every backward pass written out from fastpool's ``*_backward`` functions.

Run:  python -m pip install ".[examples]" && python examples/sequences_1d.py
"""

import argparse

import numpy as np

import fastpool

LENGTH = 128


def make_signals(rng, n):
    """``(x, labels)``: ``x`` of shape ``(n, 1, LENGTH)``; class 1 oscillates 1.4x faster,
    under noise of the signal's own amplitude."""
    labels = rng.integers(0, 2, n)
    t = np.arange(LENGTH) / LENGTH
    cycles = np.where(labels == 1, 7.0, 5.0)[:, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    x = np.sin(2 * np.pi * cycles * t + phase) + rng.standard_normal((n, LENGTH))
    return x[:, None, :].astype(np.float32), labels


class Net:
    def __init__(self, rng):
        def scale(fan_in):  # He initialisation
            return np.sqrt(2.0 / fan_in)

        self.params = {
            "w1": (rng.standard_normal((8, 1, 7)) * scale(7)).astype(np.float32),
            "b1": np.zeros(8, np.float32),
            "w2": (rng.standard_normal((16, 8, 5)) * scale(40)).astype(np.float32),
            "b2": np.zeros(16, np.float32),
            "w3": (rng.standard_normal((16, 2)) * scale(16)).astype(np.float32),
            "b3": np.zeros(2, np.float32),
        }

    def forward(self, x):
        p = self.params
        c1 = fastpool.conv1d(x, p["w1"], p["b1"], padding="same")
        r1 = np.maximum(c1, 0)
        m1, idx = fastpool.max_pool1d(r1, 4, return_indices=True)         # L 128 -> 32
        c2 = fastpool.conv1d(m1, p["w2"], p["b2"], padding=2)
        r2 = np.maximum(c2, 0)
        g = fastpool.avg_pool1d(r2, r2.shape[-1])[:, :, 0]                 # global average
        logits = g @ p["w3"] + p["b3"]
        cache = (x, c1, r1, m1, idx, c2, r2, g)
        return logits, cache

    def backward(self, dlogits, cache):
        p = self.params
        x, c1, r1, m1, idx, c2, r2, g = cache
        grads = {"w3": g.T @ dlogits, "b3": dlogits.sum(0)}
        dg = (dlogits @ p["w3"].T)[:, :, None]
        dr2 = fastpool.avg_pool1d_backward(dg, r2, r2.shape[-1])
        dc2 = dr2 * (c2 > 0)
        dm1, grads["w2"], grads["b2"] = fastpool.conv1d_backward(dc2, m1, p["w2"], padding=2)
        dr1 = fastpool.max_pool1d_backward(dm1, r1, 4, indices=idx)
        dc1 = dr1 * (c1 > 0)
        _, grads["w1"], grads["b1"] = fastpool.conv1d_backward(
            dc1, x, p["w1"], padding="same", output_mask=(False, True, True))
        return grads


def softmax_cross_entropy(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    loss = -np.log(probs[np.arange(len(labels)), labels] + 1e-12).mean()
    dlogits = probs.copy()
    dlogits[np.arange(len(labels)), labels] -= 1
    return loss, (dlogits / len(labels)).astype(np.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    net = Net(rng)
    x_test, y_test = make_signals(rng, 256)
    velocity = {k: np.zeros_like(v) for k, v in net.params.items()}
    for step in range(args.steps):
        x, labels = make_signals(rng, 32)
        logits, cache = net.forward(x)
        loss, dlogits = softmax_cross_entropy(logits, labels)
        grads = net.backward(dlogits, cache)
        for k in net.params:  # SGD with momentum
            velocity[k] = 0.9 * velocity[k] - 0.05 * grads[k]
            net.params[k] += velocity[k]
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss:.3f}")
    accuracy = (net.forward(x_test)[0].argmax(1) == y_test).mean()
    print(f"test accuracy {accuracy:.1%} on {len(y_test)} held-out signals")
    assert accuracy > 0.9, "the 1-D CNN should tell the two oscillations apart"
    return accuracy


if __name__ == "__main__":
    main()
