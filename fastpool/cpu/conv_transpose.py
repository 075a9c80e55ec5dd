"""CPU launchers of transposed convolution: ``fastpool._conv_transpose`` with
``fastpool.cpu.slabs`` (``fastpool.cuda.conv_transpose`` mirrors it)."""

from __future__ import annotations

import functools

from fastpool import _conv_transpose
from fastpool.cpu import slabs

conv_transpose_forward = functools.partial(_conv_transpose.launch_forward, slabs)
conv_transpose_backward = functools.partial(_conv_transpose.launch_backward, slabs)
