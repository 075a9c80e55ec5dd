"""Command line: ``python -m fastpool bench``, ``info`` and ``gpu-check``."""

import argparse
import json
import sys

# OMP_WAIT_POLICY is left as the user has it: the benchmarks time the peers (PyTorch's
# OpenMP pool) with their default settings and let spinning workers stop between
# timings (``_bench_layers.interleaved_medians``). Until 2026-12-07 this module set
# PASSIVE, under which PyTorch's layer-suite calls took 2x as long (geometric mean of
# the batch-1 rows; up to 10x on the smallest): docs/site/performance.md.


def _parser():
    parser = argparse.ArgumentParser(prog="python -m fastpool",
                                     description="fastpool's benchmark and info commands")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench", help="time every op against PyTorch (or NumPy) in one interleaved run",
        description="Time every op against PyTorch on the same device when it is "
                    "installed, else against plain NumPy on small shapes; fastpool and "
                    "the peer alternate within each repeat; medians are reported.")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "all"],
                       help="auto (default): the CPU, and the GPU too when one is usable; "
                            "all: both, failing without a GPU")
    bench.add_argument("--dtype", default="float32",
                       choices=["float16", "float32", "float64"],
                       help="float16: fastpool's pooling reads and writes float16 "
                            "(computing in float32), convolution runs on float32 copies; "
                            "the peer runs its own float16 kernels (ops suite)")
    bench.add_argument("--quick", action="store_true",
                       help="small shapes and 5 repeats: a smoke run of well under a minute")
    bench.add_argument("--ops", default="all", choices=["all", "pool", "conv", "nd"],
                       help="nd: 1-D and 3-D ops and channels-last pooling (issue 14's "
                            "shapes), against PyTorch in the same rank and layout")
    bench.add_argument("--suite", default="ops", choices=["ops", "layers", "dask", "calls"],
                       help="ops (default): every op on standard shapes against PyTorch; "
                            "layers: the conv and pooling layers of LeNet-5, ResNet-18/50, "
                            "MobileNetV2 and VGG-16 against PyTorch NCHW, PyTorch "
                            "channels_last and ONNX Runtime (CPU); dask: "
                            "examples/large_image.py's pipeline through fastpool.dask, "
                            "its overhead against the in-memory calls and its "
                            "throughput on a LocalCluster of 1 and 2 worker processes; "
                            "calls: the fixed cost of a call on a tiny input against "
                            "PyTorch's (CPU)")
    bench.add_argument("--networks", default=None,
                       help="layers suite: comma-separated networks (default all: "
                            "lenet5,resnet18,resnet50,mobilenet_v2,vgg16; quick: lenet5,"
                            "resnet18)")
    bench.add_argument("--batches", default=None,
                       help="layers suite: comma-separated batch sizes (default 1,32; "
                            "quick: 1); backward rows for batches >= 32")
    bench.add_argument("--repeats", type=int,
                       help="timed repeats (default 11, quick 5; layers suite 5, quick 3)")
    bench.add_argument("--threads", type=int,
                       help="Numba and PyTorch threads (default: Numba's NUMBA_NUM_THREADS)")
    bench.add_argument("--json", metavar="PATH", help="also write the rows to this file")
    bench.add_argument("--plot", metavar="PATH",
                       help="also draw the speed-ups as a PNG bar chart (needs matplotlib)")
    commands.add_parser("info", help="versions, threads, kernel cache and GPU status")
    check = commands.add_parser(
        "gpu-check", help="on a CUDA machine: the GPU tests, the device's ceilings and "
                          "the GPU benchmark, into one JSON",
        description="Run the test suite's GPU tests on the real GPU, measure the copy "
                    "bandwidth and float32 peak, and benchmark every op against "
                    "PyTorch/cuDNN (TF32 off), within --budget seconds; installs "
                    "nothing and skips what is missing. Run it from a source checkout.")
    check.add_argument("--json", metavar="PATH", help="write the report here (rewritten "
                                                     "after every stage)")
    check.add_argument("--log", metavar="PATH", help="the stages' output (default: a "
                                                    "temporary file)")
    check.add_argument("--budget", type=float, default=480,
                       help="seconds for the whole check (default 480)")
    check.add_argument("--repeats", type=int, default=5,
                       help="benchmark repeats (default 5)")
    check.add_argument("-k", dest="select", metavar="EXPRESSION",
                       help="pytest -k expression for the tests (default: cuda or gpu or "
                            "simulator)")
    check.add_argument("--workers", type=int, help="pytest-xdist workers (default: "
                                                  "min(8, CPUs))")
    check.add_argument("--no-bench", action="store_true", help="the tests only")
    check.add_argument("--simulator", action="store_true",
                       help="run the tests under Numba's CUDA simulator, no benchmarks "
                            "(to check the command itself without a GPU)")
    return parser


def _gpu_problem():
    """Why the GPU cannot be benchmarked, or None when it can."""
    from numba import config

    import fastpool
    if config.ENABLE_CUDASIM:
        return "NUMBA_ENABLE_CUDASIM=1: the CUDA simulator's timings mean nothing"
    if not fastpool.cuda_available():
        return "no usable GPU (python -m fastpool info says what was found)"
    return None


