"""A LeNet-5-style CNN on scikit-learn's 8x8 digits, trained with NumPy and fastpool only.

Every forward and backward pass is written out by hand: fastpool supplies the
convolutions, the pooling and their gradients, NumPy the rest (ReLU, linear layers,
softmax cross-entropy, Adam). No deep-learning framework is imported.

    conv 3x3 1->16, pad 1 (+bias) -> ReLU -> pool 2     8x8 -> 4x4
    conv 3x3 16->32, pad 1 (+bias) -> ReLU -> pool 2    4x4 -> 2x2
    flatten 128 -> linear 64 -> ReLU -> linear 10 -> softmax cross-entropy

The pooling is stochastic by default (Zeiler & Fergus 2013): in training each 2x2 window
outputs one of its elements, drawn with probability proportional to its value, and
``fastpool.stochastic_pool2d_backward`` sends the gradient to the element drawn; at test
time each window outputs the probability-weighted average. ``--pool max`` and
``--pool avg`` swap in the matching fastpool functions.

Run:   python examples/digits_numpy.py [--pool {stochastic,max,avg}] [--epochs 20]
                                       [--seed 0]

Prints the time of a warm-up step (Numba compiles fastpool's kernels on the first run
and caches them on disk), then per epoch a progress bar with the running training loss
on stderr, finished with the epoch's training accuracy (over its mini-batches, in
training mode) and the test accuracy (inference mode); then a one-row summary table and
the final test accuracy.

Defaults: 20 epochs, batch 16, Adam lr 1e-2 with cosine decay per epoch. The split
(1347 train / 450 test, stratified) is fixed; --seed sets the initialisation, the
shuffling and the stochastic picks (fastpool's results are the same at any thread
count). Measured on the project's 2-core machine, test accuracy for --seed 0..4:

    stochastic  98.22  98.89  98.22  97.78  98.89 %
    max         99.11  97.78  98.22  98.00  98.00 %
    avg         96.44  98.22  98.22  97.11  96.67 %

Time (stochastic, quiet machine): about 5.3 s in all when the kernels are cached (3.8 s
of training), 25 s on the very first run (20 s of it compiling). These images are too
small to gain from threads: on a machine busy with other work, ``NUMBA_NUM_THREADS=1``
keeps this speed, where fastpool's two threads, waiting for each other, can be 10x
slower.
"""

import argparse
import math
import time

import numpy as np

import fastpool
from _digits import Progress, batches, load, summary


# --- pooling layers: forward returns (y, what backward needs) --------------------------

def pool_forward(kind, a, training, seed):
    if kind == "stochastic":
        if training:
            return fastpool.stochastic_pool2d(a, 2, training=True, seed=seed,
                                              return_indices=True)
        return fastpool.stochastic_pool2d(a, 2, training=False), None
    if kind == "max":
        return fastpool.max_pool2d(a, 2, return_indices=True)
    return fastpool.avg_pool2d(a, 2), None


def pool_backward(kind, g, a, cache, training):
    if kind == "stochastic":
        return fastpool.stochastic_pool2d_backward(g, a, 2, training=training,
                                                   indices=cache)
    if kind == "max":
        return fastpool.max_pool2d_backward(g, a, 2, indices=cache)
    return fastpool.avg_pool2d_backward(g, a, 2)


# --- the network ------------------------------------------------------------------------

