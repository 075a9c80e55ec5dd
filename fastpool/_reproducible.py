"""Reproducible weight and bias gradients: sums whose bits do not depend on how the
terms are split (chunks of a Dask array, batches, threads, devices) or on their order.

A convolution's weight gradient is a sum of ``T = N * prod(out_size)`` products
``p = (x * scale) * grad_output`` per weight element. Each product is computed the same way
wherever it is computed (one float64 multiply of the widened inputs: exact for float32
and half inputs), so only the additions could depend on the split. They are made exact:
each product is cut into ``FOLDS`` pieces on fixed grids (``q_k = (sigma_k + r) -
sigma_k``, ``r -= q_k``; Rump, Ogita and Oishi's ExtractVector, as in Demmel and
Nguyen's reproducible summation), and the pieces of fold ``k`` are all multiples of
``ulp(sigma_k) / 2`` whose sum stays below ``sigma_k``: every addition of them, in any
order and grouping, is exact. The grids depend only on bounds of the whole problem --
``max |grad_output|``, ``max |x|`` (powers of two at or above them) and ``T`` -- which
a chunked computation gets from a reduction over all chunks first. The result is
``((S_0 + S_1) + S_2) + S_3`` rounded to float64, then to the dtype.

Error: what the last fold leaves, at most ``T * 2**(k_4 - 53)`` with ``2**k_1 >= 2 T
max|p|``, ``k_{i+1} = k_i - 52 + s`` and ``s = ceil(log2 T)``: about ``2**(5 s - 206) *
max|x| * max|grad_output|`` (the whole arrays' maxima) -- ``2**-121`` of that product
for ``T = 2**17`` terms per element, ``2**-86`` for ``2**24``, ``2**-51`` for ``2**31``
(a batch of one 46,000 x 46,000 plane) -- plus the final roundings. An element whose
sum is far below that bound (heavy cancellation, or products far smaller than the
maxima) loses digits where the default sums may keep them; elsewhere the result is
within 1-2 ulps of the exact sum.

The bounds are maxima of the *finite* values. A product that is not finite (an infinity
or NaN factor, or a float64 overflow) goes to a separate plain float64 sum ``E``:
infinities and NaNs give the same result in any order (up to NaN payloads), and the
result is ``((((S_0 + S_1) + S_2) + S_3) + E) / scale``. A product with a zero factor
adds nothing (not even ``0 * inf``): a chunk's zero padding of ``grad_output`` must not
add what the whole call does not.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Tuple

FOLDS = 4
SUMS = FOLDS + 1       # the folds' sums and E, the plain sum of non-finite products
_MAX_TERMS_LOG2 = 50   # k_{i+1} < k_i needs ceil(log2 T) < 52; far beyond any array
_TOP = 1000            # sigma_1 at most 2**1000: products scaled down past it
_BOTTOM = -1022        # sigma_k at least 2**-1022, the least normal: its grid (and
                       # the subnormals') is 2**-1074, which holds every residual


class Grids(NamedTuple):
    """One sum's fold grids: ``sigma`` (the ``FOLDS`` powers of two), ``scale``
    (the power of two each product's first factor is multiplied by, 1 unless the bound
    is huge) and ``finite`` (every factor is finite: kernels may skip the checks that
    send non-finite products to ``E``, which give the same bits otherwise)."""

    sigma: Tuple[float, ...]
    scale: float
    finite: bool


class Plan(NamedTuple):
    """The grids of a convolution's weight gradient and bias gradient."""

    weight: Grids
    bias: Grids


def _exponent(bound: float) -> int:
    """The least ``e`` with ``bound <= 2**e`` (for ``bound > 0``)."""
    mantissa, e = math.frexp(bound)
    return e - 1 if mantissa == 0.5 else e


def grids(bounds: Tuple[float, ...], terms: int, finite: bool = True) -> Grids:
    """Fold grids for ``terms`` products of factors bounded by ``bounds`` (maxima of
    the finite absolute values, as float64); ``finite``: no factor is infinite or NaN."""
    if any(b == 0.0 for b in bounds) or terms == 0:
        return Grids((1.0,) * FOLDS, 1.0, finite)   # every finite product is zero
    spread = max(terms - 1, 0).bit_length()      # 2**spread >= terms
    if spread > _MAX_TERMS_LOG2:
        raise ValueError(f"reproducible sums take at most 2**{_MAX_TERMS_LOG2} terms per "
                         f"element, got {terms}")
    top = sum(_exponent(b) for b in bounds) + spread + 1   # 2**top >= 2 T max|p|
    shift = max(top - _TOP, 0)
    top = max(top - shift, _BOTTOM)
    exponents = [top]
    for _ in range(FOLDS - 1):
        exponents.append(max(exponents[-1] - 52 + spread, _BOTTOM))
    return Grids(tuple(math.ldexp(1.0, e) for e in exponents), math.ldexp(1.0, -shift),
                 finite)


