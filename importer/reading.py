"""Reading a model and refusing what cannot be imported before any of it is converted.

:func:`read` turns a ModelProto, its bytes or a file into a ModelProto; :func:`check` then
looks at counts and declared shapes only (no tensor is decoded yet), so a model over the
engine's :class:`~gradserve.engine.Limits` (too many bytes, nodes, elements; too high a rank;
too long a name) is refused before it costs memory or time, and so is a model with no graph,
with tensors stored outside it, or of an opset this importer does not read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from math import prod
from pathlib import Path

import onnx
import onnx.inliner
from google.protobuf.message import DecodeError

from gradserve.engine.validate import Limits
from gradserve.importer.errors import ModelError

MIN_OPSET = 11  # older models: onnx.version_converter.convert_version brings them up
# The newest opset whose ops this importer was written against. A newer onnx may define new
# versions of ops; a node at such a version is refused until the importer has looked at it.
REVIEWED_OPSET = 28
DEFAULT_DOMAINS = ("", "ai.onnx")

Source = onnx.ModelProto | bytes | str | os.PathLike[str]


def max_bytes(limits: Limits) -> int:
    """The most bytes a model may have: its tensors must fit in one run's elements, so no
    more than that many float64 values (2 GiB, protobuf's own ceiling, by default)."""
    return 8 * limits.max_total_elements


def read(model: Source, limits: Limits) -> onnx.ModelProto:
    """The ModelProto ``model`` is, holds (bytes) or names (a path), refused if it is larger
    than :func:`max_bytes` or is not a model at all."""
    if isinstance(model, onnx.ModelProto):
        _within_bytes(model.ByteSize(), limits)
        return model
    if isinstance(model, bytes | bytearray | memoryview):
        data = bytes(model)
    elif isinstance(model, str | os.PathLike):
        data = _read_file(Path(model), limits)
    else:
        raise ModelError(f"a model is a ModelProto, its bytes or a path, not "
                         f"{type(model).__name__}", field="model")
    _within_bytes(len(data), limits)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as e:
        raise ModelError(f"the bytes are not an ONNX model: {e}", field="bytes") from None
    return proto


def _read_file(path: Path, limits: Limits) -> bytes:
    try:
        _within_bytes(path.stat().st_size, limits)
        return path.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read the model file: {e.strerror or e}",
                         field="path") from None


def _within_bytes(size: int, limits: Limits) -> None:
    if size > max_bytes(limits):
        raise ModelError(f"the model has {size} bytes; the limit is {max_bytes(limits)}",
                         field="bytes", limit=True)


def check(model: onnx.ModelProto, limits: Limits) -> onnx.ModelProto:
    """The model with its local functions inlined; or a :class:`ModelError` for what makes
    it unreadable (no graph, an opset outside the range read) or too large."""
    if not model.HasField("graph"):
        raise ModelError("the model has no graph", field="graph")
    _check_opset(model)
    graph = model.graph
    nodes = len(graph.node) + sum(len(f.node) for f in model.functions)
    named = len(graph.input) + len(graph.initializer) + len(graph.output)
    for what, count in (("graph.node", nodes), ("graph.initializer", named)):
        if count > limits.max_nodes:
            raise ModelError(f"the model has {count} {what.split('.')[1]}s and the like; the "
                             f"limit is {limits.max_nodes}", field=what, limit=True)
    if len(graph.sparse_initializer):
        raise ModelError("sparse initializers are not supported",
                         field="graph.sparse_initializer")
    _check_tensors(model, limits)
    _check_names(model, limits)
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
        if len(model.graph.node) > limits.max_nodes:
            raise ModelError(f"with its functions inlined the model has {len(model.graph.node)} "
                             f"nodes; the limit is {limits.max_nodes}", field="graph.node",
                             limit=True)
    return model


def _check_opset(model: onnx.ModelProto) -> None:
    """The model's opset of the default (ai.onnx) domain must be one this importer reads."""
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    if not versions:
        raise ModelError("the model imports no opset of the default domain",
                         field="opset_import")
    opset = versions[0]
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ModelError(f"opset {opset} is outside the {MIN_OPSET} to {newest} this importer "
                         "reads; onnx.version_converter.convert_version can convert the model",
                         field="opset_import", opset=opset)


def _tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor the graph holds, with its field: initializers and Constant values."""
    for k, t in enumerate(model.graph.initializer):
        yield f"graph.initializer[{k}]", t
    for k, node in enumerate(model.graph.node):
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield f"graph.node[{k}].attribute.{a.name}", a.t


def _check_tensors(model: onnx.ModelProto, limits: Limits) -> None:
    """Declared sizes within the limits, data stored in the model; before any is decoded."""
    total = 0
    for field, t in _tensors(model):
        name = t.name or None
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelError("the tensor's data is stored outside the model: load it with "
                             "onnx.load(path) and pass the ModelProto", node=name, field=field)
        dims = list(t.dims)
        if any(d < 0 for d in dims):
            raise ModelError(f"dims {dims} are negative", node=name, field=field)
        elements = prod(dims)
        if len(dims) > limits.max_rank:
            raise ModelError(f"rank {len(dims)} exceeds the limit of {limits.max_rank}",
                             node=name, field=field, limit=True)
        if elements > limits.max_elements:
            raise ModelError(f"the tensor holds {elements} elements; the limit is "
                             f"{limits.max_elements} per tensor", node=name, field=field,
                             limit=True)
        total += elements
    if total > limits.max_total_elements:
        raise ModelError(f"the model's tensors hold {total} elements; the limit is "
                         f"{limits.max_total_elements}", field="graph.initializer", limit=True)
    for k, value in enumerate(model.graph.input):
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if len(dims) > limits.max_rank or prod(d for d in dims if d > 0) > limits.max_elements:
            raise ModelError(f"input of shape {dims} is over the limits (rank "
                             f"{limits.max_rank}, {limits.max_elements} elements)",
                             node=value.name, field=f"graph.input[{k}]", limit=True)


def _check_names(model: onnx.ModelProto, limits: Limits) -> None:
    """No name longer than the engine takes (they become the engine graph's names)."""
    graph = model.graph
    named = [*((f"graph.input[{k}]", v.name) for k, v in enumerate(graph.input)),
             *((f"graph.output[{k}]", v.name) for k, v in enumerate(graph.output)),
             *((f"graph.initializer[{k}]", t.name) for k, t in enumerate(graph.initializer)),
             *((f"graph.node[{k}].output", o) for k, n in enumerate(graph.node) for o in n.output)]
    for field, name in named:
        if len(name) > limits.max_name_length:
            raise ModelError(f"a name of {len(name)} characters; names have at most "
                             f"{limits.max_name_length}", field=field)
