"""Bad input to the public pooling functions (docs/design.md sections 1-3).

Every rule raises ``ValueError`` or ``TypeError`` whose message names the offending
parameter. Argument errors must be raised before any kernel runs: the ``no_kernels``
fixture replaces the CPU launchers with functions that fail the test if called. Errors
that only the kernel can see (out-of-range ``indices`` values, negative / NaN / inf
stochastic inputs) are checked without it, and the process must stay usable afterwards.

Only a few kernel geometries get compiled here (k = 2 or 3, stride 1 or 2, dilation 1
or 2); most tests never reach a kernel at all.
"""

import numpy as np
import pytest

import fastpool
import fastpool.cpu

SHAPE = (1, 2, 5, 5)

# Public functions with a uniform signature for the argument checks: the first
# positional argument is always the forward input ``x``; backward functions receive a
# dummy ``grad_output`` (every check below fires before grad_output is looked at).
_DUMMY_GRAD = np.zeros((1, 2, 2, 2))


def _max(x, *args, **kwargs):
    return fastpool.max_pool2d(x, *args, **kwargs)


def _max_backward(x, *args, **kwargs):
    return fastpool.max_pool2d_backward(_DUMMY_GRAD, x, *args, **kwargs)


def _avg(x, *args, **kwargs):
    return fastpool.avg_pool2d(x, *args, **kwargs)


def _avg_backward(x, *args, **kwargs):
    return fastpool.avg_pool2d_backward(_DUMMY_GRAD, x, *args, **kwargs)


def _stochastic(x, *args, **kwargs):
    return fastpool.stochastic_pool2d(x, *args, **kwargs)


def _stochastic_backward(x, *args, **kwargs):
    kwargs.setdefault("training", False)  # no indices needed
    return fastpool.stochastic_pool2d_backward(_DUMMY_GRAD, x, *args, **kwargs)


ALL_OPS = {
    "max_pool2d": _max,
    "max_pool2d_backward": _max_backward,
    "avg_pool2d": _avg,
    "avg_pool2d_backward": _avg_backward,
    "stochastic_pool2d": _stochastic,
    "stochastic_pool2d_backward": _stochastic_backward,
}
# The functions that take ``dilation``.
DILATED_OPS = {k: v for k, v in ALL_OPS.items() if not k.startswith("avg")}
AVG_OPS = {k: v for k, v in ALL_OPS.items() if k.startswith("avg")}

all_ops = pytest.mark.parametrize("op", list(ALL_OPS.values()), ids=list(ALL_OPS))
dilated_ops = pytest.mark.parametrize("op", list(DILATED_OPS.values()),
                                      ids=list(DILATED_OPS))
avg_ops = pytest.mark.parametrize("op", list(AVG_OPS.values()), ids=list(AVG_OPS))

_LAUNCHERS = ("max_pool_forward", "max_pool_backward", "avg_pool_forward",
              "avg_pool_backward", "stochastic_pool_forward",
              "stochastic_pool_backward")


