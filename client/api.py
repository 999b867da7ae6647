"""The Python client: ``GradientClient`` (blocking) and ``AsyncGradientClient`` (asyncio).

Graphs come from the engine's builder (``L = (a*b + c) * f``) or as engine ``Graph`` objects;
values are numpy arrays or plain numbers, in and out. A graph is registered with the server on
first use and referred to by id afterwards (re-registered transparently if the server evicted
it). Calls that find the server UNAVAILABLE are retried by gRPC itself, per the channel's
service config; every other failure raises :class:`GradserveError` with the server's field
violations.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import grpc

from gradserve.client.credentials import Credentials
from gradserve.engine import Graph, structural_key
from gradserve.engine.builder import Value
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request
from gradserve.wire.responses import Gradients, decode_response
from gradserve.wire.status import status_code, violations_of

__all__ = ["AsyncGradientClient", "GradientClient", "Gradients", "GradserveError", "as_graph"]

DEFAULT_TARGET = "localhost:50051"
MAX_MESSAGE_BYTES = 64 << 20

# gRPC retries calls that fail with UNAVAILABLE (server restarting, connection refused), and
# spreads calls over every server a target names (ipv4:A,B; a DNS name of several replicas).
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "gradserve.v1.GradientService"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "2s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}], "loadBalancingConfig": [{"round_robin": {}}]})
CHANNEL_OPTIONS = [
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    # Reconnect about as fast as the retries come, so a retry can find a restarted server.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

GraphLike = Graph | Value


class GradserveError(Exception):
    """A call the server refused: its status code, message and offending fields
    (``field_violations``: (field, description) pairs; ``field`` and ``description`` are the
    first's, empty when the status has none)."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 field_violations: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field_violations = field_violations

    @property
    def field(self) -> str:
        """The offending field's path (``inputs.x``, ``graph.nodes[3].attributes.axis``)."""
        return self.field_violations[0][0] if self.field_violations else ""

    @property
    def description(self) -> str:
        """What is wrong with :attr:`field`."""
        return self.field_violations[0][1] if self.field_violations else ""


def as_graph(graph: GraphLike) -> Graph:
    """A Graph from a Graph or from a builder Value (the graph computing that value)."""
    return graph.builder.build(graph) if isinstance(graph, Value) else graph


def error_from(e: grpc.RpcError) -> GradserveError:
    """A GradserveError carrying the rich status's field violations, if any."""
    return GradserveError(e.code(), e.details() or "", violations_of(e))


def stream_error(error: pb.StreamError) -> GradserveError:
    """A GradserveError from a failed request on the bulk stream."""
    return GradserveError(status_code(error.code), error.message,
                          tuple((v.field, v.description) for v in error.field_violations))


class GradientClient:
    """A blocking client. ``with GradientClient(target) as client: client.compute(L, {...})``."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 30.0,
                 credentials: Credentials | None = None) -> None:
        credentials = credentials or Credentials()
        self._channel = credentials.channel(target, CHANNEL_OPTIONS)
        self._metadata = credentials.metadata
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        self._timeout = timeout
        self._ids: dict[str, str] = {}  # structural key -> registered graph id
        self._inline: set[str] = set()  # structural keys of graphs always sent whole

    def __enter__(self) -> GradientClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def register(self, graph: GraphLike) -> str:
        """Register ``graph`` (validated and compiled now); return its id."""
        g = as_graph(graph)
        try:
            reply = self._stub.RegisterGraph(pb.RegisterGraphRequest(graph=graph_to_wire(g)),
                                             timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from(e) from None
        self._ids[structural_key(g)] = reply.graph_id
        return reply.graph_id

    def compute(self, graph: GraphLike, inputs: Mapping[str, Any], *,
                timeout: float | None = None, **options: Any) -> Gradients:
        """Outputs and gradients of ``graph`` at ``inputs``. Options: ``wrt`` (input names),
        ``upstream`` (output name -> gradient), ``batch_size`` (examples stacked on a leading
        axis), ``return_intermediates``, ``check_gradients``."""
        g = as_graph(graph)
        key = structural_key(g)
        if key in self._inline:
            return self._compute(None, g, inputs, timeout, options)
        graph_id = self._ids.get(key) or self.register(g)
        try:
            return self._compute(graph_id, g, inputs, timeout, options)
        except _UnknownIdError:  # see _UnknownIdError: the whole graph goes, now and later
            self._inline.add(key)
            return self._compute(None, g, inputs, timeout, options)

    def _compute(self, graph_id: str | None, graph: Graph, inputs: Mapping[str, Any],
                 timeout: float | None, options: Mapping[str, Any]) -> Gradients:
        try:
            return decode_response(self._stub.Compute(request(graph_id, graph, inputs, **options),
                                             timeout=self._timeout if timeout is None else timeout,
                                             metadata=self._metadata))
        except grpc.RpcError as e:
            raise _failure(e) from None

    def compute_many(self, graph: GraphLike, inputs: Iterable[Mapping[str, Any]], *,
                     timeout: float | None = None,
                     **options: Any) -> Iterator[Gradients | GradserveError]:
        """Bulk work over the stream: one outcome per item of ``inputs``, in order, each the
        item's Gradients or, if the server refused that item, its GradserveError (the others
        go on)."""
        g = as_graph(graph)
        graph_id = self.register(g)  # (re)registered now: a stream cannot re-register midway
        messages = (pb.ComputeStreamRequest(request=request(graph_id, g, item,
                                                            request_id=str(k), **options))
                    for k, item in enumerate(inputs))
        order = _InOrder()
        try:
            for reply in self._stub.ComputeStream(messages, timeout=timeout,
                                                  metadata=self._metadata):
                yield from order.add(reply)
        except grpc.RpcError as e:
            raise error_from(e) from None

    def ops(self) -> list[pb.OpInfo]:
        """The server's ops."""
        try:
            return list(self._stub.ListOps(pb.ListOpsRequest(), timeout=self._timeout,
                                           metadata=self._metadata).ops)
        except grpc.RpcError as e:
            raise error_from(e) from None


