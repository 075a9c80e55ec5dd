"""``python -m fastpool bench`` and ``info``: the NumPy peer computes the same results as
fastpool, and the command runs end to end on tiny shapes (no timing is asserted)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastpool
from fastpool import __main__ as cli
from fastpool import _bench, _numpy_peer
from conftest import assert_close, assert_close_to_sum

POOL_CASES = [((2, 3, 9, 8), 3, 2, 1), ((2, 3, 8, 8), 2, 2, 0), ((1, 2, 6, 7), 3, 1, 1)]
CONV_CASES = [((2, 4, 7, 6), (6, 4, 3, 3), 1, 1, 1), ((2, 4, 9, 9), (4, 1, 3, 3), 2, 1, 4),
              ((2, 3, 11, 11), (5, 3, 5, 5), 2, 2, 1), ((1, 4, 5, 5), (8, 4, 1, 1), 1, 0, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, k, s, p", POOL_CASES)
def test_numpy_peer_pooling_matches_fastpool(shape, k, s, p, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(dtype)  # continuous: no ties
    y, idx = fastpool.max_pool2d(x, k, s, p, return_indices=True, device="cpu")
    peer_y, peer_idx = _numpy_peer.max_pool2d(x, k, s, p, return_indices=True)
    np.testing.assert_array_equal(peer_y, y)
    np.testing.assert_array_equal(peer_idx, idx)
    np.testing.assert_array_equal(_numpy_peer.max_pool2d(x, k, s, p), y)
    grad = rng.standard_normal(y.shape).astype(dtype)
    assert_close(_numpy_peer.max_pool2d_backward(grad, x, k, s, p, idx),
                 fastpool.max_pool2d_backward(grad, x, k, s, p, indices=idx), dtype)
    assert_close(_numpy_peer.avg_pool2d(x, k, s, p), fastpool.avg_pool2d(x, k, s, p), dtype)
    assert_close(_numpy_peer.avg_pool2d_backward(grad, x, k, s, p),
                 fastpool.avg_pool2d_backward(grad, x, k, s, p), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, w_shape, stride, padding, groups", CONV_CASES)
def test_numpy_peer_conv_matches_fastpool(x_shape, w_shape, stride, padding, groups, dtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    y = fastpool.conv2d(x, w, stride=stride, padding=padding, groups=groups)
    bound = fastpool.conv2d(np.abs(x), np.abs(w), stride=stride, padding=padding,
                            groups=groups)
    assert_close_to_sum(_numpy_peer.conv2d(x, w, stride, padding, groups), y, bound, dtype)
    grad = rng.standard_normal(y.shape).astype(dtype)
    expected = fastpool.conv2d_backward(grad, x, w, stride=stride, padding=padding,
                                        groups=groups)
    grad_input, grad_weight = _numpy_peer.conv2d_backward(grad, x, w, stride, padding,
                                                          groups)
    # Loose but meaningful bound: each gradient element sums at most grad.size terms.
    scale = np.abs(grad).max() * max(np.abs(x).max(), np.abs(w).max()) * grad.size
    np.testing.assert_allclose(grad_input, expected.grad_input,
                               atol=scale * (1e-6 if dtype == np.float32 else 1e-14))
    np.testing.assert_allclose(grad_weight, expected.grad_weight,
                               atol=scale * (1e-6 if dtype == np.float32 else 1e-14))


@pytest.fixture
def tiny_shapes(monkeypatch):
    """Every shape table entry shrunk, so a full bench run takes a second."""
    pools = [((2, 4, 9, 9), 3, 2, 1)]
    convs = [("3x3 4->4", (2, 4, 8, 8), (4, 4, 3, 3), 1, 1, 1)]
    monkeypatch.setattr(_bench, "POOL_SHAPES", {k: pools for k in _bench.POOL_SHAPES})
    monkeypatch.setattr(_bench, "CONV_SHAPES", {k: convs for k in _bench.CONV_SHAPES})
    monkeypatch.setattr(_bench, "copy_bandwidth", lambda device, quick: 10.0)


def test_bench_with_numpy_peer_writes_table_json_and_plot(tiny_shapes, monkeypatch,
                                                          tmp_path, capsys):
    monkeypatch.setattr(_bench, "choose_peer", lambda device: _numpy_peer)
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    argv = ["bench", "--device", "cpu", "--repeats", "2", "--threads", "1",
            "--json", str(out)]
    try:  # the plot needs the bench extra
        import matplotlib
    except ImportError:
        matplotlib = None
    if matplotlib is not None:
        argv += ["--plot", str(plot)]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "vs NumPy" in table and "max_pool2d forward" in table
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["meta"]["devices"]["cpu"]["peer"] == "NumPy"
    assert [r["op"] for r in rows] == [
        "max_pool2d forward", "max_pool2d forward+indices", "max_pool2d backward",
        "avg_pool2d forward", "avg_pool2d backward",
        "stochastic_pool2d train forward+indices", "stochastic_pool2d inference forward",
        "stochastic_pool2d train backward", "stochastic_pool2d inference backward",
        "conv2d forward", "conv2d backward (input+weight)"]
    for r in rows:
        assert r["fastpool_ms"] > 0
        if r["op"].startswith("stochastic"):
            assert r["peer_ms"] is None and r["speedup"] is None
        else:
            assert r["speedup"] == pytest.approx(r["peer_ms"] / r["fastpool_ms"])
        if r["unit"] == "GB/s":
            assert r["bandwidth_fraction"] == pytest.approx(r["rate"] / 10.0)
    x_bytes = 2 * 4 * 9 * 9 * 4
    y_bytes = 2 * 4 * 5 * 5 * 4
    first = rows[0]
    assert first["rate"] == pytest.approx((x_bytes + y_bytes) / first["fastpool_ms"] / 1e6)
    if matplotlib is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_against_torch(tiny_shapes, capsys):
    torch = pytest.importorskip("torch")
    assert cli.main(["bench", "--device", "cpu", "--repeats", "1", "--ops", "conv",
                     "--dtype", "float64"]) == 0
    table = capsys.readouterr().out
    assert f"PyTorch {torch.__version__}" in table and "float64" in table
    assert "conv2d backward (input+weight)" in table and "max_pool2d" not in table


@pytest.mark.parametrize("op, shape, arg", [
    ("conv1d", (2, 3, 9), (4, 3, 3)), ("conv3d", (2, 3, 4, 5, 6), (4, 3, 3, 3, 3)),
    ("max_pool3d", (2, 3, 5, 6, 7), (3, 2, 1)), ("avg_pool3d", (2, 3, 5, 6, 7), (3, 2, 1)),
    ("conv1d channels_last", (2, 3, 9), (4, 3, 3)),
    ("conv2d channels_last", (2, 8, 6, 7), (8, 8, 3, 3)),
    ("conv3d channels_last", (2, 3, 4, 5, 6), (4, 3, 3, 3, 3))])
def test_nd_cases_time_the_same_backward_as_the_torch_peer(op, shape, arg):
    """The N-D bench's backward rows: both sides compute the same gradients, and
    channels-last rows give both sides channels-last buffers."""
    torch = pytest.importorskip("torch")
    cases = _bench.nd_cases(_bench.FastpoolSide("cpu"), _bench.TorchPeer("cpu"), op, shape,
                            arg, np.float64)
    assert [c.op for c in cases] == [f"{op} forward", f"{op} backward" + (
        " (input+weight)" if op.startswith("conv") else "")]
    for case in cases:
        ours, theirs = case.ours(), case.peer()
        if isinstance(theirs, tuple):  # convolution_backward: input, weight, bias
            pairs = list(zip(ours[:2], theirs[:2]))
        else:
            pairs = [(ours, theirs)]
        for a, b in pairs:
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-10, atol=1e-10)
        if op.endswith("channels_last"):  # the input (gradient) in the row's layout
            a, b = pairs[0]
            assert np.moveaxis(a, 1, -1).flags.c_contiguous
            if op.startswith("conv2d"):  # PyTorch keeps channels_last in 2-D only
                assert b.is_contiguous(memory_format=torch.channels_last)


def test_nd_stochastic_rows_have_no_peer_and_pick_as_the_op():
    """Stochastic pooling rows (no framework has the op): no peer, and the timed call
    is the op's (the same picks as calling it)."""
    for op, shape in (("stochastic_pool1d", (2, 3, 9)),
                      ("stochastic_pool3d", (2, 3, 5, 6, 7))):
        cases = _bench.nd_cases(_bench.FastpoolSide("cpu"), _bench.TorchPeer("cpu")
                                if importlib.util.find_spec("torch") else None, op,
                                shape, (3, 2, 1), np.float32)
        assert [c.op for c in cases] == [f"{op} forward"] and cases[0].peer is None
        x = np.random.default_rng(2).random(shape, dtype=np.float64).astype(np.float32)
        np.testing.assert_array_equal(cases[0].ours(),
                                      getattr(fastpool, op)(x, 3, 2, 1, seed=1))


