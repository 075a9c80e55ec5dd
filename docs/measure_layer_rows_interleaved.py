"""Layer-suite rows of two fastpool builds and their peers, interleaved in one process,
timed as the layer suite times them (``_bench_layers.interleaved_medians``: each call
after 12 ms of other work), 2 threads, float32, forward:

    git worktree add /tmp/old <old revision>
    python docs/measure_layer_rows_interleaved.py /tmp/old "global avg 512@7;maxpool 2x2 s2 512@14" channels_last 1 31

(arguments: the old source tree, ``;``-separated row labels as the suite prints them,
``nchw``, ``channels_last`` or both comma-separated, batch, repeats, and optionally
the dtype, float32 by default). Per row: the new
build's and the old build's medians, each peer's, new/old and each build's ratio
against the fastest peer; ``same`` says whether the builds' outputs have the same bits.
The old build is loaded as ``docs/measure_builds_interleaved.py`` loads it. The figures
of the twenty-third session (2026-12-07) in docs/design.md came from this script.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure_builds_interleaved import _old_package  # noqa: E402


def _old_forward(package, layer, x, w):
    k, s, p = layer.kernel, layer.stride, layer.padding
    if layer.kind == "conv":
        return lambda: package.conv2d(x, w, stride=s, padding=p, groups=layer.groups)
    if layer.kind == "max":
        return lambda: package.max_pool2d(x, k, s, p)
    if layer.kind == "avg":
        return lambda: package.avg_pool2d(x, k, s, p)
    return lambda: package.adaptive_avg_pool2d(x, 1)


def main(tree, labels, layouts, batch, repeats, dtype=np.float32):
    sys.path.insert(0, _old_package(tree))
    import fastpool_old

    from fastpool import _bench_layers as L
    from fastpool._bench import pinned_threads
    with pinned_threads(2):
        peers = L.available_peers(2)
        for layer, _ in L.unique_layers(list(L.NETWORKS)):
            if layer.label not in labels:
                continue
            for layout in layouts:
                d = L.make_data(layer, batch, layout, dtype)
                new = L._ours(layer, d.x, d.weight)[0]
                old = _old_forward(fastpool_old, layer, d.x, d.weight)
                same = np.array_equal(np.ascontiguousarray(new()).view(np.uint8),
                                      np.ascontiguousarray(old()).view(np.uint8))
                calls, names = [new, old], ["new", "old"]
                for peer in peers:
                    prepared = (peer.prepare(layer, d, False) if layout in peer.layouts
                                else None)
                    if prepared is not None:
                        calls.append(prepared[0])
                        names.append(peer.name)
                times = L.interleaved_medians(calls, repeats)
                best = min(times[2:]) if len(times) > 2 else float("nan")
                print(f"{layer.label:28s} {layout:14s} same={same} "
                      + " ".join(f"{n}={t * 1e3:.4f}" for n, t in zip(names, times))
                      + f"  new/old={times[1] / times[0]:.2f}x  against the fastest peer:"
                      f" new {best / times[0]:.2f} old {best / times[1]:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(";"),
         sys.argv[3].split(",") if len(sys.argv) > 3 else ["nchw", "channels_last"],
         int(sys.argv[4]) if len(sys.argv) > 4 else 1,
         int(sys.argv[5]) if len(sys.argv) > 5 else 21,
         np.dtype(sys.argv[6]) if len(sys.argv) > 6 else np.float32)
