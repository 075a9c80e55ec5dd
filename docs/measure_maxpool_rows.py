"""Why the NCHW 3x3 stride-2 max pooling forward of (1, 64, 112, 112) lags ONNX
Runtime (2026-12-05, ninth session): prototypes of its horizontal pass (each input
row's maximum over every window's three columns, stride 2) on one thread. Run:
python docs/measure_maxpool_rows.py. See docs/site/performance.md ("The NCHW stem max pooling"); the kernel
now does what the fastest of these does."""
import time, numpy as np, numba
from numba import njit
U = np.uint64
@njit(inline="always")
def rep(v, b):
    return (v > b) | ((v != v) & (b == b))

@njit(boundscheck=False, error_model="numpy")
def direct(x, out, W, OW):
    rows = x.size // W
    for r in range(rows):
        start = r * W - 1
        at = r * OW
        for ow in range(1, OW - 0):
            k0 = start + ow * 2
            if k0 + 2 >= (r + 1) * W: break
            best = x[U(k0)]
            v = x[U(k0 + 1)]; best = v if rep(v, best) else best
            v = x[U(k0 + 2)]; best = v if rep(v, best) else best
            out[U(at + ow)] = best

@njit(boundscheck=False, error_model="numpy")
def phased(x, out, W, OW, e, o):
    rows = x.size // W
    L = W // 2
    for r in range(rows):
        base = r * W
        for q in range(L):
            e[U(q)] = x[U(base + 2 * q)]
            o[U(q)] = x[U(base + 2 * q + 1)]
        at = r * OW
        # out[ow] taps at columns 2ow-1, 2ow, 2ow+1 -> o[ow-1], e[ow], o[ow]
        for ow in range(1, OW):
            best = o[U(ow - 1)]
            v = e[U(ow)]; best = v if rep(v, best) else best
            v = o[U(ow)]; best = v if rep(v, best) else best
            out[U(at + ow)] = best

x = np.random.default_rng(0).standard_normal(64 * 112 * 112).astype(np.float32)
out = np.empty(64 * 112 * 56, np.float32)
e = np.empty(56, np.float32); o = np.empty(56, np.float32)
direct(x, out, 112, 56); phased(x, out, 112, 56, e, o)
for name, f in (("direct", lambda: direct(x, out, 112, 56)), ("phased", lambda: phased(x, out, 112, 56, e, o))):
    t = []
    for _ in range(200):
        s = time.perf_counter(); f(); t.append(time.perf_counter() - s)
    print(name, round(np.median(t) * 1e6, 1), "us for all 7168 rows (one thread)")

@njit(boundscheck=False, error_model="numpy")
def deint(x, W, e, o):
    rows = x.size // W
    L = W // 2
    s = 0.0
    for r in range(rows):
        base = r * W
        for q in range(L):
            e[U(q)] = x[U(base + 2 * q)]
            o[U(q)] = x[U(base + 2 * q + 1)]
        s += e[3]
    return s

@njit(boundscheck=False, error_model="numpy")
def deint_all(x, W, e, o):
    # whole array at once: one long loop
    n = x.size // 2
    for q in range(n):
        e[U(q)] = x[U(2 * q)]
        o[U(q)] = x[U(2 * q + 1)]

@njit(boundscheck=False, error_model="numpy")
def combine(e, o, out, rows, OW):
    for r in range(rows):
        at = r * OW
        b = r * OW
        for ow in range(1, OW):
            best = o[U(b + ow - 1)]
            v = e[U(b + ow)]; best = v if rep(v, best) else best
            v = o[U(b + ow)]; best = v if rep(v, best) else best
            out[U(at + ow)] = best

E = np.empty(x.size // 2, np.float32); O = np.empty(x.size // 2, np.float32)
deint(x, 112, e, o); deint_all(x, 112, E, O); combine(E, O, out, 7168, 56)
for name, f in (("deint per row", lambda: deint(x, 112, e, o)), ("deint all", lambda: deint_all(x, 112, E, O)), ("combine", lambda: combine(E, O, out, 7168, 56))):
    t = []
    for _ in range(200):
        s = time.perf_counter(); f(); t.append(time.perf_counter() - s)
    print(name, round(np.median(t) * 1e6, 1))


@njit(boundscheck=False, error_model="numpy")
def combine_flat(e, o, out, n):
    # the fold of combine() as one loop over every row's outputs (row starts, whose
    # first tap is padding, would be fixed apart)
    for i in range(1, n):
        best = o[U(i - 1)]
        v = e[U(i)]; best = v if rep(v, best) else best
        v = o[U(i)]; best = v if rep(v, best) else best
        out[U(i)] = best


combine_flat(E, O, out, 7168 * 56)
t = []
for _ in range(200):
    s = time.perf_counter(); combine_flat(E, O, out, 7168 * 56); t.append(time.perf_counter() - s)
print("combine flat", round(np.median(t) * 1e6, 1))
