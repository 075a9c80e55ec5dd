"""``python -m fastpool gpu-check``: the GPU half proven and measured in one short run.

Written for a borrowed GPU machine with a few minutes on it, no package registry and its
own Python: it installs nothing, runs fastpool from wherever it is imported (a source
checkout: ``cd fastpool && python -m fastpool gpu-check``), and skips what that Python
lacks instead of failing. Three stages, each in its own process under its own time
limit, so a hang or a broken CUDA context in one still leaves a report:

1. the test suite's GPU tests (those whose id names ``cuda``, ``gpu`` or
   ``simulator``: ``tests/test_cuda_*.py`` and every device-parametrised test) on the
   real GPU (``NUMBA_ENABLE_CUDASIM=0``), in parallel with pytest-xdist where installed;
2. the device's ceilings: device-to-device copy bandwidth (read + write bytes) and
   float32 matrix-product rate with TF32 off (PyTorch, else CuPy); and the host cost
   of a call (microseconds per max_pool2d call on a tiny input, from a Numba device
   array, a torch tensor and a CuPy array, beside PyTorch's own);
3. ``python -m fastpool bench --device cuda`` (every op on the standard GPU shapes
   against PyTorch/cuDNN with TF32 off), then in float16 if time is left.

The JSON (``--json``) is rewritten after every stage: device, driver, versions, date,
each stage's outcome and time, the failed tests with their messages, the benchmark rows
with ratios, fractions of the copy bandwidth and of the float32 peak, and a summary
against issue 17's targets (pooling >= 70% of the copy bandwidth and >= 1.0x cuDNN,
convolution >= 0.5x cuDNN).
"""

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from importlib import metadata, util
from pathlib import Path

_DISTRIBUTIONS = ("numpy", "numba", "numba-cuda", "llvmlite", "torch", "cupy-cuda13x",
                  "cupy-cuda12x", "dask", "distributed", "pytest", "pytest-xdist",
                  "pytest-timeout", "hypothesis")
TEST_SELECTION = "cuda or gpu or simulator"
# Seconds a child gets after its interrupt (pytest writes its report) before it is
# killed; every stage's time limit leaves this much of the budget for it.
GRACE = 20
# A benchmark stage with less time than this is skipped rather than started.
MIN_STAGE = 20
# Imported by the test suite at collection: without them no test runs at all.
_TEST_NEEDS = ("pytest", "hypothesis", "scipy")


def _versions():
    found = {"python": platform.python_version()}
    for dist in _DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def environment(simulator):
    """Device, driver and library versions (without touching the GPU under the
    simulator)."""
    import fastpool
    info = dict(fastpool=fastpool.__version__, source=str(Path(fastpool.__file__).parent),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                host=platform.node(), cpus=os.cpu_count(), versions=_versions(),
                commit=_git_commit(Path(fastpool.__file__).parent.parent))
    if simulator:
        info["device"] = "Numba's CUDA simulator"
        return info
    from numba import cuda
    gpu = cuda.get_current_device()
    free, total = cuda.current_context().get_memory_info()
    name = gpu.name.decode() if isinstance(gpu.name, bytes) else gpu.name
    info.update(device=name, compute_capability=".".join(map(str, gpu.compute_capability)),
                multiprocessors=gpu.MULTIPROCESSOR_COUNT, memory_gib=round(total / 2**30, 1),
                driver=".".join(map(str, cuda.cudadrv.driver.driver.get_version())))
    try:
        from numba.cuda.cudadrv import nvvm
        info["nvvm"] = ".".join(map(str, nvvm.NVVM().get_version()))
    except Exception as exc:  # reported, not fatal: the tests will say what fails
        info["nvvm"] = f"unavailable ({type(exc).__name__}: {exc})"[:300]
    try:
        info["runtime"] = ".".join(map(str, cuda.runtime.get_version()))
    except Exception as exc:  # the runtime library is optional for Numba
        info["runtime"] = f"unknown ({type(exc).__name__})"
    try:
        import torch
        info["torch_cuda"], info["cudnn"] = torch.version.cuda, torch.backends.cudnn.version()
    except ImportError:
        pass
    return info


