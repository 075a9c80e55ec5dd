"""Hypothesis strategies for valid pooling cases."""

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from conftest import DTYPES, GEOMETRIES
from reference import pair, pool_output_size


@st.composite
def pool_cases(draw, dilated=True, min_hw=1, max_hw=9):
    """A valid case: dict of input shape, dtype and the forward's geometry arguments."""
    kernel, stride, dilation = draw(st.sampled_from(GEOMETRIES))
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
    dtype = draw(st.sampled_from(DTYPES))
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