@pytest.fixture
def no_kernels(monkeypatch):
    """Fail the test if any CPU launcher runs: validation must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the arguments were validated")

    for name in _LAUNCHERS:
        monkeypatch.setattr(fastpool.cpu, name, forbidden)


def _x(shape=SHAPE, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).random(shape).astype(dtype) + 0.5


# ----------------------------------------------------------------------------- x itself

@all_ops
@pytest.mark.parametrize("shape", [(5, 5), (1, 1, 2, 5, 5), (5,), ()],
                         ids=["2d", "5d", "1d", "0d"])
def test_wrong_ndim(no_kernels, op, shape):
    with pytest.raises(ValueError, match=r"\bx\b.*(3-D|4-D)"):
        op(np.ones(shape), 2)


@all_ops
@pytest.mark.parametrize("shape", [(1, 0, 5, 5), (1, 2, 0, 5), (1, 2, 5, 0),
                                   (0, 5, 5), (2, 0, 5), (2, 5, 0)],
                         ids=["C0", "H0", "W0", "C0-unbatched", "H0-unbatched",
                              "W0-unbatched"])
def test_zero_sizes(no_kernels, op, shape):
    with pytest.raises(ValueError, match=r"\bx\b.*(non-zero|empty)"):
        op(np.ones(shape), 2)


@all_ops
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.uint8, np.bool_,
                                   np.complex128])  # float16: test_half.py
def test_unsupported_dtype(no_kernels, op, dtype):
    with pytest.raises(TypeError, match=r"\bx\b.*dtype"):
        op(np.ones(SHAPE, dtype=dtype), 2)


# ----------------------------------------------------------------------------- batch 0

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batch_forward(dtype):
    x = np.ones((0, 2, 5, 5), dtype=dtype)
    expected = (0, 2, 2, 2)
    for y in (fastpool.max_pool2d(x, 2), fastpool.avg_pool2d(x, 2),
              fastpool.stochastic_pool2d(x, 2, seed=0),
              fastpool.stochastic_pool2d(x, 2, training=False)):
        assert isinstance(y, np.ndarray)
        assert y.shape == expected and y.dtype == dtype
    for y, indices in (fastpool.max_pool2d(x, 2, return_indices=True),
                       fastpool.stochastic_pool2d(x, 2, seed=0, return_indices=True)):
        assert y.shape == expected and y.dtype == dtype
        assert indices.shape == expected and indices.dtype == np.int64
    # With padding, stride and dilation the size rule still applies: (5+2-3)//1+1 = 5.
    y = fastpool.max_pool2d(x, 2, stride=1, padding=1, dilation=2)
    assert y.shape == (0, 2, 5, 5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batch_backward(dtype):
    x = np.ones((0, 2, 5, 5), dtype=dtype)
    grad = np.ones((0, 2, 2, 2), dtype=dtype)
    indices = np.zeros((0, 2, 2, 2), dtype=np.int64)
    for g in (fastpool.max_pool2d_backward(grad, x, 2),
              fastpool.max_pool2d_backward(grad, x, 2, indices=indices),
              fastpool.avg_pool2d_backward(grad, x, 2),
              fastpool.stochastic_pool2d_backward(grad, x, 2, indices=indices),
              fastpool.stochastic_pool2d_backward(grad, x, 2, training=False)):
        assert isinstance(g, np.ndarray)
        assert g.shape == x.shape and g.dtype == dtype


def test_empty_batch_still_validated(no_kernels):
    x = np.ones((0, 2, 5, 5))
    with pytest.raises(ValueError, match="kernel_size"):
        fastpool.max_pool2d(x, 7)
    with pytest.raises(ValueError, match="padding"):
        fastpool.avg_pool2d(x, 2, padding=2)
    with pytest.raises(ValueError, match="grad_output"):
        fastpool.avg_pool2d_backward(np.ones((1, 2, 2, 2)), x, 2)


# ----------------------------------------------------------------------------- geometry

@all_ops
@pytest.mark.parametrize("kernel_size", [0, -1, (0, 2), (2, 0), (-3, 3)])
def test_kernel_size_below_one(no_kernels, op, kernel_size):
    with pytest.raises(ValueError, match="kernel_size"):
        op(_x(), kernel_size)


@all_ops
@pytest.mark.parametrize("stride", [0, -1, (0, 1), (1, 0), (2, -2)])
def test_stride_below_one(no_kernels, op, stride):
    with pytest.raises(ValueError, match="stride"):
        op(_x(), 2, stride)


@dilated_ops
@pytest.mark.parametrize("dilation", [0, -1, (0, 1), (1, 0)])
def test_dilation_below_one(no_kernels, op, dilation):
    with pytest.raises(ValueError, match="dilation"):
        op(_x(), 2, 1, 0, dilation)


@all_ops
@pytest.mark.parametrize("kernel_size", [True, False, 2.0, 2.5, "2", None, (2, 2.0),
                                         (2, True), np.array([2, 2])],
                         ids=["True", "False", "2.0", "2.5", "str", "None", "pair-float",
                              "pair-bool", "ndarray"])
def test_kernel_size_wrong_type(no_kernels, op, kernel_size):
    with pytest.raises(TypeError, match="kernel_size"):
        op(_x(), kernel_size)


@all_ops
@pytest.mark.parametrize("kernel_size", [(2, 2, 2), (2,), ()], ids=["3-tuple", "1-tuple",
                                                                  "empty"])
def test_kernel_size_wrong_length(no_kernels, op, kernel_size):
    with pytest.raises(ValueError, match="kernel_size"):
        op(_x(), kernel_size)


@all_ops
@pytest.mark.parametrize("name", ["stride", "padding"])
@pytest.mark.parametrize("value", [True, 1.0, (1, 1.5), "1"],
                         ids=["bool", "float", "pair-float", "str"])
def test_stride_padding_wrong_type(no_kernels, op, name, value):
    with pytest.raises(TypeError, match=name):
        op(_x(), 2, **{name: value})


@all_ops
@pytest.mark.parametrize("name", ["stride", "padding"])
def test_stride_padding_wrong_length(no_kernels, op, name):
    with pytest.raises(ValueError, match=name):
        op(_x(), 2, **{name: (1, 1, 1)})


@dilated_ops
@pytest.mark.parametrize("value", [True, 2.0, (1, 2.0), None],
                         ids=["bool", "float", "pair-float", "None"])
def test_dilation_wrong_type(no_kernels, op, value):
    with pytest.raises(TypeError, match="dilation"):
        op(_x(), 2, dilation=value)


@dilated_ops
def test_dilation_wrong_length(no_kernels, op):
    with pytest.raises(ValueError, match="dilation"):
        op(_x(), 2, dilation=(1, 2, 1))


@all_ops
@pytest.mark.parametrize("padding", [-1, (0, -1), (-1, 0)])
def test_negative_padding(no_kernels, op, padding):
    with pytest.raises(ValueError, match="padding"):
        op(_x(), 2, padding=padding)


@all_ops
@pytest.mark.parametrize("kernel_size, padding", [(2, 2), (3, 2), (3, (0, 2)),
                                                  ((3, 2), (1, 2))])
def test_padding_over_half_kernel(no_kernels, op, kernel_size, padding):
    with pytest.raises(ValueError, match="padding"):
        op(_x(), kernel_size, 1, padding)


@dilated_ops
def test_dilated_padding_over_limit(no_kernels, op):
    # k=3, d=2: effective kernel 5, so padding may be 2 but not 3.
    with pytest.raises(ValueError, match="padding"):
        op(_x(), 3, 2, 3, 2)
    with pytest.raises(ValueError, match="padding"):
        op(_x(), 3, 2, (0, 3), 2)


def test_dilation_enlarges_padding_limit():
    """padding 2 with k=3, d=2 is legal for max and stochastic pooling."""
    x = _x()
    y, indices = fastpool.max_pool2d(x, 3, 2, 2, 2, return_indices=True)
    # out = (5 + 4 - 5) // 2 + 1 = 3
    assert y.shape == (1, 2, 3, 3)
    grad = fastpool.max_pool2d_backward(np.ones_like(y), x, 3, 2, 2, 2, indices=indices)
    assert grad.shape == x.shape
    y, indices = fastpool.stochastic_pool2d(x, 3, 2, 2, 2, seed=3, return_indices=True)
    assert y.shape == (1, 2, 3, 3)
    fastpool.stochastic_pool2d_backward(np.ones_like(y), x, 3, 2, 2, 2, indices=indices)
    fastpool.stochastic_pool2d(x, 3, 2, 2, 2, training=False)
    fastpool.stochastic_pool2d_backward(np.ones_like(y), x, 3, 2, 2, 2, training=False)


@avg_ops
def test_avg_padding_limit_has_no_dilation(no_kernels, op):
    # Average pooling has no dilation: k=3 allows padding 1 only.
    with pytest.raises(ValueError, match="padding"):
        op(_x(), 3, 2, 2)


@all_ops
@pytest.mark.parametrize("shape, kernel_size, padding",
                         [((1, 2, 2, 2), 3, 0), ((1, 2, 1, 5), 3, 0),
                          ((1, 2, 5, 2), (2, 3), 0), ((1, 1, 1, 1), 2, 0)])
def test_kernel_larger_than_padded_input(no_kernels, op, shape, kernel_size, padding):
    with pytest.raises(ValueError, match="kernel_size"):
        op(_x(shape), kernel_size, 1, padding)


@dilated_ops
def test_dilated_kernel_larger_than_input(no_kernels, op):
    # k=3, d=3: effective kernel 7 > 5.
    with pytest.raises(ValueError, match="kernel_size"):
        op(_x(), 3, 1, 0, 3)


@dilated_ops
@pytest.mark.parametrize("shape, kernel_size, padding, dilation",
                         [((1, 1, 1, 1), 2, 2, 3),
                          ((1, 1, 5, 1), (1, 2), (0, 2), (1, 3)),
                          ((1, 1, 1, 5), (2, 1), (2, 0), (3, 1))])
def test_dilated_window_entirely_in_padding(no_kernels, op, shape, kernel_size, padding,
                                            dilation):
    # H=W=1, k=2, d=3, p=2: out = 1, the window's taps sit at -2 and 1, both padding.
    with pytest.raises(ValueError, match="dilation"):
        op(_x(shape), kernel_size, None, padding, dilation)


@all_ops
@pytest.mark.parametrize("ceil_mode", [1, 0, "yes", None, 1.0])
def test_ceil_mode_not_bool(no_kernels, op, ceil_mode):
    with pytest.raises(TypeError, match="ceil_mode"):
        op(_x(), 2, ceil_mode=ceil_mode)


# ----------------------------------------------------------------------------- average

@avg_ops
def test_divisor_override_zero(no_kernels, op):
    with pytest.raises(ValueError, match="divisor_override"):
        op(_x(), 2, divisor_override=0)


@avg_ops
@pytest.mark.parametrize("divisor", [2.5, 2.0, True, "2"])
def test_divisor_override_wrong_type(no_kernels, op, divisor):
    with pytest.raises(TypeError, match="divisor_override"):
        op(_x(), 2, divisor_override=divisor)


@avg_ops
@pytest.mark.parametrize("value", [1, 0, None, "True"])
def test_count_include_pad_not_bool(no_kernels, op, value):
    with pytest.raises(TypeError, match="count_include_pad"):
        op(_x(), 2, count_include_pad=value)


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("fn", [fastpool.max_pool2d, fastpool.stochastic_pool2d])
@pytest.mark.parametrize("value", [1, None, "yes"])
def test_return_indices_not_bool(no_kernels, fn, value):
    with pytest.raises(TypeError, match="return_indices"):
        fn(_x(), 2, return_indices=value)


@pytest.mark.parametrize("fn", [_stochastic, _stochastic_backward])
@pytest.mark.parametrize("value", [1, None, "no"])
def test_training_not_bool(no_kernels, fn, value):
    with pytest.raises(TypeError, match="training"):
        fn(_x(), 2, training=value)


# ----------------------------------------------------------------------------- grad_output

# Backward calls with a well-formed x = (1, 2, 5, 5) float64, k=2 (output (1, 2, 2, 2)).
BACKWARDS = {
    "max_pool2d_backward": lambda g, x: fastpool.max_pool2d_backward(g, x, 2),
    "max_pool2d_backward-indices": lambda g, x: fastpool.max_pool2d_backward(
        g, x, 2, indices=np.zeros((1, 2, 2, 2), dtype=np.int64)),
    "avg_pool2d_backward": lambda g, x: fastpool.avg_pool2d_backward(g, x, 2),
    "stochastic_pool2d_backward-train": lambda g, x: fastpool.stochastic_pool2d_backward(
        g, x, 2, indices=np.zeros((1, 2, 2, 2), dtype=np.int64)),
    "stochastic_pool2d_backward-infer": lambda g, x: fastpool.stochastic_pool2d_backward(
        g, x, 2, training=False),
}
backwards = pytest.mark.parametrize("backward", list(BACKWARDS.values()),
                                    ids=list(BACKWARDS))


@backwards
@pytest.mark.parametrize("shape", [(1, 2, 3, 3), (1, 2, 2), (2, 2, 2), (1, 2, 2, 2, 1),
                                   (1, 1, 2, 2), (2, 2, 2, 2), (1, 2, 5, 5)])
def test_grad_output_wrong_shape(no_kernels, backward, shape):
    with pytest.raises(ValueError, match="grad_output"):
        backward(np.ones(shape), _x())


@backwards
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.float16, np.bool_])
def test_grad_output_wrong_dtype(no_kernels, backward, dtype):
    with pytest.raises(TypeError, match="grad_output"):
        backward(np.ones((1, 2, 2, 2), dtype=dtype), _x())


def test_grad_output_float64_with_float32_x(no_kernels):
    x32 = _x(dtype=np.float32)
    with pytest.raises(TypeError, match="grad_output"):
        fastpool.avg_pool2d_backward(np.ones((1, 2, 2, 2)), x32, 2)


def test_unbatched_grad_output_must_be_unbatched(no_kernels):
    x = _x((2, 5, 5))
    with pytest.raises(ValueError, match="grad_output"):
        fastpool.avg_pool2d_backward(np.ones((1, 2, 2, 2)), x, 2)


# ----------------------------------------------------------------------------- indices

INDEXED_BACKWARDS = {
    "max_pool2d_backward": lambda i, x: fastpool.max_pool2d_backward(
        np.ones((1, 2, 2, 2)), x, 2, indices=i),
    "stochastic_pool2d_backward": lambda i, x: fastpool.stochastic_pool2d_backward(
        np.ones((1, 2, 2, 2)), x, 2, indices=i),
}
indexed_backwards = pytest.mark.parametrize(
    "backward", list(INDEXED_BACKWARDS.values()), ids=list(INDEXED_BACKWARDS))


@indexed_backwards
@pytest.mark.parametrize("shape", [(1, 2, 3, 3), (1, 2, 2), (2, 2, 2, 2), (1, 2, 4)])
def test_indices_wrong_shape(no_kernels, backward, shape):
    with pytest.raises(ValueError, match="indices"):
        backward(np.zeros(shape, dtype=np.int64), _x())


@indexed_backwards
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.bool_])
def test_indices_not_integer(no_kernels, backward, dtype):
    with pytest.raises(TypeError, match="indices"):
        backward(np.zeros((1, 2, 2, 2), dtype=dtype), _x())


@indexed_backwards
@pytest.mark.parametrize("bad", [-1, 25, 26, 2**31, 2**62, -2**63],
                         ids=["-1", "H*W", "H*W+1", "2^31", "2^62", "-2^63"])
def test_indices_out_of_range(backward, bad):
    x = _x()
    indices = np.zeros((1, 2, 2, 2), dtype=np.int64)
    indices[0, 1, 1, 0] = bad
    with pytest.raises(ValueError, match="indices"):
        backward(indices, x)
    # Nothing was corrupted: in-range indices still work afterwards.
    indices[0, 1, 1, 0] = 24
    grad = backward(indices, x)
    assert grad.shape == x.shape
    assert grad[0, 1, 4, 4] == 1.0 and grad[0, 0, 0, 0] == 4.0
    assert grad.sum() == 8.0


@indexed_backwards
def test_indices_out_of_range_everywhere(backward):
    x = _x()
    for indices in (np.full((1, 2, 2, 2), -5, dtype=np.int64),
                    np.full((1, 2, 2, 2), 10**6, dtype=np.int64),
                    np.full((1, 2, 2, 2), 2**63, dtype=np.uint64),  # wraps if cast
                    np.full((1, 2, 2, 2), -1, dtype=np.int32)):
        with pytest.raises(ValueError, match="indices"):
            backward(indices, x)


def _channels_last(a):
    """``a`` (N, C, *spatial) with channels-last strides, the same values."""
    order = (0,) + tuple(range(2, a.ndim)) + (1,)
    back = (0, a.ndim - 1) + tuple(range(1, a.ndim - 1))
    return np.ascontiguousarray(a.transpose(order)).transpose(back)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("bad", [-1, "size", "size+1", 2**40, "int32 -1"])
def test_channels_last_indices_out_of_range(rank, bad):
    """The channels-last scatters and gathers (max and stochastic training backward,
    unpooling and its backward) reject an index outside the volume as the
    channels-first ones do, and are not left corrupted."""
    size = 4 ** rank
    x = _channels_last(_x((1, 3) + (4,) * rank))
    suffix = f"{rank}d"
    out, indices = getattr(fastpool, f"max_pool{suffix}")(x, 2, return_indices=True)
    assert indices.strides[1] < indices.strides[-1]  # the channels-last path runs
    wrong = indices.copy(order="K")
    value = {"size": size, "size+1": size + 1, "int32 -1": -1}.get(bad, bad)
    wrong[(0, 1) + (1,) * rank] = value
    if bad == "int32 -1":
        wrong = wrong.astype(np.int32)
    g = _x(out.shape, seed=1)

    def calls(x, out, g):
        return (
            lambda i: getattr(fastpool, f"max_pool{suffix}_backward")(g, x, 2, indices=i),
            lambda i: getattr(fastpool, f"stochastic_pool{suffix}_backward")(
                g, x, 2, indices=i),
            lambda i: getattr(fastpool, f"max_unpool{suffix}")(out, i, 2),
            lambda i: getattr(fastpool, f"max_unpool{suffix}_backward")(x, out, i, 2),
        )

    firsts = calls(*(np.ascontiguousarray(a) for a in (x, out, g)))
    for backward, first in zip(calls(x, _channels_last(out), _channels_last(g)), firsts):
        with pytest.raises(ValueError, match="indices|outside"):
            backward(wrong)
        # in-range indices still work afterwards, with the channels-first values
        result = backward(indices)
        assert result.strides[1] < result.strides[-1]
        assert np.array_equal(result, first(np.ascontiguousarray(indices)))


def test_indices_unbatched_out_of_range():
    x = _x((2, 5, 5))
    indices = np.zeros((2, 2, 2), dtype=np.int64)
    indices[1, 0, 0] = 25
    with pytest.raises(ValueError, match="indices"):
        fastpool.max_pool2d_backward(np.ones((2, 2, 2)), x, 2, indices=indices)


# ----------------------------------------------------------------------------- stochastic

# k=3, s=2, p=1 on 5x5: output 3x3; window (1, 1) covers rows/cols 1..3 entirely inside
# the input (the kernels' fast interior path), window (0, 0) touches the padding.
_INTERIOR, _BORDER = (2, 2), (0, 0)


def _stochastic_calls():
    kw = dict(kernel_size=3, stride=2, padding=1)
    grad = np.ones((1, 2, 3, 3))
    return {
        "train": lambda x: fastpool.stochastic_pool2d(x, seed=1, **kw),
        "train-indices": lambda x: fastpool.stochastic_pool2d(
            x, seed=1, return_indices=True, **kw),
        "infer": lambda x: fastpool.stochastic_pool2d(x, training=False, **kw),
        "infer-backward": lambda x: fastpool.stochastic_pool2d_backward(
            grad.astype(x.dtype), x, training=False, **kw),
    }


@pytest.mark.parametrize("call", list(_stochastic_calls()))
@pytest.mark.parametrize("value", [-1.0, -1e-30, np.nan, np.inf, -np.inf],
                         ids=["-1", "tiny-negative", "nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [_INTERIOR, _BORDER], ids=["interior", "border"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stochastic_rejects_invalid_values(call, value, where, dtype):
    x = _x(dtype=dtype)
    x[0, 1][where] = value
    with pytest.raises(ValueError, match=r"non-negative.*\bx\b|\bx\b.*negative"):
        _stochastic_calls()[call](x)
    # The process is fine afterwards.
    x[0, 1][where] = 0.25
    _stochastic_calls()[call](x)


def test_stochastic_accepts_zeros_and_negative_zero():
    x = _x()
    x[0, 0] = 0.0
    x[0, 1, 2, 2] = -0.0
    y = fastpool.stochastic_pool2d(x, 3, 2, 1, seed=0)
    assert np.all(y[0, 0] == 0)
    fastpool.stochastic_pool2d(x, 3, 2, 1, training=False)


def test_return_indices_needs_training(no_kernels):
    with pytest.raises(ValueError, match="return_indices"):
        fastpool.stochastic_pool2d(_x(), 2, training=False, return_indices=True)


def test_backward_training_needs_indices(no_kernels):
    with pytest.raises(ValueError, match="indices"):
        fastpool.stochastic_pool2d_backward(np.ones((1, 2, 2, 2)), _x(), 2)
    with pytest.raises(ValueError, match="indices"):
        fastpool.stochastic_pool2d_backward(np.ones((1, 2, 2, 2)), _x(), 2, training=True,
                                            indices=None)


def test_backward_inference_rejects_indices(no_kernels):
    with pytest.raises(ValueError, match="indices"):
        fastpool.stochastic_pool2d_backward(np.ones((1, 2, 2, 2)), _x(), 2, training=False,
                                            indices=np.zeros((1, 2, 2, 2), np.int64))


@pytest.mark.parametrize("seed", [-1, 2**64, 2**70, -2**63])
def test_seed_out_of_range(no_kernels, seed):
    with pytest.raises(ValueError, match="seed"):
        fastpool.stochastic_pool2d(_x(), 2, seed=seed)


@pytest.mark.parametrize("seed", [1.0, 1.5, "1", True, b"1", [1], np.float64(3)],
                         ids=["1.0", "1.5", "str", "bool", "bytes", "list", "np.float64"])
def test_seed_wrong_type(no_kernels, seed):
    with pytest.raises(TypeError, match="seed"):
        fastpool.stochastic_pool2d(_x(), 2, seed=seed)


@pytest.mark.parametrize("seed", [0, 2**64 - 1, np.uint64(2**64 - 1), np.int32(7)],
                         ids=["0", "2^64-1", "np.uint64-max", "np.int32"])
def test_seed_edges_accepted(seed):
    x = _x()
    a = fastpool.stochastic_pool2d(x, 3, 2, 1, seed=seed)
    b = fastpool.stochastic_pool2d(x, 3, 2, 1, seed=seed)
    np.testing.assert_array_equal(a, b)


def test_seed_generator_works_and_advances():
    x = _x()
    gen = np.random.default_rng(123)
    state = gen.bit_generator.state
    y1, i1 = fastpool.stochastic_pool2d(x, 3, 2, 1, seed=gen, return_indices=True)
    assert gen.bit_generator.state != state, "the Generator was not advanced"
    state = gen.bit_generator.state
    y2, i2 = fastpool.stochastic_pool2d(x, 3, 2, 1, seed=gen, return_indices=True)
    assert gen.bit_generator.state != state
    # 18 windows of 4-9 positive elements: two different keys agree everywhere only
    # with negligible probability.
    assert not np.array_equal(i1, i2)
    # A Generator in the same state gives the same choices.
    twin = np.random.default_rng(123)
    y1b, i1b = fastpool.stochastic_pool2d(x, 3, 2, 1, seed=twin, return_indices=True)
    np.testing.assert_array_equal(i1, i1b)
    np.testing.assert_array_equal(y1, y1b)
    # The outputs are the chosen input elements.
    assert np.all(np.take_along_axis(x.reshape(1, 2, -1), i1.reshape(1, 2, -1),
                                     axis=2).reshape(i1.shape) == y1)


# ----------------------------------------------------------------------------- found later

@pytest.mark.parametrize("call", [
    lambda x: fastpool.max_pool2d(x, 1, stride=2**70),
    lambda x: fastpool.max_pool2d(x, 2, dilation=2**70),
    lambda x: fastpool.avg_pool2d(x, 2, divisor_override=2**70),
    lambda x: fastpool.stochastic_pool2d(x, (2, 2**63)),
])
def test_integers_beyond_int64_are_rejected_clearly(call):
    with pytest.raises(ValueError, match="2\\*\\*62"):
        call(np.ones((1, 2, 5, 5)))


@pytest.mark.parametrize("corner", [(2, 2), (0, 0)], ids=["interior", "border"])
def test_stochastic_window_sum_overflow_is_rejected_in_training(corner):
    # Finite values whose window sum overflows float64: the same error on both kernel
    # paths in training, whose threshold is u * sum. Inference sums such windows
    # again, scaled (fastpool._stochastic_sums): 1e308 out, as from any pair of equal
    # values; so are pairs of 1e200, whose squares overflow.
    x = np.zeros((1, 1, 5, 5))
    h, w = corner
    for value in (1e308, 1e200):
        x[0, 0, h, w] = x[0, 0, h, w + 1] = value
        if value == 1e308:
            with pytest.raises(ValueError, match="overflows"):
                fastpool.stochastic_pool2d(x, 3, 2, 1, seed=0)
        else:
            fastpool.stochastic_pool2d(x, 3, 2, 1, seed=0)
        y = fastpool.stochastic_pool2d(x, 3, 2, 1, training=False)
        assert np.count_nonzero(y) == 2  # one window holds both values, one window one
        np.testing.assert_allclose(y[y > 0], value, rtol=1e-15)


def test_stochastic_seed_is_validated_in_inference_too():
    with pytest.raises(ValueError, match="seed"):
        fastpool.stochastic_pool2d(np.ones((1, 2, 5, 5)), 2, training=False, seed=-1)


# ----------------------------------------------------------------------------- conv2d

_CONV_LAUNCHERS = ("conv2d_forward", "conv2d_backward")


@pytest.fixture
def no_conv_kernels(monkeypatch):
    """Fail the test if a CPU conv launcher runs: validation must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the arguments were validated")

    for name in _CONV_LAUNCHERS:
        monkeypatch.setattr(fastpool.cpu, name, forbidden)


