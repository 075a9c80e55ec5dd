"""Static types of fastpool's NumPy-level API (docs/design.md section 1).

The public functions are made per rank by factories (``pooling._max_pool(rank)``, ...);
each factory's return type is one of these protocols, so a type checker sees every
``fastpool.<op><rank>d`` with its real signature: a float32/float64 NumPy array in gives
the same dtype out (indices int64), ``return_indices=True`` gives a pair, and any other
array (CuPy, a torch tensor, anything with ``__cuda_array_interface__``) gives ``Any``
(a result of the input's kind). ``tests/test_typing.py`` checks these signatures against
the functions and runs ``mypy --strict`` on code that calls them. Generated once from
the runtime signatures and the per-parameter rules in the annotations of the functions
themselves (``ArrayLike``, ``Size``, ...); the test keeps the two in step.
"""

from __future__ import annotations

from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    overload,
)

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from fastpool.conv import Conv2dGrads

# What the functions take as arrays: NumPy arrays (and what np.asarray takes), CPU
# torch tensors, and GPU arrays with ``__cuda_array_interface__`` (CuPy, torch, Numba).
ArrayLike = Any
# float16 arrays keep their dtype too (computed in float32; ml_dtypes.bfloat16 is not
# a NumPy scalar type mypy knows, so bfloat16 arrays take the ArrayLike overloads).
Float = TypeVar("Float", np.float16, np.float32, np.float64)
Size = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], Literal["valid", "same"]]
AdaptiveSize = Union[int, Sequence[Optional[int]]]
Device = Optional[Literal["cpu", "cuda", "auto"]]


class AdaptiveStochasticPool(Protocol):
    """``fastpool.adaptive_stochastic_pool{1,2,3}d``."""

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        output_size: AdaptiveSize,
        return_indices: Literal[False] = ...,
        *,
        training: bool = ...,
        seed: Optional[int] = ...,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        output_size: AdaptiveSize,
        *,
        return_indices: Literal[True],
        training: bool = ...,
        seed: Optional[int] = ...,
        device: Device = ...,
    ) -> Tuple[NDArray[Float], NDArray[np.int64]]: ...

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        output_size: AdaptiveSize,
        return_indices: Literal[True],
        *,
        training: bool = ...,
        seed: Optional[int] = ...,
        device: Device = ...,
    ) -> Tuple[NDArray[Float], NDArray[np.int64]]: ...

    @overload
    def __call__(
        self,
        x: Any,
        output_size: AdaptiveSize,
        return_indices: bool = ...,
        *,
        training: bool = ...,
        seed: Optional[int] = ...,
        device: Device = ...,
    ) -> Any: ...


class AdaptiveStochasticPoolBackward(Protocol):
    """``fastpool.adaptive_stochastic_pool{1,2,3}d_backward``."""

    @overload
    def __call__(
        self,
        grad_output: NDArray[Float],
        x: NDArray[Float],
        output_size: AdaptiveSize,
        *,
        training: bool = ...,
        indices: Optional[Any] = ...,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        grad_output: Any,
        x: Any,
        output_size: AdaptiveSize,
        *,
        training: bool = ...,
        indices: Optional[Any] = ...,
        device: Device = ...,
    ) -> Any: ...


class ConvTranspose(Protocol):
    """``fastpool.conv_transpose{1,2,3}d``."""

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        weight: NDArray[Float],
        bias: Optional[NDArray[Float]] = ...,
        stride: Size = ...,
        padding: Size = ...,
        output_padding: Size = ...,
        groups: int = ...,
        dilation: Size = ...,
        *,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        x: Any,
        weight: Any,
        bias: Optional[Any] = ...,
        stride: Size = ...,
        padding: Size = ...,
        output_padding: Size = ...,
        groups: int = ...,
        dilation: Size = ...,
        *,
        device: Device = ...,
    ) -> Any: ...


class ConvTransposeBackward(Protocol):
    """``fastpool.conv_transpose{1,2,3}d_backward``."""

    @overload
    def __call__(
        self,
        grad_output: NDArray[Float],
        x: NDArray[Float],
        weight: NDArray[Float],
        stride: Size = ...,
        padding: Size = ...,
        output_padding: Size = ...,
        groups: int = ...,
        dilation: Size = ...,
        *,
        output_mask: Tuple[bool, bool, bool] = ...,
        reproducible: bool = ...,
        device: Device = ...,
    ) -> Conv2dGrads: ...

    @overload
    def __call__(
        self,
        grad_output: Any,
        x: Any,
        weight: Any,
        stride: Size = ...,
        padding: Size = ...,
        output_padding: Size = ...,
        groups: int = ...,
        dilation: Size = ...,
        *,
        output_mask: Tuple[bool, bool, bool] = ...,
        reproducible: bool = ...,
        device: Device = ...,
    ) -> Conv2dGrads: ...


