"""fastpool.dask against the in-memory functions: every op, forward and backward, under
chunkings along the batch, the channels and the spatial axes (uneven last chunks,
chunks smaller than the windows' halo), on the synchronous scheduler; then on a real
``distributed.LocalCluster`` with two worker processes, one of them killed mid-run.

Pooling (every mode, stochastic picks included) and the convolution's batch chunks are
compared bit for bit; a convolution chunked across space is equal to rounding
(docs/site/dask.md says why), as are weight and bias gradients.
"""

import os
import time
import warnings

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

import fastpool  # noqa: E402
import fastpool.dask as fd  # noqa: E402
from conftest import assert_close_to_sum  # noqa: E402
from fastpool._dask_plan import Axis  # noqa: E402
from fastpool._geometry import channels_last_copy  # noqa: E402

# (shape, chunks) per rank: whole, batch only, first spatial axis only, every axis with
# uneven last chunks, and chunks of 1-2 cells (smaller than the windows' halo).
CHUNKINGS = {
    1: ((3, 4, 23), [(1, 4, 23), (3, 4, 7), (2, 3, 5), (3, 4, 2)]),
    2: ((2, 3, 13, 11), [(1, 3, 13, 11), (2, 3, 4, 11), (1, 2, 5, 4), (2, 3, 1, 2)]),
    3: ((2, 2, 7, 6, 9), [(1, 2, 7, 6, 9), (2, 2, 3, 6, 9), (2, 1, 2, 4, 4)]),
}
# Per rank: (kernel_size, stride, padding, dilation, ceil_mode).
POOL_GEOMETRIES = {
    1: [(3, 2, 1, 1, False), (4, 3, 1, 2, True)],
    2: [(3, 2, 1, 1, False), (2, None, 0, 1, True), ((3, 2), (1, 2), (1, 0), (2, 1), False)],
    3: [(3, 2, 1, 1, False), (2, 1, 0, 1, True)],
}


@pytest.fixture(autouse=True)
def synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def _equal(lazy, expected):
    """Bitwise equal, and the lazy array's chunks, dtype and meta are right."""
    assert lazy.dtype == expected.dtype
    assert lazy.shape == expected.shape
    assert isinstance(lazy._meta, np.ndarray)
    blocks = [b for b in lazy.to_delayed().ravel()]
    assert len(blocks) == np.prod(lazy.numblocks)
    computed = lazy.compute()
    assert computed.shape == expected.shape
    np.testing.assert_array_equal(computed, expected)
    # Chunk metadata matches what the tasks return.
    for index in np.ndindex(*lazy.numblocks):
        shape = tuple(lazy.chunks[a][i] for a, i in enumerate(index))
        region = tuple(slice(sum(lazy.chunks[a][:i]), sum(lazy.chunks[a][:i]) + s)
                       for a, (i, s) in enumerate(zip(index, shape)))
        assert expected[region].shape == shape
    return computed


def _cases(rank):
    shape, chunkings = CHUNKINGS[rank]
    for g, geometry in enumerate(POOL_GEOMETRIES[rank]):
        for c, chunks in enumerate(chunkings):
            yield pytest.param(rank, shape, chunks, geometry, np.float64 if (g + c) % 2 else
                               np.float32, id=f"{rank}d-g{g}-c{c}")


ALL_CASES = [case for rank in (1, 2, 3) for case in _cases(rank)]


def _pool_args(geometry):
    kernel, stride, padding, dilation, ceil_mode = geometry
    return dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                ceil_mode=ceil_mode)


