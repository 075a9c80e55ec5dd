"""Max unpooling, ranks 1-3, both memory formats, both devices: against the loop
references, PyTorch, and CPU against the GPU kernels (the simulator here)."""

import numpy as np
import pytest

import fastpool
import reference as ref
from conftest import DTYPES, assert_close
from strategies import distinct_values

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
SHAPES = {1: (2, 3, 12), 2: (2, 3, 7, 8), 3: (2, 3, 4, 6, 5)}
POOLS = {1: dict(kernel_size=3, stride=2, padding=1), 2: dict(kernel_size=2),
         3: dict(kernel_size=(2, 3, 2), stride=(1, 2, 2), padding=(0, 1, 0))}


def channels_last(a):
    axis = 1 if a.ndim >= 3 else 0
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, axis, -1)), -1, axis)


def _pooled(rank, dtype, seed=0):
    """``(x, y, indices)`` of a max pooling to unpool."""
    x = distinct_values(np.random.default_rng(seed + rank), SHAPES[rank], dtype)
    y, indices = getattr(fastpool, f"max_pool{rank}d")(x, **POOLS[rank],
                                                        return_indices=True)
    return x, y, indices


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["first", "last"])
def test_max_unpool_matches_reference_and_torch(rank, dtype, layout):
    x, y, indices = _pooled(rank, dtype)
    unpool = getattr(fastpool, f"max_unpool{rank}d")
    backward = getattr(fastpool, f"max_unpool{rank}d_backward")
    args = POOLS[rank]
    out_size = ref.unpool_output_size(y.shape[2:], **args)
    yin, iin = (channels_last(y), channels_last(indices)) if layout == "last" else (y, indices)
    if indices.max() >= np.prod(out_size):  # the pool's padding cut the default size
        out_size = x.shape[2:]
        args = dict(args, output_size=out_size)
    u = unpool(yin, iin, **args)
    np.testing.assert_array_equal(u, ref.max_unpool(y, indices, out_size).astype(dtype))
    if layout == "last":
        assert np.moveaxis(u, 1, -1).flags.c_contiguous
    g = np.random.default_rng(rank).standard_normal(u.shape).astype(dtype)
    gi = backward(channels_last(g) if layout == "last" else g, yin, iin, **args)
    np.testing.assert_array_equal(gi, ref.max_unpool_backward(g, indices).astype(dtype))
    # with an explicit output size (the pooled input's), as after an odd-sized pool
    args = POOLS[rank]
    sized = unpool(yin, iin, **args, output_size=x.shape[2:])
    assert sized.shape == x.shape
    np.testing.assert_array_equal(sized, ref.max_unpool(y, indices, x.shape[2:]).astype(dtype))
    if torch is not None:
        yt = torch.from_numpy(y.copy()).requires_grad_()
        ut = getattr(F, f"max_unpool{rank}d")(yt, torch.from_numpy(indices), **args,
                                               output_size=x.shape[2:])
        np.testing.assert_array_equal(sized, ut.detach().numpy())
        gs = np.random.default_rng(9).standard_normal(x.shape).astype(dtype)
        ut.backward(torch.from_numpy(gs))
        assert_close(backward(gs, y, indices, **args, output_size=x.shape[2:]),
                     yt.grad.numpy(), dtype)


def test_repeated_indices_keep_the_last_input_on_both_devices(small_launches):
    x = np.arange(1, 9, dtype=np.float32).reshape(1, 2, 4)
    indices = np.array([[[3, 1, 3, 0], [2, 2, 2, 2]]], np.int64)
    for device in ("cpu", "cuda"):
        y = fastpool.max_unpool1d(x, indices, 2, device=device)
        np.testing.assert_array_equal(y, [[[4, 2, 0, 3, 0, 0, 0, 0], [0, 0, 8, 0, 0, 0, 0, 0]]])


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_gpu_kernels_match_cpu(rank, layout, small_launches):
    for dtype in DTYPES:
        x, y, indices = _pooled(rank, dtype, seed=5)
        if layout == "last":
            y, indices = channels_last(y), channels_last(indices)
        args = dict(POOLS[rank], output_size=x.shape[2:])
        unpool = getattr(fastpool, f"max_unpool{rank}d")
        backward = getattr(fastpool, f"max_unpool{rank}d_backward")
        cpu, gpu = unpool(y, indices, **args, device="cpu"), unpool(y, indices, **args,
                                                                     device="cuda")
        np.testing.assert_array_equal(gpu, cpu)
        assert [s for s, n in zip(gpu.strides, gpu.shape) if n > 1] == [
            s for s, n in zip(cpu.strides, cpu.shape) if n > 1]
        g = np.cos(np.arange(cpu.size, dtype=dtype)).reshape(cpu.shape)
        g = channels_last(g) if layout == "last" else g
        np.testing.assert_array_equal(backward(g, y, indices, **args, device="cuda"),
                                      backward(g, y, indices, **args, device="cpu"))


def test_bad_input_names_the_argument(small_launches):
    y = np.ones((1, 2, 3, 3), np.float32)
    indices = np.zeros((1, 2, 3, 3), np.int64)
    with pytest.raises(ValueError, match="indices must have x's shape"):
        fastpool.max_unpool2d(y, indices[..., :2], 2)
    with pytest.raises(TypeError, match="indices must be an integer array"):
        fastpool.max_unpool2d(y, indices.astype(np.float32), 2)
    with pytest.raises(ValueError, match="output_size"):
        fastpool.max_unpool2d(y, indices, 2, output_size=(9, 9))
    with pytest.raises(ValueError, match="kernel_size and stride"):
        fastpool.max_unpool2d(y, indices, 0)
    with pytest.raises(ValueError, match="grad_output"):
        fastpool.max_unpool2d_backward(np.ones((1, 2, 5, 5), np.float32), y, indices, 2)
    for device in ("cpu", "cuda"):
        for bad in (-1, 36, 2**40):
            wrong = indices.copy()
            wrong[0, 1, 2, 2] = bad
            with pytest.raises(ValueError, match="outside"):
                fastpool.max_unpool2d(y, wrong, 2, device=device)
            with pytest.raises(ValueError, match="outside"):
                fastpool.max_unpool2d_backward(np.ones((1, 2, 6, 6), np.float32), y,
                                               wrong, 2, device=device)