def init_params(rng, c1=16, c2=32, hidden=64, dtype=np.float32):
    """PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
    def uniform(shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(dtype)

    return {
        "w1": uniform((c1, 1, 3, 3), 9), "b1": uniform((c1,), 9),
        "w2": uniform((c2, c1, 3, 3), c1 * 9), "b2": uniform((c2,), c1 * 9),
        "w3": uniform((hidden, c2 * 4), c2 * 4), "b3": uniform((hidden,), c2 * 4),
        "w4": uniform((10, hidden), hidden), "b4": uniform((10,), hidden),
    }


def forward(p, x, pool, training, seed=None):
    """Logits and the activations backward needs. ``seed``: int for the 2 pool layers."""
    seeds = (None, None) if seed is None else (seed, seed + 1)
    a1 = np.maximum(fastpool.conv2d(x, p["w1"], p["b1"], padding=1), 0)
    h1, i1 = pool_forward(pool, a1, training, seeds[0])
    a2 = np.maximum(fastpool.conv2d(h1, p["w2"], p["b2"], padding=1), 0)
    h2, i2 = pool_forward(pool, a2, training, seeds[1])
    f = h2.reshape(len(x), -1)
    a3 = np.maximum(f @ p["w3"].T + p["b3"], 0)
    logits = a3 @ p["w4"].T + p["b4"]
    return logits, (x, a1, h1, i1, a2, h2, i2, f, a3)


def cross_entropy(logits, y):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(y)
    grad = np.exp(logp)
    grad[np.arange(n), y] -= 1
    return -logp[np.arange(n), y].mean(), grad / n


def backward(p, g, cache, pool, training):
    """Gradients of every parameter, given d loss / d logits."""
    x, a1, h1, i1, a2, h2, i2, f, a3 = cache
    grads = {"w4": g.T @ a3, "b4": g.sum(axis=0)}
    g = (g @ p["w4"]) * (a3 > 0)
    grads["w3"], grads["b3"] = g.T @ f, g.sum(axis=0)
    g = (g @ p["w3"]).reshape(h2.shape)
    g = pool_backward(pool, g, a2, i2, training) * (a2 > 0)
    g_h1, grads["w2"], grads["b2"] = fastpool.conv2d_backward(g, h1, p["w2"], padding=1)
    g = pool_backward(pool, g_h1, a1, i1, training) * (a1 > 0)
    _, grads["w1"], grads["b1"] = fastpool.conv2d_backward(
        g, x, p["w1"], padding=1, output_mask=(False, True, True))
    return grads


class Adam:
    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params, grads):
        self.t += 1
        b1, b2 = self.betas
        lr = self.lr * (1 - b2**self.t) ** 0.5 / (1 - b1**self.t)  # bias-corrected
        for k, g in grads.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            params[k] -= lr * self.m[k] / (np.sqrt(self.v[k]) + self.eps)


def accuracy(p, x, y, pool):
    logits, _ = forward(p, x, pool, training=False)
    return float((logits.argmax(axis=1) == y).mean())


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--pool", choices=["stochastic", "max", "avg"], default="stochastic")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    x_tr, y_tr, x_te, y_te = load()
    rng = np.random.default_rng(args.seed)
    params = init_params(rng)
    opt = Adam(params, lr=args.lr)
    print(f"digits: {len(x_tr)} train / {len(x_te)} test images, pooling {args.pool}, "
          f"{args.epochs} epochs, batch {args.batch_size}, seed {args.seed}", flush=True)

    # One step on two images (result discarded) compiles fastpool's kernels (Numba;
    # cached on disk after the first run) before the timed training.
    start = time.perf_counter()
    logits, cache = forward(params, x_tr[:2], args.pool, training=True, seed=0)
    backward(params, cross_entropy(logits, y_tr[:2])[1], cache, args.pool, training=True)
    accuracy(params, x_tr[:2], y_tr[:2], args.pool)
    print(f"warm-up (compiles fastpool's kernels on a first run): "
          f"{time.perf_counter() - start:.1f} s", flush=True)

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        opt.lr = args.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / args.epochs))
        epoch_batches = batches(len(x_tr), args.batch_size, rng)
        bar = Progress(epoch, args.epochs, len(epoch_batches))
        loss_sum = correct = seen = 0
        for step, idx in enumerate(epoch_batches, 1):
            x, y = x_tr[idx], y_tr[idx]
            seed = int(rng.integers(2**62))  # fresh stochastic-pooling picks every step
            logits, cache = forward(params, x, args.pool, training=True, seed=seed)
            loss, g = cross_entropy(logits, y)
            opt.step(params, backward(params, g, cache, args.pool, training=True))
            loss_sum += loss * len(y)
            correct += int((logits.argmax(axis=1) == y).sum())
            seen += len(y)
            bar.update(step, loss_sum / seen)
        test_acc = accuracy(params, x_te, y_te, args.pool)
        bar.close(f"train acc {correct / seen:6.2%}  test acc {test_acc:6.2%}")
    seconds = time.perf_counter() - start

    summary([[args.pool, f"{loss_sum / seen:.4f}", f"{correct / seen:.2%}",
              f"{test_acc:.2%}", f"{seconds:.1f}"]],
            ["pooling", "last train loss", "train acc", "test acc", "train s"])
    print(f"final test accuracy: {test_acc:.2%}")


if __name__ == "__main__":
    main()
