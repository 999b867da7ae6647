"""ONNX models on the wire: an ``OnnxModel`` message imported as an engine graph, and the
``GraphSignature`` that tells a caller what a graph (imported or not) takes and gives.

The importer (``gradserve.importer``) does the work; this module maps its refusals to wire
errors whose field is the path into the message (``onnx_model.model.graph.node[3].op_type``)
and whose description names the node, its op type and opset.
"""

from __future__ import annotations

import hashlib

from gradserve.engine import Graph, Plan
from gradserve.engine.validate import Limits
from gradserve.importer import ModelError, import_model
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.status import exhausted
from gradserve.wire.tensors import WireError, wire_dtype_of

# Where an importer's field lands in an OnnxModel message: "inputs" is the caller's list of
# initializers to feed; every other field is a path into the model itself.
_CALLER_FIELDS = {"inputs": "initializer_inputs"}


def model_from_wire(message: pb.OnnxModel, field: str, limits: Limits) -> tuple[Graph, bool]:
    """The engine graph an OnnxModel message's model imports as, and whether the model's
    symbolic leading dimension became the batch axis; a WireError naming the part of the
    model at fault if it cannot be imported, or RESOURCE_EXHAUSTED (a RequestError) if it is
    over ``limits`` (refused before it is converted, where its size says so)."""
    try:
        imported = import_model(message.model, inputs=list(message.initializer_inputs),
                                limits=limits)
    except ModelError as e:
        where = _CALLER_FIELDS.get(e.field or "")
        path = f"{field}.{where}" if where else f"{field}.model" + (
            f".{e.field}" if e.field and e.field != "bytes" else "")
        if e.limit:
            raise exhausted(path, str(e)) from None
        raise WireError(path, str(e)) from None
    return imported.graph, imported.batched


def model_digest(message: pb.OnnxModel) -> bytes:
    """A digest of what an OnnxModel message asks to import: its model's bytes and the
    initializers made inputs (the same model with other inputs is another graph)."""
    h = hashlib.sha256(message.model)
    for name in message.initializer_inputs:
        data = name.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.digest()


def signature_to_wire(plan: Plan, model_batched: bool = False) -> pb.GraphSignature:
    """What a compiled graph takes and gives: each input's and output's name, dtype and
    per-example shape, in the graph's order."""
    def info(name: str) -> pb.ValueInfo:
        t = plan.types[plan.slot[name]]
        return pb.ValueInfo(name=name, dtype=wire_dtype_of(t.dtype), shape=t.shape)

    return pb.GraphSignature(inputs=[info(i.name) for i in plan.inputs],
                             outputs=[info(name) for name in plan.outputs],
                             model_batched=model_batched)