def _git_commit(root):
    """HEAD, with " (modified)" when the tree differs from it (a copied tree can carry
    an older .git)."""
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        head = git("rev-parse", "HEAD")
        return (head + (" (modified)" if git("status", "--porcelain", "-uno") else "")
                if head else None)
    except (OSError, subprocess.SubprocessError):
        return None


def _run(command, timeout, log, env=None):
    """Run ``command`` with its output appended to ``log``; (return code or "timeout",
    seconds)."""
    start = time.monotonic()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            code = child.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            # An interrupt first: pytest then still writes its JUnit report of the
            # tests that ran.
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=GRACE)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            code = "timeout"
    return code, round(time.monotonic() - start, 1)


def run_tests(tests_dir, timeout, log, simulator, select=None, workers=None):
    """The GPU tests; a dict of counts, failures and the stage's outcome."""
    if not (tests_dir / "conftest.py").exists():
        return dict(outcome="skipped", reason=f"no test suite at {tests_dir} (run from a "
                                              "source checkout)")
    missing = [name for name in _TEST_NEEDS if util.find_spec(name) is None]
    if missing:
        return dict(outcome="skipped", reason=f"not installed: {', '.join(missing)}")
    xml = Path(tempfile.mkdtemp()) / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
               f"--junitxml={xml}", "-k", select or TEST_SELECTION, str(tests_dir)]
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    if util.find_spec("xdist") is not None and workers > 1:
        command[3:3] = ["-n", str(workers)]
    if util.find_spec("pytest_timeout") is not None:
        command[3:3] = ["--timeout", "240"]
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1" if simulator else "0",
               FASTPOOL_TEST_WARMUP="0")
    code, seconds = _run(command, timeout, log, env)
    result = dict(outcome="passed" if code == 0 else "timeout" if code == "timeout"
                  else "failed", return_code=code, seconds=seconds, selection=command[-2])
    try:
        result.update(junit_summary(xml))
    except (OSError, ElementTree.ParseError) as exc:  # killed before it was written
        result["report_error"] = f"{type(exc).__name__}: {exc}"
    if code != 0:
        # A test stuck in a CUDA call ignores the interrupt and is killed: no JUnit
        # report then, and the log's last lines are what says where it stopped.
        result["log_tail"] = _tail(log, 40)
    return result


def _tail(path, lines):
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])[-4000:]
    except OSError:
        return None


def junit_summary(path):
    """Counts and failed tests (id, and the message: its start and its end when long)
    from a JUnit XML report."""
    root = ElementTree.parse(path).getroot()
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed = []
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in root.iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error"):
                text = ((child.get("message") or "") + "\n" + (child.text or "")).strip()
                if len(text) > 2000:  # the message and the test's frame, then the end
                    text = text[:1000] + "\n[...]\n" + text[-1000:]
                failed.append(dict(test=f"{case.get('classname')}::{case.get('name')}",
                                   kind=child.tag, message=text))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(counts=counts, failed=failed)


_PEAKS = r"""
import json, time
import numpy as np
from numba import cuda
n = 64 << 20
src = cuda.to_device(np.ones(4 * n, np.float32)); dst = cuda.device_array_like(src)
def best(fn, k=10):
    fn(); cuda.synchronize(); times = []
    for _ in range(k):
        t = time.perf_counter(); fn(); cuda.synchronize(); times.append(time.perf_counter() - t)
    return min(times)
out = dict(copy_gbs=2 * src.nbytes / best(lambda: dst.copy_to_device(src)) / 1e9)
print("PEAKS", json.dumps(out), flush=True)  # kept if the matrix products fail
m = 8192
def torch_mm():
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.rand(m, m, device="cuda"); b = torch.rand(m, m, device="cuda")
    return best(lambda: (torch.mm(a, b), torch.cuda.synchronize())), "torch.mm, TF32 off"
def cupy_mm():
    import cupy
    a = cupy.random.rand(m, m, dtype=cupy.float32); b = cupy.random.rand(m, m, dtype=cupy.float32)
    return best(lambda: (a @ b, cupy.cuda.Device().synchronize())), "cupy matmul"
for way in (torch_mm, cupy_mm):
    try:
        seconds, how = way()
    except Exception as exc:  # missing, or a build without CUDA
        out.setdefault("fp32_errors", []).append(f"{type(exc).__name__}: {exc}"[:200])
        continue
    out.update(fp32_tflops=2 * m**3 / seconds / 1e12, fp32_by=how)
    break
print("PEAKS", json.dumps(out))
"""