def _conv(x, weight, bias=None, **kwargs):
    return fastpool.conv2d(x, weight, bias, **kwargs)


def _conv_backward(x, weight, bias=None, **kwargs):
    # grad_output is only checked after the arguments it depends on.
    if bias is not None:
        raise pytest.skip.Exception("conv2d_backward takes no bias")
    return fastpool.conv2d_backward(np.zeros((1, 4, 3, 3)), x, weight, **kwargs)


conv_ops = pytest.mark.parametrize("op", [_conv, _conv_backward],
                                   ids=["conv2d", "conv2d_backward"])
X_CONV = np.ones((1, 4, 5, 5))
W_CONV = np.ones((4, 2, 3, 3))


@conv_ops
@pytest.mark.parametrize("shape", [(5, 5), (1, 1, 4, 5, 5), ()])
def test_conv_x_wrong_ndim(no_conv_kernels, op, shape):
    with pytest.raises(ValueError, match=r"\bx\b.*(3-D|4-D)"):
        op(np.ones(shape), W_CONV)


@conv_ops
@pytest.mark.parametrize("shape", [(1, 0, 5, 5), (1, 4, 0, 5), (4, 5, 0)])
def test_conv_x_zero_sizes(no_conv_kernels, op, shape):
    with pytest.raises(ValueError, match=r"\bx\b.*non-zero"):
        op(np.ones(shape), W_CONV)


