"""Peak resident memory of one call, and the scratch each op may use beyond its outputs.

``measure(call)`` resets the kernel's peak-RSS counter (``/proc/self/clear_refs``),
runs ``call`` and returns ``(result, bytes)``: how far the process's peak resident set
rose above its size before the call, i.e. what the call allocated and touched (outputs
plus scratch). Linux only; ``available()`` tells.

``scratch_bound(op, ...)`` is the documented bound on what an op allocates beyond its
outputs (docs/site/reliability.md), read off the kernels' allocations:

* pooling forwards: nothing beyond a flag per output row (stochastic); channels-first
  max and average pooling with a column stride from 2 to 8 keep, per thread, the column phases of its
  ``kD * kH`` input rows (``kD * kH * (W + sW)`` elements); channels-first planes
  narrower than 32 columns with at least 16 channels, overlapping windows along W and
  at most 2 MiB of input go through the channels-last kernels: a channels-last
  copy of the input and of the results;
* max / stochastic-training backward: nothing (the scatter owns whole planes);
* average backward: per thread, a ring of ``R`` spread rows of ``W`` plus one output row
  (``R = (kH - 1) * dH // sH + 1``), in the input's dtype; 3-D pooling with a depth
  kernel or stride above 1 adds a ring of ``R_D`` planes of ``H x W``; channels-last
  inputs use one output-sized buffer of shares instead;
* stochastic inference backward: per thread, two such rings, two input rows and two
  output rows in float64 (3-D: two rings of planes and two planes more);
* convolution: per thread, the largest of a 2 MiB band of gathered columns, one row of
  columns (``C_g * kH * kW * W``), one row of Winograd tiles (``16 * (C_g + O_g)`` per
  tile column) and, for the direct plane kernels, two padded planes split by stride
  phase (of at most
  2**22 elements: larger planes take the row kernels); plus four
  weight-sized copies (reordered, flipped, Winograd-transformed (16/9) and re-ordered
  gradient) and the weight gradient's partial sums (at most 16 weight-sized chunks,
  and at most 64 MiB unless one chunk is larger).

* 3-D convolution: one gathered batch of depth slices and one 2-D result at a time
  (at most the input's and the output's size; the backward gathers grad_output slices
  too), plus the 2-D convolution's scratch.

Inputs that are not contiguous are copied once more (not counted here: the tests pass
contiguous inputs).
"""

from __future__ import annotations

import re
import sys

MiB = 1 << 20
# What a call may touch that is neither output nor scratch: page rounding of each
# allocation, thread stacks and allocator bookkeeping.
SLACK = 16 * MiB


def available():
    return sys.platform.startswith("linux")


def _status(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def measure(call):
    """``(call(), peak RSS during the call - RSS before it)`` in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    result = call()
    return result, _status("VmHWM") - before


def ring_rows(kernel, stride, dilation=1):
    return (kernel - 1) * dilation // stride + 1


def pool_scratch(op, threads, in_hw, out_hw, kernel, stride, dilation, itemsize, planes,
                 channels=1):
    """Bytes beyond the outputs that a pooling op may allocate (module docstring)."""
    (H, W), (OH, OW) = in_hw[-2:], out_hw[-2:]
    flags = planes * OH  # one bool per output row (stochastic forward)
    if op in ("max_forward", "avg_forward"):
        if (W < 32 and channels >= 16 and kernel[-1] > stride[-1]
                and planes * H * W * itemsize <= 2 << 20):  # narrow: channels-last kernels
            results = planes * OH * OW * (itemsize + (8 if op == "max_forward" else 0))
            return planes * H * W * itemsize + results
        depth = kernel[0] if len(kernel) == 3 else 1
        phases = threads * itemsize * depth * kernel[-2] * (W + stride[-1])
        return flags + (phases if 1 < stride[-1] <= 8 else 0)
    if op in ("max_backward", "stochastic_train_backward"):
        return flags
    if op == "stochastic_infer_forward":
        flat = (OH + kernel[-2] - 1) * (OW + kernel[-1] - 1)
        if (tuple(stride[-2:]) == (1, 1) and tuple(dilation[-2:]) == (1, 1)
                and (len(kernel) < 3 or kernel[0] == 1) and flat <= 32768):
            return flags + threads * 8 * 3 * flat  # whole-plane loops: three planes
        return flags
    if op == "stochastic_train_forward":
        return flags
    R = ring_rows(kernel[-2], stride[-2], dilation[-2])
    # 3-D pooling with a depth kernel or stride above 1 also keeps a ring of planes.
    depth = 0
    if len(kernel) == 3 and (kernel[0] > 1 or stride[0] > 1):
        depth = ring_rows(kernel[0], stride[0], dilation[0]) * H * W
    if op == "avg_backward":
        flat = (OH + 2 * (kernel[-2] - 1)) * (OW + 2 * (kernel[-1] - 1))
        if (tuple(stride[-2:]) == (1, 1) and (len(kernel) < 3 or kernel[0] == 1)
                and flat <= 32768):  # whole-plane loops: two padded planes, divisors
            return threads * itemsize * (2 * flat + OH * OW + H * W)
        return threads * itemsize * (R * W + OW + depth)
    if op == "stochastic_infer_backward":
        flat = (OH + 2 * (kernel[-2] - 1)) * (OW + 2 * (kernel[-1] - 1))
        if (tuple(stride[-2:]) == (1, 1) and tuple(dilation[-2:]) == (1, 1)
                and (len(kernel) < 3 or kernel[0] == 1) and flat <= 16384):
            return threads * 57 * flat + planes  # seven float64 planes and a mask
        return threads * 8 * (2 * R * W + 2 * W + 2 * OW + 2 * depth + 2 * H * W) + planes
    raise ValueError(op)


def conv_scratch(threads, x_shape, weight_shape, out_hw, dilation, itemsize, groups):
    """Bytes beyond the outputs a conv forward or backward may allocate."""
    _, C, H, W = x_shape
    O, Cg, KH, KW = weight_shape
    OH, OW = out_hw
    weight = O * Cg * KH * KW * itemsize
    wide = max(OW, W)
    row_columns = Cg * KH * KW * wide * itemsize
    winograd_row = 16 * (Cg + O // groups) * ((wide + 1) // 2 + 2) * itemsize
    padded = min((max(OH, H) + dilation[0] * (KH - 1)) * (wide + dilation[1] * (KW - 1)),
                 1 << 22) * 8
    winograd_weight = 16 * Cg * (O // groups) * itemsize  # a Winograd band's budget
    per_thread = max(2 * MiB, row_columns, winograd_row, winograd_weight, 2 * padded)
    partials = max(min(16 * weight, 64 * MiB), weight)
    return threads * per_thread + 4 * weight + partials


def conv3d_scratch(threads, x_shape, weight_shape, out_size, itemsize, groups):
    """Bytes beyond the outputs a conv3d forward or backward may allocate: per depth tap
    a gathered batch of input depth slices (and, backward, of grad_output slices) and
    one 2-D result (input- or output-sized), the 2-D convolution's own scratch, and one
    weight tap."""
    N, C, D, H, W = x_shape
    O, Cg, KD, KH, KW = weight_shape
    OD, OH, OW = out_size
    inputs = N * C * D * H * W * itemsize
    outputs = N * O * OD * OH * OW * itemsize
    plane = conv_scratch(threads, (N * OD, C, H, W), (O, Cg, KH, KW), (OH, OW), (1, 1),
                         itemsize, groups)
    return 2 * (inputs + outputs) + plane + O * Cg * KH * KW * itemsize
