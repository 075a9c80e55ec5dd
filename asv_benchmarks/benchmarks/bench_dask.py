"""fastpool.dask (issue 18): examples/large_image.py's pipeline (conv 3->8, ReLU, max
pool 2, conv 8->16, ReLU, average pool 2) in tiles.

``DaskPipeline``: the in-memory calls and fastpool.dask on the synchronous and threaded
schedulers, on one scene that fits in memory (the ``small`` case is the CI smoke run's).
``DaskCluster``: the scene generated and processed on a ``distributed.LocalCluster`` of
1 and 2 worker processes. ``setup`` builds the data, starts the cluster and runs the
pipeline once, so compile and start-up time are not timed. Needs dask[array] and
distributed (the bench extra); skipped (``NotImplementedError``) without them.
"""

from .common import pin_threads

import os

import numpy as np

CASES = {"small 512x512 tiles 128": (512, 128), "2048x2048 tiles 512": (2048, 512)}


def _bench_dask():
    try:
        from fastpool import _bench_dask
        import dask  # noqa: F401
        import distributed  # noqa: F401
    except ImportError:
        raise NotImplementedError("dask[array] and distributed are not installed")
    return _bench_dask


class DaskPipeline:
    params = [list(CASES), ["in-memory", "dask synchronous", "dask threads"]]
    param_names = ["case", "scheduler"]
    processes = 1
    repeat = (3, 7, 20.0)
    timeout = 300

    def setup(self, case, scheduler):
        pin_threads()
        bench = _bench_dask()
        import dask.array as da
        size, chunk = CASES[case]
        x = bench.lazy_scene(size, size).compute(scheduler="sync")
        if scheduler == "in-memory":
            self.call = lambda: bench.pipeline(x, lazy=False)
        else:
            tiles = da.from_array(x, chunks=(1, 3, chunk, chunk))
            name = scheduler.split()[1].replace("synchronous", "sync")
            self.call = lambda: bench.pipeline(tiles, lazy=True).compute(scheduler=name)
        self.call()

    def time_pipeline(self, case, scheduler):
        """the pipeline over the scene"""
        self.call()


class DaskCluster:
    params = [[1, 2]]
    param_names = ["workers"]
    processes = 1
    repeat = (1, 3, 60.0)
    timeout = 600

    def setup(self, workers):
        bench = _bench_dask()
        from distributed import Client, LocalCluster, wait
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1,
                                    processes=True, dashboard_address=None,
                                    env={"NUMBA_NUM_THREADS": str(threads)})
        self.client = Client(self.cluster)
        self.run = lambda: wait(bench.pipeline(bench.lazy_scene(4096, 1024),
                                               lazy=True).persist())
        self.client.run(lambda: bench.pipeline(np.ones((1, 3, 16, 16), np.float32),
                                               lazy=False))
        self.run()

    def teardown(self, workers):
        self.client.close()
        self.cluster.close()

    def time_pipeline(self, workers):
        """a 4096x4096 scene, generated and processed on the workers"""
        self.run()
