"""Small ONNX models written with onnx.helper, their random inputs, and the independent oracle
that runs them (onnx.reference.ReferenceEvaluator)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx.helper as oh
from onnx.reference import ReferenceEvaluator

Arr = Any  # numpy arrays; numpy's stubs type many results loosely
Dims = tuple[int | str, ...]  # "N": the symbolic batch dimension

LATEST = onnx.defs.onnx_opset_version()


@dataclass(frozen=True)
class In:
    """A graph input: its shape ("N" for the batch axis), dtype and value range."""

    shape: Dims
    dtype: Any = np.float64
    low: float = -2.0
    high: float = 2.0

    def value_info(self, name: str) -> onnx.ValueInfoProto:
        return oh.make_tensor_value_info(name, oh.np_dtype_to_tensor_dtype(np.dtype(self.dtype)),
                                         list(self.shape))

    def draw(self, rng: np.random.Generator, batch: int) -> Arr:
        shape = tuple(batch if isinstance(d, str) else d for d in self.shape)
        if np.issubdtype(self.dtype, np.integer):
            return rng.integers(int(self.low), int(self.high), shape).astype(self.dtype)
        return rng.uniform(self.low, self.high, shape).astype(self.dtype)


def make(nodes: Sequence[onnx.NodeProto], inputs: Mapping[str, In], outputs: Sequence[str], *,
         opset: int = LATEST, initializers: Mapping[str, Arr] | None = None,
         output_dtype: Any = np.float64, declare: Mapping[str, Dims] | None = None
         ) -> onnx.ModelProto:
    """A model of ``nodes``; outputs declare their dtype, and a shape only where ``declare``
    gives one (the importer infers the rest)."""
    elem = oh.np_dtype_to_tensor_dtype(np.dtype(output_dtype))
    declare = declare or {}
    graph = oh.make_graph(
        list(nodes), "test", [spec.value_info(name) for name, spec in inputs.items()],
        [oh.make_tensor_value_info(name, elem, list(declare[name]) if name in declare else None)
         for name in outputs],
        [onnx.numpy_helper.from_array(np.asarray(v), name)
         for name, v in (initializers or {}).items()])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])


def reference(model: onnx.ModelProto, feeds: Mapping[str, Arr]) -> list[Arr]:
    """The model's outputs as onnx's reference implementation computes them."""
    return list(ReferenceEvaluator(model).run(None, dict(feeds)))


@dataclass(frozen=True)
class Case:
    """A model to import at each of ``opsets``, with an oracle for its outputs (by default the
    reference evaluator; ``oracle`` replaces it where that one is known to differ)."""

    id: str
    nodes: Sequence[onnx.NodeProto]
    inputs: Mapping[str, In]
    outputs: Sequence[str] = ("y",)
    opsets: Sequence[int] = (13, LATEST)
    initializers: Mapping[str, Arr] = field(default_factory=dict)
    oracle: Callable[[Mapping[str, Arr]], list[Arr]] | None = None
    rtol: float = 1e-10
    declare: Mapping[str, Dims] = field(default_factory=dict)  # output shapes, where given

    def model(self, opset: int) -> onnx.ModelProto:
        dtypes = {spec.dtype for spec in self.inputs.values()} - {np.int64}
        return make(self.nodes, self.inputs, self.outputs, opset=opset,
                    initializers=self.initializers, declare=self.declare,
                    output_dtype=dtypes.pop() if dtypes else np.float64)

    def expected(self, model: onnx.ModelProto, feeds: Mapping[str, Arr]) -> list[Arr]:
        return self.oracle(feeds) if self.oracle is not None else reference(model, feeds)


def node(op: str, inputs: Sequence[str], outputs: Sequence[str] = ("y",), **attrs: Any
         ) -> onnx.NodeProto:
    return oh.make_node(op, list(inputs), list(outputs), **attrs)


def ints(*values: int) -> Arr:
    return np.array(values, np.int64)
