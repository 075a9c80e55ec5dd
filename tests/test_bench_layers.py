"""``python -m fastpool bench --suite layers``: the networks' layers, the peers (each
checked to compute fastpool's result), the summary arithmetic and the command end to
end on a tiny selection (no timing is asserted)."""

import json
import math
import time

import numpy as np
import pytest

import fastpool
from fastpool import __main__ as cli
from fastpool import _bench_layers as layers
from fastpool._bench_layers import Layer, LayerRow

torch = pytest.importorskip("torch")


def test_networks_hold_their_known_layers():
    resnet18 = layers.NETWORKS["resnet18"]
    assert Layer("conv", 3, 224, 64, 7, 2, 3) in resnet18  # the stem
    assert Layer("max", 64, 112, kernel=3, stride=2, padding=1) in resnet18
    vgg = layers.NETWORKS["vgg16"]
    # 13 convs; distinct: 2 per block in blocks 1-4 (the repeats are equal), 1 in block 5
    assert sum(layer.kind == "conv" for layer in vgg) == 9
    assert sum(layer.kind == "max" for layer in vgg) == 5
    mobilenet = layers.NETWORKS["mobilenet_v2"]
    depthwise = [lay for lay in mobilenet if lay.kind == "conv" and lay.groups > 1]
    assert all(lay.groups == lay.channels == lay.out_channels for lay in depthwise)
    # torchvision's MobileNetV2 ends at 320 channels on 7x7, expanded to 1280
    assert Layer("conv", 320, 7, 1280, 1, 1, 0) in mobilenet
    resnet50 = layers.NETWORKS["resnet50"]
    assert Layer("conv", 1024, 14, 2048, 1, 2, 0) in resnet50  # last downsample
    assert Layer("global_avg", 2048, 7) in resnet50


def test_unique_layers_are_deduplicated_across_networks():
    found = layers.unique_layers(["resnet18", "resnet50"])
    keys = [layer for layer, _ in found]
    assert len(keys) == len(set(keys))
    users = dict(found)
    assert users[Layer("conv", 3, 224, 64, 7, 2, 3)] == ["resnet18", "resnet50"]
    assert users[Layer("conv", 64, 56, 64, 3, 1, 1)] == ["resnet18", "resnet50"]
    assert users[Layer("global_avg", 512, 7)] == ["resnet18"]


def test_plan_adds_backward_rows_for_training_batches_only():
    rows = layers.plan(["lenet5"], [1, 32])
    n = len(layers.NETWORKS["lenet5"])
    assert len(rows) == n * (2 + 4)  # batch 1: 2 layouts forward; 32: and backward
    assert {r[4] for r in rows if r[2] == 1} == {"forward"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layer", [
    Layer("conv", 4, 9, 6, 3, 2, 1), Layer("conv", 6, 8, 6, 3, 1, 1, groups=6),
    Layer("max", 3, 9, kernel=3, stride=2, padding=1), Layer("avg", 3, 8, kernel=2, stride=2),
    Layer("global_avg", 5, 7)], ids=lambda lay: lay.label)
@pytest.mark.parametrize("layout", layers.LAYOUTS)
def test_every_peer_runs_the_layer_fastpool_runs(layer, layout, dtype):
    peers = layers.available_peers(1)
    for direction in ("forward", "backward"):
        row = layers.time_row(layer, ["test"], 2, layout, np.dtype(dtype), direction,
                              peers, repeats=1)
        same_layout = [p.name for p in peers if layout in p.layouts]
        ran = set(row.peer_ms)
        assert ran <= set(same_layout)
        # PyTorch runs every row of its layout; ONNX Runtime forward rows it has a
        # kernel for (float32 everywhere, float64 max pooling only)
        assert any(name.startswith("PyTorch") for name in ran)
        if direction == "backward" or layout == "channels_last":
            assert "ONNX Runtime" not in ran
        elif any(p.name == "ONNX Runtime" for p in peers) and dtype == np.float32:
            assert "ONNX Runtime" in ran
        assert row.fastpool_ms > 0 and all(ms > 0 for ms in row.peer_ms.values())


