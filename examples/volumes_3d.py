"""3-D example: a small CNN on channels-last volumes (N, D, H, W, C), NumPy and fastpool only.

Volumes hold a noisy bar along the depth axis or along the width axis; the network
conv3d -> ReLU -> stochastic_pool3d -> conv3d -> ReLU -> global avg_pool3d -> linear
learns which. The data stays channels-last throughout: each array is an NDHWC buffer
viewed as (N, C, D, H, W), and fastpool returns results and gradients in the same
memory format. Stochastic pooling samples during training (a new seed per step,
reproducible) and uses its probability-weighted average at test time.

Run:  python -m pip install ".[examples]" && python examples/volumes_3d.py
"""

import argparse

import numpy as np

import fastpool

SIZE = 12


def as_ncdhw(ndhwc):
    """The (N, C, D, H, W) view of an NDHWC buffer: channels-last strides, no copy."""
    return ndhwc.transpose(0, 4, 1, 2, 3)


def make_volumes(rng, n):
    """``(x, labels)``: ``x`` is ``(n, 2, SIZE, SIZE, SIZE)`` with channels-last strides
    (two modalities; the second is noise only); label 0: a bar along depth, 1: along
    width, at a random place."""
    labels = rng.integers(0, 2, n)
    volumes = 0.3 * rng.random((n, SIZE, SIZE, SIZE, 2), dtype=np.float32)
    for k, label in enumerate(labels):
        a, b = rng.integers(2, SIZE - 2, 2)
        if label == 0:
            volumes[k, :, a, b, 0] += 1.0
        else:
            volumes[k, a, b, :, 0] += 1.0
    return as_ncdhw(volumes), labels


class Net:
    def __init__(self, rng):
        def he(shape, fan_in):
            return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

        self.params = {
            "w1": he((4, 2, 3, 3, 3), 54), "b1": np.zeros(4, np.float32),
            "w2": he((8, 4, 3, 3, 3), 108), "b2": np.zeros(8, np.float32),
            "w3": he((8, 2), 8), "b3": np.zeros(2, np.float32),
        }

    def forward(self, x, seed=None):
        """``seed=None``: inference (stochastic pooling's expectation)."""
        p = self.params
        c1 = fastpool.conv3d(x, p["w1"], p["b1"], padding=1)
        r1 = np.maximum(c1, 0)
        if seed is None:
            s1, picks = fastpool.stochastic_pool3d(r1, 2, training=False), None
        else:
            s1, picks = fastpool.stochastic_pool3d(r1, 2, seed=seed, return_indices=True)
        c2 = fastpool.conv3d(s1, p["w2"], p["b2"], padding=1)
        r2 = np.maximum(c2, 0)
        g = fastpool.avg_pool3d(r2, r2.shape[2:]).reshape(len(x), -1)    # global average
        logits = g @ p["w3"] + p["b3"]
        return logits, (x, c1, r1, s1, picks, c2, r2, g)

    def backward(self, dlogits, cache):
        p = self.params
        x, c1, r1, s1, picks, c2, r2, g = cache
        grads = {"w3": g.T @ dlogits, "b3": dlogits.sum(0)}
        dg = (dlogits @ p["w3"].T).reshape(g.shape + (1, 1, 1))
        dr2 = fastpool.avg_pool3d_backward(dg, r2, r2.shape[2:])
        ds1, grads["w2"], grads["b2"] = fastpool.conv3d_backward(dr2 * (c2 > 0), s1,
                                                                 p["w2"], padding=1)
        dr1 = fastpool.stochastic_pool3d_backward(ds1, r1, 2, indices=picks)
        _, grads["w1"], grads["b1"] = fastpool.conv3d_backward(
            dr1 * (c1 > 0), x, p["w1"], padding=1, output_mask=(False, True, True))
        return grads


def softmax_cross_entropy(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    loss = -np.log(probs[np.arange(len(labels)), labels] + 1e-12).mean()
    dlogits = probs.copy()
    dlogits[np.arange(len(labels)), labels] -= 1
    return loss, (dlogits / len(labels)).astype(np.float32)


def is_channels_last(a):
    return np.moveaxis(a, 1, -1).flags.c_contiguous


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    net = Net(rng)
    x_test, y_test = make_volumes(rng, 64)
    velocity = {k: np.zeros_like(v) for k, v in net.params.items()}
    for step in range(args.steps):
        x, labels = make_volumes(rng, 16)
        logits, cache = net.forward(x, seed=step)
        loss, dlogits = softmax_cross_entropy(logits, labels)
        grads = net.backward(dlogits, cache)
        for k in net.params:  # SGD with momentum
            velocity[k] = 0.9 * velocity[k] - 0.05 * grads[k]
            net.params[k] += velocity[k]
        if step % 20 == 0:
            c1, s1 = cache[1], cache[3]
            grad_x = fastpool.conv3d_backward(np.ones_like(c1), x, net.params["w1"],
                                              padding=1, output_mask=(True, False, False))
            assert all(is_channels_last(a) for a in (x, c1, s1, grad_x.grad_input))
            print(f"step {step:4d}  loss {loss:.3f}")
    accuracy = (net.forward(x_test)[0].argmax(1) == y_test).mean()
    print(f"test accuracy {accuracy:.1%} on {len(y_test)} held-out volumes "
          f"(channels-last throughout)")
    assert accuracy > 0.9, "the 3-D CNN should tell depth bars from width bars"
    return accuracy


if __name__ == "__main__":
    main()