@conv_ops
@pytest.mark.parametrize("dtype", [np.int64, np.float16, np.complex64, np.bool_])
def test_conv_unsupported_dtype(no_conv_kernels, op, dtype):
    with pytest.raises(TypeError, match=r"\bx\b.*dtype"):
        op(X_CONV.astype(dtype), W_CONV)
    with pytest.raises(TypeError, match=r"\bweight\b.*dtype"):
        op(X_CONV, W_CONV.astype(dtype))


@conv_ops
def test_conv_weight_dtype_must_match_x(no_conv_kernels, op):
    with pytest.raises(TypeError, match=r"\bweight\b.*float32.*float64"):
        op(X_CONV, W_CONV.astype(np.float32))


def test_conv_bias_dtype_and_shape(no_conv_kernels):
    with pytest.raises(TypeError, match=r"\bbias\b.*dtype"):
        fastpool.conv2d(X_CONV, W_CONV, np.ones(4, np.float32), groups=2)
    with pytest.raises(TypeError, match=r"\bbias\b.*dtype"):
        fastpool.conv2d(X_CONV, W_CONV, np.ones(4, np.int64), groups=2)
    for shape in [(3,), (4, 1), (), (1, 4)]:
        with pytest.raises(ValueError, match=r"\bbias\b.*\(4,\)"):
            fastpool.conv2d(X_CONV, W_CONV, np.ones(shape), groups=2)