def _devices(choice):
    if choice == "cpu":
        return ["cpu"]
    problem = _gpu_problem()
    if choice == "auto":
        return ["cpu"] if problem else ["cpu", "cuda"]
    if problem:
        raise SystemExit(f"--device {choice}: {problem}")
    return ["cuda"] if choice == "cuda" else ["cpu", "cuda"]


def main(argv=None):
    args = _parser().parse_args(argv)
    from fastpool import _bench
    if args.command == "info":
        print("\n".join(_bench.info_lines()))
        return 0
    if args.command == "gpu-check":
        return _gpu_check(args)
    import numba
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if args.threads is not None and not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        raise SystemExit(f"--threads must be in [1, {numba.config.NUMBA_NUM_THREADS}]")
    if args.suite == "layers":
        return _layers(args, threads_default=numba.config.NUMBA_NUM_THREADS)
    if args.suite == "dask":
        return _dask(args)
    if args.suite == "calls":
        return _calls(args, threads_default=numba.config.NUMBA_NUM_THREADS)
    devices = _devices(args.device)
    repeats = args.repeats or (5 if args.quick else 11)
    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    ops = ("pool", "conv", "nd") if args.ops == "all" else (args.ops,)
    rows, meta = _bench.run(devices, args.dtype, args.quick, threads, repeats, ops)
    print(_bench.format_table(rows, meta))
    if args.json:
        _bench.write_json(args.json, rows, meta)
    if args.plot:
        _bench.plot(args.plot, rows, meta)
    return 0


def _gpu_check(args):
    from numba import config

    from fastpool import _gpu_check
    if args.simulator != bool(config.ENABLE_CUDASIM):
        raise SystemExit("gpu-check: --simulator needs NUMBA_ENABLE_CUDASIM=1 set before "
                         "Python starts, and a real-GPU check needs it unset")
    if not args.simulator:
        problem = _gpu_problem()
        if problem:
            raise SystemExit(f"gpu-check: {problem}")
    report = _gpu_check.main(args.json, args.budget, args.log, simulator=args.simulator,
                             select=args.select, bench=not args.no_bench,
                             repeats=args.repeats, workers=args.workers)
    print(json.dumps(report.get("summary"), indent=1))
    return 0 if report["tests"].get("outcome") in ("passed", "skipped") else 1


def _layers(args, threads_default):
    from fastpool import _bench, _bench_layers
    if args.device not in ("auto", "cpu"):
        raise SystemExit("--suite layers runs on the CPU only (--device cpu or auto)")
    if args.dtype == "float16":
        raise SystemExit("--dtype float16 is for the ops suite (--suite ops)")
    networks = (args.networks.split(",") if args.networks
                else ["lenet5", "resnet18"] if args.quick else list(_bench_layers.NETWORKS))
    unknown = [n for n in networks if n not in _bench_layers.NETWORKS]
    if unknown:
        raise SystemExit(f"--networks: unknown {unknown}; choose from "
                         f"{','.join(_bench_layers.NETWORKS)}")
    try:
        batches = ([int(b) for b in args.batches.split(",")] if args.batches
                   else [1] if args.quick else [1, 32])
    except ValueError:
        raise SystemExit(f"--batches must be comma-separated ints, got {args.batches!r}")
    if min(batches) < 1:
        raise SystemExit("--batches must be at least 1")
    repeats = args.repeats or (3 if args.quick else 5)
    threads = args.threads or threads_default
    rows, meta = _bench_layers.run(networks, batches, args.dtype, threads, repeats)
    print(_bench_layers.format_table(rows, meta))
    if args.json:
        import json
        with open(args.json, "w") as fh:
            json.dump(dict(_bench_layers.to_json(rows, meta),
                           versions=_bench.versions()), fh, indent=1)
    if args.plot:
        _bench.plot(args.plot, _bench_layers.as_bench_rows(rows),
                    dict(meta, devices={"cpu": dict(peer="the fastest peer per row")}))
    return 0


def _calls(args, threads_default):
    from fastpool import _bench, _bench_calls
    if args.device not in ("auto", "cpu"):
        raise SystemExit("--suite calls runs on the CPU only (--device cpu or auto)")
    if args.dtype != "float32" or args.plot:
        raise SystemExit("--suite calls is float32, without --plot")
    threads = args.threads or threads_default
    repeats = args.repeats or (3 if args.quick else 11)
    rows = _bench_calls.run(repeats, 200 if args.quick else 2000, threads)
    print(_bench_calls.format_table(rows, threads))
    if args.json:
        import json
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, threads=threads, versions=_bench.versions()), fh,
                      indent=1)
    return 0


def _dask(args):
    from fastpool import _bench, _bench_dask
    if args.device not in ("auto", "cpu"):
        raise SystemExit("--suite dask runs on the CPU only (--device cpu or auto)")
    if args.dtype != "float32" or args.threads is not None or args.plot:
        raise SystemExit("--suite dask is float32 on all cores, without --threads/--plot")
    rows = _bench_dask.run(args.quick, args.repeats or (3 if args.quick else 5))
    print(_bench_dask.format_table(rows))
    if args.json:
        import json
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, versions=_bench.versions()), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
