"""Tensor types: the supported dtypes, and the (shape, dtype) pairs shape inference tracks."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from math import prod

import numpy as np


class DType(StrEnum):
    """Supported element types. Floats are differentiable; int64 carries indices (class labels)."""

    FLOAT64 = "float64"
    FLOAT32 = "float32"
    INT64 = "int64"

    @property
    def numpy(self) -> np.dtype[np.generic]:
        """The numpy dtype with this name."""
        return _NUMPY[self.value]

    @property
    def is_float(self) -> bool:
        return self is not DType.INT64

    @classmethod
    def of(cls, dtype: np.dtype[np.generic]) -> DType | None:
        """The engine dtype for a numpy dtype, or None when the engine does not support it."""
        try:
            return cls(dtype.name)
        except ValueError:
            return None


Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TensorType:
    """The static type of a value: its shape (per example) and its dtype."""

    shape: Shape
    dtype: DType
    numpy_dtype: np.dtype[np.generic] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Kept at hand: looking it up through the enum on every run costs a measurable share.
        object.__setattr__(self, "numpy_dtype", self.dtype.numpy)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return prod(self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


_NUMPY = {d.value: np.dtype(d.value) for d in DType}
