"""``python -m fastpool gpu-check`` (fastpool/_gpu_check.py) checked without a GPU: the
command end to end on a small selection under the CUDA simulator, its report of failing
tests, its time budget, and its summary against issue 17's targets. (The file and its
tests are named without "cuda", "gpu" or "simulator", so that the check's own test
selection does not run them on the GPU.)"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fastpool import _gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_the_command_runs_the_selected_tests_and_writes_the_report(tmp_path):
    report_path, log = tmp_path / "report.json", tmp_path / "check.log"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "fastpool", "gpu-check", "--simulator", "--json",
         str(report_path), "--log", str(log), "--workers", "1", "-k",
         "test_cuda_pooling and max_pool_matches_cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert report["environment"]["device"] == "Numba's CUDA simulator"
    assert report["environment"]["versions"]["numba"]
    tests = report["tests"]
    assert tests["outcome"] == "passed" and tests["failed"] == []
    assert tests["counts"]["passed"] >= 1
    assert tests["counts"]["passed"] == tests["counts"]["tests"]
    assert "passed" in log.read_text()
    assert report["summary"]["tests"] == "passed"


def test_a_real_device_check_is_refused_when_simulated(tmp_path):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "fastpool", "gpu-check"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "--simulator" in done.stderr


def test_failing_tests_are_reported_with_their_messages(tmp_path):
    (tmp_path / "conftest.py").write_text("")
    (tmp_path / "test_mixed.py").write_text(textwrap.dedent("""
        def test_cuda_passes():
            assert 1 + 1 == 2

        def test_cuda_fails():
            assert [1, 2] == [1, 3], "the planted failure"

        def test_cpu_only():
            assert False, "deselected: its name says neither cuda nor gpu"
        """))
    result = _gpu_check.run_tests(tmp_path, 300, tmp_path / "log", simulator=True,
                                  workers=1)
    assert result["outcome"] == "failed"
    assert result["counts"] == dict(tests=2, failures=1, errors=0, skipped=0, passed=1)
    (failure,) = result["failed"]
    assert failure["test"].endswith("test_cuda_fails")
    assert "the planted failure" in failure["message"]


def test_a_folder_without_a_suite_is_skipped_not_failed(tmp_path):
    result = _gpu_check.run_tests(tmp_path, 10, tmp_path / "log", simulator=True)
    assert result["outcome"] == "skipped"


def test_the_summary_counts_rows_against_the_targets():
    rows = [
        dict(device="cuda", unit="GB/s", rate=3000.0, speedup=1.2, bandwidth_fraction=0.75),
        dict(device="cuda", unit="GB/s", rate=2000.0, speedup=0.9, bandwidth_fraction=0.5),
        dict(device="cuda", unit="GFLOP/s", rate=25000.0, speedup=0.6,
             bandwidth_fraction=None),
        dict(device="cuda", unit="GFLOP/s", rate=5000.0, speedup=0.2,
             bandwidth_fraction=None),
        dict(device="cpu", unit="GB/s", rate=10.0, speedup=5.0, bandwidth_fraction=0.9),
        dict(device="cuda", unit="GB/s", rate=2500.0, speedup=None, bandwidth_fraction=0.8),
    ]
    report = dict(tests=dict(outcome="passed", counts=dict(tests=3)),
                  peaks=dict(fp32_tflops=50.0),
                  bench_float32=dict(pool=dict(rows=rows[:2] + rows[4:]),
                                     conv=dict(rows=rows[2:4])))
    summary = _gpu_check.summarise(report)
    # The peerless row (stochastic pooling) counts for the bandwidth target only.
    assert summary["pooling_at_least_70pct_of_copy_bandwidth"] == dict(rows=3, meeting=2)
    assert summary["pooling_at_least_cudnn"] == dict(rows=2, meeting=1)
    assert summary["conv_at_least_half_cudnn"] == dict(rows=2, meeting=1)
    assert rows[2]["fp32_peak_fraction"] == 25000.0 / 50000.0


def test_the_call_cost_stage_reports_every_array_library(tmp_path, monkeypatch):
    """Under the simulator (times meaningless, and no CUDA torch or CuPy here): the
    stage still runs, and says why a library's row is missing instead of failing."""
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    result = _gpu_check.measure_calls(300, tmp_path / "log", shapes=((1, 1, 4, 4),),
                                      calls=1)
    assert result["outcome"] == "passed", result
    (row,) = result["rows"]
    assert row["shape"] == [1, 1, 4, 4] and row["fastpool_numba_us"] > 0
    for library in ("torch", "cupy"):  # measured, or the reason it was not
        assert f"fastpool_{library}_us" in row or row[library]


def test_the_stages_fit_the_budget_and_every_stage_is_reported(tmp_path, monkeypatch):
    """Every stage stubbed to use all the time it is given, plus the grace a child
    gets after its interrupt, on a fake clock: the whole check ends within its budget,
    a benchmark group with too little time is skipped rather than started, and the
    report on disk holds every stage and the summary."""
    clock = [1000.0]
    monkeypatch.setattr(_gpu_check.time, "monotonic", lambda: clock[0])
    given = {}

    def spend(name, seconds, grace=True, **result):
        given[name] = seconds
        clock[0] += max(seconds, 1) + (_gpu_check.GRACE if grace else 0)
        return dict(outcome="timeout", **result)

    monkeypatch.setattr(_gpu_check, "environment", lambda simulator: {})
    monkeypatch.setattr(_gpu_check, "run_tests",
                        lambda d, t, log, sim, sel, w: spend("tests", t))
    monkeypatch.setattr(_gpu_check, "measure_peaks",
                        lambda t, log: spend("peaks", t, grace=False))
    monkeypatch.setattr(_gpu_check, "measure_calls",
                        lambda t, log: spend("calls", t, grace=False))
    monkeypatch.setattr(_gpu_check, "run_bench",
                        lambda dtype, r, t, log, ops="all": spend(f"{dtype} {ops}", t,
                                                                  rows=[]))
    path = tmp_path / "report.json"
    for budget in (450, 300, 120):
        given.clear()
        clock[0] = 1000.0
        report = _gpu_check.main(str(path), budget, tmp_path / "log")
        assert clock[0] - 1000.0 <= budget, (budget, given)
        assert given["tests"] > 0
        on_disk = json.loads(path.read_text())
        assert set(on_disk["bench_float32"]) == {"pool", "conv", "nd"}
        assert on_disk["summary"] == json.loads(json.dumps(report["summary"]))
        for group in on_disk["bench_float32"].values():
            started = group["outcome"] != "skipped"
            assert not started or group["outcome"] == "timeout"
    # The default budget leaves every group 40 s even when every stage before it used
    # all of its time.
    clock[0] = 1000.0
    given.clear()
    _gpu_check.main(str(path), 480, tmp_path / "log")
    assert min(given[f"float32 {g}"] for g in ("pool", "conv", "nd")) >= 40
