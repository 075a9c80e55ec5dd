"""Hypothesis strategies for valid pooling and convolution cases."""

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from conftest import DTYPES, GEOMETRIES, dtypes_for
from reference import conv_padding, pair, pool_output_size


@st.composite
def pool_cases(draw, dilated=True, min_hw=1, max_hw=9):
    """A valid case: dict of input shape, dtype and the forward's geometry arguments."""
    index = draw(st.integers(0, len(GEOMETRIES) - 1))
    kernel, stride, dilation = GEOMETRIES[index]
    if not dilated:
        dilation = 1
    kh, kw = pair(kernel)
    dh, dw = pair(dilation)
    sh, sw = pair(kernel if stride is None else stride)
    ekh, ekw = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    ph = draw(st.integers(0, ekh // 2))
    pw = draw(st.integers(0, ekw // 2))
    ceil_mode = draw(st.booleans())
    h = draw(st.integers(max(min_hw, ekh - 2 * ph), max_hw + ekh))
    w = draw(st.integers(max(min_hw, ekw - 2 * pw), max_hw + ekw))
    if (pool_output_size(h, kh, sh, ph, dh, ceil_mode) < 1
            or pool_output_size(w, kw, sw, pw, dw, ceil_mode) < 1):
        h, w = h + ekh, w + ekw
    assume(_every_window_covers_input(h, kh, sh, ph, dh, ceil_mode)
           and _every_window_covers_input(w, kw, sw, pw, dw, ceil_mode))
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(dtypes_for(index)))
    padding = draw(st.sampled_from([(ph, pw), ph])) if ph == pw else (ph, pw)
    args = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode)
    if dilated:
        args["dilation"] = dilation
    return dict(shape=(n, c, h, w), dtype=dtype, args=args)


def distinct_values(rng, shape, dtype):
    """Values without ties (a permutation), so argmax is unique."""
    size = int(np.prod(shape))
    return (rng.permutation(size).reshape(shape) / size - 0.5).astype(dtype)


def _every_window_covers_input(size, k, s, p, d, ceil_mode):
    """Dilated windows can fall wholly into padding; fastpool rejects those inputs."""
    out = pool_output_size(size, k, s, p, d, ceil_mode)
    return all(any(0 <= o * s - p + i * d < size for i in range(k)) for o in range(out))


@st.composite
def conv_cases(draw, max_hw=7):
    """A valid conv2d case: shapes, dtype, bias flag and the geometry arguments (int,
    pair, 'valid' or 'same' padding; groups including depthwise)."""
    groups = draw(st.integers(1, 3))
    in_per_group = draw(st.integers(1, 3))
    out_per_group = draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["int", "pair", "valid", "same"]))
    if kind == "same":
        sh = sw = 1
        padding = "same"
        (pt, pb), (pl, pr) = conv_padding("same", (kh, kw), (dh, dw))
    elif kind == "valid":
        padding = "valid"
        pt = pb = pl = pr = 0
    elif kind == "int":
        padding = pt = pb = pl = pr = draw(st.integers(0, 3))
    else:
        pt, pl = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        pb, pr = pt, pl
        padding = (pt, pl)
    ekh, ekw = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    h = draw(st.integers(max(1, ekh - pt - pb), max(1, ekh - pt - pb) + max_hw))
    w = draw(st.integers(max(1, ekw - pl - pr), max(1, ekw - pl - pr) + max_hw))
    return dict(
        x_shape=(draw(st.integers(1, 2)), groups * in_per_group, h, w),
        weight_shape=(groups * out_per_group, in_per_group, kh, kw),
        bias=draw(st.booleans()),
        unbatched=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        args=dict(stride=(sh, sw) if draw(st.booleans()) else sh if sh == sw else (sh, sw),
                  padding=padding, dilation=(dh, dw), groups=groups),
    )