@conv_ops
@pytest.mark.parametrize("shape", [(4, 2, 3), (4, 2, 3, 3, 1), (4,)])
def test_conv_weight_wrong_ndim(no_conv_kernels, op, shape):
    with pytest.raises(ValueError, match=r"\bweight\b.*4-D"):
        op(X_CONV, np.ones(shape), groups=2)


@conv_ops
@pytest.mark.parametrize("shape", [(0, 2, 3, 3), (4, 2, 0, 3), (4, 2, 3, 0)])
def test_conv_weight_zero_sizes(no_conv_kernels, op, shape):
    with pytest.raises(ValueError, match=r"\bweight\b.*non-zero"):
        op(X_CONV, np.ones(shape), groups=2)


@conv_ops
@pytest.mark.parametrize("groups, weight_shape", [
    (3, (3, 1, 3, 3)),   # 3 does not divide C_in = 4
    (2, (3, 2, 3, 3)),   # 2 does not divide C_out = 3
    (4, (6, 1, 3, 3)),   # 4 does not divide C_out = 6
])
def test_conv_groups_must_divide_channels(no_conv_kernels, op, groups, weight_shape):
    with pytest.raises(ValueError, match=r"groups=\d+ must divide"):
        op(X_CONV, np.ones(weight_shape), groups=groups)


