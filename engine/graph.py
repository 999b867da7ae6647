"""The graph IR: named inputs and constants, nodes applying ops to named values, named outputs.

Every value has exactly one name, assigned once (ONNX style): an input, a constant, or the node
that computes it. A graph is plain data; :class:`gradserve.engine.Plan` validates it and
compiles it into an executable plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gradserve.engine.ops import AttrValue
from gradserve.engine.types import DType, Shape, TensorType


@dataclass(frozen=True, slots=True)
class Input:
    """A value the caller feeds: its per-example shape and dtype, and whether its gradient is
    wanted when the caller does not say which inputs to differentiate."""

    name: str
    shape: Shape = ()
    dtype: DType = DType.FLOAT64
    requires_grad: bool = True

    @property
    def type(self) -> TensorType:
        return TensorType(tuple(self.shape), self.dtype)


@dataclass(frozen=True, slots=True, eq=False)
class Constant:
    """A tensor baked into the graph; it never gets a gradient. Its value is frozen when the
    constant is made (a writeable array is copied and made read-only), so a graph never changes
    once made: its structural key can be computed once."""

    name: str
    value: NDArray[Any]

    def __post_init__(self) -> None:
        if isinstance(self.value, np.ndarray) and self.value.flags.writeable:
            value = self.value.copy()  # anything but an array, validation refuses
            value.flags.writeable = False
            object.__setattr__(self, "value", value)


@dataclass(frozen=True, slots=True)
class Node:
    """One op applied to named values; ``name`` names its result."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, AttrValue] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class Graph:
    """A whole computation: inputs, constants, nodes (in any order) and the outputs wanted.
    Immutable, compared by identity (its structural key compares contents)."""

    inputs: tuple[Input, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    constants: tuple[Constant, ...] = ()

