"""Max pooling on the CPU, channels-first: the forward kernel, and the scatter that is
the backward of every pooling that picks one element per window (max, stochastic
training).

Kernels are built per ``(kernel, stride, dilation)`` of the three axes, which are
compile-time constants (``Window.constants``): LLVM unrolls the window and vectorises
across output columns; with runtime values the same loops ran about 6x slower.
"""

from __future__ import annotations

import functools

from numba import njit, prange

from fastpool.cpu._pool_common import INF, JIT, U, output_row, replaces


@functools.lru_cache(maxsize=None)
def max_forward(KD, KH, KW, SD, SH, SW, DD, DH, DW, WITH_INDICES):
    """``kernel(x, out, indices, pd, ph, pw, ow_lo, ow_hi)`` on ``(planes, D, H, W)``
    views; ``indices`` receives flat positions ``(d * H + h) * W + w`` in the plane."""

    @njit(**JIT)
    def kernel(x, out, indices, pd, ph, pw, ow_lo, ow_hi):
        planes, D, H, W = x.shape
        OD, OH, OW = out.shape[1], out.shape[2], out.shape[3]
        HW = H * W
        xf = x.reshape(-1)
        of = out.reshape(-1)
        jf = indices.reshape(-1)
        for row in prange(planes * OD * OH):
            _, _, _, d0, h0, base, inside = output_row(row, OD, OH, D, H, W, pd, ph,
                                                       KD, KH, SD, SH, DD, DH)
            orow = row * OW
            if inside:
                start = d0 * HW + h0 * W - pw  # the row's first window, hoisted
                for ow in range(ow_lo, ow_hi):
                    k0 = start + ow * SW
                    best = xf[U(base + k0)]
                    arg = k0
                    for a in range(KD):
                        for i in range(KH):
                            for j in range(KW):
                                if a + i + j > 0:
                                    k = k0 + a * DD * HW + i * DH * W + j * DW
                                    v = xf[U(base + k)]
                                    take = replaces(v, best)
                                    best = v if take else best
                                    if WITH_INDICES:
                                        arg = k if take else arg
                    of[U(orow + ow)] = best
                    if WITH_INDICES:
                        jf[U(orow + ow)] = arg
            for ow in range(OW):
                if inside and ow_lo <= ow < ow_hi:
                    continue
                w0 = ow * SW - pw
                best = -INF
                arg = -1
                for a in range(KD):
                    d = d0 + a * DD
                    if d < 0 or d >= D:
                        continue
                    for i in range(KH):
                        h = h0 + i * DH
                        if h < 0 or h >= H:
                            continue
                        for j in range(KW):
                            w = w0 + j * DW
                            if w < 0 or w >= W:
                                continue
                            k = d * HW + h * W + w
                            v = xf[base + k]
                            if arg < 0 or replaces(v, best):
                                best = v
                                arg = k
                of[orow + ow] = best
                if WITH_INDICES:
                    jf[orow + ow] = arg

    return kernel


@njit(**JIT)
def scatter_to_indices(grad_output, indices, grad_input):
    """``grad_input[p].flat[indices[p, k]] += grad_output[p, k]``, in output order, one
    thread per plane (so nothing races); returns the number of indices outside the
    plane, which are skipped."""
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
                g[U(target)] += grad_output[p, k]
            else:
                bad += 1
    return bad
