"""Forward and backward time of the "rows" and "im2col" convolution algorithms on
layers with outputs under 56 columns (where the planner used to send every layer to
im2col): the four calls interleaved for SECONDS (default 6) per layer, medians,
THREADS threads (default 2), float32. The rows / im2col ratios are what
fastpool/cpu/conv/_planner.py's _ROWS_NARROW_* rule was set from.
Run from a checkout: python docs/measure_rows_narrow.py"""
import json, os, time
import numpy as np, numba
from fastpool import _params
from fastpool.cpu import conv as cpu_conv

numba.set_num_threads(int(os.environ.get("THREADS", "2")))
SECONDS = float(os.environ.get("SECONDS", "6"))
CASES = [  # (name, x shape, weight shape, padding)
    ("lenet 5x5 6->16@14 b1", (1, 6, 14, 14), (16, 6, 5, 5), 0),
    ("lenet 5x5 6->16@14 b4", (4, 6, 14, 14), (16, 6, 5, 5), 0),
    ("lenet 5x5 6->16@14 b8", (8, 6, 14, 14), (16, 6, 5, 5), 0),
    ("lenet 5x5 6->16@14 b32", (32, 6, 14, 14), (16, 6, 5, 5), 0),
    ("5x5 3->6@32 b16", (16, 3, 32, 32), (6, 3, 5, 5), 0),
    ("5x5 16->32@28 b8", (8, 16, 28, 28), (32, 16, 5, 5), 2),
    ("5x5 32->64@32 b8", (8, 32, 32, 32), (64, 32, 5, 5), 2),
    ("5x5 32->64@14 b32", (32, 32, 14, 14), (64, 32, 5, 5), 2),
    ("5x5 64->64@14 b8", (8, 64, 14, 14), (64, 64, 5, 5), 2),
    ("5x5 128->128@14 b8", (8, 128, 14, 14), (128, 128, 5, 5), 2),
    ("3x5 32->32@20 b8", (8, 32, 20, 20), (32, 32, 3, 5), 1),
    ("3x3 4->16@28 b8", (8, 4, 28, 28), (16, 4, 3, 3), 1),
    ("3x3 256->256@14 b1", (1, 256, 14, 14), (256, 256, 3, 3), 1),
    ("3x3 512->512@7 b1", (1, 512, 7, 7), (512, 512, 3, 3), 1),
    ("1x7 64->64@17 b8", (8, 64, 17, 17), (64, 64, 1, 7), (0, 3)),
    ("7x1 64->64@17 b8", (8, 64, 17, 17), (64, 64, 7, 1), (3, 0)),
]
rng = np.random.default_rng(0)
rows = []
for name, xs, ws, pad in CASES:
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    b = rng.standard_normal(ws[0]).astype(np.float32)
    g = _params.conv_window(x, w, b, 2, padding=pad)[3]
    gy = rng.standard_normal(g.output_shape).astype(np.float32)
    calls = {}
    for a in ("rows", "im2col"):
        calls[a, "fwd"] = lambda a=a: cpu_conv.conv2d_forward(x, w, b, g, a)
        calls[a, "bwd"] = lambda a=a: cpu_conv.conv2d_backward(gy, x, w, g, (True,) * 3, a)
    for call in calls.values():
        call(), call()
    times = {k: [] for k in calls}
    end = time.perf_counter() + SECONDS
    while time.perf_counter() < end:
        for k, call in calls.items():
            t = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - t)
    ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    row = dict(layer=name, chosen=cpu_conv.choose_algorithm(g),
               **{f"{a}_{d}_ms": round(ms[a, d], 4) for a, d in calls},
               forward_rows_over_im2col=round(ms["rows", "fwd"] / ms["im2col", "fwd"], 3),
               backward_rows_over_im2col=round(ms["rows", "bwd"] / ms["im2col", "bwd"], 3))
    print(json.dumps(row), flush=True)
    rows.append(row)
if os.environ.get("OUT"):
    with open(os.environ["OUT"], "w") as f:
        json.dump(rows, f, indent=1)
