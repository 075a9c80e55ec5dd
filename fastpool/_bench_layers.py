"""``python -m fastpool bench --suite layers``: the layers real networks run, against the
fastest CPU peers a user could pick instead, in the same memory format.

The conv and pooling layers of LeNet-5, ResNet-18, ResNet-50, MobileNetV2 and VGG-16
(224x224 inputs; LeNet-5 32x32), deduplicated across networks, at batch 1 and batch 32:
forward, and backward at batch 32 (what training runs). Each layer is timed in NCHW and
in channels-last (an NHWC buffer viewed as ``(N, C, H, W)``). Peers in the same layout:
PyTorch NCHW and ONNX Runtime for NCHW rows, PyTorch ``channels_last`` for channels-last
rows (ONNX Runtime's CPU operators take NCHW only). ONNX Runtime runs forward only, a
one-node model built with the ``onnx`` package, its spinning thread pool turned off so
it does not steal cores from the next timing.

Rows are timed one at a time (a VGG-16 layer at batch 32 holds gigabytes), each in one
interleaved run: every repeat times fastpool and then each peer on the same data. Before
timing, every peer's forward result is checked against fastpool's, so a misbuilt peer
cannot produce a ratio. Ratio = peer time / fastpool time (> 1: fastpool faster).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import numpy as np

import fastpool
from fastpool._geometry import channels_last_copy

LAYOUTS = ("nchw", "channels_last")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer on a square ``size x size`` input of ``channels`` channels. ``kind``:
    ``conv``, ``max``, ``avg`` or ``global_avg`` (adaptive average pooling to 1x1)."""

    kind: str
    channels: int
    size: int
    out_channels: int = 0
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1

    @property
    def label(self):
        if self.kind == "global_avg":
            return f"global avg {self.channels}@{self.size}"
        step = f" s{self.stride}" if self.stride > 1 else ""
        if self.kind != "conv":
            return (f"{self.kind}pool {self.kernel}x{self.kernel}{step} "
                    f"{self.channels}@{self.size}")
        if self.groups == self.channels == self.out_channels:
            return f"dw {self.kernel}x{self.kernel}{step} {self.channels}@{self.size}"
        return (f"conv {self.kernel}x{self.kernel}{step} {self.channels}->"
                f"{self.out_channels}@{self.size}")


def _conv(c_in, c_out, size, k, stride=1, groups=1, padding=None):
    return Layer("conv", c_in, size, c_out, k, stride, k // 2 if padding is None
                 else padding, groups)


def _dw(channels, size, stride=1):
    return _conv(channels, channels, size, 3, stride, groups=channels)


def _pool(kind, channels, size, k, stride, padding=0):
    return Layer(kind, channels, size, kernel=k, stride=stride, padding=padding)


def _global(channels, size):
    return Layer("global_avg", channels, size)


