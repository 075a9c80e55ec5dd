"""Stochastic inference's window sums, kept accurate over the whole float64 range:
plain Python, compiled by each device (``fastpool.cpu._pool_common``,
``fastpool.cuda._pool_common``).

Inference outputs ``S2 / S1`` with ``S1 = sum(a)`` and ``S2 = sum(a**2)`` over a
window, and its backward gives element ``a`` the share ``a * A + B`` of each window's
gradient ``g``, with ``A = 2 g / S1`` and ``B = -g S2 / S1**2``; the sums are float64.
Squares of elements under 2**-511 lose bits or vanish, and those over 2**512 overflow:
a window of tiny elements gave 0 and NaN gradients, and one of huge finite elements an
overflow error.

The plain sums serve where ``S1 <= 2**500`` and ``S2 / S1 >= 2**-450`` (tested as
``S2 * 2**450 >= S1``, which a zero window passes too): then ``S2 <= S1**2 <=
2**1000``; the largest element is at least ``S2 / S1``, so ``S2 >= 2**-900``, the
squares that lose bits (each by at most 2**-1075) add at most 2**-155 of ``S2`` for
windows of up to 2**20 elements, and ``S1**2 >= 2**-900`` is normal. Any other window
is summed again with its elements times a power of two (an exact scaling): 2**-600
where ``S1 > 1`` (so ``S1 > 2**500``, or infinite), else 2**600 (a window whose
``S2 / S1`` is under 2**-450 has elements under 2**-430). The results take the scale
out again: ``S2 / S1 / scale`` and ``2 g / S1 * scale`` (``S2 / S1**2`` does not
depend on it). Whether a window is summed again depends on its own sums alone, so every
kernel path gives it the same bits; the test costs one multiply and two comparisons in
the vectorised loops, which sum the rare windows that fail it again after the loop.
"""

SUMS_HIGH = 2.0**500
RATIO_UP = 2.0**450
SCALE_UP = 2.0**600
SCALE_DOWN = 2.0**-600


def plain_sums_serve(s1, s2):
    """Whether the plain sums give accurate results (zero windows included; not for
    NaN sums), branch-free for vectorised loops."""
    return (s1 <= SUMS_HIGH) & (s2 * RATIO_UP >= s1)


def sums_scale(s1, s2):
    """1.0 where ``plain_sums_serve``, else the power of two to multiply the window's
    elements by before summing them again."""
    if (s1 <= SUMS_HIGH) & (s2 * RATIO_UP >= s1):  # plain_sums_serve (no calls here)
        return 1.0
    return SCALE_DOWN if s1 > 1.0 else SCALE_UP


def weighted_average(s1, s2, scale):
    """``S2 / S1`` of the unscaled elements from sums of scaled ones (0 if ``S1 == 0``)."""
    return s2 / s1 / scale if s1 > 0.0 else 0.0


def inference_shares(g, s1, s2, scale):
    """``(A, B) = (2 g / S1, -g S2 / S1**2)`` of the unscaled elements from sums of
    scaled ones, ``(0, 0)`` where ``S1 == 0``; two selects, no branch (a branch kept
    the exactly tiled backward's loop from vectorising: 5% slower)."""
    a = 2.0 * g / s1 * scale if s1 > 0.0 else 0.0
    b = -g * s2 / (s1 * s1) if s1 > 0.0 else 0.0
    return a, b
