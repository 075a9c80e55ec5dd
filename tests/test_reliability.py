"""Process-level guarantees: python -OO, fork-started children, concurrent threads, and
the threading layer fastpool picks.

Each process-level case runs in a fresh interpreter (``run_python``), so it sees
fastpool's own threading-layer choice rather than the test process's, and a crash or
a kill fails the test instead of taking pytest down.
"""

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastpool
import workloads
from fastpool import _threading

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)

try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False


def run_python(source, *flags, env=None, timeout=300):
    """Run ``source`` in a fresh interpreter with ``tests/`` importable; return its
    last stdout line parsed as JSON. Fails with the child's output on a non-zero exit."""
    environment = dict(os.environ)
    environment.pop("NUMBA_THREADING_LAYER", None)
    environment["PYTHONPATH"] = os.pathsep.join([TESTS, REPO, environment.get("PYTHONPATH", "")])
    environment.update(env or {})
    completed = subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(source)], capture_output=True,
        text=True, env=environment, timeout=timeout, cwd=REPO)
    assert completed.returncode == 0, (
        f"child exited with {completed.returncode}\nstdout:\n{completed.stdout[-3000:]}"
        f"\nstderr:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- -OO

OPTIMIZED_RUN = """
    import json, pydoc
    import fastpool, workloads
    results = workloads.run_all()
    text = pydoc.render_doc(fastpool.max_pool2d)  # help() must work without docstrings
    extra = {}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        import fastpool.torch as fpt
        x = torch.rand(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
        y = fpt.stochastic_pool2d(fpt.max_pool2d(fpt.conv2d(x, torch.ones(2, 2, 1, 1,
            dtype=torch.float64)), 2, 1), 2, seed=3)
        fpt.avg_pool2d(y, 1).sum().backward()
        extra["torch_grad_shape"] = list(x.grad.shape)
    print(json.dumps({"ops": len(results), "doc": fastpool.max_pool2d.__doc__, **extra}))
"""


@pytest.mark.parametrize("flags, env", [
    (("-OO",), {}),
    ((), {"PYTHONOPTIMIZE": "2"}),
    (("-O",), {}),
], ids=["-OO", "PYTHONOPTIMIZE=2", "-O"])
def test_runs_under_optimize(flags, env):
    out = run_python(OPTIMIZED_RUN, *flags, env=env)
    assert out["ops"] == len(workloads.every_op())
    if flags == ("-O",):
        assert "Shape\n" in out["doc"]  # -O keeps docstrings, and the shape section
    else:
        assert out["doc"] is None
    if HAVE_TORCH:
        assert out["torch_grad_shape"] == [1, 2, 6, 6]


def test_examples_and_cli_run_under_OO(tmp_path):
    subprocess.run([sys.executable, "-OO", "-m", "fastpool", "info"], check=True,
                   capture_output=True, cwd=REPO, timeout=300)
    completed = subprocess.run(
        [sys.executable, "-OO", os.path.join(REPO, "examples", "digits_numpy.py"),
         "--help"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert completed.returncode == 0, completed.stderr


# ----------------------------------------------------------------------------- fork

FORK_CHILD = """
    import json, multiprocessing
    import workloads
    from fastpool import _threading
    parent = workloads.run_all()            # the parent uses every op first

    def child(queue):
        queue.put(workloads.run_all())

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    process.join(240)
    result = queue.get(timeout=5) if process.exitcode == 0 else None
    print(json.dumps({"exitcode": process.exitcode, "same": result == parent,
                      "layer": _threading.active_layer()}))
"""


def test_fork_started_child_runs_every_op_after_parent():
    out = run_python(FORK_CHILD)
    assert out["exitcode"] == 0, out
    assert out["same"], "the forked child's results differ from the parent's"


DATALOADER = """
    import json
    import numpy as np
    import torch
    import fastpool, workloads

    names = sorted(workloads.every_op())

    class Ops(torch.utils.data.Dataset):
        def __len__(self):
            return len(names)

        def __getitem__(self, i):
            return names[i], workloads.digest(workloads.every_op()[names[i]]())

    parent = workloads.run_all()
    loader = torch.utils.data.DataLoader(Ops(), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    got = dict(loader)
    print(json.dumps({"same": got == parent, "count": len(got)}))
"""


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_fork_started_dataloader_workers_run_every_op():
    out = run_python(DATALOADER)
    assert out["count"] == len(workloads.every_op())
    assert out["same"]


# ----------------------------------------------------------------------------- threads

def _hammer(ops, expected, threads=8, calls=20, seed=0):
    """``threads`` threads each call every op ``calls`` times (each thread in its own
    shuffled order, all released at once); returns the mismatches and errors."""
    barrier = threading.Barrier(threads)
    problems = []
    names = sorted(ops)

    def work(t):
        order = np.random.default_rng(seed + t).permutation(len(names) * calls) % len(names)
        barrier.wait()
        try:
            for i in order:
                name = names[i]
                if workloads.digest(ops[name]()) != expected[name]:
                    problems.append(f"thread {t}: {name} differs")
        except Exception as exc:  # reported, not swallowed: the test fails on it
            problems.append(f"thread {t}: {exc!r}")

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return problems


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eight_threads_get_single_thread_results_bitwise(dtype):
    ops = workloads.every_op(dtype)
    expected = {name: workloads.digest(op()) for name, op in ops.items()}
    assert _hammer(ops, expected) == []


THREADS_ON_LAYER = """
    import json, sys
    sys.setswitchinterval(1e-5)  # switch threads often, to interleave the launches
    import numba, workloads
    import test_reliability as t
    ops = workloads.every_op()
    expected = {name: workloads.digest(op()) for name, op in ops.items()}
    problems = t._hammer(ops, expected, calls=5)
    print(json.dumps({"problems": problems, "layer": numba.threading_layer()}))
"""


def test_threads_on_workqueue_layer_are_serialised():
    """Numba's workqueue layer aborts the process when two threads launch at once
    ("Terminating: Nested parallel kernel launch detected"); fastpool lets one call
    at a time into the kernels there."""
    out = run_python(THREADS_ON_LAYER, env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert out["layer"] == "workqueue"
    assert out["problems"] == []


# ----------------------------------------------------------------------------- layer

LAYER_CHOICE = """
    import json
    import numpy as np
    import fastpool, numba
    from fastpool import _threading
    # large enough to run on Numba's threads (a tiny call starts none)
    fastpool.max_pool2d(np.ones((8, 64, 56, 56), np.float32), 2)
    print(json.dumps({"layer": numba.threading_layer(), "tbb": _threading.load_tbb(),
                      "describe": _threading.describe()}))
"""


def test_fastpool_picks_tbb_by_default():
    out = run_python(LAYER_CHOICE)
    if out["tbb"]:
        assert out["layer"] == "tbb"
        assert "chosen by fastpool" in out["describe"]
    else:  # a platform without oneTBB wheels: the fork-safe fallback
        assert out["layer"] == "workqueue"


@pytest.mark.parametrize("layer", ["omp", "workqueue"])
def test_users_threading_layer_wins(layer):
    out = run_python(LAYER_CHOICE, env={"NUMBA_THREADING_LAYER": layer})
    assert out["layer"] == layer
    assert "chosen by the user" in out["describe"]


def test_layer_already_running_is_kept():
    out = run_python("""
        import json
        import numba, numpy as np
        numba.config.THREADING_LAYER = "omp"

        @numba.njit(parallel=True)
        def total(a):
            s = 0.0
            for i in numba.prange(a.size):
                s += a[i]
            return s

        total(np.ones(4))                      # the user's own kernel starts omp
        import fastpool
        from fastpool import _threading
        y = fastpool.avg_pool2d(np.ones((1, 1, 4, 4)), 2)
        print(json.dumps({"layer": numba.threading_layer(), "y": float(y.sum()),
                          "describe": _threading.describe()}))
    """)
    assert out["layer"] == "omp" and out["y"] == 4.0
    assert "already running" in out["describe"]


def test_serialised_takes_the_lock_only_off_thread_safe_layers(monkeypatch):
    calls = []

    def launcher(value):
        calls.append(_threading._lock._is_owned())
        return value

    wrapped = _threading.serialised(launcher)
    monkeypatch.setitem(_threading._state, "thread_safe", True)
    assert wrapped(1) == 1
    monkeypatch.setitem(_threading._state, "thread_safe", False)
    assert wrapped(2) == 2
    assert calls == [False, True]


# ----------------------------------------------------------------------------- seeds

def test_test_seeds_are_the_same_in_every_process():
    from conftest import seed_for
    here = seed_for("tests/test_x.py::test_y[case]", (3, 2, 1))
    for hash_seed in ("0", "12345"):
        out = run_python("""
            import json
            from conftest import seed_for
            print(json.dumps(seed_for("tests/test_x.py::test_y[case]", (3, 2, 1))))
        """, env={"PYTHONHASHSEED": hash_seed})
        assert out == here


def test_no_test_seeds_a_generator_with_hash():
    """``hash()`` of a string is salted per process; a seed drawn from it cannot be
    reproduced. No test module may call the builtin ``hash``."""
    import ast
    offenders = []
    for name in sorted(os.listdir(TESTS)):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(TESTS, name)).read())
            offenders += [f"{name}:{node.lineno}" for node in ast.walk(tree)
                          if isinstance(node, ast.Call)
                          and isinstance(node.func, ast.Name) and node.func.id == "hash"]
    assert offenders == []


# ----------------------------------------------------------------------------- contract

def test_design_citations_point_at_the_repository_contract():
    """Code that cites the design cites docs/design.md, by a section it has."""
    import re
    with open(os.path.join(REPO, "docs", "design.md")) as f:
        sections = {int(m) for m in re.findall(r"^## (\d+)\. ", f.read(), re.M)}
    cited = []
    for folder in ("fastpool", "fastpool/cpu", "fastpool/cuda", "tests"):
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            if not name.endswith(".py"):
                continue
            text = open(os.path.join(REPO, folder, name)).read()
            old_brief = "DESIGN" + ".md"  # spelled apart so this file does not match
            assert old_brief not in text, f"{folder}/{name} cites the old brief"
            for match in re.finditer(r"docs/design\.md,? sections? (\d+)(?:-(\d+))?", text):
                first, last = int(match.group(1)), int(match.group(2) or match.group(1))
                cited.append((f"{folder}/{name}", set(range(first, last + 1))))
    assert cited, "no code cites docs/design.md"
    for where, numbers in cited:
        assert numbers <= sections, f"{where} cites missing sections {numbers - sections}"
