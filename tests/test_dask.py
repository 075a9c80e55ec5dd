"""fastpool.dask against the in-memory functions: every op, forward and backward, under
chunkings along the batch, the channels and the spatial axes (uneven last chunks,
chunks smaller than the windows' halo), on the synchronous scheduler; then on a real
``distributed.LocalCluster`` with two worker processes, one of them killed mid-run.

Pooling (every mode, stochastic picks included) and convolutions are compared bit for
bit; weight and bias gradients are equal to rounding (docs/site/dask.md says why),
except with ``reproducible=True`` (bitwise; tests/test_reproducible.py, and the cluster
test here).
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
# Per rank: ((kernel_size, stride, padding, dilation, ceil_mode), dtypes). Kernels are
# compiled per kernel size, stride, dilation and dtype (padding and ceil_mode are
# arguments): these are test_pooling_nd's and conftest's geometries and dtypes, which
# warm_kernels.py compiles for the suite, so these tests compile nothing of their own.
POOL_GEOMETRIES = {
    1: [((3, 2, 1, 1, False), (np.float32, np.float64)),
        ((2, None, 1, 2, True), (np.float64,))],
    2: [((3, 2, 1, 1, False), (np.float32, np.float64)),
        ((2, None, 0, 1, True), (np.float64,)),
        (((3, 2), (2, 1), (1, 0), (1, 2), False), (np.float32,))],
    3: [((3, 2, 1, 1, False), (np.float32, np.float64)),
        (((1, 2, 3), (1, 2, 1), (0, 1, 1), (1, 2, 1), True), (np.float64,))],
}


@pytest.fixture(autouse=True)
def synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def _equal(lazy, expected):
    """Every task's block is bitwise the matching block of ``expected``, with the
    shape the lazy array's ``chunks`` declare and the dtype and type of its meta."""
    assert lazy.dtype == expected.dtype
    assert lazy.shape == expected.shape
    assert isinstance(lazy._meta, np.ndarray)
    indices = list(np.ndindex(*lazy.numblocks))
    blocks = dask.get(dict(lazy.__dask_graph__()), [(lazy.name,) + i for i in indices])
    for index, block in zip(indices, blocks):
        region = tuple(slice(sum(lazy.chunks[a][:i]), sum(lazy.chunks[a][:i + 1]))
                       for a, i in enumerate(index))
        assert type(block) is np.ndarray and block.dtype == lazy.dtype, index
        assert block.shape == expected[region].shape, (index, block.shape)
        np.testing.assert_array_equal(block, expected[region], err_msg=str(index))


def _cases(rank):
    shape, chunkings = CHUNKINGS[rank]
    for g, (geometry, dtypes) in enumerate(POOL_GEOMETRIES[rank]):
        for c, chunks in enumerate(chunkings):
            yield pytest.param(rank, shape, chunks, geometry, dtypes[c % len(dtypes)],
                               id=f"{rank}d-g{g}-c{c}")


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


def test_chunks_on_the_gpu_kernels_give_the_whole_cpu_call(small_launches, rng):
    """``device="cuda"``: every chunk runs the GPU kernels (the real GPU, else Numba's
    CUDA simulator), which key their stochastic draws by global position too. The
    picks under chunking are the CPU's whole-array picks; max and average pooling are
    bitwise too (the GPU kernels add in the CPU's order)."""
    x = rng.random((2, 2, 7, 6))
    dx = da.from_array(x, chunks=(1, 1, 3, 4))
    y, picks = fastpool.stochastic_pool2d(x, 3, 2, 1, seed=5, return_indices=True)
    dy, dpicks = fd.stochastic_pool2d(dx, 3, 2, 1, seed=5, return_indices=True,
                                      device="cuda")
    _equal(dy, y)
    _equal(dpicks, picks)
    _equal(fd.max_pool2d(dx, 3, 2, 1, device="cuda"), fastpool.max_pool2d(x, 3, 2, 1))
    g = rng.standard_normal(y.shape)
    _equal(fd.avg_pool2d_backward(da.from_array(g, chunks=(2, 1, 2, 2)), dx, 3, 2, 1,
                                  device="cuda"),
           fastpool.avg_pool2d_backward(g, x, 3, 2, 1))
    # reproducible weight and bias gradients: the GPU's folds, chunk by chunk, give
    # the whole CPU call's bits
    weight = rng.standard_normal((3, 2, 3, 3))
    gy = rng.standard_normal((2, 3, 7, 6))
    lazy = fd.conv2d_backward(da.from_array(gy, chunks=(1, 3, 4, 3)), dx, weight,
                              padding=1, reproducible=True, output_mask=(False, True, True),
                              device="cuda")
    grads = fastpool.conv2d_backward(gy, x, weight, padding=1, reproducible=True)
    _equal(lazy.grad_weight, grads.grad_weight)
    _equal(lazy.grad_bias, grads.grad_bias)