@pytest.mark.parametrize("rank, shape, chunks, geometry, dtype", ALL_CASES)
def test_max_pool_forward_and_backward_are_the_in_memory_bits(rank, shape, chunks,
                                                                geometry, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    dx = da.from_array(x, chunks=chunks)
    args = _pool_args(geometry)
    forward, backward = getattr(fastpool, f"max_pool{rank}d"), getattr(
        fastpool, f"max_pool{rank}d_backward")
    y, indices = forward(x, **args, return_indices=True)
    dy, dindices = getattr(fd, f"max_pool{rank}d")(dx, **args, return_indices=True)
    _equal(dy, y)
    _equal(dindices, indices)
    g = rng.standard_normal(y.shape).astype(dtype)
    dg = da.from_array(g, chunks=tuple(max(1, s // 2) for s in g.shape))
    _equal(getattr(fd, f"max_pool{rank}d_backward")(dg, dx, **args, indices=dindices),
           backward(g, x, **args, indices=indices))
    _equal(getattr(fd, f"max_pool{rank}d_backward")(dg, dx, **args),
           backward(g, x, **args))


@pytest.mark.parametrize("rank, shape, chunks, geometry, dtype", ALL_CASES)
def test_avg_pool_forward_and_backward_are_the_in_memory_bits(rank, shape, chunks,
                                                                geometry, dtype, rng):
    kernel, stride, padding, _, ceil_mode = geometry
    x = rng.standard_normal(shape).astype(dtype)
    dx = da.from_array(x, chunks=chunks)
    for include in (True, False):
        args = dict(kernel_size=kernel, stride=stride, padding=padding,
                    ceil_mode=ceil_mode, count_include_pad=include)
        y = getattr(fastpool, f"avg_pool{rank}d")(x, **args)
        _equal(getattr(fd, f"avg_pool{rank}d")(dx, **args), y)
        g = rng.standard_normal(y.shape).astype(dtype)
        dg = da.from_array(g, chunks=tuple(max(1, s // 3) for s in g.shape))
        _equal(getattr(fd, f"avg_pool{rank}d_backward")(dg, dx, **args),
               getattr(fastpool, f"avg_pool{rank}d_backward")(g, x, **args))
    args = dict(kernel_size=kernel, stride=stride, padding=padding, divisor_override=3)
    _equal(getattr(fd, f"avg_pool{rank}d")(dx, **args),
           getattr(fastpool, f"avg_pool{rank}d")(x, **args))


@pytest.mark.parametrize("rank, shape, chunks, geometry, dtype", ALL_CASES)
def test_stochastic_pool_draws_the_same_picks_under_any_chunking(rank, shape, chunks,
                                                                 geometry, dtype, rng):
    x = rng.random(shape).astype(dtype)
    dx = da.from_array(x, chunks=chunks)
    args = _pool_args(geometry)
    seed = int(rng.integers(2**63))
    y, picks = getattr(fastpool, f"stochastic_pool{rank}d")(x, **args, seed=seed,
                                                            return_indices=True)
    dy, dpicks = getattr(fd, f"stochastic_pool{rank}d")(dx, **args, seed=seed,
                                                        return_indices=True)
    _equal(dy, y)
    _equal(dpicks, picks)
    backward = getattr(fastpool, f"stochastic_pool{rank}d_backward")
    lazy_backward = getattr(fd, f"stochastic_pool{rank}d_backward")
    g = rng.standard_normal(y.shape).astype(dtype)
    dg = da.from_array(g, chunks=tuple(max(1, s // 2) for s in g.shape))
    _equal(lazy_backward(dg, dx, **args, indices=dpicks),
           backward(g, x, **args, indices=picks))
    y_eval = getattr(fastpool, f"stochastic_pool{rank}d")(x, **args, training=False)
    _equal(getattr(fd, f"stochastic_pool{rank}d")(dx, **args, training=False), y_eval)
    _equal(lazy_backward(dg, dx, **args, training=False),
           backward(g, x, **args, training=False))


def test_a_seed_picks_differently_per_chunk_position_not_per_chunk(rng):
    """Two chunks holding equal data draw different picks (the key is the global
    position, not the chunk), and a different seed changes the picks."""
    tile = rng.random((1, 1, 8, 8))
    x = np.concatenate([tile, tile], axis=2)
    dx = da.from_array(x, chunks=(1, 1, 8, 8))
    _, picks = fd.stochastic_pool2d(dx, 2, seed=3, return_indices=True)
    picks = picks.compute()
    top, bottom = picks[..., :4, :] % 64, picks[..., 4:, :] % 64
    assert not np.array_equal(top, bottom)
    _, other = fd.stochastic_pool2d(dx, 2, seed=4, return_indices=True)
    assert not np.array_equal(other.compute(), picks)


# ----------------------------------------------------------------------------- convolution

CONV_CASES = [
    (1, (3, 4, 23), (1, 4, 23), dict(stride=1, padding=1), True),
    (1, (3, 4, 23), (3, 4, 6), dict(stride=2, padding=2, dilation=2), False),
    (2, (3, 4, 12, 11), (1, 4, 12, 11), dict(padding=1), True),
    (2, (3, 16, 12, 11), (1, 16, 12, 11), dict(padding=1), True),  # Winograd
    (2, (3, 16, 12, 11), (2, 16, 5, 4), dict(padding=1), False),   # Winograd tiles
    (2, (2, 4, 12, 11), (2, 4, 3, 2), dict(stride=2, padding=1), False),
    (2, (2, 4, 12, 11), (1, 2, 5, 11), dict(padding="same", dilation=2), False),
    (3, (2, 3, 6, 5, 7), (1, 3, 6, 5, 7), dict(padding=1), False),
    (3, (2, 3, 6, 5, 7), (2, 3, 2, 3, 7), dict(stride=(2, 1, 2), padding=1), False),
]


@pytest.mark.parametrize("rank, shape, chunks, args, bitwise", CONV_CASES,
                         ids=[f"{c[0]}d-{i}" for i, c in enumerate(CONV_CASES)])
def test_convolution_forward_and_backward_match_the_in_memory_call(rank, shape, chunks,
                                                                   args, bitwise, rng):
    """Batch chunks of 1-D and 2-D convolutions run the whole call's algorithms and
    GEMM sizes (bitwise equal); spatial chunks change the GEMMs' sizes, so BLAS sums
    in another order (equal to rounding, measured against the sum of |terms|)."""
    x = rng.standard_normal(shape)
    c_in = shape[1]
    weight = rng.standard_normal((5, c_in) + (3,) * rank)
    bias = rng.standard_normal(5)
    dx = da.from_array(x, chunks=chunks)
    y = getattr(fastpool, f"conv{rank}d")(x, weight, bias, **args)
    dy = getattr(fd, f"conv{rank}d")(dx, weight, bias, **args)
    bound = getattr(fastpool, f"conv{rank}d")(abs(x), abs(weight), abs(bias), **args)
    g = rng.standard_normal(y.shape)
    dg = da.from_array(g, chunks=(1,) + g.shape[1:])
    grads = getattr(fastpool, f"conv{rank}d_backward")(g, x, weight, **args)
    lazy = getattr(fd, f"conv{rank}d_backward")(dg, dx, weight, **args)
    if bitwise:
        _equal(dy, y)
        _equal(lazy.grad_input, grads.grad_input)
    else:
        assert_close_to_sum(dy.compute(), y, bound, np.float64)
        input_bound = getattr(fastpool, f"conv{rank}d_backward")(
            abs(g), x, abs(weight), **args, output_mask=(True, False, False)).grad_input
        assert_close_to_sum(lazy.grad_input.compute(), grads.grad_input, input_bound,
                            np.float64)
    weight_bound = getattr(fastpool, f"conv{rank}d_backward")(abs(g), abs(x), weight,
                                                              **args)
    assert_close_to_sum(lazy.grad_weight.compute(), grads.grad_weight,
                        weight_bound.grad_weight, np.float64)
    assert_close_to_sum(lazy.grad_bias.compute(), grads.grad_bias, weight_bound.grad_bias,
                        np.float64)
    assert lazy.grad_weight.numblocks == (1,) * (rank + 2)


def test_convolution_weight_is_one_key_shared_by_every_task(rng):
    x = rng.standard_normal((4, 3, 10, 10))
    weight = rng.standard_normal((2, 3, 3, 3))
    dy = fd.conv2d(da.from_array(x, chunks=(1, 3, 5, 5)), weight, padding=1)
    graph = dict(dy.__dask_graph__())
    holders = [key for key, value in graph.items()
               if isinstance(value, np.ndarray) and value.shape == weight.shape]
    assert len(holders) == 1
    from dask.core import flatten, get_dependencies
    outputs = list(flatten(dy.__dask_keys__()))
    assert len(outputs) == 4 * 2 * 2
    for key in outputs:
        assert holders[0] in get_dependencies(graph, key)
    np.testing.assert_array_equal(dy.compute(), fastpool.conv2d(x, weight, padding=1))


# ----------------------------------------------------------------------------- adaptive, misc

@pytest.mark.parametrize("rank", [1, 2, 3])
def test_adaptive_pooling_chunked_along_batch_and_channels(rank, rng):
    shape = (3, 4) + (7, 6, 5)[:rank]
    x = rng.random(shape)
    dx = da.from_array(x, chunks=(2, 3) + shape[2:])
    out = (3, None, 2)[:rank]
    _equal(getattr(fd, f"adaptive_avg_pool{rank}d")(dx, out),
           getattr(fastpool, f"adaptive_avg_pool{rank}d")(x, out))
    y, indices = getattr(fastpool, f"adaptive_max_pool{rank}d")(x, out, True)
    dy, dindices = getattr(fd, f"adaptive_max_pool{rank}d")(dx, out, True)
    _equal(dy, y)
    _equal(dindices, indices)
    y, picks = getattr(fastpool, f"adaptive_stochastic_pool{rank}d")(x, out, True, seed=9)
    dy, dpicks = getattr(fd, f"adaptive_stochastic_pool{rank}d")(dx, out, True, seed=9)
    _equal(dy, y)
    _equal(dpicks, picks)
    g = rng.standard_normal(y.shape)
    dg = da.from_array(g, chunks=(1, 2) + g.shape[2:])
    for name, keywords in (("adaptive_avg_pool", {}),
                           ("adaptive_max_pool", dict(indices=indices)),
                           ("adaptive_stochastic_pool", dict(indices=picks))):
        lazy_keywords = {k: da.from_array(v, chunks=(1, 1) + v.shape[2:])
                         for k, v in keywords.items()}
        _equal(getattr(fd, f"{name}{rank}d_backward")(dg, dx, out, **lazy_keywords),
               getattr(fastpool, f"{name}{rank}d_backward")(g, x, out, **keywords))


def test_adaptive_pooling_rechunks_space_with_a_warning(rng):
    x = rng.random((2, 3, 8, 8))
    with pytest.warns(UserWarning, match="rechunking the spatial axes"):
        dy = fd.adaptive_avg_pool2d(da.from_array(x, chunks=(1, 3, 4, 8)), 1)
    _equal(dy, fastpool.adaptive_avg_pool2d(x, 1))


def test_unbatched_and_channels_last_inputs(rng):
    x = rng.random((3, 12, 10))
    _equal(fd.max_pool2d(da.from_array(x, chunks=(3, 5, 4)), 3, 2, 1),
           fastpool.max_pool2d(x, 3, 2, 1))
    nhwc = rng.random((2, 9, 10, 4))
    x_cl = nhwc.transpose(0, 3, 1, 2)
    lazy = da.from_array(np.ascontiguousarray(x_cl), chunks=(1, 4, 4, 5)).map_blocks(
        channels_last_copy, 1)
    assert _task_result(lazy, (0, 0, 0, 0)).transpose(0, 2, 3, 1).flags.c_contiguous
    dy = fd.avg_pool2d(lazy, 3, 2, 1)
    _equal(dy, fastpool.avg_pool2d(x_cl, 3, 2, 1))
    # Chunks that are channels-last views are computed in (and returned in) that
    # layout, also where a task joins several of them.
    for index in ((0, 0, 0, 0), (1, 0, 1, 1)):
        block = _task_result(dy, index)
        assert block.transpose(0, 2, 3, 1).flags.c_contiguous, index


def _task_result(lazy, index):
    """What the task of block ``index`` returns (``compute`` copies to C order)."""
    return dask.get(dict(lazy.__dask_graph__()), (lazy.name,) + index)


def test_bad_input_is_refused_before_any_task_runs(rng):
    dx = da.from_array(rng.random((2, 3, 8, 8)), chunks=4)
    with pytest.raises(ValueError, match="padding"):
        fd.max_pool2d(dx, 2, padding=2)
    with pytest.raises(ValueError, match="kernel_size"):
        fd.avg_pool2d(dx, 0)
    with pytest.raises(ValueError, match="x must be 4-D"):
        fd.max_pool2d(dx[0, 0], 2)
    with pytest.raises(TypeError, match="weight dtype"):
        fd.conv2d(dx, np.zeros((1, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="indices is required"):
        fd.stochastic_pool2d_backward(dx[..., ::2, ::2], dx, 2)
    with pytest.raises(ValueError, match="grad_output"):
        fd.avg_pool2d_backward(dx, dx, 2)


@pytest.mark.parametrize("size, kernel, stride, pad, dilation, ceil_mode", [
    (23, 3, 2, 1, 1, False), (23, 4, 3, 1, 2, True), (10, 1, 3, 0, 1, True),
    (9, 3, 1, 1, 1, False), (40, 5, 4, 2, 1, True)])
def test_pieces_read_only_real_cells_for_the_outputs_they_keep(size, kernel, stride, pad,
                                                               dilation, ceil_mode):
    """The plan alone, over every split of the axis into 1-4 chunks: the kept outputs
    tile the whole output, and each kept window starts at or after its slice's start
    (or the real padding) and ends inside its slice (or the real end)."""
    axis = Axis(size, kernel, stride, pad, pad, dilation, ceil_mode)
    total = axis.outputs()
    rng = np.random.default_rng(size * 7 + kernel)
    for _ in range(30):
        cuts = sorted(set(rng.integers(1, size, rng.integers(0, 4)).tolist()))
        chunks = np.diff([0] + cuts + [size]).tolist()
        for tile in (1, 2):
            out_chunks, pieces = axis.forward(chunks, tile)
            assert sum(out_chunks) == total
            first = 0
            for piece in pieces:
                assert piece.first == first and piece.count > 0
                first += piece.count
                assert piece.out >= piece.skip + piece.count
                assert (piece.first - piece.skip) % tile == 0
                for o in range(piece.first, piece.first + piece.count):
                    start = o * stride - pad
                    assert start >= piece.lo or piece.lo == 0
                    assert start + axis.extent <= piece.hi or piece.hi == size
            assert first == total
            for chunk, piece in zip(chunks, axis.backward(chunks, tile)):
                if piece is not None:
                    assert piece.first + piece.count <= total


# ----------------------------------------------------------------------------- a real cluster

@pytest.fixture(scope="module")
def cluster_client():
    """Two worker processes (one thread each) on this machine, started by the test."""
    from distributed import Client, LocalCluster
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=None, worker_dashboard_address=None)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def test_on_a_local_cluster_every_op_matches_the_in_memory_call(cluster_client, rng):
    x = rng.random((4, 3, 17, 15)).astype(np.float32)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    dx = da.from_array(x, chunks=(2, 3, 6, 8))
    seed = 12345
    y, picks = fastpool.stochastic_pool2d(x, 3, 2, 1, seed=seed, return_indices=True)
    lazy = {
        "max": (fd.max_pool2d(dx, 3, 2, 1), fastpool.max_pool2d(x, 3, 2, 1)),
        "avg": (fd.avg_pool2d(dx, 3, 2, 1, ceil_mode=True),
                fastpool.avg_pool2d(x, 3, 2, 1, ceil_mode=True)),
        "stochastic": (fd.stochastic_pool2d(dx, 3, 2, 1, seed=seed), y),
        "conv batch": (fd.conv2d(da.from_array(x, chunks=(1, 3, 17, 15)), weight,
                                 padding=1), fastpool.conv2d(x, weight, padding=1)),
    }
    g = rng.random(y.shape).astype(np.float32)
    lazy["stochastic backward"] = (
        fd.stochastic_pool2d_backward(da.from_array(g, chunks=(1, 3, 4, 4)), dx, 3, 2, 1,
                                      indices=da.from_array(picks, chunks=(1, 3, 4, 4))),
        fastpool.stochastic_pool2d_backward(g, x, 3, 2, 1, indices=picks))
    computed = cluster_client.compute([v[0] for v in lazy.values()], sync=True)
    for (name, (_, expected)), result in zip(lazy.items(), computed):
        np.testing.assert_array_equal(result, expected, err_msg=name)
    pids = cluster_client.run(os.getpid)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()


def test_a_worker_killed_mid_computation_does_not_change_the_result(cluster_client, rng):
    """A worker process dies while tasks run (SIGKILL, so it cannot hand its data
    over); the nanny restarts it, the scheduler recomputes what was lost, and the
    result is still the in-memory one."""
    import signal
    x = rng.random((16, 2, 24, 24))
    dx = da.from_array(x, chunks=(1, 2, 12, 12))
    lazy = fd.stochastic_pool2d(dx, 3, 2, 1, seed=77).map_blocks(_slowly, dtype=x.dtype)
    future = cluster_client.compute(lazy)
    deadline = time.time() + 60
    while not any(cluster_client.processing().values()):
        assert time.time() < deadline
        time.sleep(0.05)
    victim = next(address for address, tasks in cluster_client.processing().items()
                  if tasks)
    pid = cluster_client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    result = future.result(timeout=120)
    assert victim not in cluster_client.scheduler_info()["workers"]
    np.testing.assert_array_equal(result, fastpool.stochastic_pool2d(x, 3, 2, 1, seed=77))


def _slowly(block):
    time.sleep(0.05)
    return block