_CALLS = r"""
import json, sys, time
import numpy as np
from numba import cuda
import fastpool
shapes, n = json.loads(sys.argv[1])
def per_call(fn):
    fn(); cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6
rows = []
for shape in map(tuple, shapes):
    host = np.random.default_rng(0).random(shape, dtype=np.float32)
    x = cuda.to_device(host)
    row = dict(shape=shape, fastpool_numba_us=per_call(lambda: fastpool.max_pool2d(x, 3, 1, 1)))
    try:
        import torch
        t = torch.from_numpy(host).cuda()
        row["fastpool_torch_us"] = per_call(lambda: fastpool.max_pool2d(t, 3, 1, 1))
        row["torch_us"] = per_call(lambda: torch.nn.functional.max_pool2d(t, 3, 1, 1))
    except Exception as exc:  # missing, or without CUDA: the other rows still count
        row["torch"] = f"{type(exc).__name__}: {exc}"[:200]
    try:
        import cupy
        c = cupy.asarray(host)
        row["fastpool_cupy_us"] = per_call(lambda: fastpool.max_pool2d(c, 3, 1, 1))
    except Exception as exc:
        row["cupy"] = f"{type(exc).__name__}: {exc}"[:200]
    rows.append(row)
print("CALLS", json.dumps(rows))
"""


def measure_calls(timeout, log, shapes=((1, 1, 8, 8), (32, 512, 14, 14)), calls=300):
    """The host cost of a call: microseconds per max_pool2d call in a loop of
    asynchronous calls (a tiny input, where only the overhead counts, and a (32, 512,
    14, 14) one), given a Numba device array, a torch tensor and a CuPy array, beside
    PyTorch's own call; in a child process."""
    return _child_json(_CALLS, "CALLS", timeout, log, "rows",
                       [json.dumps([shapes, calls])])


def _child_json(script, tag, timeout, log, key=None, args=()):
    """Run ``script`` in a child; the JSON it printed after ``tag``."""
    start = time.monotonic()
    outcome = "passed"
    try:
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                              text=True, timeout=max(timeout, 1))
        stdout, stderr = done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        outcome = "timeout"
        stdout, stderr = (_text(exc.stdout), _text(exc.stderr))
    with open(log, "a") as out:
        out.write(stdout + stderr)
    seconds = round(time.monotonic() - start, 1)
    found = None
    for line in stdout.splitlines():  # the last report printed wins
        if line.startswith(tag + " "):
            found = json.loads(line[len(tag) + 1:])
    if found is None:
        return dict(outcome="failed" if outcome == "passed" else outcome,
                    error=stderr[-1500:], seconds=seconds)
    return dict({key: found} if key else found, outcome=outcome, seconds=seconds)


def _text(output):
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output


def measure_peaks(timeout, log):
    """Copy bandwidth and float32 matrix-product rate, in a child process."""
    return _child_json(_PEAKS, "PEAKS", timeout, log)


def run_bench(dtype, repeats, timeout, log, ops="all"):
    """``python -m fastpool bench --device cuda`` in a child; its rows."""
    path = Path(tempfile.mkdtemp()) / "bench.json"
    command = [sys.executable, "-m", "fastpool", "bench", "--device", "cuda", "--dtype",
               dtype, "--ops", ops, "--repeats", str(repeats), "--json", str(path)]
    code, seconds = _run(command, timeout, log)
    result = dict(outcome="passed" if code == 0 else "timeout" if code == "timeout"
                  else "failed", return_code=code, seconds=seconds, dtype=dtype)
    try:
        with open(path) as fh:
            result.update(json.load(fh))
    except (OSError, ValueError) as exc:  # not written, or cut short by a kill
        result["report_error"] = f"{type(exc).__name__}: {exc}"
    return result