def _cupy_on_a_gpu():
    """CuPy with a real GPU (CuPy cannot run under Numba's simulator), else skip."""
    from conftest import CUDA_SIMULATOR
    if CUDA_SIMULATOR:
        pytest.skip("CuPy chunks need a real GPU (Numba's simulator cannot run CuPy)")
    cupy = pytest.importorskip("cupy")
    try:
        cupy.zeros(1).sum().item()
    except Exception as exc:  # no driver or no device
        pytest.skip(f"CuPy cannot use a GPU here: {exc}")
    return cupy


def _equal_on_gpu(cupy, lazy, expected, bound=None):
    """Every block of ``lazy`` is a CuPy array (so is its meta) and, brought to the
    host, the matching block of ``expected``: bitwise, or within the sum tolerance of
    ``bound`` where one is given."""
    assert isinstance(lazy._meta, cupy.ndarray), type(lazy._meta)
    assert lazy.dtype == expected.dtype and lazy.shape == expected.shape
    indices = list(np.ndindex(*lazy.numblocks))
    blocks = dask.get(dict(lazy.__dask_graph__()), [(lazy.name,) + i for i in indices])
    for index, block in zip(indices, blocks):
        region = tuple(slice(sum(lazy.chunks[a][:i]), sum(lazy.chunks[a][:i + 1]))
                       for a, i in enumerate(index))
        assert isinstance(block, cupy.ndarray), (index, type(block))
        host = cupy.asnumpy(block)
        if bound is None:
            np.testing.assert_array_equal(host, expected[region], err_msg=str(index))
        else:
            assert_close_to_sum(host, expected[region], bound[region], expected.dtype)