def _mobilenet_v2():
    layers = [_conv(3, 32, 224, 3, 2), _dw(32, 112), _conv(32, 16, 112, 1)]
    size, c_in = 112, 16
    # (expansion, out channels, repeats, first stride): torchvision's table
    for t, c, n, s in ((6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = c_in * t
            layers += [_conv(c_in, hidden, size, 1), _dw(hidden, size, stride)]
            size //= stride
            layers.append(_conv(hidden, c, size, 1))
            c_in = c
    return layers + [_conv(320, 1280, 7, 1), _global(1280, 7)]


def _resnet50():
    layers = [_conv(3, 64, 224, 7, 2), _pool("max", 64, 112, 3, 2, 1)]
    size, c_in = 56, 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        out = 4 * width
        # first block (stride on the 3x3, as torchvision), then one repeated block
        layers += [_conv(c_in, width, size, 1), _conv(width, width, size, 3, stride),
                   _conv(c_in, out, size, 1, stride)]
        size //= stride
        layers += [_conv(width, out, size, 1), _conv(out, width, size, 1),
                   _conv(width, width, size, 3)]
        c_in = out
    return layers + [_global(2048, 7)]


NETWORKS = {
    "lenet5": [_conv(1, 6, 32, 5, padding=0), _pool("avg", 6, 28, 2, 2),
               _conv(6, 16, 14, 5, padding=0), _pool("avg", 16, 10, 2, 2)],
    "resnet18": [_conv(3, 64, 224, 7, 2), _pool("max", 64, 112, 3, 2, 1),
                 _conv(64, 64, 56, 3),
                 _conv(64, 128, 56, 3, 2), _conv(128, 128, 28, 3), _conv(64, 128, 56, 1, 2),
                 _conv(128, 256, 28, 3, 2), _conv(256, 256, 14, 3),
                 _conv(128, 256, 28, 1, 2),
                 _conv(256, 512, 14, 3, 2), _conv(512, 512, 7, 3), _conv(256, 512, 14, 1, 2),
                 _global(512, 7)],
    "resnet50": _resnet50(),
    "mobilenet_v2": _mobilenet_v2(),
    "vgg16": [_conv(3, 64, 224, 3), _conv(64, 64, 224, 3), _pool("max", 64, 224, 2, 2),
              _conv(64, 128, 112, 3), _conv(128, 128, 112, 3), _pool("max", 128, 112, 2, 2),
              _conv(128, 256, 56, 3), _conv(256, 256, 56, 3), _pool("max", 256, 56, 2, 2),
              _conv(256, 512, 28, 3), _conv(512, 512, 28, 3), _pool("max", 512, 28, 2, 2),
              _conv(512, 512, 14, 3), _pool("max", 512, 14, 2, 2)],
}


def unique_layers(networks):
    """The distinct layers of ``networks`` in first-seen order, each with the networks
    that run it."""
    seen = {}
    for name in networks:
        for layer in NETWORKS[name]:
            users = seen.setdefault(layer, [])
            if name not in users:
                users.append(name)
    return list(seen.items())


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class Data:
    """One row's inputs, host NumPy, in the row's memory format."""

    x: np.ndarray
    weight: Optional[np.ndarray]
    grad: np.ndarray
    y: np.ndarray  # fastpool's forward result: the peers' results are checked against it


def _ours(layer, x, w):
    """fastpool's forward and backward of ``layer`` as closures over its data."""
    k, s, p = layer.kernel, layer.stride, layer.padding
    if layer.kind == "conv":
        def forward():
            return fastpool.conv2d(x, w, stride=s, padding=p, groups=layer.groups)
        return forward, lambda g: (lambda: fastpool.conv2d_backward(
            g, x, w, stride=s, padding=p, groups=layer.groups,
            output_mask=(True, True, False)))
    if layer.kind == "max":
        def forward():
            return fastpool.max_pool2d(x, k, s, p)
        _, idx = fastpool.max_pool2d(x, k, s, p, return_indices=True)
        return forward, lambda g: (lambda: fastpool.max_pool2d_backward(
            g, x, k, s, p, indices=idx))
    if layer.kind == "avg":
        return (lambda: fastpool.avg_pool2d(x, k, s, p),
                lambda g: (lambda: fastpool.avg_pool2d_backward(g, x, k, s, p)))
    return (lambda: fastpool.adaptive_avg_pool2d(x, 1),
            lambda g: (lambda: fastpool.adaptive_avg_pool2d_backward(g, x, 1)))


def make_data(layer, batch, layout, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, layer.channels, layer.size, layer.size)).astype(dtype)
    w = None
    if layer.kind == "conv":
        fan_in = layer.channels // layer.groups * layer.kernel ** 2
        w = (rng.standard_normal((layer.out_channels, layer.channels // layer.groups,
                                  layer.kernel, layer.kernel)) / math.sqrt(fan_in)
             ).astype(dtype)
    if layout == "channels_last":
        x = channels_last_copy(x, 1)
    y = _ours(layer, x, w)[0]()
    grad = rng.standard_normal(y.shape).astype(dtype)
    if layout == "channels_last":
        grad = channels_last_copy(grad, 1)
    return Data(x, w, grad, y)


# ----------------------------------------------------------------------------- peers

class TorchPeer:
    """PyTorch on the CPU in one memory format (the row's)."""

    def __init__(self, layout):
        import torch
        self.torch, self.layout = torch, layout
        self.version = torch.__version__
        self.name = "PyTorch NCHW" if layout == "nchw" else "PyTorch channels_last"
        self.layouts = (layout,)

    def prepare(self, layer, data, backward):
        """``(forward, backward or None, forward result as NumPy)`` for this row."""
        torch = self.torch
        F, aten = torch.nn.functional, torch.ops.aten
        # from_numpy keeps the NumPy strides: a channels-last view gives a channels_last
        # tensor, with no copy.
        x, g = torch.from_numpy(data.x), torch.from_numpy(data.grad)
        k, s, p = layer.kernel, layer.stride, layer.padding
        if layer.kind == "conv":
            w = torch.from_numpy(data.weight)
            if self.layout == "channels_last":
                w = w.contiguous(memory_format=torch.channels_last)

            def forward():
                return F.conv2d(x, w, stride=s, padding=p, groups=layer.groups)

            def back():
                return aten.convolution_backward(g, x, w, None, [s, s], [p, p], [1, 1],
                                                 False, [0, 0], layer.groups,
                                                 [True, True, False])
        elif layer.kind == "max":
            def forward():
                return F.max_pool2d(x, k, s, p)
            _, idx = F.max_pool2d(x, k, s, p, return_indices=True)

            def back():
                return aten.max_pool2d_with_indices_backward(g, x, [k, k], [s, s], [p, p],
                                                             [1, 1], False, idx)
        elif layer.kind == "avg":
            def forward():
                return F.avg_pool2d(x, k, s, p)

            def back():
                return aten.avg_pool2d_backward(g, x, [k, k], [s, s], [p, p], False, True,
                                                None)
        else:
            def forward():
                return F.adaptive_avg_pool2d(x, 1)

            def back():
                return aten._adaptive_avg_pool2d_backward(g, x)
        return forward, (back if backward else None), forward().numpy()


class OrtPeer:
    """ONNX Runtime's CPU execution provider: a one-node model per row, NCHW only."""

    layouts = ("nchw",)

    def __init__(self, threads):
        import onnxruntime
        self.ort, self.threads = onnxruntime, threads
        self.name = "ONNX Runtime"
        self.version = onnxruntime.__version__

    def _model(self, layer, data):
        import onnx
        from onnx import TensorProto, helper, numpy_helper
        elem = TensorProto.FLOAT if data.x.dtype == np.float32 else TensorProto.DOUBLE
        k, s, p = layer.kernel, layer.stride, layer.padding
        inputs, inits = ["x"], []
        if layer.kind == "conv":
            inputs.append("w")
            inits.append(numpy_helper.from_array(np.ascontiguousarray(data.weight), "w"))
            node = helper.make_node("Conv", inputs, ["y"], kernel_shape=[k, k],
                                    strides=[s, s], pads=[p] * 4, group=layer.groups)
        elif layer.kind in ("max", "avg"):
            extra = dict(count_include_pad=1) if layer.kind == "avg" else {}
            node = helper.make_node("MaxPool" if layer.kind == "max" else "AveragePool",
                                    inputs, ["y"], kernel_shape=[k, k], strides=[s, s],
                                    pads=[p] * 4, **extra)
        else:
            node = helper.make_node("GlobalAveragePool", inputs, ["y"])
        graph = helper.make_graph(
            [node], "layer", [helper.make_tensor_value_info("x", elem, data.x.shape)],
            [helper.make_tensor_value_info("y", elem, data.y.shape)], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # read by every ONNX Runtime since 1.10
        onnx.checker.check_model(model)
        return model.SerializeToString()

    def prepare(self, layer, data, backward):
        ort = self.ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle workers sleep instead of spinning, so they do not steal the cores
        # fastpool's next timing needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(self._model(layer, data), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # e.g. no float64 kernel for this operator
            if "NOT_IMPLEMENTED" in str(exc) or "Could not find an implementation" in str(exc):
                return None
            raise
        x = np.ascontiguousarray(data.x)
        feed = {"x": x}

        def forward():
            return session.run(None, feed)[0]
        return forward, None, forward()


def available_peers(threads):
    """The peers installed here, PyTorch first."""
    peers = []
    try:
        import torch  # noqa: F401
        peers += [TorchPeer("nchw"), TorchPeer("channels_last")]
    except ImportError:
        pass
    try:
        import onnx  # noqa: F401  builds the one-node models
        peers.append(OrtPeer(threads))
    except ImportError:  # onnx or onnxruntime missing
        pass
    return peers


# ----------------------------------------------------------------------------- timing

@dataclasses.dataclass
class LayerRow:
    networks: str
    layer: str
    kind: str
    batch: int
    direction: str
    layout: str
    fastpool_ms: float
    peer_ms: dict  # peer name -> ms (only peers that ran this row)

    @property
    def ratios(self):
        return {name: ms / self.fastpool_ms for name, ms in self.peer_ms.items()}

    @property
    def best_ratio(self):
        """Against the fastest peer of this row's layout; None without peers."""
        return min(self.ratios.values()) if self.peer_ms else None


def _check_same(name, layer, ours, theirs):
    ours = np.asarray(ours)
    tol = 1e-3 if ours.dtype == np.float32 else 1e-9
    scale = max(1.0, float(np.abs(ours).max(initial=0.0)))
    if ours.shape != np.shape(theirs) or not np.allclose(theirs, ours, rtol=tol,
                                                         atol=tol * scale):
        raise RuntimeError(f"{name} computes another result than fastpool for "
                           f"{layer.label}: the benchmark's peer is misbuilt")


# How long a peer's idle threads go on spinning after its call: PyTorch's libgomp
# workers burn 8-9 ms of CPU after each call here (process CPU time measured across a
# sleep after a 1x1 512->256 conv on 28x28).
SETTLE_SECONDS = 0.012


def _busy_wait(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def interleaved_medians(functions, repeats, settle=SETTLE_SECONDS):
    """Median seconds of each function over ``repeats`` rounds; in each round every
    function runs in turn, each round starting from the next function.

    Each sample is a function's steady state, as in a loop of its own calls: after
    ``settle`` seconds (the main thread busy, so the clocks stay up) for the previous
    function's spinning threads to stop, one untimed call wakes the function's own
    thread pool and caches, and the next call is timed. Timed right after another
    library's call, a function ran with that library's spinning OpenMP thread on one of
    the two cores (fastpool's 1x1 512->256 on 28x28: 1.2 ms alone, 1.8-2.4 ms right
    after PyTorch's call). ``OMP_WAIT_POLICY=PASSIVE`` would stop the spinning, but makes
    PyTorch's small calls 4-10x slower (4 -> 40 us): the peers' settings stay as users
    have them (``python -m fastpool`` set PASSIVE until 2026-12-07: PyTorch's layer-suite
    calls took 2x as long, up to 10x on the smallest). The rotation keeps whatever
    effect remains from always falling on the same function."""
    samples = [[] for _ in functions]
    count = len(functions)
    for r in range(repeats):
        for i in range(count):
            k = (r + i) % count
            _busy_wait(settle)
            functions[k]()
            start = time.perf_counter()
            functions[k]()
            samples[k].append(time.perf_counter() - start)
    return [float(np.median(b)) for b in samples]


def time_row(layer, networks, batch, layout, dtype, direction, peers, repeats):
    """One row: fastpool and every peer of ``layout``, compiled and warmed, then
    ``repeats`` interleaved timings."""
    data = make_data(layer, batch, layout, dtype)
    forward, backward = _ours(layer, data.x, data.weight)
    ours = forward if direction == "forward" else backward(data.grad)
    names, calls = [], [ours]
    for peer in peers:
        if layout not in peer.layouts:
            continue
        prepared = peer.prepare(layer, data, direction == "backward")
        if prepared is None:
            continue
        peer_forward, peer_backward, result = prepared
        _check_same(peer.name, layer, data.y, result)
        call = peer_forward if direction == "forward" else peer_backward
        if call is None:
            continue
        names.append(peer.name)
        calls.append(call)
    for call in calls:  # compile, warm caches and allocators
        call()
    times = interleaved_medians(calls, repeats)
    return LayerRow(networks=",".join(networks), layer=layer.label, kind=layer.kind,
                    batch=batch, direction=direction, layout=layout,
                    fastpool_ms=times[0] * 1e3,
                    peer_ms={n: t * 1e3 for n, t in zip(names, times[1:])})


def plan(networks, batches, layouts=LAYOUTS):
    """Every row to time: ``(layer, networks, batch, layout, direction)``; backward at
    batch 32 and larger (training batches) only."""
    rows = []
    for layer, users in unique_layers(networks):
        for batch in batches:
            for layout in layouts:
                rows.append((layer, users, batch, layout, "forward"))
                if batch >= 32:
                    rows.append((layer, users, batch, layout, "backward"))
    return rows


def run(networks, batches, dtype, threads, repeats, progress=None, peers=None):
    """Time the suite; returns ``(rows, meta)``. Thread pools are pinned as in
    ``fastpool._bench.run``."""
    import datetime

    from fastpool import _bench
    with _bench.pinned_threads(threads):
        peers = available_peers(threads) if peers is None else peers
        todo = plan(networks, batches)
        bar = _bench.Progress(len(todo), "layers", progress)
        rows = []
        for layer, users, batch, layout, direction in todo:
            rows.append(time_row(layer, users, batch, layout, np.dtype(dtype), direction,
                                 peers, repeats))
            bar.step(layer.label)
    meta = dict(suite="layers", dtype=str(np.dtype(dtype)), threads=threads,
                repeats=repeats, networks=list(networks), batches=list(batches),
                timing=dict(settle_seconds=SETTLE_SECONDS, untimed_calls_before=1,
                            order="rotating"),
                date=datetime.date.today().isoformat(),
                peers={p.name: getattr(p, "version", None) for p in peers})
    return rows, meta


# ----------------------------------------------------------------------------- report

def geometric_mean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summary(rows):
    """Per group (pooling, convolution, all): rows with a peer, the geometric mean and
    minimum of the best-peer ratio, and how many rows are behind any peer."""
    out = {}
    groups = {"pooling": [r for r in rows if r.kind != "conv"],
              "convolution": [r for r in rows if r.kind == "conv"], "all": rows}
    for group, members in groups.items():
        ratios = [r.best_ratio for r in members if r.best_ratio is not None]
        out[group] = dict(rows=len(ratios), geomean=geometric_mean(ratios),
                          minimum=min(ratios) if ratios else None,
                          behind=sum(1 for r in ratios if r < 1.0))
    return out


def format_table(rows, meta):
    names = list(meta["peers"])
    header = ("layer", "networks", "batch", "dir", "layout", "fastpool ms",
              *names, "best peer")
    table = [header]
    for r in rows:
        ratios = r.ratios
        table.append((r.layer, r.networks, str(r.batch), r.direction[:3],
                      "NCHW" if r.layout == "nchw" else "NHWC", f"{r.fastpool_ms:.3f}",
                      *[f"{ratios[n]:.2f}x" if n in ratios else "-" for n in names],
                      "-" if r.best_ratio is None else f"{r.best_ratio:.2f}x"))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [f"fastpool {fastpool.__version__} layer suite; {meta['dtype']}; "
             f"{meta['threads']} threads; median of {meta['repeats']}; ratio = peer time / "
             f"fastpool time (> 1: fastpool faster)"]
    for j, line in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    for group, s in summary(rows).items():
        if s["rows"]:
            lines.append(f"{group}: {s['rows']} rows, geometric mean {s['geomean']:.2f}x "
                         f"against the best peer, minimum {s['minimum']:.2f}x, "
                         f"{s['behind']} behind a peer")
    return "\n".join(lines)


def as_bench_rows(rows):
    """The rows as ``fastpool._bench.Row`` against the best peer, for its chart."""
    from fastpool import _bench
    return [_bench.Row(device="cpu", op=f"{r.layer} b{r.batch} {r.direction[:3]}",
                       where="NCHW" if r.layout == "nchw" else "NHWC",
                       fastpool_ms=r.fastpool_ms, peer_ms=None, speedup=r.best_ratio,
                       rate=0.0, unit="", bandwidth_fraction=None)
            for r in rows if r.best_ratio is not None]


def to_json(rows, meta):
    return dict(meta=meta, summary=summary(rows),
                rows=[dict(dataclasses.asdict(r), ratios=r.ratios, best_ratio=r.best_ratio)
                      for r in rows])