def test_bench_nd_against_torch(capsys):
    torch = pytest.importorskip("torch")
    assert cli.main(["bench", "--device", "cpu", "--repeats", "1", "--ops", "nd",
                     "--quick"]) == 0
    table = capsys.readouterr().out
    assert f"PyTorch {torch.__version__}" in table
    for row in ("conv1d backward (input+weight)", "conv3d backward (input+weight)",
                "max_pool3d backward", "avg_pool3d backward"):
        assert row in table


def test_torch_peer_matches_fastpool():
    pytest.importorskip("torch")
    peer = _bench.TorchPeer("cpu")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 9, 8))
    y, idx = fastpool.max_pool2d(x, 3, 2, 1, return_indices=True)
    ty, tidx = peer.max_pool2d(peer.put(x), 3, 2, 1, return_indices=True)
    np.testing.assert_array_equal(ty.numpy(), y)
    np.testing.assert_array_equal(tidx.numpy(), idx)
    grad = rng.standard_normal(y.shape)
    np.testing.assert_allclose(
        peer.avg_pool2d_backward(peer.put(grad), peer.put(x), 3, 2, 1).numpy(),
        fastpool.avg_pool2d_backward(grad, x, 3, 2, 1), rtol=1e-12)


def test_bench_cuda_path_runs_end_to_end(tiny_shapes, monkeypatch):
    """The GPU half of the bench (device arrays, synchronisation, the GPU shape table)
    on tiny shapes: under the simulator here (the command refuses it, so ``run`` is
    called directly), on the GPU where there is one. Timings are not looked at."""
    from numba import config
    if not config.ENABLE_CUDASIM and not fastpool.cuda_available():
        pytest.skip("neither a GPU nor the simulator")
    if config.ENABLE_CUDASIM:  # split-K sized for tiny shapes, as in test_cuda_conv.py
        from fastpool.cuda import conv as cuda_conv  # (the GPU's split 40 s of threads)
        monkeypatch.setattr(cuda_conv, "_TARGET_BLOCKS", 4)
        monkeypatch.setattr(cuda_conv, "_TARGET_THREADS", 256)
    rows, meta = _bench.run(["cuda"], "float32", quick=False, threads=1, repeats=1,
                            ops=("pool", "conv"))
    assert [r.device for r in rows] == ["cuda"] * 11
    assert meta["devices"]["cuda"]["shapes"] in ("numpy", "full-cuda")
    assert all(r.fastpool_ms > 0 for r in rows)
    assert all((r.speedup is None) == r.op.startswith("stochastic") for r in rows)