def summarise(report):
    """Issue 17's targets against the float32 benchmark rows."""
    rows = [r for group in report.get("bench_float32", {}).values()
            for r in group.get("rows", []) if r.get("device") == "cuda"]
    peak = report.get("peaks", {}).get("fp32_tflops")
    pool, conv = [], []
    for row in rows:
        if peak and row.get("unit") == "GFLOP/s":
            row["fp32_peak_fraction"] = row["rate"] / (peak * 1e3)
        (pool if row.get("unit") == "GB/s" else conv).append(row)
    tests = report.get("tests", {})

    def count(rows, ok):
        return dict(rows=len(rows), meeting=sum(1 for r in rows if ok(r)))
    calls = report.get("calls", {}).get("rows") or [{}]
    return dict(
        tests=tests.get("outcome"), test_counts=tests.get("counts"),
        host_cost_of_a_tiny_call_us={k: v for k, v in calls[0].items()
                                     if k.endswith("_us")},
        pooling_at_least_70pct_of_copy_bandwidth=count(
            pool, lambda r: (r.get("bandwidth_fraction") or 0) >= 0.7),
        # Rows without a peer (stochastic pooling: cuDNN has none) count for the
        # bandwidth target only.
        pooling_at_least_cudnn=count([r for r in pool if r.get("speedup")],
                                     lambda r: r["speedup"] >= 1.0),
        conv_at_least_half_cudnn=count([r for r in conv if r.get("speedup")],
                                       lambda r: r["speedup"] >= 0.5))


# What the stages after the tests need: peaks and calls (30 s each), three benchmark
# groups of 40 s (a group took 19-25 s on an H200, compilation included), each with
# its grace.
BENCH_RESERVE = 60 + 3 * (40 + GRACE)


def main(json_path, budget, log_path, simulator=False, select=None, bench=True,
         repeats=5, workers=None):
    """Run the stages within ``budget`` seconds; returns the report."""
    start = time.monotonic()
    deadline = start + budget
    log = Path(log_path or Path(tempfile.mkdtemp()) / "gpu_check.log")
    report = dict(command=sys.argv, budget_seconds=budget, log=str(log))

    def save():
        report["seconds"] = round(time.monotonic() - start, 1)
        report["summary"] = summarise(report)
        if json_path:  # written whole, then moved: a kill mid-write keeps the last one
            partial = f"{json_path}.partial"
            with open(partial, "w") as fh:
                json.dump(report, fh, indent=1, default=str)
            os.replace(partial, json_path)

    def left(reserve=0.0):
        """Seconds a stage may run now, keeping ``reserve`` for later stages and the
        grace a child gets after its interrupt."""
        return deadline - time.monotonic() - reserve - GRACE

    report["environment"] = environment(simulator)
    save()
    tests_dir = Path(__file__).resolve().parent.parent / "tests"
    benchmarks = bench and not simulator
    # The tests get most of the budget; the benchmark stages keep their own, but
    # leave the tests at least a third of a small budget.
    report["tests"] = run_tests(tests_dir, max(left(BENCH_RESERVE), left() / 3)
                                if benchmarks else left(), log, simulator, select, workers)
    save()
    if benchmarks:
        report["peaks"] = measure_peaks(min(30, left()), log)
        save()
        report["calls"] = measure_calls(min(30, left()), log)
        save()
        # One child per group, so a group that runs out of time loses only its rows.
        groups = ("pool", "conv", "nd")
        report["bench_float32"] = {}
        for i, ops in enumerate(groups):
            later = len(groups) - i - 1  # groups after this one, and their graces
            seconds = (left() - later * GRACE) / (later + 1)
            report["bench_float32"][ops] = (
                run_bench("float32", repeats, seconds, log, ops) if seconds >= MIN_STAGE
                else dict(outcome="skipped", reason="no time left in the budget"))
            save()
        if left() >= 45:
            report["bench_float16"] = run_bench("float16", repeats, left(), log,
                                                ops="pool")
            save()
    elif simulator:
        report["bench"] = "skipped under the simulator (its timings mean nothing)"
    save()
    return report
