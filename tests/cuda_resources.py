"""What every CUDA kernel specialisation costs an H100/H200, found without a GPU.

Each kernel of ``cuda_kernel_signatures.kernels()`` is compiled to PTX for compute
capability 9.0 by Numba (NVVM), then by NVIDIA's assembler, ``ptxas -arch=sm_90 -v``
(from the ``nvidia-cuda-nvcc`` wheel that ``pip install ".[gpu]"`` brings), which
reports its registers per thread, static shared memory, stack frame and spills. From
those and the block size fastpool launches it with, the blocks that fit on one SM and
the occupancy follow (sm_90: 65,536 registers, 2,048 threads, 32 blocks and 228 KiB of
shared memory per SM; registers are allocated per warp in units of 256).

Kernels that call NVIDIA's float16 functions (linked when the kernel loads) are
assembled alone (``ptxas -c``): their figures leave the callee out and include the
call's stack.

Run as a script, with the simulator off, it prints the table that docs/site/devices.md
records (``--json`` for JSON)::

    NUMBA_ENABLE_CUDASIM=0 python tests/cuda_resources.py
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

# sm_90 per-SM limits
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
REGISTER_UNIT = 256  # registers per warp are allocated in units of this

# The convolution kernels (tiled GEMMs, direct loops, their reductions); the rest are
# pooling and copies. Issue 17's budgets: pooling at least 50% occupancy, convolution
# at least 2 blocks per SM.
CONV_KERNELS = frozenset({"tiled_forward", "tiled_weight_grad", "direct_forward",
                          "direct_input_grad", "direct_weight_grad", "bias_grad",
                          "sum_partials", "gemm_weights", "copy_4d",
                          "reproducible_weight", "reproducible_bias"})
POOLING_MIN_OCCUPANCY = 0.5
CONV_MIN_BLOCKS = 2


def ptxas_path():
    """``ptxas`` from the ``nvidia-cuda-nvcc`` wheel, else from ``PATH``; or None."""
    try:
        import nvidia.cuda_nvcc
        for base in nvidia.cuda_nvcc.__path__:
            candidate = os.path.join(base, "bin", "ptxas")
            if os.path.exists(candidate):
                return candidate
    except ImportError:
        pass
    return shutil.which("ptxas")


def parse_ptxas(log):
    """``ptxas -v``'s figures for the one entry function in ``log``."""
    def number(pattern):
        found = re.findall(pattern, log)
        return int(found[-1]) if found else 0
    registers = re.findall(r"Used (\d+) registers", log)
    if not registers:
        raise ValueError(f"no register count in ptxas output:\n{log}")
    return dict(registers=int(registers[-1]),
                stack=number(r"(\d+) bytes stack frame"),
                spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"),
                shared=number(r"(\d+) bytes smem"))


def blocks_per_sm(registers, threads, shared):
    """Blocks of ``threads`` threads that fit on one sm_90 SM at the same time."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (REGISTERS_PER_SM // (per_warp * warps)) if registers else BLOCKS_PER_SM
    by_shared = SHARED_PER_SM // shared if shared else BLOCKS_PER_SM
    return min(by_registers, THREADS_PER_SM // threads, by_shared, BLOCKS_PER_SM)


def _dtype_of(signature):
    for t in signature:
        if hasattr(t, "dtype") and str(t.dtype) not in ("int64", "int32", "uint64"):
            return str(t.dtype)
    return "int64"


def measure(ptxas, workdir):
    """One row per kernel specialisation (``cuda_kernel_signatures.kernels()``)."""
    from numba import cuda

    import cuda_kernel_signatures
    from fastpool.cuda import _launch
    from fastpool.cuda.conv import PRODUCTION_TILES

    rows = []
    for name, kernel, signature in cuda_kernel_signatures.kernels():
        row = dict(name=name, dtype=_dtype_of(signature))
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            continue
        if ptxas is None:
            rows.append(row)
            continue
        path = os.path.join(workdir, f"{name}_{len(rows)}.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        row["linked_later"] = ".extern .func" in ptx
        command = [ptxas, "-arch=sm_90", "-v", path, "-o", os.devnull]
        if row["linked_later"]:
            command.insert(1, "-c")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            row["error"] = f"ptxas: {done.stderr.strip()}"
            rows.append(row)
            continue
        row.update(parse_ptxas(done.stderr + done.stdout))
        threads = (PRODUCTION_TILES.threads if name.startswith("tiled_")
                   else _launch.THREADS_PER_BLOCK)
        row["threads"] = threads
        row["blocks_per_sm"] = blocks_per_sm(row["registers"], threads, row["shared"])
        row["occupancy"] = row["blocks_per_sm"] * threads / THREADS_PER_SM
        rows.append(row)
    return rows


def over_budget(row):
    """Why ``row`` misses issue 17's budget, or None."""
    if row["name"] in CONV_KERNELS:
        if row["blocks_per_sm"] < CONV_MIN_BLOCKS:
            return f"{row['blocks_per_sm']} block(s) per SM"
    elif row["occupancy"] < POOLING_MIN_OCCUPANCY:
        return f"occupancy {row['occupancy']:.0%}"
    return None


def markdown(rows):
    lines = ["| kernel | dtype | registers | shared bytes | stack bytes | spills bytes "
             "| threads | blocks/SM | occupancy | budget |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "registers" not in r:
            lines.append(f"| {r['name']} | {r['dtype']} | {r.get('error', 'no ptxas')} "
                         "| | | | | | | |")
            continue
        note = over_budget(r) or "ok"
        stack = f"{r['stack']}" + (" (call)" if r["linked_later"] else "")
        lines.append(
            f"| {r['name']} | {r['dtype']} | {r['registers']} | {r['shared']} | {stack} "
            f"| {r['spill_stores'] + r['spill_loads']} | {r['threads']} "
            f"| {r['blocks_per_sm']} | {r['occupancy']:.0%} | {note} |")
    return "\n".join(lines)


def main(argv):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        from numba import cuda, types
        cuda.compile_ptx(lambda a: None, (types.float32[:],), cc=(9, 0))
    except Exception as exc:
        print(json.dumps({"skip": f"no NVVM: {type(exc).__name__}: {exc}"}))
        return 0
    ptxas = ptxas_path()
    with tempfile.TemporaryDirectory() as workdir:
        rows = measure(ptxas, workdir)
    if "--json" in argv:
        print(json.dumps({"ptxas": ptxas, "rows": rows}))
    else:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