def plan(bounds_weight: Tuple[float, float], weight_terms: int, bound_bias: float,
         bias_terms: int, finite: bool = True) -> Plan:
    """The grids of a convolution's parameter gradients: the weight's products have
    factors bounded by ``bounds_weight`` (maxima of the finite ``|grad_output|`` and
    ``|x|`` over the whole problem), ``weight_terms`` of them per element; the bias
    sums ``bias_terms`` values bounded by ``bound_bias``. ``finite``: every value of
    the arrays is finite."""
    return Plan(grids(bounds_weight, weight_terms, finite),
                grids((bound_bias,), bias_terms, finite))


class Roles(NamedTuple):
    """Who plays which part in a weight gradient: ``grad_output`` and ``x`` of the
    convolution ``window`` (its output gradient and input), and ``summed``, the array
    the bias gradient sums over all axes but the channels. For a convolution:
    ``(grad_output, x, grad_output)``; for a transposed convolution (whose ``window``
    is the convolution from its result to its input): ``(x, grad_output,
    grad_output)``."""

    grad_output: Any
    x: Any
    summed: Any


def terms(window) -> int:
    """The terms of each weight element's sum: one per image and output position."""
    return window.batch * math.prod(window.out_size)


def channel_terms(a, batched) -> int:
    """Values per channel of ``a``: the terms of each channel's (the bias's) sum."""
    shape = tuple(a.shape)
    channels = shape[1 if batched else 0]
    return math.prod(shape) // channels if channels else 0


def make_plan(backend, roles: Roles, window, output_mask) -> Plan:
    """The in-memory call's plan: the maxima of its whole arrays."""
    from fastpool import _half
    b = getattr(backend, "_module", backend)
    g, x = (0.0, True), (0.0, True)
    if output_mask[1]:
        g, x = b.max_abs(_half._widen(roles.grad_output)), b.max_abs(_half._widen(roles.x))
    bias = b.max_abs(_half._widen(roles.summed)) if output_mask[2] else (0.0, True)
    return plan((g[0], x[0]), terms(window), bias[0],
                channel_terms(roles.summed, window.batched), g[1] and x[1] and bias[1])


def parameter_folds(backend, roles: Roles, window, output_mask, the_plan: Plan):
    """``(weight_folds, bias_folds)``: float64 arrays ``(SUMS, *weight.shape)`` and
    ``(SUMS, C_out)`` (None where ``output_mask`` did not ask) of ``backend``'s
    kernels; additions of folds of disjoint parts of the problem are exact."""
    from fastpool import _half
    b = getattr(backend, "_module", backend)   # half inputs widened here instead
    weight_folds = bias_folds = None
    if output_mask[1]:
        weight_folds = b.conv_weight_folds(_half._widen(roles.grad_output),
                                           _half._widen(roles.x), window, the_plan.weight)
    if output_mask[2]:
        bias_folds = b.channel_sum_folds(_half._widen(roles.summed), window.batched,
                                         the_plan.bias)
    return weight_folds, bias_folds


def finish(backend, folds, grids_: Grids, like):
    """The gradient from summed ``folds``: ``(((S_0 + S_1) + ...) + E)`` in float64,
    times ``1 / scale``, rounded to ``like``'s dtype (half dtypes through float32)."""
    if folds is None:
        return None
    from fastpool import _half
    backend = getattr(backend, "_module", backend)
    half = _half.is_half(_half._dtype(like))
    name = "float32" if half else str(_half._dtype(like)).split(".")[-1]  # torch.float64
    result = backend.finish_folds(folds, 1.0 / grids_.scale, name)
    return _half._narrow(result, like) if half else result


def parameter_grads(backend, roles: Roles, window, output_mask):
    """``(grad_weight, grad_bias)``, reproducible (None where ``output_mask`` did not
    ask): the in-memory call."""
    the_plan = make_plan(backend, roles, window, output_mask)
    weight_folds, bias_folds = parameter_folds(backend, roles, window, output_mask,
                                               the_plan)
    return (finish(backend, weight_folds, the_plan.weight, roles.x),
            finish(backend, bias_folds, the_plan.bias, roles.x))
