"""GPU launchers of 3-D convolution: ``fastpool._conv3d``'s depth decomposition
with ``fastpool.cuda.slabs`` for the depth steps (``fastpool.cpu.conv3d`` mirrors it)."""

from __future__ import annotations

import functools

from fastpool import _conv3d
from fastpool.cuda import slabs

conv3d_forward = functools.partial(_conv3d.launch_forward, slabs)
conv3d_backward = functools.partial(_conv3d.launch_backward, slabs)
