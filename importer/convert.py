"""Importing an ONNX model: :func:`import_model` and what it returns.

The model is read and checked against the limits first (``reading``); then its inputs become
engine inputs, its initializers known values (or engine inputs, for those the caller names),
and each node in turn becomes engine ops through its converter (``ops.CONVERTERS``). Last, its
outputs are put in the engine's per-example form and the graph is validated by the engine.

Batching. A model whose inputs share one symbolic leading dimension (``batch``, ``N``) is
imported *batched*: that dimension becomes the engine's batch axis, so the engine graph's
inputs and outputs have per-example shapes without it, and a batched run (or the server's
batcher) stacks examples on it. Each example is computed as the model computes a batch of
one: a batch of B examples gives what B separate runs give, per-example outputs and
per-example gradients. So where the model reduces over its batch axis (a loss averaged over
N), each example gets its own value: averaging the outputs of B examples gives the model's
batch-of-B loss, and averaging their weight gradients (weights fed per example) its gradient.
A model with concrete dimensions only is imported unbatched: its shapes are the engine
graph's per-example shapes as they are, N included (a batched run then stacks whole model
batches, and the engine's conv and pools keep N as a leading axis of their operands).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from gradserve.engine import DType, EngineError, ErrorKind, Graph
from gradserve.engine.validate import Limits, check
from gradserve.importer.emitter import Emitter, Known, Missing, Sym, Tensor, Value, shape_of
from gradserve.importer.errors import ModelError
from gradserve.importer.node import NodeView
from gradserve.importer.ops import CONVERTERS
from gradserve.importer.reading import DEFAULT_DOMAINS, REVIEWED_OPSET, read
from gradserve.importer.reading import check as check_model

Dim = int | None  # None: a symbolic dimension (the batch axis)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One of a model's inputs or outputs: its name, its shape as the model declares it (None
    for a symbolic dimension) and its dtype's name (``float32``, ``int64``)."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class Imported:
    """An imported model: the engine graph, the inputs a caller feeds it (the model's own,
    then the initializers named as inputs), its outputs, and whether it is batched (the
    model's symbolic leading dimension is the engine's batch axis: see the module's doc)."""

    graph: Graph
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    batched: bool


def import_model(model: onnx.ModelProto | bytes | str | os.PathLike[str], *,
                 inputs: Collection[str] = (), limits: Limits | None = None) -> Imported:
    """Turn an ONNX model (a ModelProto, its serialized bytes, or the path of a ``.onnx``
    file) into an engine graph.

    Initializers become engine constants, but those named in ``inputs``, which become engine
    inputs (a caller then feeds their values and can get their gradients). ``limits`` bound
    the model (bytes, nodes, elements, ranks, names) before it is converted, and the graph
    it becomes. Anything that cannot be imported raises :class:`ModelError`.
    """
    limits = limits or Limits()
    proto = check_model(read(model, limits), limits)
    if isinstance(inputs, str):
        raise ModelError("inputs is a collection of initializer names, not one string",
                         field="inputs")
    with np.errstate(all="ignore"):  # folding follows IEEE (inf, nan), as the engine does
        return _Conversion(proto, frozenset(inputs), limits).run()


_DTYPES: Mapping[int, DType] = {onnx.TensorProto.FLOAT: DType.FLOAT32,
                                onnx.TensorProto.DOUBLE: DType.FLOAT64,
                                onnx.TensorProto.INT64: DType.INT64}


class _Conversion:
    """One import: the model's values as the nodes are converted, and the engine graph."""

    def __init__(self, model: onnx.ModelProto, wanted: frozenset[str], limits: Limits) -> None:
        self.model = model
        self.graph = model.graph
        self.opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        self.wanted = wanted
        self.limits = limits
        self.produced = {o for node in self.graph.node for o in node.output if o}
        names = {v.name for v in self.graph.input} | {t.name for t in self.graph.initializer}
        self.emitter = Emitter(limits, names | self.produced)
        self.values: dict[str, Value] = {}
        self.batch: str | None = None  # the symbol of the batch axis, when batched
        self._inferred: dict[str, onnx.ValueInfoProto] | None = None  # see _inferred_dims

    def run(self) -> Imported:
        initializers = {t.name: (k, t) for k, t in enumerate(self.graph.initializer)}
        for name in sorted(self.wanted):
            if name not in initializers:  # a graph input is an input already
                raise ModelError(f"{name!r} is not an initializer of the model", node=name,
                                 field="inputs")
        self.batch = _batch_symbol(self.graph.input, initializers)
        infos = [self._input(k, v) for k, v in enumerate(self.graph.input)
                 if v.name not in initializers]
        for k, t in initializers.values():
            infos += self._initializer(k, t)
        for index, node in enumerate(self.graph.node):
            self._node(index, node)
        outputs = [self._output(k, v) for k, v in enumerate(self.graph.output)]
        graph = self.emitter.finish([(info.name, t) for info, t in outputs],
                                    self.values.items())
        try:
            check(graph, self.limits)
        except EngineError as e:
            raise ModelError(f"the engine refuses the imported graph: {e.message}",
                             node=e.node, field=e.field, limit=e.kind is ErrorKind.LIMIT
                             ) from None
        return Imported(graph, tuple(infos), tuple(info for info, _ in outputs),
                        self.batch is not None)

    # --- inputs and initializers ------------------------------------------------------------

    def _input(self, k: int, value: onnx.ValueInfoProto) -> TensorInfo:
        """A graph input: an engine input, without its batch axis when it has one."""
        field = f"graph.input[{k}].type"
        dims, dtype = _declared(value, field, self.batch)
        squeezed = self.batch is not None and bool(dims) and dims[0] is None
        shape = tuple(1 if d is None else d for d in dims)
        if any(d < 1 for d in shape):
            raise ModelError(f"dims {list(dims)} need sizes >= 1", node=value.name, field=field)
        self.values[value.name] = self.emitter.input(value.name, shape, dtype, squeezed)
        return TensorInfo(value.name, dims, str(dtype))

    def _initializer(self, k: int, tensor: onnx.TensorProto) -> list[TensorInfo]:
        """An initializer: a known value, or an engine input if the caller named it."""
        field = f"graph.initializer[{k}]"
        try:
            array = onnx.numpy_helper.to_array(tensor)
        except (ValueError, TypeError, KeyError) as e:
            raise ModelError(f"the tensor's data does not fit its type and shape: {e}",
                             node=tensor.name, field=field) from None
        if tensor.name not in self.wanted:
            self.values[tensor.name] = Known(array, tensor.name)
            return []
        dtype = _DTYPES.get(tensor.data_type)
        if dtype is None or 0 in array.shape:
            raise ModelError(f"an input must be a non-empty float32, float64 or int64 tensor, "
                             f"not {array.dtype}{list(array.shape)}", node=tensor.name,
                             field=field)
        self.values[tensor.name] = self.emitter.input(tensor.name, array.shape, dtype, False)
        return [TensorInfo(tensor.name, tuple(array.shape), str(dtype))]

    # --- nodes ------------------------------------------------------------------------------

    def _node(self, index: int, node: onnx.NodeProto) -> None:
        """Convert one node and bind its outputs."""
        domain = node.domain if node.domain not in DEFAULT_DOMAINS else "ai.onnx"
        opset = self.opsets.get(domain)
        name = node.name or (node.output[0] if node.output else f"node {index}")

        def error(message: str, field: str | None = None, limit: bool = False) -> ModelError:
            return ModelError(message, node=name, op_type=node.op_type, opset=opset,
                              field=f"graph.node[{index}]" + (f".{field}" if field else ""),
                              limit=limit)

        converter = CONVERTERS.get(node.op_type) if domain == "ai.onnx" else None
        if converter is None or opset is None:
            raise error(f"op {node.op_type!r} of domain {domain!r} is not supported", "op_type")
        try:
            version = onnx.defs.get_schema(node.op_type, opset, "").since_version
        except onnx.defs.SchemaError:
            raise error(f"opset {opset} has no op {node.op_type!r}", "op_type") from None
        if version > REVIEWED_OPSET:
            raise error(f"{node.op_type} version {version} is newer than this importer knows",
                        "op_type")
        inputs = [self._lookup(value, k, error) if value else None
                  for k, value in enumerate(node.input)]
        view = NodeView(node, index, version, opset, inputs, self.emitter)
        self.emitter.context = next((o for o in node.output if o), name)
        try:
            outputs = converter(self.emitter, view)
        except ModelError as e:
            if e.node is not None:
                raise
            raise error(e.message, e.field, e.limit) from None
        except (ValueError, TypeError, IndexError, ArithmeticError) as e:
            raise error(f"cannot convert it: {e}") from None
        unread = view.unread()
        if unread:
            raise error(f"attribute {unread[0]!r} of {node.op_type} is not supported",
                        f"attribute.{unread[0]}")
        for k, out in enumerate(node.output):
            if not out:
                continue
            if k >= len(outputs):
                raise error(f"output {k} of {node.op_type} is not supported", f"output[{k}]")
            if out in self.values:
                raise error(f"{out!r} is assigned twice", f"output[{k}]")
            value = outputs[k]
            self.values[out] = Known(value.array, out) if isinstance(value, Known) \
                and value.name is None else value

    def _lookup(self, name: str, k: int, error: Callable[[str, str], ModelError]) -> Value:
        value = self.values.get(name)
        if value is None:
            if name in self.produced:
                raise error(f"input {name!r} is used before the node that computes it (ONNX "
                            "lists nodes in topological order)", f"input[{k}]")
            raise error(f"input {name!r} is not computed by any node, initializer or graph "
                        "input", f"input[{k}]")
        return value

    # --- outputs ----------------------------------------------------------------------------

    def _output(self, k: int, info: onnx.ValueInfoProto) -> tuple[TensorInfo, Tensor]:
        """A graph output as the engine holds it per example (the batch axis dropped), and
        how it is described."""
        field = f"graph.output[{k}]"
        value = self.values.get(info.name)
        if value is None:
            raise ModelError(f"output {info.name!r} is not computed by any node, initializer "
                             "or graph input", node=info.name, field=field)
        if isinstance(value, Missing):
            raise ModelError(f"output {info.name!r} is not computed: {value.reason}",
                             node=info.name, field=field)
        shape = shape_of(value)
        declared = _declared_dims(info)
        if declared is None and self.batch is not None:
            declared = self._inferred_dims(info.name)
        if declared is None:
            declared = tuple(shape)
        elif len(declared) != len(shape) or any(d not in (None, s)
                                                for d, s in zip(declared, shape, strict=True)):
            raise ModelError(f"the output is declared {list(declared)} but computes "
                             f"{list(shape)}", node=info.name, field=field)
        batch_axes = [i for i, d in enumerate(declared) if d is None]
        if self.batch is None or not batch_axes:
            tensor = self.emitter.full(value)
        elif len(batch_axes) > 1:
            raise ModelError(f"the output has symbolic dimensions {batch_axes}: only the batch "
                             "axis may be symbolic", node=info.name, field=field)
        elif batch_axes == [0] and isinstance(value, Sym) and value.squeezed:
            tensor = value
        else:
            axis = batch_axes[0]
            tensor = self.emitter.reshape(self.emitter.full(value),
                                          shape[:axis] + shape[axis + 1:])
        dtype = str(tensor.dtype if isinstance(tensor, Sym) else tensor.array.dtype)
        return TensorInfo(info.name, declared, dtype), tensor

    def _inferred_dims(self, name: str) -> tuple[Dim, ...]:
        """An output's dimensions as ONNX shape inference finds them (for a batched model's
        output that declares none: where its batch axis lies)."""
        if self._inferred is None:
            try:
                model = onnx.shape_inference.infer_shapes(self.model, data_prop=True)
            except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
                raise ModelError(f"shape inference fails: {e}", field="graph.output") from None
            self._inferred = {v.name: v for v in model.graph.output}
        dims = _declared_dims(self._inferred[name]) if name in self._inferred else None
        if dims is None:
            raise ModelError("the output declares no shape, and shape inference finds none: "
                             "where its batch axis lies is unknown", node=name,
                             field="graph.output")
        return dims


def _declared_dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    """A value's declared dimensions (None for a symbolic one), or None if it declares none."""
    if not value.type.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None
                 for d in value.type.tensor_type.shape.dim)


