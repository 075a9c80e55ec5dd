"""Every CUDA kernel compiles for a real GPU, and fits it, checked without one.

The simulator runs kernels as Python, so code that NVVM would reject (an untyped
global, an unsupported call) can pass every simulator test. Here each kernel is compiled
to PTX for compute capability 9.0 (H100) with NVIDIA's compiler, in a fresh process with
the simulator off, for both dtypes (and float16 where the kernels read it) and the
argument types the launchers pass (``cuda_kernel_signatures.py``), then assembled for
sm_90 by ``ptxas`` (``cuda_resources.py``): no kernel may spill registers or keep a
stack, and each must fit the SM as issue 17 asks (pooling at least 50% occupancy,
convolution at least 2 blocks per SM). That needs NVVM and ptxas, which
``pip install ".[gpu]"`` provides (``numba-cuda[cu12]``); without them the tests skip.
"""

import json
import os
import subprocess
import sys

import pytest

import cuda_resources

TESTS = os.path.dirname(os.path.abspath(__file__))

# Specialisations known to miss issue 17's budgets, which its item 2 (int32 index
# arithmetic, compile-time window constants, per-axis covering ranges, a leaner tiled
# weight gradient) is to bring in. The test fails when one of them meets its budget, so
# that this list only shrinks; docs/site/devices.md has the table.
OVER_BUDGET = frozenset({
    ("gather_to_indices", "float32"), ("gather_to_indices", "float64"),
    ("gather_to_indices", "float16"),
    ("avg_forward", "float32"), ("avg_forward", "float64"), ("avg_forward", "float16"),
    ("avg_backward", "float32"), ("avg_backward", "float64"), ("avg_backward", "float16"),
    ("stochastic_train", "float32"), ("stochastic_train", "float64"),
    ("stochastic_train", "float16"),
    ("stochastic_infer_backward", "float32"), ("stochastic_infer_backward", "float64"),
    ("stochastic_infer_backward", "float16"),
    ("max_forward", "float16"),
    ("adaptive_avg_forward", "float32"), ("adaptive_avg_forward", "float64"),
    ("adaptive_avg_backward", "float32"), ("adaptive_avg_backward", "float64"),
    ("adaptive_max_forward", "float32"), ("adaptive_max_forward", "float64"),
    ("adaptive_max_backward", "float32"), ("adaptive_max_backward", "float64"),
    ("adaptive_stochastic_train", "float32"), ("adaptive_stochastic_train", "float64"),
    ("adaptive_stochastic_infer", "float32"), ("adaptive_stochastic_infer", "float64"),
    ("adaptive_stochastic_shares", "float32"), ("adaptive_stochastic_shares", "float64"),
    ("adaptive_stochastic_backward", "float32"),
    ("adaptive_stochastic_backward", "float64"),
    ("tiled_weight_grad", "float64"),
})


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    cache = tmp_path_factory.mktemp("numba-cache")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", NUMBA_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join([TESTS, os.path.dirname(TESTS),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(TESTS, "cuda_resources.py"),
                           "--json"], env=env, capture_output=True, text=True,
                          timeout=900, cwd=cache)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


def test_every_cuda_kernel_compiles_to_ptx(kernels):
    failures = [f"{r['name']} {r['dtype']}: {r['error']}" for r in kernels["rows"]
                if "error" in r]
    assert failures == []
    assert len(kernels["rows"]) >= 49


def _assembled(kernels):
    if kernels["ptxas"] is None:
        pytest.skip("no ptxas (pip install '.[gpu]' brings it)")
    return [r for r in kernels["rows"] if "registers" in r]


def test_no_kernel_spills_or_keeps_a_stack(kernels):
    rows = _assembled(kernels)
    assert [r["name"] for r in rows if r["spill_stores"] or r["spill_loads"]] == []
    # a float16 kernel's call into NVIDIA's half functions needs a small frame
    assert [r["name"] for r in rows if r["stack"] and not r["linked_later"]] == []


def test_kernels_fit_the_sm_as_budgeted(kernels):
    rows = _assembled(kernels)
    over = {(r["name"], r["dtype"]): cuda_resources.over_budget(r) for r in rows}
    assert {k for k, why in over.items() if why} == OVER_BUDGET, over
    # every convolution kernel fits at least one block; none needs more shared
    # memory than a block may have
    assert all(r["blocks_per_sm"] >= 1 for r in rows)


@pytest.mark.parametrize("registers, threads, shared, blocks", [
    (32, 256, 0, 8),        # the thread limit: 2048 / 256
    (64, 256, 0, 4),        # 64 x 256 x 4 = 65,536 registers
    (65, 256, 0, 3),        # 72 per thread once rounded to the allocation unit
    (128, 256, 8704, 2),
    (166, 256, 17408, 1),
    (30, 256, 100 * 1024, 2),  # shared memory: 228 KiB / 100 KiB
    (16, 32, 0, 32),        # the block limit
])
def test_blocks_per_sm_follows_the_sm90_limits(registers, threads, shared, blocks):
    assert cuda_resources.blocks_per_sm(registers, threads, shared) == blocks


def test_ptxas_output_is_read():
    log = ("ptxas info    : Function properties for k\n"
           "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 72 registers, used 1 barriers, 8704 bytes smem, "
           "400 bytes cmem[0]\n")
    assert cuda_resources.parse_ptxas(log) == dict(
        registers=72, stack=16, spill_stores=8, spill_loads=4, shared=8704)
    with pytest.raises(ValueError):
        cuda_resources.parse_ptxas("ptxas fatal : nothing")
