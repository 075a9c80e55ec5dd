"""What each Numba threading layer costs fastpool: tbb (fastpool's default), omp, workqueue.

A process runs one threading layer for its whole life, so the layers cannot be timed
side by side in one process. This script starts one child process per (round, layer),
the layers in a new random order every round; each child warms every case up (kernels
come from the disk cache) and reports the median of ``--repeats`` timed calls per
case. The table gives, per case, the median over rounds for each layer and its ratio to
tbb (> 1: slower than tbb).

    python asv_benchmarks/threading_layers.py                    # 5 rounds, 2 threads
    python asv_benchmarks/threading_layers.py --rounds 3 --json layers.json

``safe`` and ``threadsafe`` select tbb, ``forksafe`` selects workqueue on Linux, so the
three named layers cover Numba's options.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

LAYERS = ("tbb", "omp", "workqueue")

# (label, kind, x shape, argument): pooling cases are (kernel, stride, padding), conv
# cases a weight shape with padding 1.
CASES = [
    ("max_pool2d tiny call (1,1,4,4) k2", "max", (1, 1, 4, 4), (2, 2, 0)),
    ("max_pool2d (64,16,28,28) k2s2", "max", (64, 16, 28, 28), (2, 2, 0)),
    ("avg_pool2d (16,256,14,14) k2s2", "avg", (16, 256, 14, 14), (2, 2, 0)),
    ("max_pool2d (32,64,112,112) k3s2p1", "max", (32, 64, 112, 112), (3, 2, 1)),
    ("avg_pool2d_backward (32,64,112,112) k3s2p1", "avg_backward", (32, 64, 112, 112),
     (3, 2, 1)),
    ("conv2d 3x3 64->64 (1,64,56,56)", "conv", (1, 64, 56, 56), (64, 64, 3, 3)),
    ("conv2d 3x3 64->64 (32,64,56,56)", "conv", (32, 64, 56, 56), (64, 64, 3, 3)),
]


def _child(repeats):
    """Time every case on the layer this process was started with; print JSON."""
    import numba
    import numpy as np

    import fastpool

    rng = np.random.default_rng(0)
    timings = {}
    for label, kind, shape, arg in CASES:
        x = rng.random(shape, dtype=np.float32)
        if kind == "conv":
            w = rng.standard_normal(arg).astype(np.float32)
            call = (lambda x=x, w=w: fastpool.conv2d(x, w, padding=1))
        elif kind == "max":
            call = (lambda x=x, a=arg: fastpool.max_pool2d(x, *a))
        elif kind == "avg":
            call = (lambda x=x, a=arg: fastpool.avg_pool2d(x, *a))
        else:
            g = np.ones_like(fastpool.avg_pool2d(x, *arg))
            call = (lambda x=x, g=g, a=arg: fastpool.avg_pool2d_backward(g, x, *a))
        call()
        call()
        inner = 200 if x.size < 100 else 1  # time many tiny calls per sample
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(inner):
                call()
            samples.append((time.perf_counter() - start) / inner)
        timings[label] = statistics.median(samples)
    print(json.dumps({"layer": numba.threading_layer(), "threads": numba.get_num_threads(),
                      "timings": timings}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.repeats)
        return
    import random
    results = {layer: {label: [] for label, *_ in CASES} for layer in LAYERS}
    shuffle = random.Random(0)
    for round_ in range(args.rounds):
        for layer in shuffle.sample(LAYERS, len(LAYERS)):
            env = dict(os.environ, NUMBA_THREADING_LAYER=layer,
                       NUMBA_NUM_THREADS=str(args.threads), OMP_NUM_THREADS="1",
                       OPENBLAS_NUM_THREADS="1")
            out = subprocess.run([sys.executable, __file__, "--child", "--repeats",
                                  str(args.repeats)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            report = json.loads(out.strip().splitlines()[-1])
            assert report["layer"] == layer, report
            for label, seconds in report["timings"].items():
                results[layer][label].append(seconds)
            print(f"round {round_ + 1}/{args.rounds}: {layer} done", file=sys.stderr)
    medians = {layer: {label: statistics.median(v) for label, v in cases.items()}
               for layer, cases in results.items()}
    print(f"| case ({args.threads} threads, float32) | tbb ms | omp ms (x tbb) "
          f"| workqueue ms (x tbb) |")
    print("|---|---|---|---|")
    for label, *_ in CASES:
        tbb = medians["tbb"][label]
        cells = [f"{tbb * 1e3:.4g}"]
        for layer in ("omp", "workqueue"):
            t = medians[layer][label]
            cells.append(f"{t * 1e3:.4g} ({t / tbb:.2f}x)")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "threads": args.threads,
                       "rounds": args.rounds, "repeats": args.repeats,
                       "median_seconds": medians, "all_seconds": results}, f, indent=1)


if __name__ == "__main__":
    main()