@pytest.mark.parametrize("chunks", [(1, 2, 7, 6), (2, 1, 3, 4), (1, 1, 2, 2)])
def test_cupy_chunks_run_the_gpu_kernels_and_stay_on_the_gpu(chunks, rng):
    """dask-cuda's case: CuPy chunks (``device="auto"``) run the GPU kernels, every
    task returns a CuPy array, and the result is the whole-array CPU call's: pooling
    and stochastic picks bitwise under batch and spatial chunks, convolutions and
    their gradients to rounding (the GPU sums in another order than the CPU's GEMM),
    reproducible weight and bias gradients bitwise."""
    cupy = _cupy_on_a_gpu()
    x = rng.random((2, 2, 7, 6))
    dx = da.from_array(cupy.asarray(x), chunks=chunks, asarray=False)
    _equal_on_gpu(cupy, fd.max_pool2d(dx, 3, 2, 1), fastpool.max_pool2d(x, 3, 2, 1))
    y, picks = fastpool.stochastic_pool2d(x, 3, 2, 1, seed=5, return_indices=True)
    dy, dpicks = fd.stochastic_pool2d(dx, 3, 2, 1, seed=5, return_indices=True)
    _equal_on_gpu(cupy, dy, y)
    _equal_on_gpu(cupy, dpicks, picks)
    g = rng.standard_normal(fastpool.avg_pool2d(x, 3, 2, 1).shape)
    dg = da.from_array(cupy.asarray(g), chunks=(1, 1, 2, 2), asarray=False)
    _equal_on_gpu(cupy, fd.avg_pool2d_backward(dg, dx, 3, 2, 1),
                  fastpool.avg_pool2d_backward(g, x, 3, 2, 1))
    weight, bias = rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
    bound = fastpool.conv2d(abs(x), abs(weight), abs(bias), padding=1)
    _equal_on_gpu(cupy, fd.conv2d(dx, cupy.asarray(weight), cupy.asarray(bias), padding=1),
                  fastpool.conv2d(x, weight, bias, padding=1), bound)
    gy = rng.standard_normal(bound.shape)
    dgy = da.from_array(cupy.asarray(gy), chunks=(1, 3, 4, 3), asarray=False)
    lazy = fd.conv2d_backward(dgy, dx, cupy.asarray(weight), padding=1)
    grads = fastpool.conv2d_backward(gy, x, weight, padding=1)
    input_bound = fastpool.conv2d_backward(abs(gy), x, abs(weight), padding=1,
                                           output_mask=(True, False, False)).grad_input
    _equal_on_gpu(cupy, lazy.grad_input, grads.grad_input, input_bound)
    weight_bound = fastpool.conv2d_backward(abs(gy), abs(x), weight, padding=1)
    assert_close_to_sum(cupy.asnumpy(lazy.grad_weight.compute()), grads.grad_weight,
                        weight_bound.grad_weight, np.float64)
    assert_close_to_sum(cupy.asnumpy(lazy.grad_bias.compute()), grads.grad_bias,
                        weight_bound.grad_bias, np.float64)
    # with reproducible=True: bitwise the whole CPU call's
    lazy = fd.conv2d_backward(dgy, dx, cupy.asarray(weight), padding=1, reproducible=True)
    grads = fastpool.conv2d_backward(gy, x, weight, padding=1, reproducible=True)
    _equal_on_gpu(cupy, lazy.grad_weight, grads.grad_weight)
    _equal_on_gpu(cupy, lazy.grad_bias, grads.grad_bias)


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

# (rank, shape, chunks, kernel size, args). Every chunk runs the whole call's
# algorithms (``planned_as``; a 3-D call's depth taps those of all its output depths),
# fastpool's own GEMM gives each output one chain of fused multiply-adds whatever the
# GEMM's size, Winograd chunks start on the whole call's tile grid, and the im2col
# input gradient adds each cell's terms in kernel-tap order: the forward and the input
# gradient are bitwise the in-memory call's under any chunking.
CONV_CASES = [
    (1, (3, 4, 23), (1, 4, 23), 3, dict(stride=1, padding=1)),
    (1, (3, 4, 23), (3, 4, 6), 3, dict(stride=2, padding=2, dilation=2)),
    (2, (3, 4, 12, 11), (1, 4, 12, 11), 3, dict(padding=1)),
    (2, (3, 16, 12, 11), (1, 16, 12, 11), 3, dict(padding=1)),  # Winograd
    (2, (3, 16, 12, 11), (2, 16, 5, 4), 3, dict(padding=1)),    # Winograd tiles
    (2, (1, 4, 7, 60), (1, 4, 4, 25), 3, dict(padding=1)),      # rows
    (2, (2, 4, 12, 11), (2, 4, 3, 2), 3, dict(stride=2, padding=1)),
    (2, (2, 4, 12, 11), (1, 2, 5, 11), 3, dict(padding="same", dilation=2)),
    (2, (1, 7, 9, 10), (1, 7, 4, 3), 1, dict()),  # pointwise
    (3, (2, 3, 6, 5, 7), (1, 3, 6, 5, 7), 3, dict(padding=1)),
    (3, (2, 3, 6, 5, 7), (2, 3, 2, 3, 7), 3, dict(stride=(2, 1, 2), padding=1)),
    (3, (1, 8, 5, 9, 8), (1, 8, 2, 4, 3), 3, dict(padding=1)),  # Winograd
    (3, (2, 3, 3, 4, 60), (1, 3, 1, 2, 25), (3, 3, 5), dict(padding=(1, 1, 2))),  # rows
]