class MaxUnpool(Protocol):
    """``fastpool.max_unpool{1,2,3}d``."""

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        indices: Any,
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        output_size: Optional[Sequence[int]] = ...,
        *,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        x: Any,
        indices: Any,
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        output_size: Optional[Sequence[int]] = ...,
        *,
        device: Device = ...,
    ) -> Any: ...


class MaxUnpoolBackward(Protocol):
    """``fastpool.max_unpool{1,2,3}d_backward``."""

    @overload
    def __call__(
        self,
        grad_output: NDArray[Float],
        x: NDArray[Float],
        indices: Any,
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        output_size: Optional[Sequence[int]] = ...,
        *,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        grad_output: Any,
        x: Any,
        indices: Any,
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        output_size: Optional[Sequence[int]] = ...,
        *,
        device: Device = ...,
    ) -> Any: ...


class AdaptiveAvgPool(Protocol):
    """``fastpool.adaptive_avg_pool{1,2,3}d``."""

    @overload
    def __call__(
        self, x: NDArray[Float], output_size: AdaptiveSize, *, device: Device = ...
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self, x: Any, output_size: AdaptiveSize, *, device: Device = ...
    ) -> Any: ...


class AdaptiveAvgPoolBackward(Protocol):
    """``fastpool.adaptive_avg_pool{1,2,3}d_backward``."""

    @overload
    def __call__(
        self,
        grad_output: NDArray[Float],
        x: NDArray[Float],
        output_size: AdaptiveSize,
        *,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        grad_output: Any,
        x: Any,
        output_size: AdaptiveSize,
        *,
        device: Device = ...,
    ) -> Any: ...


class AdaptiveMaxPool(Protocol):
    """``fastpool.adaptive_max_pool{1,2,3}d``."""

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        output_size: AdaptiveSize,
        return_indices: Literal[False] = ...,
        *,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        output_size: AdaptiveSize,
        *,
        return_indices: Literal[True],
        device: Device = ...,
    ) -> Tuple[NDArray[Float], NDArray[np.int64]]: ...

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        output_size: AdaptiveSize,
        return_indices: Literal[True],
        *,
        device: Device = ...,
    ) -> Tuple[NDArray[Float], NDArray[np.int64]]: ...

    @overload
    def __call__(
        self,
        x: Any,
        output_size: AdaptiveSize,
        return_indices: bool = ...,
        *,
        device: Device = ...,
    ) -> Any: ...


class AdaptiveMaxPoolBackward(Protocol):
    """``fastpool.adaptive_max_pool{1,2,3}d_backward``."""

    @overload
    def __call__(
        self,
        grad_output: NDArray[Float],
        x: NDArray[Float],
        output_size: AdaptiveSize,
        *,
        indices: Optional[Any] = ...,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        grad_output: Any,
        x: Any,
        output_size: AdaptiveSize,
        *,
        indices: Optional[Any] = ...,
        device: Device = ...,
    ) -> Any: ...


class AvgPool(Protocol):
    """``fastpool.avg_pool{1,2,3}d``."""

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        ceil_mode: bool = ...,
        count_include_pad: bool = ...,
        divisor_override: Optional[int] = ...,
        *,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        x: Any,
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        ceil_mode: bool = ...,
        count_include_pad: bool = ...,
        divisor_override: Optional[int] = ...,
        *,
        device: Device = ...,
    ) -> Any: ...


class AvgPoolBackward(Protocol):
    """``fastpool.avg_pool{1,2,3}d_backward``."""

    @overload
    def __call__(
        self,
        grad_output: NDArray[Float],
        x: NDArray[Float],
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        ceil_mode: bool = ...,
        count_include_pad: bool = ...,
        divisor_override: Optional[int] = ...,
        *,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        grad_output: Any,
        x: Any,
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        ceil_mode: bool = ...,
        count_include_pad: bool = ...,
        divisor_override: Optional[int] = ...,
        *,
        device: Device = ...,
    ) -> Any: ...


class Conv(Protocol):
    """``fastpool.conv{1,2,3}d``."""

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        weight: NDArray[Float],
        bias: Optional[NDArray[Float]] = ...,
        stride: Size = ...,
        padding: Padding = ...,
        dilation: Size = ...,
        groups: int = ...,
        *,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        x: Any,
        weight: Any,
        bias: Optional[Any] = ...,
        stride: Size = ...,
        padding: Padding = ...,
        dilation: Size = ...,
        groups: int = ...,
        *,
        device: Device = ...,
    ) -> Any: ...


