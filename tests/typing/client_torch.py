"""PyTorch code using ``fastpool.torch``, type-checked by ``mypy --strict`` in
tests/test_typing.py (never run)."""

import torch
from typing_extensions import assert_type

import fastpool.torch as fpt

x = torch.rand(2, 3, 8, 8)
assert_type(fpt.conv2d(x, torch.rand(4, 3, 3, 3), padding="same"), torch.Tensor)
assert_type(fpt.avg_pool2d(x, 2, divisor_override=3), torch.Tensor)
assert_type(fpt.adaptive_avg_pool2d(x, (None, 1)), torch.Tensor)
assert_type(fpt.max_unpool2d(x, torch.zeros(2, 3, 8, 8, dtype=torch.int64), 2),
            torch.Tensor)

model = torch.nn.Sequential(
    fpt.Conv2d(3, 8, 3, padding=1),
    fpt.StochasticPool2d(2, generator=torch.Generator()),
    fpt.AdaptiveAvgPool2d(1),
)
y = model(x)
pool = fpt.MaxPool2d(2, return_indices=True)
out, indices = pool(x)
unpool = fpt.MaxUnpool2d(2)
assert_type(unpool.forward(out, indices), torch.Tensor)  # module calls are Any in torch

fpt.max_pool2d(x, 2, paddin=1)  # type: ignore[call-arg]
fpt.avg_pool2d(x, 2, padding="same")  # type: ignore[arg-type]
fpt.StochasticPool2d(2, generator=0)  # type: ignore[arg-type]
