"""Parallel CPU pooling kernels (Numba) and their launchers.

Every launcher takes host arrays already validated by ``fastpool._params`` plus the
``PoolGeometry`` and returns host arrays. Kernels work on ``(planes, H, W)`` views with
``planes = N * C``.

Why kernels are built by factories: kernel size, stride and dilation are baked into
each compiled kernel as compile-time constants (``PoolGeometry.constants``), which lets
LLVM unroll the window loop and vectorise across output columns; with runtime
values the same loops ran about 6x slower. Each specialisation is compiled once per
process (``functools.lru_cache``) and cached on disk (``cache=True``; the closure's
constants are part of Numba's cache key), so a second process loads it without
compiling. Padding and sizes stay runtime arguments.

Forward kernels parallelise over output rows ``(plane, oh)``. Backward kernels give
each plane to one thread and scatter in output order, so no two threads ever write the
same element and every result is identical at any thread count, with no atomics.

Indexing uses ``uint64`` casts on offsets already known to be in range: Numba adds a
negative-index wraparound select to every signed index, which blocks vectorisation.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from fastpool import _params, _rng
from fastpool.cpu._arrays import contiguous

_JIT = dict(parallel=True, cache=True, boundscheck=False, error_model="numpy", nogil=True)
_U = np.uint64
_INF = np.inf
_JUST_BELOW_ONE = 1.0 - 2.0**-53


@njit(inline="always")
def _replaces(value, best):
    """Max-pool ordering: larger wins; the first NaN wins and then sticks."""
    return (value > best) | ((value != value) & (best == best))


def _interior_columns(g):
    """Output columns ``[lo, hi)`` whose window lies wholly inside the input's width."""
    lo = min((g.pad_w + g.stride_w - 1) // g.stride_w, g.out_w)
    hi = min((g.in_w - 1 - (g.kernel_w - 1) * g.dilation_w + g.pad_w) // g.stride_w + 1,
             g.out_w)
    return lo, max(hi, lo)


# Helpers are module-level (not closures) so the kernels that inline them stay cacheable
# on disk; callers pass their compile-time constants, which inlining folds in.

@njit(inline="always")
def _output_row(row, OH, H, W, ph, KH, SH, DH):
    """Plane ``p``, ``oh``, top input row ``h0``, plane offset, and whether every window
    row lies inside the input, for flat output row ``row = p * OH + oh``."""
    p = row // OH
    oh = row - p * OH
    h0 = oh * SH - ph
    return p, oh, h0, p * H * W, h0 >= 0 and h0 + (KH - 1) * DH < H


def _spread_along_w_py(srow, share, zero, pw, KW, SW, DW):
    """Write ``srow[w] = sum of share[ow]`` over the taps ``(ow, j)`` of every window
    with ``ow*SW - pw + j*DW == w`` (0 where none), each cell written once.

    Gather form, one residue class ``r = (w + pw) % SW`` at a time: the taps landing on
    that class are the ``j`` with ``j*DW % SW == r``, each reading ``share`` at a fixed
    offset ``q - c_j`` for ``w = q*SW + r - pw``. The sum runs over ``j`` in order, so
    it is deterministic; interior ``q`` need no bounds checks and vectorise.
    """
    W = srow.shape[0]
    OW = share.shape[0]
    for r in range(SW):
        q_lo = -((r - pw) // SW)  # ceil((pw - r) / SW): first q with w >= 0
        q_hi = (W - 1 + pw - r) // SW + 1
        if q_lo >= q_hi:
            continue
        c_min = OW + W  # offsets c_j = (j*DW - r) // SW of this class's taps
        c_max = -1
        for j in range(KW):
            if (j * DW) % SW == r:
                c = (j * DW - r) // SW
                c_min = min(c_min, c)
                c_max = max(c_max, c)
        if c_max < 0:  # no tap lands on this class
            for q in range(q_lo, q_hi):
                srow[_U(q * SW + r - pw)] = 0
            continue
        inner_lo = min(max(q_lo, c_max), q_hi)
        inner_hi = max(min(q_hi, OW + c_min), inner_lo)
        for q in range(inner_lo, inner_hi):
            acc = zero
            for j in range(KW):
                if (j * DW) % SW == r:
                    acc += share[_U(q - (j * DW - r) // SW)]
            srow[_U(q * SW + r - pw)] = acc
        for q in range(q_lo, q_hi):
            if inner_lo <= q < inner_hi:
                continue
            acc = zero
            for j in range(KW):
                if (j * DW) % SW == r:
                    o = q - (j * DW - r) // SW
                    if 0 <= o < OW:
                        acc += share[_U(o)]
            srow[_U(q * SW + r - pw)] = acc


def _gather_rows_py(dst, ring, OH, h, ph, KH, SH, DH):
    """``dst = sum of spread row oh`` over the output rows ``oh < OH`` whose window
    covers input row ``h`` (in tap order, so the result is deterministic); zeros if none
    does. Spread row ``oh`` lives in ``ring[oh % R]`` (``R = ring.shape[0]``)."""
    R = ring.shape[0]
    empty = True
    for i in range(KH):
        t = h + ph - i * DH
        if t < 0 or t % SH != 0 or t // SH >= OH:
            continue
        src = ring[(t // SH) % R]
        if empty:
            for w in range(dst.shape[0]):
                dst[w] = src[w]
            empty = False
        else:
            for w in range(dst.shape[0]):
                dst[w] += src[w]
    if empty:
        dst[:] = 0


def ring_rows(KH, SH, DH):
    """Spread rows a backward kernel keeps at once: the most output rows whose windows
    cover one input row. Input rows are visited in order and each spread row is made
    just before the first input row that needs it, so ``R`` rows of ``W`` are the
    whole per-thread scratch, however tall the plane."""
    return (KH - 1) * DH // SH + 1


# Inlined where speed matters (the constants fold in); called, and so compiled once for
# all geometries, where compile time matters more (stochastic inference backward).
_spread_along_w = njit(inline="always")(_spread_along_w_py)
_gather_rows = njit(inline="always")(_gather_rows_py)
_spread_along_w_called = njit(cache=True)(_spread_along_w_py)
_gather_rows_called = njit(cache=True)(_gather_rows_py)

# ----------------------------------------------------------------------------- max

@functools.lru_cache(maxsize=None)
def _max_forward_kernel(KH, KW, SH, SW, DH, DW, WITH_INDICES):
    @njit(**_JIT)
    def max_forward(x, out, indices, ph, pw, ow_lo, ow_hi):
        planes, H, W = x.shape
        OH, OW = out.shape[1], out.shape[2]
        xf = x.reshape(-1)
        of = out.reshape(-1)
        jf = indices.reshape(-1)
        for row in prange(planes * OH):
            _, _, h0, base, rows_inside = _output_row(row, OH, H, W, ph, KH, SH, DH)
            orow = row * OW
            if rows_inside:
                for ow in range(ow_lo, ow_hi):
                    k0 = h0 * W + ow * SW - pw
                    best = xf[_U(base + k0)]
                    arg = k0
                    for i in range(KH):
                        for j in range(KW):
                            if i + j > 0:
                                k = k0 + i * DH * W + j * DW
                                v = xf[_U(base + k)]
                                take = _replaces(v, best)
                                best = v if take else best
                                if WITH_INDICES:
                                    arg = k if take else arg
                    of[_U(orow + ow)] = best
                    if WITH_INDICES:
                        jf[_U(orow + ow)] = arg
            for ow in range(OW):
                if rows_inside and ow_lo <= ow < ow_hi:
                    continue
                w0 = ow * SW - pw
                best = -_INF
                arg = -1
                for i in range(KH):
                    h = h0 + i * DH
                    if h < 0 or h >= H:
                        continue
                    for j in range(KW):
                        w = w0 + j * DW
                        if w < 0 or w >= W:
                            continue
                        v = xf[base + h * W + w]
                        if arg < 0 or _replaces(v, best):
                            best = v
                            arg = h * W + w
                of[orow + ow] = best
                if WITH_INDICES:
                    jf[orow + ow] = arg

    return max_forward


@njit(**_JIT)
def _scatter_to_indices(grad_output, indices, grad_input):
    """``grad_input[p].flat[indices[p, k]] += grad_output[p, k]``; returns #bad indices."""
    planes, plane_size = grad_input.shape
    outputs = grad_output.shape[1]
    bad = 0
    for p in prange(planes):
        g = grad_input[p]
        for k in range(plane_size):
            g[k] = 0
        for k in range(outputs):
            target = indices[p, k]
            if 0 <= target < plane_size:
                g[_U(target)] += grad_output[p, k]
            else:
                bad += 1
    return bad


def _as_planes(a, h, w):
    return contiguous(a).reshape(-1, h, w)


def max_pool2d_forward(x, geometry, with_indices):
    g = geometry
    out = np.empty(g.output_shape, dtype=x.dtype)
    indices = np.empty(g.output_shape if with_indices else (1,), dtype=np.int64)
    if g.planes:
        ow_lo, ow_hi = _interior_columns(g)
        kernel = _max_forward_kernel(*g.constants, bool(with_indices))
        kernel(_as_planes(x, g.in_h, g.in_w), out.reshape(-1, g.out_h, g.out_w),
               indices.reshape(-1, g.out_h, g.out_w) if with_indices
               else indices.reshape(1, 1, 1),
               g.pad_h, g.pad_w, ow_lo, ow_hi)
    return out, (indices if with_indices else None)


def scatter_to_indices(grad_output, indices, geometry):
    """Backward of a pooling that picked one element per window (max, stochastic-train)."""
    g = geometry
    grad_input = np.empty(g.input_shape, dtype=grad_output.dtype)
    if g.planes:
        plane_out = g.out_h * g.out_w
        bad = _scatter_to_indices(
            contiguous(grad_output).reshape(-1, plane_out),
            contiguous(indices).reshape(-1, plane_out),
            grad_input.reshape(-1, g.in_h * g.in_w))
        if bad:
            raise ValueError(
                f"indices holds {bad} value(s) outside [0, H*W) = [0, {g.in_h * g.in_w}); "
                "indices must be flat positions h * W + w inside each (n, c) plane")
    return grad_input


def max_pool2d_backward(grad_output, x, geometry, indices):
    if indices is None:
        _, indices = max_pool2d_forward(x, geometry, with_indices=True)
    return scatter_to_indices(grad_output, indices, geometry)


# ----------------------------------------------------------------------------- average

@functools.lru_cache(maxsize=None)
def _avg_forward_kernel(KH, KW, SH, SW):
    @njit(**_JIT)
    def avg_forward(x, out, ph, pw, count_include_pad, divisor_override, ow_lo, ow_hi,
                    zero, interior_divisor):
        planes, H, W = x.shape
        OH, OW = out.shape[1], out.shape[2]
        xf = x.reshape(-1)
        of = out.reshape(-1)
        for row in prange(planes * OH):
            _, _, h0, base, rows_inside = _output_row(row, OH, H, W, ph, KH, SH, 1)
            orow = row * OW
            if rows_inside:
                for ow in range(ow_lo, ow_hi):
                    k0 = h0 * W + ow * SW - pw
                    total = zero
                    for i in range(KH):
                        for j in range(KW):
                            total += xf[_U(base + k0 + i * W + j)]
                    of[_U(orow + ow)] = total / interior_divisor
            h1 = min(h0 + KH, H + ph)
            hs, he = max(h0, 0), min(h1, H)
            for ow in range(OW):
                if rows_inside and ow_lo <= ow < ow_hi:
                    continue
                w0 = ow * SW - pw
                w1 = min(w0 + KW, W + pw)
                ws, we = max(w0, 0), min(w1, W)
                total = zero
                for h in range(hs, he):
                    for w in range(ws, we):
                        total += xf[base + h * W + w]
                if divisor_override != 0:
                    divisor = divisor_override
                elif count_include_pad:
                    divisor = (h1 - h0) * (w1 - w0)
                else:
                    divisor = (he - hs) * (we - ws)
                of[orow + ow] = total / divisor

    return avg_forward


@functools.lru_cache(maxsize=None)
def _avg_backward_kernel(KH, KW, SH, SW):
    R = ring_rows(KH, SH, 1)

    @njit(**_JIT)
    def avg_backward(grad_output, grad_input, ph, pw, count_include_pad,
                     divisor_override, zero):
        """Separable gather: the box sum is spread along w into one row per ``oh``,
        then each input row adds the spread rows covering it, so every ``grad_input``
        element is written once, with vector-friendly row additions. Spread rows are
        made as the input rows reach them and kept in a ring of ``R`` rows."""
        planes, H, W = grad_input.shape
        OH, OW = grad_output.shape[1], grad_output.shape[2]
        for p in prange(planes):
            go = grad_output[p]
            gi = grad_input[p]
            share = np.empty(OW, dtype=grad_input.dtype)
            ring = np.empty((R, W), dtype=grad_input.dtype)
            next_oh = 0
            for h in range(H):
                while next_oh <= min((h + ph) // SH, OH - 1):
                    oh = next_oh
                    h0 = oh * SH - ph
                    h1 = min(h0 + KH, H + ph)
                    rows_in = min(h1, H) - max(h0, 0)
                    for ow in range(OW):
                        w0 = ow * SW - pw
                        w1 = min(w0 + KW, W + pw)
                        if divisor_override != 0:
                            divisor = divisor_override
                        elif count_include_pad:
                            divisor = (h1 - h0) * (w1 - w0)
                        else:
                            divisor = rows_in * (min(w1, W) - max(w0, 0))
                        share[ow] = go[oh, ow] / divisor
                    _spread_along_w(ring[oh % R], share, zero, pw, KW, SW, 1)
                    next_oh += 1
                _gather_rows(gi[h], ring, OH, h, ph, KH, SH, 1)

    return avg_backward


def avg_pool2d_forward(x, geometry, count_include_pad, divisor_override):
    g = geometry
    out = np.empty(g.output_shape, dtype=x.dtype)
    if g.planes:
        ow_lo, ow_hi = _interior_columns(g)
        kernel = _avg_forward_kernel(g.kernel_h, g.kernel_w, g.stride_h, g.stride_w)
        kernel(_as_planes(x, g.in_h, g.in_w), out.reshape(-1, g.out_h, g.out_w),
               g.pad_h, g.pad_w, count_include_pad, divisor_override, ow_lo, ow_hi,
               # Sum and divide in the input's dtype, as PyTorch does.
               x.dtype.type(0), x.dtype.type(divisor_override or g.kernel_h * g.kernel_w))
    return out


def avg_pool2d_backward(grad_output, geometry, count_include_pad, divisor_override):
    g = geometry
    grad_input = np.empty(g.input_shape, dtype=grad_output.dtype)
    if g.planes:
        kernel = _avg_backward_kernel(g.kernel_h, g.kernel_w, g.stride_h, g.stride_w)
        kernel(_as_planes(grad_output, g.out_h, g.out_w),
               grad_input.reshape(-1, g.in_h, g.in_w),
               g.pad_h, g.pad_w, count_include_pad, divisor_override,
               grad_output.dtype.type(0))
    return grad_input


# ----------------------------------------------------------------------------- stochastic

@njit(inline="always")
def _tap(e, h0, w0, H, W, KW, DH, DW):
    """Flat in-plane offset of window element ``e`` (row-major), or -1 if padding."""
    i = e // KW
    h = h0 + i * DH
    w = w0 + (e - i * KW) * DW
    if h < 0 or h >= H or w < 0 or w >= W:
        return -1
    return h * W + w


@njit(inline="always")
def _window_sums(xf, base, h0, w0, H, W, KH, KW, DH, DW):
    """Return ``(S1, S2, first in-input offset, invalid)`` of one window (float64)."""
    s1 = 0.0
    s2 = 0.0
    first = -1
    invalid = False
    for e in range(KH * KW):
        k = _tap(e, h0, w0, H, W, KW, DH, DW)
        if k >= 0:
            v = np.float64(xf[_U(base + k)])
            if not (0.0 <= v < _INF):
                invalid = True
            if first < 0:
                first = k
            s1 += v
            s2 += v * v
    return s1, s2, first, invalid or not (s1 < _INF)


@njit(inline="always")
def _interior_sums(xf, k0, W, KH, KW, DH, DW):
    """``(S1, S2, all taps >= 0)`` of a window wholly inside the input, starting at flat
    offset ``k0``: no bounds checks, so loops over ``ow`` vectorise (float64 sums)."""
    s1 = 0.0
    s2 = 0.0
    nonnegative = True
    for i in range(KH):
        for j in range(KW):
            v = np.float64(xf[_U(k0 + i * DH * W + j * DW)])
            s1 += v
            s2 += v * v
            nonnegative &= v >= 0.0
    return s1, s2, nonnegative


@functools.lru_cache(maxsize=None)
def _stochastic_train_kernel(KH, KW, SH, SW, DH, DW, WITH_INDICES):
    """Training forward: window elements are visited in row-major order; sums, the
    threshold and the running sum are float64 in that order, so the choice made for a
    window is exactly reproducible (and matches the GPU kernel's)."""
    taps = KH * KW

    @njit(**_JIT)
    def train_forward(x, out, indices, ph, pw, seed, channels, invalid_rows, ow_lo, ow_hi):
        planes, H, W = x.shape
        OH, OW = out.shape[1], out.shape[2]
        xf = x.reshape(-1)
        of = out.reshape(-1)
        jf = indices.reshape(-1)
        for row in prange(planes * OH):
            p, oh, h0, base, rows_inside = _output_row(row, OH, H, W, ph, KH, SH, DH)
            n = p // channels
            key = _rng.plane_key(seed, n, p - n * channels)
            orow = row * OW
            invalid = False
            if rows_inside:
                # Branch-free form of the edge loop below, so LLVM vectorises across ow.
                for ow in range(ow_lo, ow_hi):
                    k0 = h0 * W + ow * SW - pw
                    total, _, nonnegative = _interior_sums(xf, base + k0, W, KH, KW, DH, DW)
                    invalid |= not (nonnegative and total < _INF)
                    # u * total can round up to total; capping the threshold at the
                    # double just below total (total * (1 - 2**-53) is exactly that for
                    # any normal total) makes the last positive element the fallback
                    # with no extra state, as the edge path does explicitly.
                    threshold = min(_rng.uniform(key, oh, ow) * total,
                                    total * _JUST_BELOW_ONE)
                    running = 0.0
                    found = False
                    chosen = k0
                    value = xf[_U(base + k0)]  # a zero-sum window: all zeros, keeps first
                    for i in range(KH):
                        for j in range(KW):
                            k = k0 + i * DH * W + j * DW
                            v = xf[_U(base + k)]
                            running += np.float64(v)
                            hit = (running > threshold) & (not found)
                            chosen = k if hit else chosen
                            value = v if hit else value
                            found |= hit
                    of[_U(orow + ow)] = value
                    if WITH_INDICES:
                        jf[_U(orow + ow)] = chosen
            for ow in range(OW):
                if rows_inside and ow_lo <= ow < ow_hi:
                    continue
                w0 = ow * SW - pw
                total, _, first, bad = _window_sums(xf, base, h0, w0, H, W,
                                                    KH, KW, DH, DW)
                invalid |= bad
                chosen = first
                if total > 0.0:
                    threshold = _rng.uniform(key, oh, ow) * total
                    running = 0.0
                    last_positive = first
                    chosen = -1
                    for e in range(taps):
                        k = _tap(e, h0, w0, H, W, KW, DH, DW)
                        if k >= 0:
                            v = np.float64(xf[_U(base + k)])
                            running += v
                            if v > 0.0:
                                last_positive = k
                            if running > threshold:
                                chosen = k
                                break
                    if chosen < 0:
                        chosen = last_positive
                of[orow + ow] = xf[_U(base + chosen)] if total > 0.0 else 0
                if WITH_INDICES:
                    jf[orow + ow] = chosen
            invalid_rows[row] = invalid

    return train_forward


@functools.lru_cache(maxsize=None)
def _stochastic_infer_kernels(KH, KW, SH, SW, DH, DW):
    """Inference forward and backward (probability-weighted average)."""
    R = ring_rows(KH, SH, DH)

    @njit(**_JIT)
    def infer_forward(x, out, ph, pw, invalid_rows, ow_lo, ow_hi):
        planes, H, W = x.shape
        OH, OW = out.shape[1], out.shape[2]
        xf = x.reshape(-1)
        of = out.reshape(-1)
        for row in prange(planes * OH):
            _, _, h0, base, rows_inside = _output_row(row, OH, H, W, ph, KH, SH, DH)
            orow = row * OW
            invalid = False
            if rows_inside:
                for ow in range(ow_lo, ow_hi):
                    s1, s2, nonnegative = _interior_sums(
                        xf, base + h0 * W + ow * SW - pw, W, KH, KW, DH, DW)
                    invalid |= not (nonnegative and s1 < _INF and s2 < _INF)
                    of[_U(orow + ow)] = s2 / s1 if s1 > 0.0 else 0.0
            for ow in range(OW):
                if rows_inside and ow_lo <= ow < ow_hi:
                    continue
                s1, s2, _, bad = _window_sums(xf, base, h0, ow * SW - pw, H, W,
                                              KH, KW, DH, DW)
                invalid |= bad or not (s2 < _INF)
                of[orow + ow] = s2 / s1 if s1 > 0.0 else 0.0
            invalid_rows[row] = invalid

    @njit(**_JIT)
    def infer_backward(grad_output, x, grad_input, ph, pw, invalid_planes, ow_lo, ow_hi):
        """Each window adds ``g * (2 a_i S1 - S2) / S1**2 = a_i * A + B`` to its taps,
        with ``A = 2 g / S1`` and ``B = -g S2 / S1**2``; so per plane the ``A`` and ``B``
        of all windows are box-spread as in average pooling's backward, and then
        ``grad = x * spread(A) + spread(B)`` writes every element once."""
        planes, H, W = x.shape
        OH, OW = grad_output.shape[1], grad_output.shape[2]
        for p in prange(planes):
            xp = x[p]
            xf = xp.reshape(-1)
            go = grad_output[p]
            gi = grad_input[p]
            share_a = np.empty(OW)
            share_b = np.empty(OW)
            ring_a = np.empty((R, W))
            ring_b = np.empty((R, W))
            row_a = np.empty(W)
            row_b = np.empty(W)
            invalid = False
            next_oh = 0
            for h in range(H):
                while next_oh <= min((h + ph) // SH, OH - 1):
                    oh = next_oh
                    h0 = oh * SH - ph
                    rows_inside = h0 >= 0 and h0 + (KH - 1) * DH < H
                    for ow in range(OW):
                        if rows_inside and ow_lo <= ow < ow_hi:
                            s1, s2, nonnegative = _interior_sums(
                                xf, h0 * W + ow * SW - pw, W, KH, KW, DH, DW)
                            bad = not nonnegative
                        else:
                            s1, s2, _, bad = _window_sums(xf, 0, h0, ow * SW - pw, H, W,
                                                          KH, KW, DH, DW)
                        invalid |= bad or not (s1 < _INF and s2 < _INF)
                        g = np.float64(go[oh, ow])
                        share_a[ow] = 2.0 * g / s1 if s1 > 0.0 else 0.0
                        share_b[ow] = -g * s2 / (s1 * s1) if s1 > 0.0 else 0.0
                    _spread_along_w_called(ring_a[oh % R], share_a, 0.0, pw, KW, SW, DW)
                    _spread_along_w_called(ring_b[oh % R], share_b, 0.0, pw, KW, SW, DW)
                    next_oh += 1
                _gather_rows_called(row_a, ring_a, OH, h, ph, KH, SH, DH)
                _gather_rows_called(row_b, ring_b, OH, h, ph, KH, SH, DH)
                xrow = xp[h]
                girow = gi[h]
                for w in range(W):
                    girow[w] = np.float64(xrow[w]) * row_a[w] + row_b[w]
            invalid_planes[p] = invalid

    return infer_forward, infer_backward


def _raise_if_invalid(flags):
    if flags.any():
        raise _params.invalid_stochastic_input()


def stochastic_pool2d_forward(x, geometry, training, seed, with_indices):
    g = geometry
    with_indices = bool(training and with_indices)
    out = np.empty(g.output_shape, dtype=x.dtype)
    indices = np.empty(g.output_shape if with_indices else (1,), dtype=np.int64)
    if g.planes:
        invalid = np.zeros(g.planes * g.out_h, dtype=np.bool_)
        ow_lo, ow_hi = _interior_columns(g)
        planes_x = _as_planes(x, g.in_h, g.in_w)
        planes_out = out.reshape(-1, g.out_h, g.out_w)
        if training:
            kernel = _stochastic_train_kernel(*g.constants, with_indices)
            kernel(planes_x, planes_out,
                   indices.reshape(-1, g.out_h, g.out_w) if with_indices
                   else indices.reshape(1, 1, 1),
                   g.pad_h, g.pad_w, np.uint64(seed), g.channels, invalid, ow_lo, ow_hi)
        else:
            infer_forward, _ = _stochastic_infer_kernels(*g.constants)
            infer_forward(planes_x, planes_out, g.pad_h, g.pad_w, invalid, ow_lo, ow_hi)
        _raise_if_invalid(invalid)
    return out, (indices if with_indices else None)


def stochastic_pool2d_backward(grad_output, x, geometry, training, indices):
    g = geometry
    if training:
        return scatter_to_indices(grad_output, indices, geometry)
    grad_input = np.empty(g.input_shape, dtype=grad_output.dtype)
    if g.planes:
        _, infer_backward = _stochastic_infer_kernels(*g.constants)
        invalid = np.zeros(g.planes, dtype=np.bool_)
        ow_lo, ow_hi = _interior_columns(g)
        infer_backward(_as_planes(grad_output, g.out_h, g.out_w),
                       _as_planes(x, g.in_h, g.in_w),
                       grad_input.reshape(-1, g.in_h, g.in_w), g.pad_h, g.pad_w, invalid,
                       ow_lo, ow_hi)
        _raise_if_invalid(invalid)
    return grad_input
