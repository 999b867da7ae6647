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
    """A tensor baked into the graph; it never gets a gradient."""

    name: str
    value: NDArray[Any]


@dataclass(frozen=True, slots=True)
class Node:
    """One op applied to named values; ``name`` names its result."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, AttrValue] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True, eq=False)
class Graph:
    """A whole computation: inputs, constants, nodes (in any order) and the outputs wanted."""

    inputs: tuple[Input, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    constants: tuple[Constant, ...] = ()