def test_bench_refuses_a_missing_or_simulated_gpu(monkeypatch):
    monkeypatch.setattr(cli, "_gpu_problem", lambda: "no usable GPU")
    with pytest.raises(SystemExit, match="--device cuda: no usable GPU"):
        cli.main(["bench", "--device", "cuda"])
    assert cli._devices("auto") == ["cpu"]
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        monkeypatch.undo()
        assert "simulator" in cli._gpu_problem()


@pytest.mark.parametrize("argv, message", [
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--threads", "0"], "--threads"),
])
def test_bench_rejects_bad_options(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)


def test_progress_bar_in_a_log_prints_the_finished_bar_once(tmp_path):
    with open(tmp_path / "log", "w+", newline="") as log:
        bar = _bench.Progress(4, "timing", stream=log, width=8)
        for _ in range(4):
            bar.step("op")
        log.seek(0)
        assert log.read() == "\rtiming [########] 4/4 op" + " " * 38 + "\n"


def test_each_side_is_timed_right_after_its_own_untimed_call(tmp_path):
    """Neither side is timed on the cache state the other one left (the peer reads
    the same buffers as fastpool)."""
    calls = []

    def side(name):
        return lambda: calls.append(name)

    cases = [_bench.Case("a", "", side("ours a"), side("peer a"), 1.0, "GB/s"),
             _bench.Case("b", "", side("ours b"), None, 1.0, "GB/s")]
    with open(tmp_path / "log", "w") as log:
        _bench.median_times(cases, 2, _bench.Progress(4, "t", stream=log))
    assert calls == ["ours a", "ours a", "peer a", "peer a", "ours b", "ours b"] * 2


