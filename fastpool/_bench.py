"""``python -m fastpool bench``: every op against a peer, interleaved in one run.

The peer is PyTorch on the same device when it is installed (CUDA tensors, so cuDNN,
on the GPU; TF32 off), else plain NumPy (``fastpool._numpy_peer``) on small shapes.
Each repeat times fastpool and then the peer on the same data, so both see the same
machine state, each timed call right after an untimed one (both from cache where the
data fits); the table reports medians. Kernels are called once before timing, so
compile time is not timed. Thread pools are pinned: Numba and PyTorch to ``--threads``,
BLAS libraries to one thread, and idle OpenMP workers sleep, so one pool runs at a time.

Throughput is GB/s for pooling (bytes the op must read and write) and GFLOP/s for
convolution; for pooling it is also given as a fraction of the copy bandwidth measured
in the same run (a parallel Numba copy on the CPU, a device-to-device copy on the GPU;
read + write bytes, like STREAM's Copy).
"""

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from typing import Callable, Optional

import numpy as np
from numba import njit, prange

import fastpool
from fastpool._geometry import channels_last_copy

# (shape, kernel, stride, padding): the standard pooling cases.
POOL_SHAPES = {
    "full": [((32, 64, 112, 112), 3, 2, 1), ((32, 128, 56, 56), 2, 2, 0),
             ((8, 512, 14, 14), 3, 1, 1)],
    "quick": [((8, 64, 56, 56), 3, 2, 1)],
    "numpy": [((4, 16, 32, 32), 3, 2, 1)],
    # A GPU needs far more work to be busy: issue 4's shapes.
    "full-cuda": [((128, 64, 112, 112), 3, 2, 1), ((128, 128, 56, 56), 2, 2, 0),
                  ((32, 512, 14, 14), 3, 1, 1)],
}
# (label, x shape, weight shape, stride, padding, groups): the standard conv cases.
CONV_SHAPES = {
    "full": [
        ("3x3 64->64", (32, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1),
        ("7x7 s2 stem 3->64", (32, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1),
        ("3x3 256->256", (32, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1),
        ("1x1 256->512", (32, 256, 28, 28), (512, 256, 1, 1), 1, 0, 1),
        ("depthwise 3x3", (32, 128, 56, 56), (128, 1, 3, 3), 1, 1, 128),
    ],
    "quick": [
        ("3x3 64->64", (8, 64, 28, 28), (64, 64, 3, 3), 1, 1, 1),
        ("depthwise 3x3", (8, 128, 28, 28), (128, 1, 3, 3), 1, 1, 128),
    ],
    "numpy": [
        ("3x3 16->16", (4, 16, 16, 16), (16, 16, 3, 3), 1, 1, 1),
        ("depthwise 3x3", (4, 16, 16, 16), (16, 1, 3, 3), 1, 1, 16),
    ],
    "full-cuda": [
        ("3x3 64->64", (128, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1),
        ("7x7 s2 stem 3->64", (128, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1),
        ("3x3 256->256", (128, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1),
        ("1x1 256->512", (128, 256, 28, 28), (512, 256, 1, 1), 1, 0, 1),
        ("depthwise 3x3", (128, 128, 56, 56), (128, 1, 3, 3), 1, 1, 128),
    ],
}


# The N-D engine's cases (issue 14's benchmark shapes): (op, x shape, argument), each
# against PyTorch in the same rank and memory format.
ND_SHAPES = {
    "full": [("conv1d", (32, 64, 4096), (64, 64, 3)),
             ("max_pool3d", (8, 32, 32, 64, 64), (3, 2, 1)),
             ("avg_pool3d", (8, 32, 32, 64, 64), (3, 2, 1)),
             ("conv3d", (4, 32, 16, 56, 56), (32, 32, 3, 3, 3)),
             ("max_pool2d channels_last", (32, 64, 112, 112), (3, 2, 1)),
             ("avg_pool2d channels_last", (32, 64, 112, 112), (3, 2, 1)),
             ("max_pool1d", (32, 64, 4096), (3, 2, 1)),
             ("avg_pool1d", (32, 64, 4096), (3, 2, 1)),
             ("max_pool3d channels_last", (8, 32, 32, 64, 64), (3, 2, 1)),
             ("avg_pool3d channels_last", (8, 32, 32, 64, 64), (3, 2, 1)),
             ("max_pool1d channels_last", (32, 64, 4096), (3, 2, 1)),
             ("avg_pool1d channels_last", (32, 64, 4096), (3, 2, 1)),
             ("conv1d channels_last", (32, 64, 4096), (64, 64, 3)),
             ("conv2d channels_last", (32, 64, 56, 56), (64, 64, 3, 3)),
             ("conv3d channels_last", (4, 32, 16, 56, 56), (32, 32, 3, 3, 3)),
             # no peer: no framework has stochastic pooling
             ("stochastic_pool1d", (32, 64, 4096), (3, 2, 1)),
             ("stochastic_pool3d", (8, 32, 32, 64, 64), (3, 2, 1)),
             # issue 15's ops and shapes
             ("adaptive_avg_pool2d", (32, 2048, 7, 7), 1),
             ("adaptive_avg_pool2d channels_last", (32, 2048, 7, 7), 1),
             ("conv_transpose2d", (16, 64, 64, 64), (64, 32, 4, 4)),
             ("max_unpool2d", (32, 64, 56, 56), 2)],
    "quick": [("conv1d", (8, 32, 512), (32, 32, 3)),
              ("max_pool3d", (2, 8, 16, 32, 32), (3, 2, 1)),
              ("avg_pool3d", (2, 8, 16, 32, 32), (3, 2, 1)),
              ("conv3d", (2, 8, 8, 16, 16), (8, 8, 3, 3, 3)),
              ("max_pool2d channels_last", (8, 64, 56, 56), (3, 2, 1)),
              ("avg_pool2d channels_last", (8, 64, 56, 56), (3, 2, 1)),
              ("max_pool1d", (8, 32, 512), (3, 2, 1)),
              ("avg_pool1d", (8, 32, 512), (3, 2, 1)),
              ("max_pool3d channels_last", (2, 8, 16, 32, 32), (3, 2, 1)),
              ("avg_pool3d channels_last", (2, 8, 16, 32, 32), (3, 2, 1)),
              ("max_pool1d channels_last", (8, 32, 512), (3, 2, 1)),
              ("avg_pool1d channels_last", (8, 32, 512), (3, 2, 1)),
              ("conv1d channels_last", (8, 32, 512), (32, 32, 3)),
              ("conv2d channels_last", (4, 16, 28, 28), (16, 16, 3, 3)),
              ("conv3d channels_last", (2, 8, 8, 16, 16), (8, 8, 3, 3, 3)),
              ("stochastic_pool1d", (8, 32, 512), (3, 2, 1)),
              ("stochastic_pool3d", (2, 8, 16, 32, 32), (3, 2, 1)),
              ("adaptive_avg_pool2d", (8, 256, 7, 7), 1),
              ("adaptive_avg_pool2d channels_last", (8, 256, 7, 7), 1),
              ("conv_transpose2d", (2, 16, 16, 16), (16, 8, 4, 4)),
              ("max_unpool2d", (4, 16, 14, 14), 2)],
}


@dataclasses.dataclass
class Case:
    op: str
    where: str
    ours: Callable
    peer: Optional[Callable]  # None: the peer has no such op
    amount: float  # bytes moved (unit GB/s) or floating-point operations (GFLOP/s)
    unit: str


@dataclasses.dataclass
class Row:
    device: str
    op: str
    where: str
    fastpool_ms: float
    peer_ms: Optional[float]
    speedup: Optional[float]
    rate: float
    unit: str
    bandwidth_fraction: Optional[float]


class FastpoolSide:
    """Where fastpool's arrays live and how to wait for its kernels."""

    def __init__(self, device):
        self.device = device
        if device == "cuda":
            from numba import cuda
            self.put, self.sync = cuda.to_device, cuda.synchronize
        else:
            self.put, self.sync = (lambda a: a), (lambda: None)


class TorchPeer:
    """PyTorch on one device, with the calling conventions of ``fastpool._numpy_peer``."""

    def __init__(self, device):
        import torch
        self.torch = torch
        self.name = f"PyTorch {torch.__version__}"
        self.device = device
        if device == "cuda":
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            self.name += " (cuDNN)"
            self.sync = torch.cuda.synchronize
        else:
            self.sync = lambda: None
        self.F = torch.nn.functional
        self.aten = torch.ops.aten

    def put(self, array):
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def max_pool2d(self, x, k, s, p, return_indices=False):
        return self.F.max_pool2d(x, k, s, p, return_indices=return_indices)

    def max_pool2d_backward(self, grad, x, k, s, p, indices):
        return self.aten.max_pool2d_with_indices_backward(grad, x, [k, k], [s, s], [p, p],
                                                          [1, 1], False, indices)

    def avg_pool2d(self, x, k, s, p):
        return self.F.avg_pool2d(x, k, s, p)

    def avg_pool2d_backward(self, grad, x, k, s, p):
        return self.aten.avg_pool2d_backward(grad, x, [k, k], [s, s], [p, p], False, True,
                                             None)

    def conv2d(self, x, w, stride, padding, groups):
        return self.F.conv2d(x, w, stride=stride, padding=padding, groups=groups)

    def conv2d_backward(self, grad, x, w, stride, padding, groups):
        return self.aten.convolution_backward(grad, x, w, None, [stride] * 2, [padding] * 2,
                                              [1, 1], False, [0, 0], groups,
                                              [True, True, False])


def choose_peer(device):
    """PyTorch on ``device`` when it can run there, else the NumPy peer on the host."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and (device == "cpu" or torch.cuda.is_available()):
        return TorchPeer(device)
    from fastpool import _numpy_peer
    return _numpy_peer


def _timed(fn, sync):
    def run():
        result = fn()
        sync()
        return result
    return run


def pool_cases(side, peer, shape, k, s, p, dtype):
    rng = np.random.default_rng(0)
    x_host = rng.random(shape, dtype=np.float64).astype(dtype)
    y_host, idx_host = fastpool.max_pool2d(x_host, k, s, p, return_indices=True,
                                           device="cpu")
    grad_host = rng.standard_normal(y_host.shape).astype(dtype)
    dev = side.device
    x, grad, idx = side.put(x_host), side.put(grad_host), side.put(idx_host)
    _, sidx = fastpool.stochastic_pool2d(x, k, s, p, seed=1, return_indices=True,
                                         device=dev)
    px, pgrad, pidx = peer.put(x_host), peer.put(grad_host), peer.put(idx_host)
    xb, yb, ib = x_host.nbytes, y_host.nbytes, idx_host.nbytes
    where = f"{shape} k{k} s{s} p{p}"
    ours = [
        ("max_pool2d forward", lambda: fastpool.max_pool2d(x, k, s, p, device=dev),
         lambda: peer.max_pool2d(px, k, s, p), xb + yb),
        ("max_pool2d forward+indices",
         lambda: fastpool.max_pool2d(x, k, s, p, return_indices=True, device=dev),
         lambda: peer.max_pool2d(px, k, s, p, return_indices=True), xb + yb + ib),
        ("max_pool2d backward",
         lambda: fastpool.max_pool2d_backward(grad, x, k, s, p, indices=idx, device=dev),
         lambda: peer.max_pool2d_backward(pgrad, px, k, s, p, pidx), xb + yb + ib),
        ("avg_pool2d forward", lambda: fastpool.avg_pool2d(x, k, s, p, device=dev),
         lambda: peer.avg_pool2d(px, k, s, p), xb + yb),
        ("avg_pool2d backward",
         lambda: fastpool.avg_pool2d_backward(grad, x, k, s, p, device=dev),
         lambda: peer.avg_pool2d_backward(pgrad, px, k, s, p), xb + yb),
        # No framework has stochastic pooling: these rows have no peer.
        ("stochastic_pool2d train forward+indices",
         lambda: fastpool.stochastic_pool2d(x, k, s, p, seed=1, return_indices=True,
                                            device=dev), None, xb + yb + ib),
        ("stochastic_pool2d inference forward",
         lambda: fastpool.stochastic_pool2d(x, k, s, p, training=False, device=dev),
         None, xb + yb),
        ("stochastic_pool2d train backward",
         lambda: fastpool.stochastic_pool2d_backward(grad, x, k, s, p, indices=sidx,
                                                     device=dev), None, xb + yb + ib),
        ("stochastic_pool2d inference backward",
         lambda: fastpool.stochastic_pool2d_backward(grad, x, k, s, p, training=False,
                                                     device=dev), None, 2 * xb + yb),
    ]
    return [Case(op, where, _timed(mine, side.sync),
                 None if theirs is None else _timed(theirs, peer.sync), amount, "GB/s")
            for op, mine, theirs, amount in ours]


def conv_cases(side, peer, label, x_shape, w_shape, stride, padding, groups, dtype):
    rng = np.random.default_rng(1)
    x_host = rng.standard_normal(x_shape).astype(dtype)
    w_host = (rng.standard_normal(w_shape) * 0.1).astype(dtype)
    dev = side.device
    x, w = side.put(x_host), side.put(w_host)
    y = fastpool.conv2d(x, w, stride=stride, padding=padding, groups=groups, device=dev)
    grad_host = rng.standard_normal(y.shape).astype(dtype)
    grad = side.put(grad_host)
    px, pw, pgrad = peer.put(x_host), peer.put(w_host), peer.put(grad_host)
    flop = 2.0 * np.prod(y.shape) * np.prod(w_shape[1:])
    where = f"{label} {x_shape}"

    def ours_forward():
        fastpool.conv2d(x, w, stride=stride, padding=padding, groups=groups, device=dev)

    def ours_backward():
        fastpool.conv2d_backward(grad, x, w, stride=stride, padding=padding, groups=groups,
                                 output_mask=(True, True, False), device=dev)

    return [
        Case("conv2d forward", where, _timed(ours_forward, side.sync),
             _timed(lambda: peer.conv2d(px, pw, stride, padding, groups), peer.sync),
             flop, "GFLOP/s"),
        Case("conv2d backward (input+weight)", where, _timed(ours_backward, side.sync),
             _timed(lambda: peer.conv2d_backward(pgrad, px, pw, stride, padding, groups),
                    peer.sync), 2 * flop, "GFLOP/s"),
    ]


def _new_op_case(side, peer, name, x_host, x, shape, arg, dtype):
    """The ops of issue 15 (adaptive pooling, transposed convolution, unpooling) as a
    ``Case``, or None for the other N-D ops."""
    torch = getattr(peer, "torch", None)
    dev = side.device
    if name.startswith("adaptive"):
        mine = (lambda: getattr(fastpool, name)(x, arg, device=dev))
        y = getattr(fastpool, name)(x_host, arg, device="cpu")
        theirs = None
        if torch is not None:
            px = torch.from_numpy(x_host).to(peer.device)
            theirs = (lambda: getattr(peer.F, name)(px, arg))
        return Case(f"{name}{' channels_last' if x_host.strides[1] == x_host.itemsize else ''}"
                    " forward", f"{shape} -> {arg}", _timed(mine, side.sync),
                    None if theirs is None else _timed(theirs, peer.sync),
                    x_host.nbytes + y.nbytes, "GB/s")
    if name == "max_unpool2d":
        rng = np.random.default_rng(3)
        big = rng.random(shape[:2] + tuple(n * arg for n in shape[2:])).astype(dtype)
        pooled, indices = fastpool.max_pool2d(big, arg, return_indices=True, device="cpu")
        xs, js = side.put(pooled), side.put(indices)
        mine = (lambda: fastpool.max_unpool2d(xs, js, arg, device=dev))
        theirs = None
        if torch is not None:
            px, pj = (torch.from_numpy(a).to(peer.device) for a in (pooled, indices))
            theirs = (lambda: peer.F.max_unpool2d(px, pj, arg))
        return Case("max_unpool2d forward", f"{shape} k{arg}", _timed(mine, side.sync),
                    None if theirs is None else _timed(theirs, peer.sync),
                    pooled.nbytes + indices.nbytes + big.nbytes, "GB/s")
    if name == "conv_transpose2d":
        rng = np.random.default_rng(4)
        w_host = (rng.standard_normal(arg) * 0.1).astype(dtype)
        w = side.put(w_host)
        mine = (lambda: fastpool.conv_transpose2d(x, w, stride=2, padding=1, device=dev))
        theirs = None
        if torch is not None:
            px, pw = (torch.from_numpy(a).to(peer.device) for a in (x_host, w_host))
            theirs = (lambda: peer.F.conv_transpose2d(px, pw, stride=2, padding=1))
        flop = 2.0 * np.prod(shape) * np.prod(arg[1:])
        return Case("conv_transpose2d forward", f"{shape} w{arg} s2 p1",
                    _timed(mine, side.sync),
                    None if theirs is None else _timed(theirs, peer.sync), flop, "GFLOP/s")
    return None


def nd_cases(side, peer, op, shape, arg, dtype):
    """One N-D case: fastpool and PyTorch (same rank, same memory format) on the same
    data. Host memory formats only: the GPU computes channels-first."""
    rng = np.random.default_rng(2)
    x_host = rng.random(shape, dtype=np.float64).astype(dtype)
    torch = getattr(peer, "torch", None)
    dev = side.device
    layout_last = op.endswith("channels_last")
    name = op.split()[0]
    if layout_last:
        if dev != "cpu":
            return []
        x_host = channels_last_copy(x_host, 1)
    x = side.put(x_host)
    extra = _new_op_case(side, peer, name, x_host, x, shape, arg, dtype)
    if extra is not None:
        return [extra]
    where = f"{shape}" + (f" k{arg[0]} s{arg[1]} p{arg[2]}" if "pool" in name else
                          f" w{arg}")
    rank = len(shape) - 2
    if "pool" in name:
        k, st, p = arg
        seeded = dict(seed=1) if name.startswith("stochastic") else {}  # as the 2-D rows
        mine = (lambda: getattr(fastpool, name)(x, k, st, p, device=dev, **seeded))
        y = getattr(fastpool, name)(x_host, k, st, p, device="cpu", **seeded)
        amount, unit = x_host.nbytes + y.nbytes, "GB/s"
        theirs = None
        if torch is not None and not name.startswith("stochastic"):
            px = torch.from_numpy(x_host).to(peer.device)  # strides kept: the layout
            theirs = (lambda: getattr(peer.F, name)(px, k, st, p))
    else:
        w_host = (rng.standard_normal(arg) * 0.1).astype(dtype)
        w = side.put(w_host)
        padding = 1
        mine = (lambda: getattr(fastpool, name)(x, w, padding=padding, device=dev))
        y = getattr(fastpool, name)(x_host, w_host, padding=padding, device="cpu")
        amount, unit = 2.0 * np.prod(y.shape) * np.prod(arg[1:]), "GFLOP/s"
        theirs = None
        if torch is not None:
            px = _peer_put(peer, x_host, layout_last)
            pw = _peer_put(peer, w_host, False)
            theirs = (lambda: getattr(peer.F, name)(px, pw, padding=padding))
    cases = [Case(f"{op} forward", where, _timed(mine, side.sync),
                  None if theirs is None else _timed(theirs, peer.sync), amount, unit)]
    if (name.startswith("conv") if layout_last else
            rank != 2 and name in ("conv1d", "conv3d", "max_pool3d", "avg_pool3d")):
        grad_host = rng.standard_normal(y.shape).astype(dtype)
        if layout_last:
            grad_host = channels_last_copy(grad_host, 1)
        cases.append(_nd_backward(side, peer, name, rank, x_host, x, grad_host, arg,
                                  where, 2 * amount if unit == "GFLOP/s" else amount,
                                  unit, layout_last, op))
    return cases


def _peer_put(peer, array, keep_strides):
    """``array`` as a tensor on the peer's device: with its strides (a channels-last
    buffer stays channels-last), or channels-first."""
    if not keep_strides:
        return peer.put(array)
    return peer.torch.from_numpy(array).to(peer.device)


def _nd_backward(side, peer, name, rank, x_host, x, grad_host, arg, where, amount, unit,
                 layout_last=False, label=None):
    """The backward of an N-D case (pooling: the input gradient; convolution: input and
    weight gradients) against ATen's backward ops, both sides in the case's memory
    format."""
    dev, torch = side.device, getattr(peer, "torch", None)
    label = name if label is None else label
    grad = side.put(grad_host)
    ones = [1] * rank
    theirs = None
    if torch is not None:
        px = _peer_put(peer, x_host, layout_last)
        pgrad = _peer_put(peer, grad_host, layout_last)
    if name.startswith("conv"):
        w_host = (np.random.default_rng(3).standard_normal(arg) * 0.1).astype(x_host.dtype)
        w = side.put(w_host)
        backward = getattr(fastpool, f"{name}_backward")

        def mine():
            return backward(grad, x, w, padding=1, output_mask=(True, True, False),
                            device=dev)
        if torch is not None:
            pw = peer.put(w_host)
            theirs = (lambda: peer.aten.convolution_backward(
                pgrad, px, pw, None, ones, ones, ones, False, [0] * rank, 1,
                [True, True, False]))
        return Case(f"{label} backward (input+weight)", where, _timed(mine, side.sync),
                    None if theirs is None else _timed(theirs, peer.sync), amount, unit)
    k, st, p = arg
    if name.startswith("max"):
        _, idx_host = fastpool.max_pool3d(x_host, k, st, p, return_indices=True,
                                          device="cpu")
        idx = side.put(idx_host)

        def mine():
            return fastpool.max_pool3d_backward(grad, x, k, st, p, indices=idx, device=dev)
        if torch is not None:
            pidx = peer.put(idx_host)
            theirs = (lambda: peer.aten.max_pool3d_with_indices_backward(
                pgrad, px, [k] * 3, [st] * 3, [p] * 3, ones, False, pidx))
    else:
        def mine():
            return fastpool.avg_pool3d_backward(grad, x, k, st, p, device=dev)
        if torch is not None:
            theirs = (lambda: peer.aten.avg_pool3d_backward(
                pgrad, px, [k] * 3, [st] * 3, [p] * 3, False, True, None))
    return Case(f"{label} backward", where, _timed(mine, side.sync),
                None if theirs is None else _timed(theirs, peer.sync), amount, unit)


class Progress:
    """A one-line progress bar on stderr (redrawn at most ten times a second)."""

    def __init__(self, total, label, stream=None, width=30):
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.done, self._drawn = 0, 0.0

    def step(self, note=""):
        self.done += 1
        now = time.monotonic()
        finished = self.done == self.total
        # Logs (not a terminal) get the finished bar only, not every redraw.
        redraw = now - self._drawn >= 0.1 and self.stream.isatty()
        if finished or redraw:
            self._drawn = now
            filled = self.width * self.done // self.total
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} "
                              f"{note[:40]:40s}")
            if finished:
                self.stream.write("\n")
            self.stream.flush()


def median_times(cases, repeats, progress, settle=None):
    """Interleaved: each repeat times every case's fastpool call and then its peer.
    Each timed call follows an untimed call of the same function, so both sides are
    timed from the same cache state: the peer reads the same input buffer, and timed
    right after fastpool it found in cache what fastpool had to read from memory (the
    other cases evict it between repeats), which favoured it on inputs that fit the
    cache (global average pooling of (32, 2048, 7, 7): 0.82x-1.02x that way, 1.2x-2.0x
    with both sides warm or both cold).

    Before each side's untimed call the main thread waits ``settle`` seconds, busy
    (default ``_bench_layers.SETTLE_SECONDS``, as the layer suite does): PyTorch's
    OpenMP workers go on spinning for milliseconds after its call and took a core from
    the fastpool calls that followed (channels-last avg_pool1d on (32, 64, 4096), 2
    threads, alternating with PyTorch alone: fastpool 1.78 ms against PyTorch's 1.43;
    with other work between the calls 1.54 against 1.57)."""
    from fastpool._bench_layers import SETTLE_SECONDS, _busy_wait
    settle = SETTLE_SECONDS if settle is None else settle
    samples = [([], []) for _ in cases]
    for _ in range(repeats):
        for case, (mine, theirs) in zip(cases, samples):
            for fn, bucket in ((case.ours, mine), (case.peer, theirs)):
                if fn is not None:
                    _busy_wait(settle)
                    fn()
                    start = time.perf_counter()
                    fn()
                    bucket.append(time.perf_counter() - start)
            progress.step(case.op)
    return [(float(np.median(mine)), float(np.median(theirs)) if theirs else None)
            for mine, theirs in samples]


def copy_bandwidth(device, quick):
    """Copy bandwidth in GB/s (read + write bytes), best of several copies."""
    n = (16 if quick else 64) << 20  # float32 elements: 64 or 256 MiB, far beyond caches
    if device == "cuda":
        from numba import cuda
        src = cuda.to_device(np.ones(4 * n, np.float32))
        dst = cuda.device_array_like(src)
        nbytes = src.nbytes

        def copy():
            dst.copy_to_device(src)
            cuda.synchronize()
    else:
        src = np.ones(n, np.float32)
        dst = np.empty_like(src)
        nbytes = src.nbytes
        kernel = parallel_copy

        def copy():
            kernel(src, dst)
    copy()
    best = min(_seconds(copy) for _ in range(5 if quick else 10))
    return 2 * nbytes / best / 1e9


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@njit(parallel=True, cache=True)
def parallel_copy(src, dst):
    for i in prange(src.size):
        dst[i] = src[i]


@contextlib.contextmanager
def pinned_threads(threads):
    """Numba and PyTorch at ``threads``, BLAS at one thread, for the block; restored
    afterwards (the command may be called from a longer-lived process, e.g. the tests)."""
    import numba
    from threadpoolctl import threadpool_limits
    try:
        import torch
    except ImportError:
        torch = None
    numba_before = numba.get_num_threads()
    torch_before = torch.get_num_threads() if torch is not None else None
    numba.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        with threadpool_limits(1, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(numba_before)
        if torch is not None:
            torch.set_num_threads(torch_before)


def run(devices, dtype, quick, threads, repeats, ops, stream=None):
    """Benchmark ``ops`` ("pool", "conv", "nd") on ``devices``; returns (rows, meta)."""
    with pinned_threads(threads):
        return _run(devices, dtype, quick, threads, repeats, ops, stream)


def _run(devices, dtype, quick, threads, repeats, ops, stream):
    from fastpool._bench_layers import SETTLE_SECONDS
    rows, meta = [], dict(dtype=dtype, threads=threads, repeats=repeats, quick=quick,
                          date=datetime.date.today().isoformat(), devices={},
                          settle_seconds=SETTLE_SECONDS)
    for device in devices:
        side, peer = FastpoolSide(device), choose_peer(device)
        size = "numpy" if peer.name == "NumPy" else "quick" if quick else "full"
        if size == "full" and device == "cuda":
            size = "full-cuda"
        cases = []
        if "pool" in ops:
            for shape, k, s, p in POOL_SHAPES[size]:
                cases += pool_cases(side, peer, shape, k, s, p, dtype)
        if "conv" in ops:
            for spec in CONV_SHAPES[size]:
                cases += conv_cases(side, peer, *spec, dtype)
        if "nd" in ops and size != "numpy":
            for op, shape, arg in ND_SHAPES["quick" if quick or size == "numpy"
                                            else "full"]:
                cases += nd_cases(side, peer, op, shape, arg, dtype)
        warmup = Progress(len(cases), f"{device}: compile+warm-up", stream)
        median_times(cases, 1, warmup)
        bandwidth = copy_bandwidth(device, quick)
        progress = Progress(len(cases) * repeats, f"{device}: timing", stream)
        for case, (mine, theirs) in zip(cases, median_times(cases, repeats, progress)):
            rate = case.amount / mine / 1e9
            rows.append(Row(
                device=device, op=case.op, where=case.where, fastpool_ms=mine * 1e3,
                peer_ms=None if theirs is None else theirs * 1e3,
                speedup=None if theirs is None else theirs / mine, rate=rate,
                unit=case.unit,
                bandwidth_fraction=rate / bandwidth if case.unit == "GB/s" else None))
        meta["devices"][device] = dict(peer=peer.name, shapes=size,
                                       copy_bandwidth_gbs=bandwidth)
    return rows, meta


def _cell(value, fmt):
    return "-" if value is None else format(value, fmt)


def format_table(rows, meta):
    lines = []
    for device, info in meta["devices"].items():
        lines.append(f"\n{device}: fastpool {fastpool.__version__} vs {info['peer']}; "
                     f"{meta['dtype']}; {meta['threads']} threads; median of "
                     f"{meta['repeats']}; copy bandwidth {info['copy_bandwidth_gbs']:.1f} "
                     f"GB/s")
        table = [("op", "shape", "fastpool ms", "peer ms", "speedup", "throughput",
                  "of bandwidth")]
        for r in rows:
            if r.device == device:
                table.append((r.op, r.where, f"{r.fastpool_ms:.2f}",
                              _cell(r.peer_ms, ".2f"),
                              "-" if r.speedup is None else f"{r.speedup:.2f}x",
                              f"{r.rate:.1f} {r.unit}",
                              "-" if r.bandwidth_fraction is None
                              else f"{100 * r.bandwidth_fraction:.0f}%"))
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
        for j, line in enumerate(table):
            cells = [c.ljust(w) if i < 2 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(line, widths))]
            lines.append("  ".join(cells).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path, rows, meta):
    with open(path, "w") as fh:
        json.dump(dict(meta=dict(meta, versions=versions()),
                       rows=[dataclasses.asdict(r) for r in rows]), fh, indent=1)


def plot(path, rows, meta):
    """Horizontal bars of the speed-ups (log scale), one panel per device."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'fastpool[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    devices = [d for d in meta["devices"] if any(r.device == d and r.speedup for r in rows)]
    if not devices:
        raise SystemExit("--plot: no row has a peer to compare with")
    panels = [[r for r in rows if r.device == d and r.speedup] for d in devices]
    height = max(len(p) for p in panels) * 0.28 + 1.2
    fig, axes = plt.subplots(1, len(devices), figsize=(9 * len(devices), height),
                             squeeze=False)
    for ax, device, panel in zip(axes[0], devices, panels):
        labels = [f"{r.op}  {r.where}" for r in panel]
        values = [r.speedup for r in panel]
        colours = ["tab:green" if v >= 1 else "tab:red" for v in values]
        # Bars grow from 1x, left for slower and right for faster.
        ax.barh(range(len(panel)), [v - 1 for v in values], left=1, color=colours)
        ax.set_xscale("log")
        low, high = min(values + [1.0]), max(values + [1.0])
        ax.set_xlim(low / 1.3, high * 1.5)
        ax.set_xticks([2.0 ** e for e in range(-6, 8) if low / 1.3 <= 2.0 ** e <= high * 1.5])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(panel)), labels, fontsize=7)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}x " if v >= 1 else f"{v:.2f}x ", va="center",
                    ha="left" if v >= 1 else "right", fontsize=7)
        ax.set_xlabel(f"speed-up over {meta['devices'][device]['peer']} (log scale; "
                      f"> 1: fastpool faster)")
        ax.set_title(f"fastpool {fastpool.__version__}, {device}, {meta['dtype']}, "
                     f"{meta['threads']} threads, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def versions():
    import numba
    found = dict(fastpool=fastpool.__version__, python=platform.python_version(),
                 numpy=np.__version__, numba=numba.__version__)
    from importlib import metadata
    for dist in ("numba-cuda", "scipy", "threadpoolctl", "torch", "asv", "matplotlib"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def info_lines():
    """What ``python -m fastpool info`` prints."""
    import numba
    from threadpoolctl import threadpool_info

    lines = [f"fastpool {fastpool.__version__} ({os.path.dirname(fastpool.__file__)})",
             f"platform {platform.platform()}, {os.cpu_count()} CPUs"]
    for dist, version in versions().items():
        if dist != "fastpool":
            lines.append(f"  {dist:14s} {version or 'not installed'}")
    parallel_copy(np.ones(8, np.float32), np.empty(8, np.float32))  # starts the pool
    from fastpool import _threading
    lines.append(f"numba threading layer: {_threading.describe()}; threads: "
                 f"{numba.get_num_threads()} (NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS})")
    import scipy.linalg.cython_blas  # noqa: F401  the BLAS fastpool's conv kernels call
    for pool in threadpool_info():
        kernels = pool.get("architecture")
        lines.append(f"  {pool['user_api']:6s} {pool['internal_api']} "
                     f"({os.path.basename(pool['filepath'])}) "
                     f"{pool.get('version') or ''} threads={pool['num_threads']}"
                     + (f" kernels={kernels}" if kernels else ""))
    note = blas_note(threadpool_info())
    if note:
        lines.append(note)
    lines.append(f"kernel cache directory: {kernel_cache_dir()}")
    lines += gpu_lines()
    return lines


# OpenBLAS core types whose GEMM kernels use 256-bit vectors at most.
_NARROW_OPENBLAS = {"haswell", "zen", "sandybridge", "nehalem", "core2", "prescott",
                    "atom", "barcelona", "bulldozer", "piledriver", "steamroller",
                    "excavator"}


def blas_note(pools):
    """A warning line when ``OPENBLAS_CORETYPE`` makes OpenBLAS run narrower GEMM
    kernels than this CPU has (AVX-512): fastpool's GEMM-based convolutions then run at
    about half speed (measured 2x on a Zen 5 core; docs/site/performance.md). None
    otherwise."""
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if not forced:
        return None
    from llvmlite import binding
    features = binding.get_host_cpu_features()
    if not all(features.get(f, False) for f in ("avx512f", "avx512bw", "avx512dq",
                                                 "avx512vl")):
        return None
    narrow = [p for p in pools if p.get("internal_api") == "openblas"
              and str(p.get("architecture", "")).lower() in _NARROW_OPENBLAS]
    if not narrow:
        return None
    return (f"note: OPENBLAS_CORETYPE={forced} is set, so OpenBLAS runs "
            f"{narrow[0]['architecture']} (AVX2) GEMM kernels on a CPU with AVX-512; "
            "convolutions run up to 2x faster without it (it is read when OpenBLAS "
            "loads, so unset it before starting Python)")


def kernel_cache_dir():
    """Where Numba caches fastpool's CPU kernels (``NUMBA_CACHE_DIR`` wins)."""
    from fastpool.cpu import pool_max
    return pool_max._scatter_to_indices.body._cache._cache_path


def gpu_lines():
    from numba import config
    if config.ENABLE_CUDASIM:
        return ["GPU: Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1): kernels run "
                "as Python on the CPU"]
    if not fastpool.cuda_available():
        return ["GPU: none usable (no CUDA driver or no device); device='cuda' raises "
                "CudaUnavailableError"]
    from numba import cuda
    gpu = cuda.get_current_device()
    free, total = cuda.current_context().get_memory_info()
    return [f"GPU: {gpu.name.decode() if isinstance(gpu.name, bytes) else gpu.name}, "
            f"compute capability {gpu.compute_capability[0]}.{gpu.compute_capability[1]}, "
            f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)"]