@pytest.mark.parametrize("rank, shape, chunks, k, args", CONV_CASES,
                         ids=[f"{c[0]}d-{i}" for i, c in enumerate(CONV_CASES)])
def test_convolution_forward_and_backward_match_the_in_memory_call(
        rank, shape, chunks, k, args, rng):
    """The forward and the input gradient bitwise; the weight and bias gradients (sums
    over chunks, added in chunk order) equal to rounding, measured against the sum of
    |terms|."""
    x = rng.standard_normal(shape)
    c_in = shape[1]
    kernel = k if isinstance(k, tuple) else (k,) * rank
    weight = rng.standard_normal((5, c_in) + kernel)
    bias = rng.standard_normal(5)
    dx = da.from_array(x, chunks=chunks)
    y = getattr(fastpool, f"conv{rank}d")(x, weight, bias, **args)
    dy = getattr(fd, f"conv{rank}d")(dx, weight, bias, **args)
    g = rng.standard_normal(y.shape)
    dg = da.from_array(g, chunks=(1,) + g.shape[1:])
    grads = getattr(fastpool, f"conv{rank}d_backward")(g, x, weight, **args)
    lazy = getattr(fd, f"conv{rank}d_backward")(dg, dx, weight, **args)
    _equal(dy, y)
    _equal(lazy.grad_input, grads.grad_input)
    weight_bound = getattr(fastpool, f"conv{rank}d_backward")(abs(g), abs(x), weight,
                                                              **args)
    assert_close_to_sum(lazy.grad_weight.compute(), grads.grad_weight,
                        weight_bound.grad_weight, np.float64)
    assert_close_to_sum(lazy.grad_bias.compute(), grads.grad_bias, weight_bound.grad_bias,
                        np.float64)
    assert lazy.grad_weight.numblocks == (1,) * (rank + 2)


@pytest.mark.parametrize("chunks", [(1, 9), (2, 8), (9, 1), (1, 1, 1, 7)])
@pytest.mark.parametrize("padding", [3, 5])
def test_convolution_padding_wider_than_the_kernel(chunks, padding, rng):
    """Outputs that read padding only, at either end, in chunks of one or two cells."""
    x = rng.standard_normal((2, 2, 10))
    weight = rng.standard_normal((3, 2, 3))
    dx = da.from_array(x, chunks=(2, 2, chunks))
    y = fastpool.conv1d(x, weight, padding=padding)
    _equal(fd.conv1d(dx, weight, padding=padding), y)
    g = rng.standard_normal(y.shape)
    grads = fastpool.conv1d_backward(g, x, weight, padding=padding)
    lazy = fd.conv1d_backward(da.from_array(g, chunks=(1, 3, 4)), dx, weight,
                              padding=padding)
    bound = fastpool.conv1d_backward(abs(g), abs(x), abs(weight), padding=padding)
    _equal(lazy.grad_input, grads.grad_input)
    assert_close_to_sum(lazy.grad_weight.compute(), grads.grad_weight, bound.grad_weight,
                        np.float64)


def test_zero_size_chunks(rng):
    x = rng.standard_normal((2, 3, 20))
    dx = da.from_array(x, chunks=((1, 0, 1), (3,), (5, 0, 0, 11, 4)))
    y, indices = fastpool.max_pool1d(x, 3, 2, 1, return_indices=True)
    dy, dindices = fd.max_pool1d(dx, 3, 2, 1, return_indices=True)
    _equal(dy, y)
    _equal(dindices, indices)
    g = rng.standard_normal(y.shape)
    _equal(fd.max_pool1d_backward(da.from_array(g, chunks=((2, 0), (3,), (0, 4, 6))), dx,
                                  3, 2, 1, indices=dindices),
           fastpool.max_pool1d_backward(g, x, 3, 2, 1, indices=indices))


