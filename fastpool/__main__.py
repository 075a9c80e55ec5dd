"""Command line: ``python -m fastpool bench`` and ``python -m fastpool info``."""

import argparse
import os
import sys

# Set before NumPy/OpenMP start: idle OpenMP workers sleep instead of spinning, so a
# benchmark's thread pools do not steal each other's cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
    bench.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    bench.add_argument("--quick", action="store_true",
                       help="small shapes and 5 repeats: a smoke run of well under a minute")
    bench.add_argument("--ops", default="all", choices=["all", "pool", "conv", "nd"],
                       help="nd: 1-D and 3-D ops and channels-last pooling (issue 14's "
                            "shapes), against PyTorch in the same rank and layout")
    bench.add_argument("--repeats", type=int, help="timed repeats (default 11, quick 5)")
    bench.add_argument("--threads", type=int,
                       help="Numba and PyTorch threads (default: Numba's NUMBA_NUM_THREADS)")
    bench.add_argument("--json", metavar="PATH", help="also write the rows to this file")
    bench.add_argument("--plot", metavar="PATH",
                       help="also draw the speed-ups as a PNG bar chart (needs matplotlib)")
    commands.add_parser("info", help="versions, threads, kernel cache and GPU status")
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
    import numba
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if args.threads is not None and not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        raise SystemExit(f"--threads must be in [1, {numba.config.NUMBA_NUM_THREADS}]")
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


if __name__ == "__main__":
    sys.exit(main())
