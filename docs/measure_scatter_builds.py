"""The stochastic training backward (the scatter of gradients to the picked indices),
the pre-N-D build against this one, in one process, calls interleaved (each timed call
after an untimed one), best and median of 60, the public call, channels-first:

    git worktree add /tmp/prend 7758188
    python docs/measure_scatter_builds.py /tmp/prend 2     # threads

Each case checks that both builds give the same gradient. Figures in
docs/site/performance.md ("No regression of the 2-D channels-first figures")."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(tree, threads):
    from measure_builds_interleaved import _old_package

    sys.path.insert(0, _old_package(tree))
    import numba
    import numpy as np

    import fastpool
    import fastpool_old

    numba.set_num_threads(threads)
    for dtype in (np.float64, np.float32):
        for shape in ((8, 512, 14, 14), (32, 64, 56, 56), (8, 16, 32, 32)):
            rng = np.random.default_rng(0)
            x = rng.random(shape).astype(dtype)
            s, picked = fastpool.stochastic_pool2d(x, 3, 2, 1, training=True, seed=1,
                                                   return_indices=True)
            g = rng.standard_normal(s.shape).astype(dtype)

            def new():
                return fastpool.stochastic_pool2d_backward(g, x, 3, 2, 1, indices=picked)

            def old():
                return fastpool_old.stochastic_pool2d_backward(g, x, 3, 2, 1,
                                                               indices=picked)

            assert np.array_equal(new(), old())
            times = {"old": [], "new": []}
            for i in range(60):
                pair = (("new", new), ("old", old)) if i % 2 else (("old", old),
                                                                  ("new", new))
                for name, fn in pair:
                    fn()
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            best = {k: min(v) for k, v in times.items()}
            print(f"{np.dtype(dtype).name} {shape}: "
                  + ", ".join(f"{k} best {best[k] * 1e6:.0f} us median "
                              f"{np.median(v) * 1e6:.0f}" for k, v in times.items())
                  + f"; old/new {best['old'] / best['new']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
