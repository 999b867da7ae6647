"""Registering the GradientService with request decoding that never raises.

The generated ``add_GradientServiceServicer_to_server`` decodes requests with ``FromString``
inside gRPC: bytes that are not a valid message (random, truncated, a wrong length prefix)
raise DecodeError there, and gRPC answers UNKNOWN and logs a traceback per call. Here every
method decodes with :func:`tolerant` instead, which turns such bytes into a :class:`Malformed`
value; the handler answers it with INVALID_ARGUMENT (see :func:`decoded`), and the server logs
at most one line per interval about them, however many arrive.

A large Compute request's tensors are not copied out of the received bytes (see
:func:`detaching`), and a handler may answer with a message it serialised itself, as bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from gradserve.client.bulk import RawData, parse_detached
from gradserve.server.errors import invalid
from gradserve.v1 import gradserve_pb2 as pb

log = logging.getLogger("gradserve.server")
SERVICE = pb.DESCRIPTOR.services_by_name["GradientService"]
LOG_INTERVAL = 10.0  # seconds between two log lines about malformed requests
DETACH_BYTES = 1 << 20  # tensors this large stay in the bytes a request arrived in
DETACHED_FIELDS = {"Compute": ("inputs", "upstream")}  # by method: map<string, Tensor> fields
M = TypeVar("M", bound=Message)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Malformed:
    """Bytes a client sent that do not decode as a message of type ``message``."""

    message: str  # the message's full name, e.g. gradserve.v1.ComputeRequest
    size: int  # bytes received


def tolerant(message: type[M]) -> Callable[[bytes], M | Malformed]:
    """A request deserializer for ``message`` that returns :class:`Malformed` where
    ``FromString`` would raise."""
    name = message.DESCRIPTOR.full_name

    def decode(data: bytes) -> M | Malformed:
        try:
            return message.FromString(data)
        except DecodeError:
            return Malformed(name, len(data))

    return decode


@dataclass(frozen=True, slots=True)
class Detached(Generic[M]):
    """A request whose large tensors' raw_data was left in the received bytes: ``raw`` holds
    views of it by map field and key (see ``bulk.parse_detached``)."""

    message: M
    raw: RawData
    size: int  # bytes received


def detaching(message: type[M], fields: Collection[str]) -> Callable[[bytes], Detached[M] |
                                                                   Malformed]:
    """A request deserializer like :func:`tolerant`'s that leaves the raw_data of tensors of at
    least DETACH_BYTES in ``fields`` in the received bytes (saving two copies of each)."""
    plain = tolerant(message)

    def decode(data: bytes) -> Detached[M] | Malformed:
        if len(data) < DETACH_BYTES:
            got = plain(data)
            return got if isinstance(got, Malformed) else Detached(got, {}, len(data))
        try:
            return Detached(*parse_detached(message, data, fields, DETACH_BYTES), len(data))
        except DecodeError:
            return Malformed(message.DESCRIPTOR.full_name, len(data))

    return decode


class _Throttle:
    """Says whether to log now: at most once per ``interval`` seconds; counts what it held."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = 0.0
        self.held = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            self.held += 1
            return False
        self._next = now + self._interval
        return True


_malformed_log = _Throttle(LOG_INTERVAL)


def decoded(request: T | Malformed) -> T:
    """``request`` as decoded, or INVALID_ARGUMENT (a RequestError) for malformed bytes."""
    if isinstance(request, Malformed):
        if _malformed_log.ready():
            held, _malformed_log.held = _malformed_log.held, 0
            log.warning("refused %d bytes that are not a valid %s (and %d more malformed "
                        "requests in the last %g s)", request.size, request.message, held,
                        LOG_INTERVAL)
        raise invalid("request", f"not a valid {request.message} message: the bytes are "
                      "truncated or corrupt")
    return request


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
