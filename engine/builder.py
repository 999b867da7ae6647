"""A graph builder with operator overloading: ``L = (a*b + c) * f`` builds the graph for L.

Python numbers in an expression become constants of the other operand's dtype. Every op of the
table is reachable as ``builder.op(name, *operands, **attrs)``; the common ones are methods and
operators of :class:`Value`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradserve.engine.graph import Constant, Graph, Input, Node
from gradserve.engine.ops import AttrValue
from gradserve.engine.types import DType


class GraphBuilder:
    """Collects inputs, constants and nodes; :meth:`build` returns the :class:`Graph`."""

    def __init__(self) -> None:
        self._inputs: list[Input] = []
        self._constants: list[Constant] = []
        self._nodes: list[Node] = []
        self._dtypes: dict[str, DType] = {}
        self._count = 0
        self._built: dict[tuple[str, ...], Graph] = {}  # by outputs, until anything is added

    def input(self, name: str, shape: Sequence[int] = (), dtype: DType = DType.FLOAT64,
              requires_grad: bool = True) -> Value:
        """A named input of per-example ``shape``."""
        self._inputs.append(Input(name, tuple(shape), dtype, requires_grad))
        return self._value(name, dtype)

    def constant(self, value: Any, dtype: DType = DType.FLOAT64, name: str | None = None) -> Value:
        """A constant tensor (name generated unless given)."""
        name = name or self._fresh("const")
        self._constants.append(Constant(name, np.asarray(value, dtype=dtype.numpy)))
        return self._value(name, dtype)

    def op(self, op: str, *operands: Value | float, name: str | None = None,
           **attrs: AttrValue) -> Value:
        """Apply ``op`` to ``operands``; numbers become constants of the first Value's dtype."""
        return self.apply(op, operands, attrs, name)

    def apply(self, op: str, operands: Sequence[Value | float], attrs: Mapping[str, AttrValue],
              name: str | None = None) -> Value:
        """:meth:`op` with the attributes as a mapping."""
        dtype = next((o.dtype for o in operands if isinstance(o, Value)), DType.FLOAT64)
        names = tuple(o.name if isinstance(o, Value) else self.constant(o, dtype).name
                      for o in operands)
        node_name = name or self._fresh(op)
        self._nodes.append(Node(node_name, op, names, dict(attrs)))
        return self._value(node_name, dtype)

    def build(self, *outputs: Value) -> Graph:
        """The graph computing ``outputs``: the same object until the builder grows, so what
        is derived from it once (its structural key) serves every call that sends it."""
        names = tuple(o.name for o in outputs)
        graph = self._built.get(names)
        if graph is None:
            graph = self._built[names] = Graph(tuple(self._inputs), tuple(self._nodes), names,
                                               tuple(self._constants))
        return graph

    def _fresh(self, stem: str) -> str:
        """A generated name no value of the graph has (nor will get from a generated name)."""
        while True:
            self._count += 1
            name = f"{stem}_{self._count}"
            if name not in self._dtypes:
                return name

    def _value(self, name: str, dtype: DType) -> Value:
        self._built.clear()  # the builder grew: a graph built from now on differs
        self._dtypes[name] = dtype
        return Value(self, name, dtype)


@dataclass(frozen=True, slots=True, eq=False)
class Value:
    """A named value of a graph under construction."""

    builder: GraphBuilder
    name: str
    dtype: DType

    def _op(self, op: str, *operands: Value | float, **attrs: AttrValue) -> Value:
        return self.builder.apply(op, operands, attrs)

    def __add__(self, o: Value | float) -> Value:
        return self._op("add", self, o)

    def __radd__(self, o: float) -> Value:
        return self._op("add", o, self)

    def __sub__(self, o: Value | float) -> Value:
        return self._op("sub", self, o)

    def __rsub__(self, o: float) -> Value:
        return self._op("sub", o, self)

    def __mul__(self, o: Value | float) -> Value:
        return self._op("mul", self, o)

    def __rmul__(self, o: float) -> Value:
        return self._op("mul", o, self)

    def __truediv__(self, o: Value | float) -> Value:
        return self._op("div", self, o)

    def __rtruediv__(self, o: float) -> Value:
        return self._op("div", o, self)

    def __pow__(self, o: Value | float) -> Value:
        return self._op("pow", self, o)

    def __rpow__(self, o: float) -> Value:
        return self._op("pow", o, self)

    def __matmul__(self, o: Value) -> Value:
        return self._op("matmul", self, o)

    def __neg__(self) -> Value:
        return self._op("neg", self)

    def __abs__(self) -> Value:
        return self._op("abs", self)

    def exp(self) -> Value:
        return self._op("exp", self)

    def log(self) -> Value:
        return self._op("log", self)

    def sqrt(self) -> Value:
        return self._op("sqrt", self)

    def tanh(self) -> Value:
        return self._op("tanh", self)

    def sigmoid(self) -> Value:
        return self._op("sigmoid", self)

    def relu(self) -> Value:
        return self._op("relu", self)

    def sum(self, axis: Sequence[int] | int | None = None, keepdims: bool = False) -> Value:
        return self._reduce("sum", axis, keepdims)

    def mean(self, axis: Sequence[int] | int | None = None, keepdims: bool = False) -> Value:
        return self._reduce("mean", axis, keepdims)

    def max(self, axis: Sequence[int] | int | None = None, keepdims: bool = False) -> Value:
        return self._reduce("max", axis, keepdims)

    def min(self, axis: Sequence[int] | int | None = None, keepdims: bool = False) -> Value:
        return self._reduce("min", axis, keepdims)

    def reshape(self, *shape: int | Sequence[int]) -> Value:
        """``x.reshape(2, 3)`` or ``x.reshape((2, 3))``, as numpy allows."""
        dims = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        return self._op("reshape", self, shape=tuple(int(d) for d in dims))  # type: ignore[arg-type]

    @property
    def T(self) -> Value:  # noqa: N802 - numpy's name
        return self._op("transpose", self)

    def _reduce(self, op: str, axis: Sequence[int] | int | None, keepdims: bool) -> Value:
        attrs: dict[str, AttrValue] = {"keepdims": keepdims}
        if axis is not None:
            attrs["axis"] = (axis,) if isinstance(axis, int) else tuple(axis)
        return self._op(op, self, **attrs)
