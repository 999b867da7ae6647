"""Op descriptions: the engine's op table as ``OpInfo`` messages (the ListOps answer), and what a
client shows of one."""

from __future__ import annotations

from gradserve.engine import OP_TABLE, OpDef
from gradserve.engine.ops.base import arity_text
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.graphs import attribute_to_wire

VARIADIC = -1  # OpInfo.max_arity of an op that takes any number of operands


def op_infos() -> list[pb.OpInfo]:
    """Every op the engine has, by name."""
    return [op_info(op) for op in sorted(OP_TABLE.values(), key=lambda o: o.name)]


def op_info(op: OpDef) -> pb.OpInfo:
    """One op's description."""
    return pb.OpInfo(
        name=op.name, doc=op.doc, edges=op.edges, min_arity=op.min_arity,
        higher_order=op.jvp is not None,
        max_arity=VARIADIC if op.max_arity is None else op.max_arity,
        attributes=[
            pb.AttributeInfo(
                name=name, kind=str(spec.kind), doc=spec.doc, required=spec.required,
                choices=spec.choices,
                default_value=None if spec.default is None else attribute_to_wire(spec.default))
            for name, spec in op.attrs.items()
        ])


def arity_of(info: pb.OpInfo) -> str:
    """How many operands the op ``info`` describes takes (``2``, ``1-2``, ``1+``)."""
    return arity_text(info.min_arity, None if info.max_arity == VARIADIC else info.max_arity)
