"""Arrays flush against inaccessible memory, for tests that a kernel reads nothing
outside its input (run in a child process: a read past the end is a segmentation
fault, which must fail a test rather than kill pytest).

``guarded(shape, dtype, at_end)`` returns a writeable C-contiguous array whose first
(or, with ``at_end``, last) byte touches a page mapped ``PROT_NONE``; pages on both
sides are inaccessible. Linux (and other POSIX systems with ``mprotect``) only.
"""

import ctypes
import json
import mmap

import numpy as np

_LIBC = ctypes.CDLL(None, use_errno=True)
_PAGE = mmap.PAGESIZE
_KEEP = []  # the mappings stay alive with their arrays


def guarded(shape, dtype, at_end):
    count = int(np.prod(shape))
    size = count * np.dtype(dtype).itemsize
    pages = max(1, -(-size // _PAGE))
    mapping = mmap.mmap(-1, (pages + 2) * _PAGE)
    _KEEP.append(mapping)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    for start in (base, base + (pages + 1) * _PAGE):
        if _LIBC.mprotect(ctypes.c_void_p(start), _PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
    offset = _PAGE + (pages * _PAGE - size if at_end else 0)
    return np.frombuffer(mapping, dtype, count, offset).reshape(shape)


# (N, C, H, W, kernel, stride, padding, dilation): partial blocks of channels (5, 17,
# 33, 40), strides beyond the kernel, dilation, kernels other than 3x3.
DEPTHWISE_CASES = [
    (1, 17, 9, 7, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 40, 6, 11, (3, 3), (2, 2), (1, 1), (1, 1)),
    (1, 33, 13, 5, (3, 3), (1, 2), (2, 0), (2, 1)),
    (1, 5, 8, 8, (3, 3), (4, 3), (0, 2), (1, 1)),
    (1, 24, 7, 9, (5, 3), (1, 1), (2, 1), (1, 2)),
    (2, 16, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1)),
]


def depthwise_blocks():
    """``_depthwise_blocks.forward`` on inputs against guard pages at either end, bands
    of 1 and 2 rows and whole planes, forward and stride-1 input-gradient problems,
    float32 and float64, compared bitwise with the channels-first direct kernels.
    Prints a JSON line: the number of calls and the mismatches."""
    from fastpool import _params
    from fastpool.cpu import conv as cpu_conv
    from fastpool.cpu.conv import _depthwise_blocks as blocks
    rng = np.random.default_rng(11)
    band_rows = blocks.band_rows
    calls, mismatches = 0, []
    for n, c, h, w, kernel, stride, padding, dilation in DEPTHWISE_CASES:
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal((n, c, h, w)).astype(dtype)
            weight = rng.standard_normal((c, 1) + kernel).astype(dtype)
            _, _, _, window = _params.conv_window(x, weight, None, 2, stride=stride,
                                                  padding=padding, dilation=dilation,
                                                  groups=c)
            y = cpu_conv.conv2d_forward(x, weight, None, window, algorithm="direct")
            problems = [(cpu_conv._forward_problem(window), x, weight, y)]
            if stride == (1, 1):
                g = rng.standard_normal(y.shape).astype(dtype)
                gx = cpu_conv.conv2d_backward(g, x, weight, window, (True, False, False),
                                              "direct")[0]
                problems.append((cpu_conv._input_grad_problem(window), g,
                                 np.ascontiguousarray(weight[:, :, ::-1, ::-1]), gx))
            for problem, source, taps, expected in problems:
                for at_end in (True, False):
                    fenced = guarded(source.shape, dtype, at_end)
                    fenced[...] = source
                    for rows in (1, 2, None):
                        blocks.band_rows = (band_rows if rows is None
                                            else (lambda p, i, r=rows: r))
                        got = blocks.forward(fenced, taps, None, problem, 2)
                        blocks.band_rows = band_rows
                        calls += 1
                        if not np.array_equal(got, expected):
                            mismatches.append([n, c, h, w, problem.kind, rows,
                                               np.dtype(dtype).name])
    print(json.dumps({"calls": calls, "mismatches": mismatches}))


def max2x2_rows():
    """``_pool_pairs.max2x2_rows`` on inputs and outputs against guard pages at either
    end (its masked loads and stores of the last chunk of a row must touch nothing past
    the row), rows of 1 to 17 and 28 outputs, float32 and float64, compared bit for
    bit with the four taps folded in NumPy (larger wins, the first of equal values and
    the first NaN stay: signed zeros and NaN payloads tell them apart). Prints a JSON
    line: the number of calls and the mismatches."""
    from fastpool.cpu._pool_pairs import max2x2_rows_for_tests as rows_kernel
    rng = np.random.default_rng(12)
    calls, mismatches = 0, []
    for width in list(range(1, 18)) + [28]:
        for dtype in (np.float32, np.float64):
            rows = 3
            uint = np.dtype(f"u{np.dtype(dtype).itemsize}")
            # ties, signed zeros and NaNs of distinct payloads: which tap wins shows
            # in the bits (first maximum, first NaN)
            x = rng.integers(-2, 2, rows * 4 * width).astype(dtype)
            x[rng.random(x.size) < 0.2] = -0.0
            nans = np.flatnonzero(rng.random(x.size) < 0.15)
            quiet = np.array(np.nan, dtype).view(uint)
            x.view(uint)[nans] = quiet | np.arange(1, nans.size + 1, dtype=uint)
            taps = x.reshape(rows, 2, width, 2).transpose(0, 2, 1, 3).reshape(
                rows, width, 4)
            best = taps[..., 0].copy()
            for k in (1, 2, 3):
                tap = taps[..., k]
                take = (tap > best) | (np.isnan(tap) & ~np.isnan(best))
                best = np.where(take, tap, best)
            for at_end in (True, False):
                fenced_x = guarded(x.shape, dtype, at_end)
                fenced_x[...] = x
                out = guarded((rows * width,), dtype, at_end)
                # the first row alone, then the others (a worker's share)
                rows_kernel(fenced_x, out, 0, 1, width)
                rows_kernel(fenced_x, out, 1, rows, width)
                calls += 1
                if not np.array_equal(out.view(uint), best.reshape(-1).view(uint)):
                    mismatches.append([width, np.dtype(dtype).name, at_end])
    print(json.dumps({"calls": calls, "mismatches": mismatches}))
