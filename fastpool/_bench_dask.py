"""``python -m fastpool bench --suite dask``: examples/large_image.py's pipeline (conv
3->8 3x3, ReLU, max pool 2, conv 8->16 3x3, ReLU, average pool 2) through
``fastpool.dask``.

Two measurements:

- **Overhead** on a scene that fits in memory: the in-memory ``fastpool`` calls against
  ``fastpool.dask`` on the same NumPy array in tiles, on Dask's synchronous scheduler
  (graph building, slicing and halo assembly alone) and its threaded one; one
  interleaved run, ratio = in-memory time / Dask time.
- **Throughput** on a ``distributed.LocalCluster`` of 1 and 2 worker processes (the
  machine's cores shared out to their Numba threads), the scene generated on the
  workers tile by tile and the result kept there (``persist``): input pixels per
  second, and each worker's peak resident memory.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import numpy as np

SEED = 2026


def _weights():
    rng = np.random.default_rng(SEED)
    return ((rng.standard_normal((8, 3, 3, 3)) / np.sqrt(27)).astype(np.float32),
            (0.1 * rng.standard_normal(8)).astype(np.float32),
            (rng.standard_normal((16, 8, 3, 3)) / np.sqrt(72)).astype(np.float32),
            (0.1 * rng.standard_normal(16)).astype(np.float32))


def pipeline(x, lazy):
    """The pipeline on ``x``: ``fastpool.dask`` (``lazy``) or ``fastpool``."""
    import fastpool
    w1, b1, w2, b2 = _weights()
    if lazy:
        import dask.array as da
        import fastpool.dask as ops
        relu = lambda a: da.maximum(a, np.float32(0))  # noqa: E731
    else:
        ops = fastpool
        relu = lambda a: np.maximum(a, np.float32(0))  # noqa: E731
    h = ops.max_pool2d(relu(ops.conv2d(x, w1, b1, padding=1)), 2)
    return ops.avg_pool2d(relu(ops.conv2d(h, w2, b2, padding=1)), 2)


def scene_tile(block_info=None):
    """A tile of the scene, a pure function of its position (generated where it runs)."""
    (_, _), (_, _), (r0, r1), (c0, c1) = block_info[None]["array-location"]
    return np.random.default_rng([SEED, r0, c0]).random((1, 3, r1 - r0, c1 - c0),
                                                        dtype=np.float32)


def lazy_scene(size, chunk):
    import dask.array as da
    sides = da.core.normalize_chunks(chunk, (size,))[0]
    return da.map_blocks(scene_tile, dtype=np.float32, chunks=((1,), (3,), sides, sides),
                         meta=np.empty((0,) * 4, np.float32))


def overhead(size, chunk, repeats):
    """Rows timing the in-memory pipeline and ``fastpool.dask``'s on one scene."""
    import dask
    import dask.array as da
    x = lazy_scene(size, size).compute(scheduler="sync")
    tiles = da.from_array(x, chunks=(1, 3, chunk, chunk))
    calls = {"in-memory": lambda: pipeline(x, lazy=False),
             "dask synchronous": lambda: pipeline(tiles, lazy=True).compute(
                 scheduler="sync"),
             "dask threads": lambda: pipeline(tiles, lazy=True).compute(
                 scheduler="threads")}
    expected = calls["in-memory"]()
    for name, call in calls.items():  # warm (compile) and check once
        np.testing.assert_allclose(call(), expected, rtol=1e-5, atol=1e-5, err_msg=name)
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["in-memory"])
    with dask.config.set(scheduler="sync"):
        tasks = len(pipeline(tiles, lazy=True).__dask_graph__())
    return [dict(case=f"overhead {name} ({size}x{size}, tiles {chunk}, {tasks} tasks)",
                 seconds=statistics.median(t), ratio=base / statistics.median(t))
            for name, t in times.items()]


def _peak_memory(client, peaks, stop):
    import psutil
    while not stop.is_set():
        try:
            for worker, rss in client.run(
                    lambda: psutil.Process().memory_info().rss).items():
                peaks[worker] = max(peaks.get(worker, 0), rss)
        except Exception:  # a worker starting or stopping; sample again
            pass
        stop.wait(0.25)


def throughput(size, chunk, workers, repeats):
    """A row for the pipeline on a LocalCluster of ``workers`` processes."""
    from distributed import Client, LocalCluster, wait
    threads = max(1, (os.cpu_count() or 1) // workers)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, env={"NUMBA_NUM_THREADS": str(threads)})
    try:
        with Client(cluster) as client:
            client.run(lambda: pipeline(np.ones((1, 3, 16, 16), np.float32), lazy=False))
            wait(pipeline(lazy_scene(2 * chunk, chunk), lazy=True).persist())  # warm
            peaks, stop = {}, threading.Event()
            sampler = threading.Thread(target=_peak_memory, args=(client, peaks, stop),
                                       daemon=True)
            sampler.start()
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                result = pipeline(lazy_scene(size, chunk), lazy=True).persist()
                wait(result)
                seconds.append(time.perf_counter() - start)
                del result
            stop.set()
            sampler.join()
    finally:
        cluster.close()
    best = statistics.median(seconds)
    return dict(case=f"throughput {workers} worker(s) x {threads} thread(s) "
                     f"({size}x{size}, tiles {chunk})",
                seconds=best, mpixels_per_s=size * size / best / 1e6,
                peak_gib_per_worker=max(peaks.values()) / 2**30 if peaks else None)


def run(quick, repeats):
    size, chunk = (1024, 256) if quick else (4096, 1024)
    rows = overhead(size, chunk, repeats)
    big = 2048 if quick else 8192
    rows += [throughput(big, chunk if quick else 2048, w, max(1, repeats // 2))
             for w in (1, 2)]
    return rows


def format_table(rows):
    lines = ["fastpool.dask: examples/large_image.py's pipeline", ""]
    for row in rows:
        if "ratio" in row:
            lines.append(f"{row['case']:<62} {row['seconds'] * 1e3:9.1f} ms   "
                         f"in-memory / this: {row['ratio']:.2f}x")
        else:
            peak = row["peak_gib_per_worker"]
            lines.append(f"{row['case']:<62} {row['seconds']:9.2f} s    "
                         f"{row['mpixels_per_s']:.1f} Mpixel/s, peak "
                         f"{'?' if peak is None else f'{peak:.2f}'} GiB per worker")
    return "\n".join(lines)
