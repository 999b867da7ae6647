"""What a model holds and whether it imports: :func:`inspect_model`, for ``gradserve inspect``.

It reads the model as the importer does (same limits), lists its inputs, outputs, weights and
op types (each marked if no converter exists for it), then imports it and says what the
import gives or, if it refuses, why: the same :class:`ModelError` a server would answer.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from math import prod

import onnx

from gradserve.engine.validate import Limits
from gradserve.importer.convert import TensorInfo, _declared_dims, import_model
from gradserve.importer.errors import ModelError
from gradserve.importer.ops import CONVERTERS
from gradserve.importer.reading import DEFAULT_DOMAINS, read
from gradserve.importer.reading import check as check_model


@dataclass(frozen=True, slots=True)
class Inspection:
    """A model described: its opsets by domain, producer, inputs and outputs as declared,
    initializers (count and elements), op types with their node counts and which of them no
    converter exists for; then the import's outcome: the engine graph's node count and
    whether it is batched, or the refusal."""

    opsets: dict[str, int]
    producer: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    initializers: int
    weights: int
    ops: dict[str, int]
    unsupported: tuple[str, ...]
    engine_nodes: int | None
    batched: bool | None
    refusal: ModelError | None


def inspect_model(model: onnx.ModelProto | bytes | str | os.PathLike[str], *,
                  inputs: Collection[str] = (), limits: Limits | None = None) -> Inspection:
    """Describe ``model`` and try importing it (``inputs``: initializers made inputs).
    A model that cannot even be read (not a model, no graph, over the limits) raises
    :class:`ModelError`."""
    limits = limits or Limits()
    proto = check_model(read(model, limits), limits)
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    ops = Counter(n.op_type if n.domain in DEFAULT_DOMAINS else f"{n.domain}.{n.op_type}"
                  for n in graph.node)
    declared = tuple(_info(v) for v in graph.input if v.name not in initializers)
    try:
        imported = import_model(proto, inputs=inputs, limits=limits)
        nodes, batched, refusal = len(imported.graph.nodes), imported.batched, None
        declared = imported.inputs
    except ModelError as e:
        nodes, batched, refusal = None, None, e
    return Inspection(
        opsets={o.domain or "ai.onnx": o.version for o in proto.opset_import},
        producer=" ".join(filter(None, (proto.producer_name, proto.producer_version))),
        inputs=declared, outputs=tuple(_info(v) for v in graph.output),
        initializers=len(graph.initializer),
        weights=sum(prod(t.dims) for t in graph.initializer),
        ops=dict(sorted(ops.items())),
        unsupported=tuple(sorted(op for op in ops if op not in CONVERTERS)),
        engine_nodes=nodes, batched=batched, refusal=refusal)


def _info(value: onnx.ValueInfoProto) -> TensorInfo:
    """A declared input or output as its type says (a symbolic or unknown dimension as None,
    an unknown shape as none at all; describing never refuses), its dtype by numpy's name."""
    elem = value.type.tensor_type.elem_type
    try:
        name = str(onnx.helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, ValueError):
        name = onnx.TensorProto.DataType.Name(elem).lower() \
            if elem in onnx.TensorProto.DataType.values() else "unknown"
    return TensorInfo(value.name, _declared_dims(value) or (), name)