@conv_ops
@pytest.mark.parametrize("groups, weight_shape", [(1, (4, 2, 3, 3)), (2, (4, 4, 3, 3)),
                                                  (4, (4, 2, 3, 3))])
def test_conv_weight_channels_must_match_groups(no_conv_kernels, op, groups, weight_shape):
    with pytest.raises(ValueError, match=r"\bweight\b.*in_channels // groups"):
        op(X_CONV, np.ones(weight_shape), groups=groups)


@conv_ops
@pytest.mark.parametrize("groups", [0, -1])
def test_conv_groups_below_one(no_conv_kernels, op, groups):
    with pytest.raises(ValueError, match=r"groups must be >= 1"):
        op(X_CONV, W_CONV, groups=groups)


@conv_ops
@pytest.mark.parametrize("name, value", [("groups", 2.0), ("groups", True),
                                         ("stride", 1.5), ("stride", (1, "2")),
                                         ("dilation", None), ("padding", 1.0),
                                         ("padding", (1, True))])
def test_conv_integer_arguments_wrong_type(no_conv_kernels, op, name, value):
    kwargs = dict(groups=2)
    kwargs[name] = value
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        op(X_CONV, W_CONV, **kwargs)


@conv_ops
@pytest.mark.parametrize("name", ["stride", "dilation", "padding"])
def test_conv_pair_wrong_length(no_conv_kernels, op, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b.*pair"):
        op(X_CONV, W_CONV, groups=2, **{name: (1, 1, 1)})


@conv_ops
@pytest.mark.parametrize("name, value", [("stride", 0), ("stride", (1, -1)),
                                         ("dilation", 0), ("dilation", (0, 1))])
def test_conv_stride_dilation_below_one(no_conv_kernels, op, name, value):
    with pytest.raises(ValueError, match=rf"\b{name}\b must be >= 1"):
        op(X_CONV, W_CONV, groups=2, **{name: value})


@conv_ops
@pytest.mark.parametrize("padding", [-1, (0, -2)])
def test_conv_negative_padding(no_conv_kernels, op, padding):
    with pytest.raises(ValueError, match=r"\bpadding\b must be >= 0"):
        op(X_CONV, W_CONV, groups=2, padding=padding)


@conv_ops
@pytest.mark.parametrize("padding", ["SAME", "full", "", "same "])
def test_conv_bad_padding_string(no_conv_kernels, op, padding):
    with pytest.raises(ValueError, match=r"\bpadding\b.*'valid' or 'same'"):
        op(X_CONV, W_CONV, groups=2, padding=padding)


@conv_ops
@pytest.mark.parametrize("stride", [2, (1, 2), (2, 1)])
def test_conv_same_padding_needs_stride_one(no_conv_kernels, op, stride):
    with pytest.raises(ValueError, match=r"padding='same'.*stride 1"):
        op(X_CONV, W_CONV, groups=2, padding="same", stride=stride)


@conv_ops
@pytest.mark.parametrize("weight_shape, kwargs", [
    ((4, 2, 6, 3), {}),                                 # kH 6 > H 5
    ((4, 2, 3, 8), dict(padding=1)),                    # kW 8 > W 5 + 2
    ((4, 2, 3, 3), dict(dilation=3)),                   # effective 7 > 5
    ((4, 2, 3, 3), dict(dilation=(1, 4), padding="valid")),
])
def test_conv_kernel_larger_than_padded_input(no_conv_kernels, op, weight_shape, kwargs):
    with pytest.raises(ValueError, match=r"kernel size.*larger than the padded input"):
        op(X_CONV, np.ones(weight_shape), groups=2, **kwargs)


def test_conv_integers_beyond_int64_are_rejected_clearly(no_conv_kernels):
    for kwargs in (dict(stride=2**70, groups=2), dict(padding=2**63, groups=2),
                   dict(groups=2**64)):
        with pytest.raises(ValueError, match=r"2\*\*62"):
            fastpool.conv2d(X_CONV, W_CONV, **kwargs)


@pytest.mark.parametrize("shape", [(1, 4, 3, 4), (1, 3, 3, 3), (2, 4, 3, 3), (4, 3, 3)])
def test_conv_grad_output_wrong_shape(no_conv_kernels, shape):
    with pytest.raises(ValueError, match=r"grad_output.*\(1, 4, 3, 3\)"):
        fastpool.conv2d_backward(np.zeros(shape), X_CONV, W_CONV, groups=2)


def test_conv_grad_output_wrong_dtype(no_conv_kernels):
    with pytest.raises(TypeError, match=r"grad_output dtype"):
        fastpool.conv2d_backward(np.zeros((1, 4, 3, 3), np.float32), X_CONV, W_CONV,
                                 groups=2)
    with pytest.raises(TypeError, match=r"grad_output.*dtype"):
        fastpool.conv2d_backward(np.zeros((1, 4, 3, 3), np.int32), X_CONV, W_CONV,
                                 groups=2)


@pytest.mark.parametrize("mask", [(True, True), (True, True, True, True), True,
                                  (1, 1, 1), (True, None, False), "TTT"])
def test_conv_output_mask_must_be_three_bools(no_conv_kernels, mask):
    with pytest.raises(TypeError, match=r"output_mask"):
        fastpool.conv2d_backward(np.zeros((1, 4, 3, 3)), X_CONV, W_CONV, groups=2,
                                 output_mask=mask)


def test_conv_device_checked_before_kernels(no_conv_kernels):
    with pytest.raises(ValueError, match="device"):
        fastpool.conv2d(X_CONV, W_CONV, groups=2, device="tpu")


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("name", ["conv", "conv_transpose"])
def test_conv_backward_called_like_the_forward_says_what_it_takes(no_conv_kernels, name,
                                                                  rank):
    """``conv2d_backward(g, x, w, b, padding=1)``: the bias lands on ``stride``; the
    error names the backward's arguments rather than calling the bias a bad stride."""
    x, w = np.ones((1, 4) + (5,) * rank), np.ones((4, 4) + (3,) * rank)
    backward = getattr(fastpool, f"{name}{rank}d_backward")
    with pytest.raises(TypeError, match=rf"{name}{rank}d_backward\(grad_output, x, "
                                        rf"weight, stride.*takes no bias.*\(4,\)"):
        backward(np.ones((1, 4) + (3,) * rank), x, w, np.ones(4), padding=1)


def test_return_indices_is_positional_in_every_pooling_function():
    """After the geometry, as PyTorch places it (and as ``fastpool.torch`` does)."""
    import inspect
    names = [f"{mode}_pool{r}d" for mode in ("max", "stochastic", "adaptive_max",
                                             "adaptive_stochastic") for r in (1, 2, 3)]
    for name in names:
        parameter = inspect.signature(getattr(fastpool, name)).parameters["return_indices"]
        assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
    x = np.random.default_rng(0).random((1, 2, 4, 4))
    y, picks = fastpool.stochastic_pool2d(x, 2, 2, 0, 1, False, True, seed=3)
    assert np.array_equal(picks, fastpool.stochastic_pool2d(x, 2, seed=3,
                                                            return_indices=True)[1])