def test_bad_indices_are_refused(rng):
    x = rng.standard_normal((1, 2, 12))
    dx = da.from_array(x, chunks=(1, 2, 5))
    y, indices = fastpool.max_pool1d(x, 2, return_indices=True)
    g = da.from_array(np.ones_like(y), chunks=(1, 2, 2))
    for bad in (indices + 3, indices - indices.max() - 1, indices * 0 + 12):
        with pytest.raises(ValueError, match="indices"):
            fd.max_pool1d_backward(g, dx, 2, indices=da.from_array(bad, chunks=2)).compute()


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


def test_transposed_convolution_chunks_run_the_whole_calls_algorithm(rng):
    """Four images of 9x9 make enough pixels for Winograd (``_WINOGRAD_MIN_PIXELS``),
    one does not: each one-image chunk still runs Winograd, and gives its bits."""
    x = rng.standard_normal((4, 8, 9, 9))
    weight = rng.standard_normal((8, 8, 3, 3))
    dx = da.from_array(x, chunks=(1, 8, 9, 9))
    _equal(fd.conv_transpose2d(dx, weight, padding=1),
           fastpool.conv_transpose2d(x, weight, padding=1))
    g = rng.standard_normal(x.shape)
    _equal(fd.conv_transpose2d_backward(da.from_array(g, chunks=dx.chunks), dx, weight,
                                        padding=1).grad_input,
           fastpool.conv_transpose2d_backward(g, x, weight, padding=1).grad_input)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_transposed_convolution_and_unpooling_chunked_along_the_batch(rank, rng):
    """Every output of these reads its whole plane, so they chunk along the batch (and
    the channels, for unpooling). Unpooling, the transposed convolution and its input
    gradient are bitwise the in-memory call (every chunk runs the whole call's
    algorithms); the weight and bias gradients (sums over chunks) equal to
    rounding."""
    shape = (3, 4) + (6, 5, 4)[:rank]
    x = rng.standard_normal(shape)
    dx = da.from_array(x, chunks=(1, 2) + shape[2:])
    weight = rng.standard_normal((4, 3) + (3,) * rank)
    bias = rng.standard_normal(3)
    args = dict(stride=2, padding=1, output_padding=1)
    f = getattr(fastpool, f"conv_transpose{rank}d")
    y = f(x, weight, bias, **args)
    dy = getattr(fd, f"conv_transpose{rank}d")(dx, weight, bias, **args)
    assert dy.chunks[:2] == ((1, 1, 1), (3,))
    _equal(dy, y)
    g = rng.standard_normal(y.shape)
    backward = getattr(fastpool, f"conv_transpose{rank}d_backward")
    grads = backward(g, x, weight, **args)
    bound = backward(abs(g), abs(x), abs(weight), **args)
    lazy = getattr(fd, f"conv_transpose{rank}d_backward")(
        da.from_array(g, chunks=(2,) + g.shape[1:]), dx, weight, **args)
    _equal(lazy.grad_input, grads.grad_input)
    for name in ("grad_weight", "grad_bias"):
        assert_close_to_sum(getattr(lazy, name).compute(), getattr(grads, name),
                            getattr(bound, name), np.float64)

    pooled, indices = getattr(fastpool, f"max_pool{rank}d")(x, 2, return_indices=True)
    unpool = getattr(fastpool, f"max_unpool{rank}d")
    lazy_pooled = da.from_array(pooled, chunks=(2, 1) + pooled.shape[2:])
    lazy_indices = da.from_array(indices, chunks=(1, 3) + pooled.shape[2:])
    expected = unpool(pooled, indices, 2, output_size=x.shape[2:])
    _equal(getattr(fd, f"max_unpool{rank}d")(lazy_pooled, lazy_indices, 2,
                                             output_size=x.shape[2:]), expected)
    g = rng.standard_normal(expected.shape)
    _equal(getattr(fd, f"max_unpool{rank}d_backward")(
        da.from_array(g, chunks=(1, 1) + g.shape[2:]), lazy_pooled, lazy_indices, 2,
        output_size=x.shape[2:]),
        getattr(fastpool, f"max_unpool{rank}d_backward")(g, pooled, indices, 2,
                                                         output_size=x.shape[2:]))


