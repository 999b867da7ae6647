"""Registering the GradientService's handlers with gRPC.

The generated ``add_GradientServiceServicer_to_server`` decodes requests with ``FromString``
inside gRPC: bytes that are not a valid message raise DecodeError there, and gRPC answers
UNKNOWN and logs a traceback per call. Here every method decodes with the wire layer's
tolerant decoders instead (``wire.requests``: malformed bytes arrive as ``Malformed``, and a
large Compute request's tensors stay in the received bytes), counts the bytes each way, and a
handler may answer with a message it serialised itself, as bytes. A unary handler's failure
lets go of its request at once (:func:`forgetting`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message_factory import GetMessageClass

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.requests import detaching, tolerant

SERVICE = pb.DESCRIPTOR.services_by_name["GradientService"]
DETACHED_FIELDS = {"Compute": ("inputs", "upstream")}  # by method: map<string, Tensor> fields


class WireBytes:
    """Bytes of request and response messages by method, counted as gRPC hands them over
    (on the server's event loop)."""

    def __init__(self) -> None:
        self.received: dict[str, int] = {}
        self.sent: dict[str, int] = {}


def add_service(servicer: object, server: grpc.aio.Server, wire: WireBytes) -> None:
    """Register ``servicer``'s methods for every RPC of gradserve.v1.GradientService, decoding
    requests with :func:`tolerant` (:func:`detaching` for DETACHED_FIELDS) and counting the
    bytes in ``wire``."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        kind = _HANDLERS[method.client_streaming, method.server_streaming]
        request = GetMessageClass(method.input_type)
        fields = DETACHED_FIELDS.get(method.name)
        handle = getattr(servicer, method.name)
        handlers[method.name] = kind(
            handle if method.client_streaming or method.server_streaming else forgetting(handle),
            request_deserializer=_reading(tolerant(request) if fields is None else
                                          detaching(request, fields),
                                          wire.received, method.name),
            response_serializer=_writing(GetMessageClass(method.output_type).SerializeToString,
                                         wire.sent, method.name))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def forgetting(handle: Callable[[Any, Any], Awaitable[Any]]
               ) -> Callable[[Any, Any], Awaitable[Any]]:
    """A unary handler whose failure keeps no hold on its request.

    gRPC keeps the exception a handler ends with (``context.abort``'s AbortError) in a
    reference cycle with the call's state, and the exception's traceback, and those of the
    exceptions it was raised while handling, hold every frame they passed through with its
    locals: the request among them. Each refused request then stayed in memory until the
    cyclic collector happened to run (a refused million-node request held 185 MB). Cutting
    the tracebacks lets the request go as the call ends; the server logged any trace it needed
    before."""

    async def handle_and_forget(request: Any, context: Any) -> Any:
        try:
            return await handle(request, context)
        except BaseException as e:
            del request
            _cut_tracebacks(e)
            raise

    return handle_and_forget


def _cut_tracebacks(error: BaseException) -> None:
    """Drop the tracebacks of ``error`` and of every exception chained to it."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop()
        if id(e) not in seen:
            seen.add(id(e))
            e.with_traceback(None)
            pending.extend(c for c in (e.__cause__, e.__context__) if c is not None)


def _reading(decode: Callable[[bytes], Any], counts: dict[str, int], method: str
             ) -> Callable[[bytes], Any]:
    counts[method] = 0

    def read(data: bytes) -> Any:
        counts[method] += len(data)
        return decode(data)

    return read


def _writing(encode: Callable[[Any], bytes], counts: dict[str, int], method: str
             ) -> Callable[[Any], bytes]:
    """A response serializer: ``encode`` for a message; bytes, serialised already, as they
    are."""
    counts[method] = 0

    def write(message: Any) -> bytes:
        data = message if isinstance(message, bytes) else encode(message)
        counts[method] += len(data)
        return data

    return write


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