class _UnknownIdError(Exception):
    """The server that took the call does not know a graph id the client registered: it
    evicted the graph, or it is another replica behind a load balancer. The request is sent
    again with the whole graph, which whichever server takes it compiles (or finds cached, by
    the same key), and so are the graph's later requests: by id they could keep landing on
    replicas that never saw it."""


def _failure(e: grpc.RpcError) -> Exception:
    return _UnknownIdError() if e.code() is grpc.StatusCode.NOT_FOUND else error_from(e)


class _InOrder:
    """Stream replies (which come in any order) released in request order."""

    def __init__(self) -> None:
        self._waiting: dict[int, pb.ComputeStreamResponse] = {}
        self._next = 0

    def add(self, reply: pb.ComputeStreamResponse) -> list[Gradients | GradserveError]:
        """The outcomes ``reply`` makes ready: its own, if it is next, and those after it."""
        self._waiting[int(reply.request_id)] = reply
        ready = []
        while self._next in self._waiting:
            done = self._waiting.pop(self._next)
            ready.append(stream_error(done.error) if done.WhichOneof("outcome") == "error"
                         else decode_response(done.response))
            self._next += 1
        return ready


class AsyncGradientClient:
    """The asyncio client: ``async with AsyncGradientClient(target) as client: await
    client.compute(L, {...})``."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 30.0,
                 credentials: Credentials | None = None) -> None:
        credentials = credentials or Credentials()
        self._channel = credentials.aio_channel(target, CHANNEL_OPTIONS)
        self._metadata = credentials.metadata
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        self._timeout = timeout
        self._ids: dict[str, str] = {}  # as GradientClient's
        self._inline: set[str] = set()

    async def __aenter__(self) -> AsyncGradientClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def register(self, graph: GraphLike) -> str:
        """Register ``graph``; return its id."""
        g = as_graph(graph)
        try:
            reply = await self._stub.RegisterGraph(
                pb.RegisterGraphRequest(graph=graph_to_wire(g)), timeout=self._timeout,
                metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from(e) from None
        self._ids[structural_key(g)] = reply.graph_id
        graph_id: str = reply.graph_id
        return graph_id

    async def compute(self, graph: GraphLike, inputs: Mapping[str, Any], *,
                      timeout: float | None = None, **options: Any) -> Gradients:
        """As :meth:`GradientClient.compute`."""
        g = as_graph(graph)
        key = structural_key(g)
        if key in self._inline:
            return await self._compute(None, g, inputs, timeout, options)
        graph_id = self._ids.get(key) or await self.register(g)
        try:
            return await self._compute(graph_id, g, inputs, timeout, options)
        except _UnknownIdError:  # see _UnknownIdError: the whole graph goes, now and later
            self._inline.add(key)
            return await self._compute(None, g, inputs, timeout, options)

    async def _compute(self, graph_id: str | None, graph: Graph, inputs: Mapping[str, Any],
                       timeout: float | None, options: Mapping[str, Any]) -> Gradients:
        try:
            message = request(graph_id, graph, inputs, **options)
            wait = self._timeout if timeout is None else timeout
            return decode_response(await self._stub.Compute(message, timeout=wait,
                                                   metadata=self._metadata))
        except grpc.RpcError as e:
            raise _failure(e) from None

    async def compute_many(self, graph: GraphLike, inputs: Iterable[Mapping[str, Any]],
                           **options: Any) -> AsyncIterator[Gradients | GradserveError]:
        """As :meth:`GradientClient.compute_many`, yielding results in order."""
        g = as_graph(graph)
        graph_id = await self.register(g)  # (re)registered now: a stream cannot re-register
        messages = [pb.ComputeStreamRequest(request=request(graph_id, g, item,
                                                            request_id=str(k), **options))
                    for k, item in enumerate(inputs)]
        order = _InOrder()
        try:
            async for reply in self._stub.ComputeStream(iter(messages),
                                                        metadata=self._metadata):
                for outcome in order.add(reply):
                    yield outcome
        except grpc.RpcError as e:
            raise error_from(e) from None