class ConvBackward(Protocol):
    """``fastpool.conv{1,2,3}d_backward``."""

    @overload
    def __call__(
        self,
        grad_output: NDArray[Float],
        x: NDArray[Float],
        weight: NDArray[Float],
        stride: Size = ...,
        padding: Padding = ...,
        dilation: Size = ...,
        groups: int = ...,
        *,
        output_mask: Tuple[bool, bool, bool] = ...,
        reproducible: bool = ...,
        device: Device = ...,
    ) -> Conv2dGrads: ...

    @overload
    def __call__(
        self,
        grad_output: Any,
        x: Any,
        weight: Any,
        stride: Size = ...,
        padding: Padding = ...,
        dilation: Size = ...,
        groups: int = ...,
        *,
        output_mask: Tuple[bool, bool, bool] = ...,
        reproducible: bool = ...,
        device: Device = ...,
    ) -> Conv2dGrads: ...


class MaxPool(Protocol):
    """``fastpool.max_pool{1,2,3}d``."""

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        dilation: Size = ...,
        ceil_mode: bool = ...,
        return_indices: Literal[False] = ...,
        *,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        dilation: Size = ...,
        ceil_mode: bool = ...,
        *,
        return_indices: Literal[True],
        device: Device = ...,
    ) -> Tuple[NDArray[Float], NDArray[np.int64]]: ...

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        kernel_size: Size,
        stride: Optional[Size],
        padding: Size,
        dilation: Size,
        ceil_mode: bool,
        return_indices: Literal[True],
        *,
        device: Device = ...,
    ) -> Tuple[NDArray[Float], NDArray[np.int64]]: ...

    @overload
    def __call__(
        self,
        x: Any,
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        dilation: Size = ...,
        ceil_mode: bool = ...,
        return_indices: bool = ...,
        *,
        device: Device = ...,
    ) -> Any: ...


class MaxPoolBackward(Protocol):
    """``fastpool.max_pool{1,2,3}d_backward``."""

    @overload
    def __call__(
        self,
        grad_output: NDArray[Float],
        x: NDArray[Float],
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        dilation: Size = ...,
        ceil_mode: bool = ...,
        *,
        indices: Optional[Any] = ...,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        grad_output: Any,
        x: Any,
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        dilation: Size = ...,
        ceil_mode: bool = ...,
        *,
        indices: Optional[Any] = ...,
        device: Device = ...,
    ) -> Any: ...


class StochasticPool(Protocol):
    """``fastpool.stochastic_pool{1,2,3}d``."""

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        dilation: Size = ...,
        ceil_mode: bool = ...,
        return_indices: Literal[False] = ...,
        *,
        training: bool = ...,
        seed: Optional[int] = ...,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        dilation: Size = ...,
        ceil_mode: bool = ...,
        *,
        return_indices: Literal[True],
        training: bool = ...,
        seed: Optional[int] = ...,
        device: Device = ...,
    ) -> Tuple[NDArray[Float], NDArray[np.int64]]: ...

    @overload
    def __call__(
        self,
        x: NDArray[Float],
        kernel_size: Size,
        stride: Optional[Size],
        padding: Size,
        dilation: Size,
        ceil_mode: bool,
        return_indices: Literal[True],
        *,
        training: bool = ...,
        seed: Optional[int] = ...,
        device: Device = ...,
    ) -> Tuple[NDArray[Float], NDArray[np.int64]]: ...

    @overload
    def __call__(
        self,
        x: Any,
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        dilation: Size = ...,
        ceil_mode: bool = ...,
        return_indices: bool = ...,
        *,
        training: bool = ...,
        seed: Optional[int] = ...,
        device: Device = ...,
    ) -> Any: ...


class StochasticPoolBackward(Protocol):
    """``fastpool.stochastic_pool{1,2,3}d_backward``."""

    @overload
    def __call__(
        self,
        grad_output: NDArray[Float],
        x: NDArray[Float],
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        dilation: Size = ...,
        ceil_mode: bool = ...,
        *,
        training: bool = ...,
        indices: Optional[Any] = ...,
        device: Device = ...,
    ) -> NDArray[Float]: ...

    @overload
    def __call__(
        self,
        grad_output: Any,
        x: Any,
        kernel_size: Size,
        stride: Optional[Size] = ...,
        padding: Size = ...,
        dilation: Size = ...,
        ceil_mode: bool = ...,
        *,
        training: bool = ...,
        indices: Optional[Any] = ...,
        device: Device = ...,
    ) -> Any: ...
