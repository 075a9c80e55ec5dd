"""What the numba.cuda pooling kernels share with the CPU's
(``fastpool.cpu._pool_common``): stochastic inference's range-safe sums
(``fastpool._stochastic_sums``), as device functions."""

from __future__ import annotations

from numba import cuda

from fastpool import _stochastic_sums

_device = cuda.jit(device=True, inline=True)
plain_sums_serve = _device(_stochastic_sums.plain_sums_serve)
sums_scale = _device(_stochastic_sums.sums_scale)
weighted_average = _device(_stochastic_sums.weighted_average)
inference_shares = _device(_stochastic_sums.inference_shares)