def test_adaptive_pooling_rechunks_space_with_a_warning(rng):
    x = rng.random((2, 3, 8, 8))
    with pytest.warns(UserWarning, match="rechunking the spatial axes"):
        dy = fd.adaptive_avg_pool2d(da.from_array(x, chunks=(1, 3, 4, 8)), 1)
    _equal(dy, fastpool.adaptive_avg_pool2d(x, 1))
    pooled, indices = fastpool.max_pool2d(x, 2, return_indices=True)
    with pytest.warns(UserWarning, match="indices point anywhere"):
        dy = fd.max_unpool2d(da.from_array(pooled, chunks=(1, 3, 2, 4)), indices, 2)
    _equal(dy, fastpool.max_unpool2d(pooled, indices, 2))


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
    with pytest.raises(ValueError, match="grad_output must be unbatched"):
        fd.avg_pool2d_backward(dx[:1, :, :4, :4], dx[0], 2)
    with pytest.raises(TypeError):
        fd.adaptive_avg_pool2d(dx, 2, True)
    with pytest.raises(ValueError, match="indices is required"):
        fd.adaptive_stochastic_pool2d_backward(dx[..., :2, :2], dx, 2)


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
            start = 0
            for chunk, piece in zip(chunks, axis.backward(chunks, tile)):
                taps = {o: [t for t in range(o * stride - pad,
                                             o * stride - pad + axis.extent, dilation)
                            if 0 <= t < size] for o in range(total)}
                touching = [o for o, ts in taps.items()
                            if any(start <= t < start + chunk for t in ts)]
                if piece is None:
                    assert not touching
                else:
                    kept = range(piece.first, piece.first + piece.count)
                    assert set(touching) <= set(kept)
                    assert all(piece.lo <= t < piece.hi for o in kept for t in taps[o])
                start += chunk


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


