"""The backward of channels-last 2-D convolutions: fastpool on the NHWC buffers as they
are, fastpool as it ran before 2026-12-05's fifth session (copy ``x`` and
``grad_output`` to channels-first, run the channels-first backward, copy the input
gradient back to channels-last), fastpool channels-first, and PyTorch's
``convolution_backward`` on ``channels_last`` tensors, all interleaved in one loop
(float32, 2 threads, best of 7 calls of each, ms; input, weight and bias gradients)::

    OMP_WAIT_POLICY=PASSIVE python docs/measure_channels_last_backward.py

Figures in docs/site/performance.md."""
import time

LAYERS = [  # (batch, C_in, C_out, size, kernel, stride, padding)
    (1, 64, 64, 56, 3, 1, 1),
    (8, 64, 64, 56, 3, 1, 1),
    (8, 128, 128, 28, 3, 1, 1),
    (8, 256, 256, 14, 3, 1, 1),
    (8, 512, 512, 7, 3, 1, 1),
    (8, 64, 128, 56, 3, 2, 1),
    (32, 64, 128, 56, 1, 2, 0),
    (8, 3, 64, 224, 7, 2, 3),
]


def main():
    import numba
    import numpy as np
    import torch

    import fastpool

    numba.set_num_threads(2)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)

    def last(a):
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)

    print("layer                       in place  copied  channels-first  PyTorch CL")
    for n, c, o, size, k, s, p in LAYERS:
        x = rng.standard_normal((n, c, size, size), dtype=np.float32)
        w = rng.standard_normal((o, c, k, k), dtype=np.float32)
        g = rng.standard_normal(fastpool.conv2d(x, w, stride=s, padding=p).shape,
                                dtype=np.float32)
        xl, gl = last(x), last(g)
        tx, tg = (torch.from_numpy(a) for a in (xl, gl))
        tw = torch.from_numpy(w)

        def copied():
            grads = fastpool.conv2d_backward(np.ascontiguousarray(gl),
                                             np.ascontiguousarray(xl), w, stride=s,
                                             padding=p)
            return last(grads.grad_input), grads.grad_weight, grads.grad_bias

        calls = [
            lambda: fastpool.conv2d_backward(gl, xl, w, stride=s, padding=p),
            copied,
            lambda: fastpool.conv2d_backward(g, x, w, stride=s, padding=p),
            lambda: torch.ops.aten.convolution_backward(
                tg, tx, tw, [o], [s, s], [p, p], [1, 1], False, [0, 0], 1,
                [True, True, True]),
        ]
        best = [float("inf")] * len(calls)
        for call in calls:
            call()
        for _ in range(7):
            for i, call in enumerate(calls):
                start = time.perf_counter()
                call()
                best[i] = min(best[i], time.perf_counter() - start)
        name = f"{n}x {c}->{o}@{size} k{k} s{s}"
        print(f"{name:26s}" + "".join(f"{t * 1e3:10.2f}" for t in best))


if __name__ == "__main__":
    main()
