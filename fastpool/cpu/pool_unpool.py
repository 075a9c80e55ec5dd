"""Max unpooling on the CPU: ``y.flat[indices[p]] = x[p]`` within each ``(n, c)`` volume
(forward) and ``grad_x[p] = grad_y.flat[indices[p]]`` (backward), either memory format.

Channels-first arrays are ``(planes, S)`` views, one thread per run of planes;
channels-last ones are ``(N, S, C)`` buffers, one task per ``(n, channel block)``, as
``pool_channels_last.scatter_to_indices``. Inputs are visited in order, so where two
inputs name the same output the later one (in row-major order) wins, on every run and
on the GPU too. Both return the number of indices outside ``[0, S_out)`` (nothing is
written for them; the launcher raises).
"""

from __future__ import annotations

from numba import njit, prange

from fastpool.cpu._pool_common import JIT, U


@njit(**JIT)
def unpool_channels_first(x, indices, y):
    planes, inputs = x.shape
    outputs = y.shape[1]
    bad = 0
    for p in prange(planes):
        yp = y[p]
        for s in range(outputs):
            yp[s] = 0
        for k in range(inputs):
            # one unsigned compare (a negative index wraps past the end), as in
            # ``pool_max``'s scatter
            target = U(indices[p, k])
            if target < U(outputs):
                yp[target] = x[p, k]
            else:
                bad += 1
    return bad


@njit(**JIT)
def unpool_channels_last(x, indices, y, blocks):
    N, inputs, C = x.shape
    outputs = y.shape[1]
    bad = 0
    for task in prange(N * blocks):
        n = task // blocks
        block = task - n * blocks
        c0 = block * C // blocks
        c1 = (block + 1) * C // blocks
        yn = y[n]
        for s in range(outputs):
            for c in range(c0, c1):
                yn[s, c] = 0
        for k in range(inputs):
            for c in range(c0, c1):
                target = U(indices[n, k, c])
                if target < U(outputs):
                    yn[target, c] = x[n, k, c]
                else:
                    bad += 1
    return bad


@njit(**JIT)
def gather_channels_first(grad_output, indices, grad_input):
    planes, inputs = grad_input.shape
    outputs = grad_output.shape[1]
    bad = 0
    for p in prange(planes):
        for k in range(inputs):
            target = U(indices[p, k])
            if target < U(outputs):
                grad_input[p, k] = grad_output[p, target]
            else:
                grad_input[p, k] = 0
                bad += 1
    return bad


@njit(**JIT)
def gather_channels_last(grad_output, indices, grad_input):
    N, inputs, C = grad_input.shape
    outputs = grad_output.shape[1]
    bad = 0
    for row in prange(N * inputs):
        n = row // inputs
        k = row - n * inputs
        for c in range(C):
            target = U(indices[n, k, c])
            if target < U(outputs):
                grad_input[n, k, c] = grad_output[n, target, c]
            else:
                grad_input[n, k, c] = 0
                bad += 1
    return bad