def test_peer_backward_matches_fastpool_backward():
    """The backward rows time the same computation on both sides."""
    layer = Layer("conv", 4, 9, 6, 3, 2, 1)
    for layout in layers.LAYOUTS:
        data = layers.make_data(layer, 2, layout, np.float64)
        ours = layers._ours(layer, data.x, data.weight)[1](data.grad)()
        peer = layers.TorchPeer(layout)
        theirs = peer.prepare(layer, data, True)[1]()
        np.testing.assert_allclose(theirs[0].numpy(), ours.grad_input, rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(theirs[1].numpy(), ours.grad_weight, rtol=1e-10,
                                   atol=1e-12)


def test_a_misbuilt_peer_is_refused():
    layer = Layer("max", 3, 9, kernel=3, stride=2, padding=1)
    data = layers.make_data(layer, 1, "nchw", np.float32)

    class Wrong:
        name, layouts = "wrong", ("nchw",)

        def prepare(self, layer, data, backward):
            y = data.y + 1.0
            return (lambda: y), None, y

    with pytest.raises(RuntimeError, match="wrong computes another result"):
        layers.time_row(layer, ["t"], 1, "nchw", np.dtype(np.float32), "forward",
                        [Wrong()], repeats=1)


def test_channels_last_rows_give_the_peer_channels_last_tensors():
    layer = Layer("avg", 3, 8, kernel=2, stride=2)
    data = layers.make_data(layer, 2, "channels_last", np.float32)
    assert data.x.strides[1] == data.x.itemsize
    forward = layers.TorchPeer("channels_last").prepare(layer, data, False)[0]
    assert forward().is_contiguous(memory_format=torch.channels_last)


def _row(kind, fastpool_ms, **peers):
    return LayerRow(networks="n", layer="l", kind=kind, batch=1, direction="forward",
                    layout="nchw", fastpool_ms=fastpool_ms, peer_ms=peers)


def test_summary_takes_the_fastest_peer_per_row():
    rows = [_row("max", 2.0, a=4.0, b=1.0),   # best peer b: 0.5x
            _row("avg", 1.0, a=2.0),          # 2x
            _row("conv", 1.0, a=3.0, b=6.0),  # 3x
            _row("conv", 1.0)]                # no peer: not counted
    assert rows[0].best_ratio == 0.5 and rows[3].best_ratio is None
    s = layers.summary(rows)
    assert s["pooling"] == dict(rows=2, geomean=pytest.approx(1.0), minimum=0.5, behind=1)
    assert s["convolution"] == dict(rows=1, geomean=pytest.approx(3.0), minimum=3.0,
                                    behind=0)
    assert s["all"]["geomean"] == pytest.approx(math.exp(math.log(3.0) / 3))
    assert s["all"]["behind"] == 1


def test_layers_command_end_to_end(tmp_path, capsys):
    out_json, out_png = tmp_path / "layers.json", tmp_path / "layers.png"
    argv = ["bench", "--suite", "layers", "--networks", "lenet5", "--batches", "1",
            "--repeats", "1", "--threads", "1", "--json", str(out_json)]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(out_png)]
    except ImportError:
        out_png = None
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "conv 5x5 1->6@32" in printed and "PyTorch channels_last" in printed
    assert "geometric mean" in printed
    result = json.loads(out_json.read_text())
    assert result["meta"]["networks"] == ["lenet5"]
    assert len(result["rows"]) == 2 * len(layers.NETWORKS["lenet5"])
    assert result["summary"]["all"]["rows"] == len(result["rows"])
    assert result["versions"]["fastpool"] == fastpool.__version__
    if out_png is not None:
        assert out_png.stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--networks", "alexnet"], "unknown"), (["--batches", "0"], "at least 1"),
    (["--batches", "x"], "comma-separated"), (["--device", "cuda"], "CPU only")])
def test_layers_command_rejects_bad_options(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["bench", "--suite", "layers", *argv])


def test_interleaved_medians_rotates_the_order():
    # Each repeat starts from the next function, so the one that runs after a peer's
    # threads is not always the same; every function gets one timed call (after an
    # untimed one) per repeat, and each median is of its own samples.
    calls = []

    def make(name, seconds):
        def fn():
            calls.append(name)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
        return fn

    fns = [make("a", 0.0), make("b", 0.002), make("c", 0.0)]
    medians = layers.interleaved_medians(fns, repeats=3, settle=0.0)
    # each sample: an untimed call, then the timed one
    assert calls == [n for n in "abcbcacab" for _ in range(2)]
    assert medians[1] >= 0.002 > max(medians[0], medians[2])