def _every_function(rank, dtype, rng):
    """``{name: (lazy, expected)}`` for every fastpool.dask function of ``rank``, on
    the rank's hardest chunking (every axis split, uneven, chunks under the halo)."""
    shape, chunkings = CHUNKINGS[rank]
    chunks = chunkings[-1]
    x = rng.random(shape).astype(dtype)
    dx = da.from_array(x, chunks=chunks)
    geometry = POOL_GEOMETRIES[rank][0][0]
    args = _pool_args(geometry)
    avg = dict(kernel_size=args["kernel_size"], stride=args["stride"],
               padding=args["padding"], ceil_mode=True)
    seed = 12345
    y, indices = getattr(fastpool, f"max_pool{rank}d")(x, **args, return_indices=True)
    s, picks = getattr(fastpool, f"stochastic_pool{rank}d")(x, **args, seed=seed,
                                                            return_indices=True)
    g = rng.random(y.shape).astype(dtype)
    dg = da.from_array(g, chunks=tuple(max(1, n // 2) for n in g.shape))
    di = da.from_array(indices, chunks=dg.chunks)
    dp = da.from_array(picks, chunks=dg.chunks)
    weight = rng.standard_normal((4, shape[1]) + (3,) * rank).astype(dtype)
    def f(name):  # "max_pool" -> fastpool.max_pool2d, "max_pool_backward" -> ..._backward
        op, backward, _ = name.partition("_backward")
        return getattr(fastpool, f"{op}{rank}d{backward}")

    def m(name):
        op, backward, _ = name.partition("_backward")
        return getattr(fd, f"{op}{rank}d{backward}")

    ga_ = rng.random(f("avg_pool")(x, **avg).shape).astype(dtype)
    dga = da.from_array(ga_, chunks=tuple(max(1, n // 3) for n in ga_.shape))
    cases = {
        "max": (m("max_pool")(dx, **args), y),
        "max indices": (m("max_pool")(dx, **args, return_indices=True)[1], indices),
        "max backward": (m("max_pool_backward")(dg, dx, **args, indices=di),
                         f("max_pool_backward")(g, x, **args, indices=indices)),
        "avg": (m("avg_pool")(dx, **avg), f("avg_pool")(x, **avg)),
        "avg backward": (m("avg_pool_backward")(dga, dx, **avg),
                         f("avg_pool_backward")(ga_, x, **avg)),
        "stochastic": (m("stochastic_pool")(dx, **args, seed=seed), s),
        "stochastic backward": (m("stochastic_pool_backward")(dg, dx, **args, indices=dp),
                                f("stochastic_pool_backward")(g, x, **args,
                                                              indices=picks)),
        "stochastic inference backward": (
            m("stochastic_pool_backward")(dg, dx, **args, training=False),
            f("stochastic_pool_backward")(g, x, **args, training=False)),
    }
    batch = da.from_array(x, chunks=(1,) + x.shape[1:])
    yc = f("conv")(x, weight, padding=1)
    gc = rng.random(yc.shape).astype(dtype)
    dgc = da.from_array(gc, chunks=tuple(max(1, n // 2) for n in gc.shape))
    grad_c = f("conv_backward")(gc, x, weight, padding=1).grad_input
    cases["conv batch chunks"] = (m("conv")(batch, weight, padding=1), yc)
    cases["conv backward batch chunks"] = (
        m("conv_backward")(dgc, batch, weight, padding=1).grad_input, grad_c)
    cases["conv"] = (m("conv")(dx, weight, padding=1), yc)
    cases["conv backward"] = (m("conv_backward")(dgc, dx, weight, padding=1).grad_input,
                              grad_c)
    lazy = m("conv_backward")(dgc, dx, weight, padding=1, reproducible=True,
                              output_mask=(False, True, True))
    grads = f("conv_backward")(gc, x, weight, padding=1, reproducible=True)
    cases["conv weight gradient, reproducible"] = (lazy.grad_weight, grads.grad_weight)
    cases["conv bias gradient, reproducible"] = (lazy.grad_bias, grads.grad_bias)
    ys = f("conv")(x, weight, stride=2)
    gs = rng.random(ys.shape).astype(dtype)
    cases["strided conv backward"] = (
        m("conv_backward")(da.from_array(gs, chunks=tuple(max(1, n // 2)
                                                          for n in gs.shape)),
                           dx, weight, stride=2).grad_input,
        f("conv_backward")(gs, x, weight, stride=2).grad_input)
    out = (2,) * rank
    ya, ia = f("adaptive_max_pool")(x, out, True)
    ga = rng.random(ya.shape).astype(dtype)
    by_channel = da.from_array(x, chunks=(1, 1) + x.shape[2:])
    cases["adaptive avg"] = (m("adaptive_avg_pool")(by_channel, out),
                             f("adaptive_avg_pool")(x, out))
    cases["adaptive max backward"] = (
        m("adaptive_max_pool_backward")(da.from_array(ga, chunks=(1, 1) + ga.shape[2:]),
                                        by_channel, out,
                                        indices=da.from_array(ia, chunks=(1, 1) + out)),
        f("adaptive_max_pool_backward")(ga, x, out, indices=ia))
    cases["adaptive stochastic"] = (m("adaptive_stochastic_pool")(by_channel, out, seed=seed),
                                    f("adaptive_stochastic_pool")(x, out, seed=seed))
    return cases


def test_on_a_local_cluster_every_function_matches_the_in_memory_call(cluster_client,
                                                                     rng):
    """Every function of every rank (float32 and float64 alternately; the synchronous
    tests above cover both per rank), computed by two worker processes (which compile
    or load their kernels themselves)."""
    cases = {}
    for rank, dtype in ((1, np.float32), (2, np.float64), (3, np.float32)):
        for name, case in _every_function(rank, dtype, rng).items():
            cases[f"{rank}-D {np.dtype(dtype).name} {name}"] = case
    computed = cluster_client.compute([lazy for lazy, _ in cases.values()], sync=True)
    for (name, (_, expected)), result in zip(cases.items(), computed):
        np.testing.assert_array_equal(result, expected, err_msg=name)
    pids = cluster_client.run(os.getpid)
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    # Both workers ran tasks.
    assert all(count > 0 for count in cluster_client.run(_tasks_run).values())


def _tasks_run(dask_worker):
    return dask_worker.state.executed_count


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