def _declared(value: onnx.ValueInfoProto, field: str, batch: str | None
              ) -> tuple[tuple[Dim, ...], DType]:
    """A graph input's dimensions and engine dtype, refused where the engine has no such
    input: another type, an unknown shape, a symbolic dimension other than the batch axis."""
    if value.type.WhichOneof("value") != "tensor_type":
        raise ModelError("only tensor inputs are supported", node=value.name, field=field)
    dtype = _DTYPES.get(value.type.tensor_type.elem_type)
    if dtype is None:
        elem = value.type.tensor_type.elem_type
        name = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() \
            else str(elem)
        raise ModelError(f"data type {name} is not supported: inputs are FLOAT, DOUBLE or INT64",
                         node=value.name, field=f"{field}.tensor_type.elem_type")
    dims = _declared_dims(value)
    if dims is None:
        raise ModelError("the input declares no shape", node=value.name,
                         field=f"{field}.tensor_type.shape")
    if any(d is None for d in dims[1:]) or (dims and dims[0] is None and batch is None):
        raise ModelError(f"dims {list(dims)}: only the leading (batch) dimension may be "
                         "symbolic; export the model with fixed sizes for the others",
                         node=value.name, field=f"{field}.tensor_type.shape")
    return dims, dtype


def _batch_symbol(inputs: Sequence[onnx.ValueInfoProto],
                  initializers: Mapping[str, object]) -> str | None:
    """The symbol of the inputs' shared symbolic leading dimension (the batch axis; an
    unnamed one is ``""``), or None if no input has one."""
    symbols = {v.type.tensor_type.shape.dim[0].dim_param: v.name for v in inputs
               if v.name not in initializers and len(v.type.tensor_type.shape.dim)
               and not v.type.tensor_type.shape.dim[0].HasField("dim_value")}
    if len(symbols) > 1:
        listed = ", ".join(f"{name!r} ({symbol or 'unnamed'})" for symbol, name in
                           symbols.items())
        raise ModelError(f"inputs lead with different symbolic dimensions: {listed}; the batch "
                         "axis must be one", field="graph.input")
    return next(iter(symbols), None)

