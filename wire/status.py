"""Errors on the wire: what went wrong as gRPC statuses with ``google.rpc.BadRequest``
details, and back.

Bad input is INVALID_ARGUMENT, a limit RESOURCE_EXHAUSTED, and every status carries field
violations naming the offending field (``graph.nodes[3].attributes.axis``, ``inputs.x``), so
any gRPC client can point at the problem. No stack trace ever reaches a client. The server
raises :class:`RequestError` (a call's status, or a stream's ``StreamError``); a client reads
the field violations back with :func:`violations_of` and :func:`status_code`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gradserve.engine import Constant, EngineError, ErrorKind, Graph, Input, Node
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.tensors import WireError

# UTF-8 bytes of a message, field path or description sent back. gRPC sends the message twice
# in the trailers (percent-encoded in grpc-message, base64 in grpc-status-details-bin), and
# clients drop a response whose metadata passes 8 KiB: 512 bytes each keeps the worst case
# (every byte non-ASCII) near 4 KiB.
ECHO_LIMIT = 512


@dataclass(eq=False)  # compared and hashed by identity, as exceptions are
class RequestError(Exception):
    """A request the server refuses: a status code, a message, and the offending fields. Each
    text is cut to ECHO_LIMIT bytes, so no client-supplied string comes back whole. (Not a
    frozen dataclass: Python sets an exception's __traceback__ by assignment as it travels.)"""

    code: grpc.StatusCode
    message: str
    violations: tuple[tuple[str, str], ...] = ()
    reason: str | None = None  # why it was refused, when its code does not say it all

    @property
    def rejection(self) -> str | None:
        """The reason this is a refusal (a REJECTION_REASONS entry), None for a server error."""
        return self.reason or _REJECTIONS.get(self.code)

    def __post_init__(self) -> None:
        self.message = _bounded(self.message)
        self.violations = tuple((_bounded(f), _bounded(d)) for f, d in self.violations)

    def to_stream_error(self) -> pb.StreamError:
        """The error a stream answers one request with (the stream goes on)."""
        return pb.StreamError(code=self.code.value[0], message=self.message, field_violations=[
            pb.FieldViolation(field=f, description=d) for f, d in self.violations])

    def to_status(self) -> grpc.Status:
        """The rich status (google.rpc.Status with BadRequest details) to abort a call with."""
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in self.violations
        ]))
        status = status_pb2.Status(code=self.code.value[0], message=self.message,
                                   details=[detail] if self.violations else [])
        rich: grpc.Status = rpc_status.to_status(status)
        return rich


# Why a request was refused, by its status code; a refusal may give a finer reason instead.
_REJECTIONS = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "limit",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
}
QUEUE_FULL = "queue_full"  # RESOURCE_EXHAUSTED: the server is busy
DECODE_COST = "decode_cost"  # RESOURCE_EXHAUSTED: the tensors would take too much decoded
# Every reason a refusal can give (the metrics' ``reason`` label).
REJECTION_REASONS = (*_REJECTIONS.values(), QUEUE_FULL, DECODE_COST)
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The status code numbered ``number`` on the wire (UNKNOWN for a number gRPC has not)."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


def violations_of(e: grpc.RpcError) -> tuple[tuple[str, str], ...]:
    """The field violations a failed call's rich status carries (none if it has none)."""
    status = rpc_status.from_call(e)  # type: ignore[arg-type]
    found: list[tuple[str, str]] = []
    for detail in () if status is None else status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found += [(v.field, v.description) for v in bad.field_violations]
    return tuple(found)


def _bounded(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, ending in an ellipsis when cut."""
    encoded = text.encode("utf-8", "backslashreplace")
    if len(encoded) <= limit:
        return text
    ellipsis = "\u2026"
    head = encoded[: limit - len(ellipsis.encode())].decode("utf-8", "ignore")
    return head + ellipsis


def shown(text: str) -> str:
    """A client's string as a message quotes it: its first 64 bytes, in quotes."""
    return repr(_bounded(text, 64))


def invalid(field: str, description: str) -> RequestError:
    """INVALID_ARGUMENT for one field."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}",
                        ((field, description),))


def exhausted(field: str, description: str) -> RequestError:
    """RESOURCE_EXHAUSTED (a limit) for one field."""
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{field}: {description}",
                        ((field, description),))


def expired() -> RequestError:
    """DEADLINE_EXCEEDED for work stopped because its deadline passed (or its caller left)."""
    return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                        "the deadline passed before the request was computed")


def from_wire_error(e: WireError) -> RequestError:
    """A decoding error: the codec already names the field."""
    kind = exhausted if "limit" in e.description else invalid
    return kind(e.field, e.description)


def from_engine_error(e: EngineError, graph: Graph, *, running: bool) -> RequestError:
    """An engine error located in the request. Compiling, the error is about the graph
    (``graph.nodes[3].attributes.axis``); running, about what was fed (``inputs.x``,
    ``upstream.y``, ``wrt``), unless an op refused a value: then the input that fed it
    (``inputs.labels``), or the node's operand (``graph.nodes[3].inputs[1]``)."""
    if e.kind is ErrorKind.CANCELLED:  # its caller is gone, or its deadline passed
        return expired()
    if not running:
        field = None
    elif e.kind is ErrorKind.VALUE:
        field = _feeding_input(e, graph)
    else:
        field = _fed_field(e, graph)
    field = field or _graph_field(e, graph)
    kind = exhausted if e.kind is ErrorKind.LIMIT else invalid
    return kind(field, e.message)


def _feeding_input(e: EngineError, graph: Graph) -> str | None:
    """``inputs.<name>`` when the operand whose value an op refused (``e.field``
    ``inputs[k]`` of node ``e.node``) is one of the graph's inputs: the request's field that
    holds the value."""
    operand = re.fullmatch(r"inputs\[(\d+)\]", e.field or "")
    node = next((n for n in graph.nodes if n.name == e.node), None)
    if operand is None or node is None or int(operand[1]) >= len(node.inputs):
        return None
    name = node.inputs[int(operand[1])]
    return f"inputs.{name}" if any(i.name == name for i in graph.inputs) else None


def _fed_field(e: EngineError, graph: Graph) -> str | None:
    if e.field == "wrt":
        return "wrt"
    if e.field == "batch":
        return "batch_size"
    if e.field == "time":
        return "graph"  # the work the graph asks for took too long
    if e.field in ("inputs", "upstream"):
        return e.field if e.node is None else f"{e.field}.{e.node}"
    if e.node in {i.name for i in graph.inputs}:
        return f"inputs.{e.node}"
    return None


def _graph_field(e: EngineError, graph: Graph) -> str:
    field = re.sub(r"^attrs\b", "attributes", e.field or "")
    if field.startswith(("outputs", "nodes")):  # about the graph's lists themselves
        return f"graph.{field}"
    # The items of that name, in the order the engine assigns names: of a name assigned twice,
    # the second is the one at fault.
    parts: tuple[tuple[str, Sequence[Input | Constant | Node]], ...] = (
        ("inputs", graph.inputs), ("constants", graph.constants), ("nodes", graph.nodes))
    named = [f"graph.{part}[{k}]" for part, items in parts for k, item in enumerate(items)
             if e.node is not None and item.name == e.node]
    at = 1 if e.kind is ErrorKind.DUPLICATE_NAME and len(named) > 1 else 0
    where = named[at] if named else "graph"
    return f"{where}.{field}" if field else where
