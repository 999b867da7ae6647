"""The importer's one exception type: what in the model cannot be imported, and where.

Everything the importer refuses (bytes that are not a model, a model without a graph, a name no
node produces, a data type or op the engine lacks, a model over the limits) is a
:class:`ModelError`, never another exception, so a server can answer any upload with a
client-side error that names the node, its op type and opset, and the field at fault.
"""

from __future__ import annotations


class ModelError(ValueError):
    """A model the importer cannot turn into an engine graph.

    ``node`` names the ONNX node at fault (its ``name``, or its first output when it has no
    name), or the initializer, input or output when the problem is one of those; ``op_type``
    and ``opset`` say which op at which opset of its domain, for a node; ``field`` names the
    part of the model (``"graph.node[3].attribute.axis"``, ``"graph.input[0].type"``,
    ``"bytes"``). Each is None where it does not apply. ``limit`` says the model is refused
    for its size (bytes, nodes, ranks, elements) rather than for what it is: a server answers
    RESOURCE_EXHAUSTED for that, as for any graph over its limits.
    """

    def __init__(self, message: str, *, node: str | None = None, op_type: str | None = None,
                 opset: int | None = None, field: str | None = None,
                 limit: bool = False) -> None:
        self.message = message
        self.limit = limit
        self.node = node
        self.op_type = op_type
        self.opset = opset
        self.field = field
        where = ""
        if node is not None:
            what = f" ({op_type}, opset {opset})" if op_type is not None else ""
            where = f"{node}{what}: "
        super().__init__(f"{where}{message}")
