"""A scene too large for one piece of memory, through conv -> ReLU -> max pool -> conv ->
ReLU -> average pool with fastpool.dask on a LocalCluster of worker processes.

The scene (3 channels, float32, 40,000 x 40,000 by default: 19.2 GB) is generated
lazily, tile by tile, from a fixed seed: no tile exists until a worker needs it. The
result (16 channels, a quarter of each side) is written lazily to a zarr store; a few
tiles are checked against the in-memory fastpool calls on a crop of the scene, and the
throughput and each worker's peak memory are printed.

    pip install fastpool[examples]
    python examples/large_image.py                    # 40,000 x 40,000, 2 workers
    python examples/large_image.py --size 4096 --workers 1
"""

import argparse
import os
import shutil
import tempfile
import threading
import time

import dask.array as da
import numpy as np
import psutil
import zarr
from distributed import Client, LocalCluster, progress

import fastpool
import fastpool.dask as fd

SEED = 2026


def scene_tile(block_info=None):
    """One tile of the scene: smooth structure plus noise, a pure function of where
    the tile sits (any worker regenerates the same values)."""
    info = block_info[None]
    (_, _), (_, _), (r0, r1), (c0, c1) = info["array-location"]
    rows = np.arange(r0, r1, dtype=np.float32)[:, None]
    cols = np.arange(c0, c1, dtype=np.float32)[None, :]
    tile = np.random.default_rng([SEED, r0, c0]).random((1, 3, r1 - r0, c1 - c0),
                                                        dtype=np.float32)
    # Separable structure (products of 1-D waves), cheap next to the pipeline.
    tile[0, 0] += np.sin(rows / 97.0) * np.cos(cols / 131.0)
    tile[0, 1] += np.sin(rows / 211.0) * np.sin(cols / 173.0)
    tile[0, 2] += np.cos(rows / 53.0) * np.cos(cols / 71.0)
    return tile


def scene(size, chunk):
    return da.map_blocks(scene_tile, dtype=np.float32, chunks=(
        (1,), (3,), da.core.normalize_chunks(chunk, (size,))[0],
        da.core.normalize_chunks(chunk, (size,))[0]), meta=np.empty((0,) * 4, np.float32))


def weights():
    rng = np.random.default_rng(SEED)
    w1 = (rng.standard_normal((8, 3, 3, 3)) / np.sqrt(27)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(8)).astype(np.float32)
    w2 = (rng.standard_normal((16, 8, 3, 3)) / np.sqrt(72)).astype(np.float32)
    b2 = (0.1 * rng.standard_normal(16)).astype(np.float32)
    return w1, b1, w2, b2


def pipeline(x, conv, max_pool, avg_pool, relu):
    w1, b1, w2, b2 = weights()
    h = max_pool(relu(conv(x, w1, b1, padding=1)), 2)
    return avg_pool(relu(conv(h, w2, b2, padding=1)), 2)


def lazy_pipeline(x):
    return pipeline(x, fd.conv2d, fd.max_pool2d, fd.avg_pool2d,
                    lambda a: da.maximum(a, np.float32(0)))


def in_memory_pipeline(x):
    return pipeline(x, fastpool.conv2d, fastpool.max_pool2d, fastpool.avg_pool2d,
                    lambda a: np.maximum(a, np.float32(0)))


class PeakMemory:
    """Samples each worker process's resident memory every ``interval`` seconds."""

    def __init__(self, client, interval=0.25):
        self.client, self.interval, self.peak = client, interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                for worker, rss in self.client.run(
                        lambda: psutil.Process().memory_info().rss).items():
                    self.peak[worker] = max(self.peak.get(worker, 0), rss)
            except Exception:  # a worker restarting; sample again next time
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def check_tiles(x, result, size, count=3, crop=256, margin=16):
    """Tiles of the result against the in-memory calls on crops of the scene (plus a
    margin, so the crop's own edges do not reach the compared outputs; at the scene's
    edges the margin is the real edge)."""
    rng = np.random.default_rng(SEED)
    worst = 0.0
    for _ in range(count):
        r, c = (int(v) // 4 * 4 for v in rng.integers(0, max(1, size - crop), 2))
        r0, c0 = max(0, r - margin), max(0, c - margin)
        r1, c1 = min(size, r + crop + margin), min(size, c + crop + margin)
        expected = in_memory_pipeline(x[:, :, r0:r1, c0:c1].compute())
        # Compare the outputs whose receptive field lies inside the crop.
        o_r0, o_c0 = (r - r0) // 4 + (2 if r0 else 0), (c - c0) // 4 + (2 if c0 else 0)
        o_r1 = (r + crop - r0) // 4 - (2 if r1 < size else 0)
        o_c1 = (c + crop - c0) // 4 - (2 if c1 < size else 0)
        got = result[:, :, r0 // 4 + o_r0:r0 // 4 + o_r1,
                     c0 // 4 + o_c0:c0 // 4 + o_c1]
        want = expected[:, :, o_r0:o_r1, o_c0:o_c1]
        assert got.shape == want.shape and got.size, (got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=40_000, help="scene side (pixels)")
    parser.add_argument("--chunk", type=int, default=2048, help="tile side (pixels)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="3GiB", help="per worker")
    parser.add_argument("--out", default=None, help="zarr store (default: a temp dir)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    x = scene(args.size, args.chunk)
    y = lazy_pipeline(x)
    print(f"scene {x.shape} {x.dtype} ({x.nbytes / 1e9:.1f} GB, {x.npartitions} tiles) "
          f"-> {y.shape} ({y.nbytes / 1e9:.2f} GB), {len(y.__dask_graph__())} tasks")
    out = args.out or tempfile.mkdtemp(prefix="fastpool-large-")
    store = os.path.join(out, "result.zarr")
    # One task at a time per worker, and the machine's cores shared out to the
    # workers' Numba threads, so workers do not oversubscribe the cores.
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                           memory_limit=args.memory_limit, dashboard_address=None,
                           env={"NUMBA_NUM_THREADS": str(threads)})
    try:
        with Client(cluster) as client:
            # Compile (or load from Numba's disk cache) in every worker first, so the
            # throughput below is the pipeline's, not the compiler's.
            client.run(lambda: in_memory_pipeline(np.ones((1, 3, 16, 16), np.float32)))
            with PeakMemory(client) as memory:
                start = time.perf_counter()
                written = y.to_zarr(store, compute=False, overwrite=True)
                future = client.compute(written)
                if not args.no_progress:
                    progress(future)
                future.result()
                seconds = time.perf_counter() - start
            result = zarr.open_array(store, mode="r")
            worst = check_tiles(x, result, args.size)
            pixels = args.size * args.size
            print(f"\n{args.workers} worker(s) x {threads} thread(s): {seconds:.1f} s, "
                  f"{pixels / seconds / 1e6:.1f} Mpixel/s "
                  f"({x.nbytes / seconds / 1e9:.2f} GB/s of input); peak memory per worker "
                  + ", ".join(f"{v / 2**30:.2f} GiB" for v in memory.peak.values())
                  + f"; checked tiles agree with the in-memory calls (max |diff| {worst:.1e})")
    finally:
        cluster.close()
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