def test_info_runs_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "fastpool", "info"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"fastpool {fastpool.__version__}")
    assert "numba threading layer: " in out and "threads: " in out
    assert "kernel cache directory: " in out
    assert any(line.startswith("GPU: ") for line in out.splitlines())
    assert f"numpy          {np.__version__}" in out


def test_command_leaves_the_openmp_wait_policy_to_the_user():
    """The benchmarks time peers with their own settings: ``python -m fastpool`` once
    set ``OMP_WAIT_POLICY=PASSIVE``, under which PyTorch's layer-suite calls took 2x as
    long as a user's (up to 10x on the smallest)."""
    script = ("import os, runpy, sys; sys.argv = ['fastpool', 'info']\n"
              "try:\n    runpy.run_module('fastpool', run_name='__main__')\n"
              "except SystemExit:\n    pass\n"
              "print('POLICY', os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "POLICY None"


def test_bench_restores_thread_counts(tiny_shapes, monkeypatch):
    import numba
    from threadpoolctl import threadpool_info
    monkeypatch.setattr(_bench, "choose_peer", lambda device: _numpy_peer)
    before = numba.get_num_threads()
    blas_before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    with open(os.devnull, "w") as sink:
        _bench.run(["cpu"], "float32", True, 1, 1, ("pool",), stream=sink)
    assert numba.get_num_threads() == before
    assert [p["num_threads"] for p in threadpool_info()
            if p["user_api"] == "blas"] == blas_before


def test_blas_note_names_a_forced_narrow_openblas(monkeypatch):
    from llvmlite import binding

    from fastpool import _bench
    wide = {"avx512f": True, "avx512bw": True, "avx512dq": True, "avx512vl": True}
    pools = [{"internal_api": "openblas", "architecture": "Haswell"}]
    monkeypatch.setattr(binding, "get_host_cpu_features", lambda: wide)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert "OPENBLAS_CORETYPE=Haswell" in _bench.blas_note(pools)
    assert _bench.blas_note([{"internal_api": "openblas", "architecture": "SkylakeX"}]) is None
    monkeypatch.setattr(binding, "get_host_cpu_features", lambda: {"avx2": True})
    assert _bench.blas_note(pools) is None  # the CPU has nothing wider: nothing to say
    monkeypatch.setattr(binding, "get_host_cpu_features", lambda: wide)
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert _bench.blas_note(pools) is None  # OpenBLAS chose by itself


def test_calls_suite_runs_and_writes_json(tmp_path, capsys):
    import numba
    path = tmp_path / "calls.json"
    before = numba.get_num_threads()
    assert cli.main(["bench", "--suite", "calls", "--quick", "--repeats", "1",
                     "--threads", "1", "--json", str(path)]) == 0
    # the caller keeps its thread count (it once stayed 1 for the rest of the suite)
    assert numba.get_num_threads() == before
    table = capsys.readouterr().out
    rows = json.loads(path.read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names[0] == "max_pool2d" and "conv2d_backward 3x3" in names
    for r in rows:
        assert r["name"] in table and r["fastpool_us"] > 0
        assert (r["target_us"] is None) == ("backward" in r["name"])
        if r["peer_us"] is not None:
            assert r["ratio"] == pytest.approx(r["peer_us"] / r["fastpool_us"])
    with pytest.raises(SystemExit, match="float32"):
        cli.main(["bench", "--suite", "calls", "--dtype", "float64"])


def test_calls_suite_peers_compute_what_fastpool_computes():
    """The timed PyTorch calls are the same computations as fastpool's (a cheaper peer
    op would make the ratio meaningless)."""
    pytest.importorskip("torch")
    from fastpool import _bench_calls
    for name, _, ours, peer in _bench_calls.cases():
        got, want = ours(), peer()
        if isinstance(want, tuple):  # conv backward: (input, weight, None) grads
            got, want = got[:2], want[:2]
        else:
            got, want = [got], [want]
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
