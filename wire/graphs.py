"""Graphs: gradserve.v1 ``Graph`` messages to the engine's :class:`Graph` and back.

A graph is decoded field by field into the engine's own types, each problem a
:class:`~gradserve.wire.tensors.WireError` naming its field (``graph.nodes[3].attributes.axis``);
the engine then validates what the graph means. A graph past the node limit is refused before
anything of it is decoded.
"""

from __future__ import annotations

from google.protobuf import json_format

from gradserve.engine import Constant, EngineError, Graph, Input, Node
from gradserve.engine.ops import AttrValue
from gradserve.engine.validate import check_counts
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.tensors import (
    WireError,
    dtype_from_wire,
    shape_from_wire,
    tensor_from_wire,
    tensor_to_wire,
    wire_dtype_of,
)


def attribute_from_wire(value: pb.AttributeValue, field: str) -> AttrValue:
    """An attribute's Python value (ints become a tuple)."""
    kind = value.WhichOneof("value")
    if kind is None:
        raise WireError(field, "the attribute has no value")
    if kind == "ints_value":
        return tuple(int(i) for i in value.ints_value.values)
    result: AttrValue = getattr(value, kind)
    return result


def attribute_to_wire(value: AttrValue) -> pb.AttributeValue:
    """An attribute's wire form."""
    if isinstance(value, bool):
        return pb.AttributeValue(bool_value=value)
    if isinstance(value, int):
        return pb.AttributeValue(int_value=value)
    if isinstance(value, float):
        return pb.AttributeValue(float_value=value)
    if isinstance(value, str):
        return pb.AttributeValue(string_value=value)
    return pb.AttributeValue(ints_value=pb.IntList(values=list(value)))


def graph_from_wire(g: pb.Graph, field: str = "graph", max_elements: int = 1 << 28,
                    max_nodes: int | None = None) -> Graph:
    """The engine graph a Graph message describes (the engine validates its structure).

    With ``max_nodes``, a graph of more nodes (or inputs, constants and outputs together), as
    the engine counts them, is refused before anything is decoded: building a million nodes
    would take seconds and a gigabyte first."""
    if max_nodes is not None:
        try:
            check_counts(len(g.nodes), len(g.inputs) + len(g.constants) + len(g.outputs),
                         max_nodes)
        except EngineError as e:
            raise WireError(f"{field}.{e.field}", e.message) from None
    inputs = tuple(
        Input(i.name, shape_from_wire(i.shape, f"{field}.inputs[{k}].shape", max_elements),
              dtype_from_wire(i.dtype, f"{field}.inputs[{k}].dtype"),
              i.requires_grad if i.HasField("requires_grad") else True)
        for k, i in enumerate(g.inputs)
    )
    constants = tuple(
        Constant(c.name, tensor_from_wire(c.value, f"{field}.constants[{k}].value", max_elements))
        for k, c in enumerate(g.constants)
    )
    nodes = tuple(
        Node(n.name, n.op, tuple(n.inputs),
             {name: attribute_from_wire(v, f"{field}.nodes[{k}].attributes.{name}")
              for name, v in n.attributes.items()})
        for k, n in enumerate(g.nodes)
    )
    return Graph(inputs, nodes, tuple(g.outputs), constants)


def graph_to_wire(graph: Graph, *, raw: bool = True) -> pb.Graph:
    """The Graph message for an engine graph."""
    return pb.Graph(
        inputs=[pb.Input(name=i.name, dtype=wire_dtype_of(i.dtype), shape=i.shape,
                         requires_grad=i.requires_grad) for i in graph.inputs],
        constants=[pb.Constant(name=c.name, value=tensor_to_wire(c.value, raw=raw))
                   for c in graph.constants],
        nodes=[pb.Node(name=n.name, op=n.op, inputs=n.inputs,
                       attributes={k: attribute_to_wire(v) for k, v in n.attrs.items()})
               for n in graph.nodes],
        outputs=graph.outputs,
    )


def graph_from_json(text: str) -> Graph:
    """The graph a Graph message in the proto's JSON mapping describes (a file a user wrote)."""
    return graph_from_wire(json_format.Parse(text, pb.Graph()))
