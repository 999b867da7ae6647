"""The Python client: ``GradientClient`` (blocking) and ``AsyncGradientClient`` (asyncio).

Graphs come from the engine's builder (``L = (a*b + c) * f``), as engine ``Graph`` objects, or
as ONNX models (``client.register_onnx("model.onnx")``, which returns a :class:`Model`);
values are numpy arrays or plain numbers, in and out. A graph is registered with the server on
first use and referred to by id afterwards (re-registered transparently if the server evicted
it). Calls that find the server UNAVAILABLE are retried by gRPC itself, per the channel's
service config; every other failure raises :class:`GradserveError` with the server's field
violations.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import onnx

from gradserve.client.credentials import Credentials
from gradserve.engine import Graph, structural_key
from gradserve.engine.builder import Value
from gradserve.importer import TensorInfo, import_model
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request
from gradserve.wire.responses import Gradients, decode_response
from gradserve.wire.status import status_code, violations_of

__all__ = ["AsyncGradientClient", "GradientClient", "Gradients", "GradserveError", "Model",
           "as_graph", "load_model"]

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



@dataclass(frozen=True)
class Model:
    """An ONNX model as the client holds it: imported here too (so the client knows its graph,
    checks what it sends, and finds the model's mistakes before sending it), and sent to the
    server as the model's own bytes. ``inputs`` and ``outputs`` are as the model declares
    them (None for its dynamic batch dimension); see :func:`load_model`."""

    graph: Graph
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    batched: bool
    message: pb.OnnxModel = field(repr=False)

    def feed(self, inputs: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
        """``inputs`` as a request sends them, and its batch_size. A batched model's own inputs
        come in its shapes, batch first: the batch is their leading dimension. An input of
        fixed shape (an initializer fed as an input) given without that dimension is the same
        for every example (sent once per example: each is computed alone); given with it, it
        is each example's own."""
        if not self.batched:
            return dict(inputs), None
        batch: int | None = None
        for info in self.inputs:
            if info.name in inputs and info.shape and info.shape[0] is None:
                shape = np.shape(inputs[info.name])
                if len(shape) != len(info.shape):
                    raise ValueError(f"input {info.name!r} has shape {list(shape)}; the model "
                                     f"takes {_declared(info.shape)} (N: the batch)")
                if batch is not None and shape[0] != batch:
                    raise ValueError(f"input {info.name!r} has a batch of {shape[0]}; the "
                                     f"inputs before it, {batch}")
                batch = int(shape[0])
        if batch is None:
            return dict(inputs), None
        fed = dict(inputs)
        for info in self.inputs:
            if info.name in fed and (not info.shape or info.shape[0] is not None) and \
                    np.ndim(fed[info.name]) == len(info.shape):
                value = np.asarray(fed[info.name])
                fed[info.name] = np.broadcast_to(value, (batch, *value.shape))
        return fed, batch


def load_model(model: onnx.ModelProto | bytes | str | os.PathLike[str],
               inputs: Collection[str] = ()) -> Model:
    """An ONNX model (a ModelProto, its bytes, or a ``.onnx`` file's path), imported here as
    the server will import it; ``inputs`` names the initializers to feed as inputs (weights
    to differentiate). Raises :class:`gradserve.importer.ModelError` for what cannot be
    imported, naming the node, its op type and opset."""
    if isinstance(model, str | os.PathLike):
        with open(model, "rb") as f:
            model = f.read()
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else bytes(model)
    imported = import_model(data, inputs=inputs)
    return Model(imported.graph, imported.inputs, imported.outputs, imported.batched,
                 pb.OnnxModel(model=data, initializer_inputs=list(inputs)))


def _declared(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


GraphLike = Graph | Value | Model


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
    """A Graph from a Graph, a builder Value (the graph computing that value) or a Model."""
    if isinstance(graph, Value):
        return graph.builder.build(graph)
    return graph.graph if isinstance(graph, Model) else graph


def error_from(e: grpc.RpcError) -> GradserveError:
    """A GradserveError carrying the rich status's field violations, if any."""
    return GradserveError(e.code(), e.details() or "", violations_of(e))


def stream_error(error: pb.StreamError) -> GradserveError:
    """A GradserveError from a failed request on the bulk stream."""
    return GradserveError(status_code(error.code), error.message,
                          tuple((v.field, v.description) for v in error.field_violations))


# Values by name, or by the builder's Value of that name (Mapping is invariant in its keys).
Named = Mapping[str, Any] | Mapping[Value, Any] | Mapping[str | Value, Any]


@dataclass(frozen=True)
class _Call:
    """One graph's computations as a caller asked for them: the graph, its structural key and
    the options, with values named by the graph's own names (a Value key becomes its name, and
    a lone upstream gradient goes to the one output)."""

    graph: Graph
    key: str
    options: dict[str, Any]
    model: Model | None

    def registration(self) -> pb.RegisterGraphRequest:
        """The RegisterGraph request: the model as it is, or the graph."""
        if self.model is not None:
            return pb.RegisterGraphRequest(onnx_model=self.model.message)
        return pb.RegisterGraphRequest(graph=graph_to_wire(self.graph))

    def message(self, graph_id: str | None, inputs: Named, request_id: str = ""
                ) -> pb.ComputeRequest:
        """The request computing ``inputs``: by graph id when there is one, else whole (a
        model as its engine graph: every server takes that). A batched model's inputs are
        taken as :meth:`Model.feed` says, unless batch_size is given (then as sent)."""
        named, options = _names(inputs), self.options
        if self.model is not None and options.get("batch_size") is None:
            named, batch = self.model.feed(named)
            options = {**options, "batch_size": batch}
        return request(graph_id, self.graph, named, request_id=request_id, **options)

    def answer(self, response: pb.ComputeResponse) -> Gradients:
        """The response's arrays, in the graph's order of outputs and inputs."""
        return decode_response(response, self.graph)


class _Graphs:
    """What a client knows of the graphs it computes, shared by the blocking and the asyncio
    client: each graph's id once registered, and which graphs go whole with every request
    (a server behind the target did not know the id: see _UnknownIdError)."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}  # structural key -> registered graph id
        self._whole: set[str] = set()  # structural keys of graphs always sent whole

    def call(self, graph: GraphLike, options: Mapping[str, Any]) -> _Call:
        g = as_graph(graph)
        given = dict(options)
        if given.get("upstream") is not None:
            given["upstream"] = _upstream(given["upstream"], g)
        for by_input in ("tangents", "hvp_vectors"):
            if given.get(by_input) is not None:
                given[by_input] = _names(given[by_input])
        return _Call(g, structural_key(g), given, graph if isinstance(graph, Model) else None)

    def registered(self, call: _Call, graph_id: str) -> None:
        self._ids[call.key] = graph_id

    def graph_id(self, call: _Call) -> str | None:
        """The id to send ``call``'s requests by; None when its graph goes whole, or is not
        registered yet (then ``needs_registering``)."""
        return None if call.key in self._whole else self._ids.get(call.key)

    def needs_registering(self, call: _Call) -> bool:
        return call.key not in self._whole and call.key not in self._ids

    def unknown(self, call: _Call) -> None:
        """The server did not know ``call``'s graph id: send the graph whole from now on."""
        self._whole.add(call.key)


def _names(values: Named) -> dict[str, Any]:
    """``values`` by name (a builder Value stands for its name)."""
    return {k.name if isinstance(k, Value) else k: v for k, v in values.items()}


def _upstream(given: Named | Any, graph: Graph) -> dict[str, Any]:
    """Upstream gradients by output name: a mapping as it is, or one array for a graph of one
    output (whose generated name the caller need not know)."""
    if isinstance(given, Mapping):
        return _names(given)
    if len(graph.outputs) != 1:
        raise ValueError(f"the graph has {len(graph.outputs)} outputs "
                         f"({', '.join(graph.outputs)}): give upstream gradients as "
                         "{output: gradient}")
    return {graph.outputs[0]: given}


class GradientClient:
    """A blocking client. ``with GradientClient(target) as client: client.compute(L, {...})``."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 30.0,
                 credentials: Credentials | None = None) -> None:
        credentials = credentials or Credentials()
        self._channel = credentials.channel(target, CHANNEL_OPTIONS)
        self._metadata = credentials.metadata
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        self._timeout = timeout
        self._graphs = _Graphs()

    def __enter__(self) -> GradientClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def register(self, graph: GraphLike) -> str:
        """Register ``graph`` (validated and compiled now); return its id."""
        return self._register(self._graphs.call(graph, {}))

    def register_onnx(self, model: onnx.ModelProto | bytes | str | os.PathLike[str],
                      inputs: Collection[str] = ()) -> Model:
        """Register an ONNX model (see :func:`load_model`); ``compute`` takes the Model this
        returns, with inputs in the model's own shapes (a batched model's batch first)."""
        loaded = load_model(model, inputs)
        self.register(loaded)
        return loaded

    def _register(self, call: _Call) -> str:
        try:
            reply = self._stub.RegisterGraph(call.registration(), timeout=self._timeout,
                                             metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from(e) from None
        self._graphs.registered(call, reply.graph_id)
        return reply.graph_id

    def compute(self, graph: GraphLike, inputs: Named, *, timeout: float | None = None,
                **options: Any) -> Gradients:
        """Outputs and gradients of ``graph`` at ``inputs`` (by name, or by the builder's
        Values), both in the graph's order. Options: ``wrt`` (input names), ``upstream``
        (output -> gradient, or one array for a graph of one output), ``batch_size``
        (examples stacked on a leading axis), ``return_intermediates``,
        ``check_gradients``."""
        call = self._graphs.call(graph, options)
        if self._graphs.needs_registering(call):
            self._register(call)
        try:
            return self._compute(call, self._graphs.graph_id(call), inputs, timeout)
        except _UnknownIdError:  # see _UnknownIdError: the whole graph goes, now and later
            self._graphs.unknown(call)
            return self._compute(call, None, inputs, timeout)

    def jvp(self, graph: GraphLike, inputs: Named, tangents: Named, **options: Any
            ) -> Gradients:
        """Forward mode: the outputs and their derivatives along ``tangents`` (a direction
        per input, by name or Value; inputs left out are held fixed), in ``.jvp`` by output.
        Options as :meth:`compute`'s."""
        return self.compute(graph, inputs, tangents=tangents, **options)

    def hvp(self, graph: GraphLike, inputs: Named, vectors: Named, **options: Any
            ) -> Gradients:
        """The Hessian of (upstream . outputs) times ``vectors`` (one per differentiated
        input), in ``.hvp`` by input; for a scalar output, H v."""
        return self.compute(graph, inputs, hvp_vectors=vectors, **options)

    def jacobian(self, graph: GraphLike, inputs: Named, **options: Any) -> Gradients:
        """The outputs and their dense Jacobians, ``.jacobian[(output, input)]`` of shape
        (*output shape, *input shape) per example."""
        return self.compute(graph, inputs, jacobian=True, **options)

    def hessian(self, graph: GraphLike, inputs: Named, **options: Any) -> Gradients:
        """The dense Hessian of (upstream . outputs), ``.hessian[(input, input)]`` blocks of
        shape (*row input shape, *column input shape) per example."""
        return self.compute(graph, inputs, hessian=True, **options)

    def _compute(self, call: _Call, graph_id: str | None, inputs: Named,
                 timeout: float | None) -> Gradients:
        try:
            return call.answer(self._stub.Compute(
                call.message(graph_id, inputs), metadata=self._metadata,
                timeout=self._timeout if timeout is None else timeout))
        except grpc.RpcError as e:
            raise _failure(e) from None

    def compute_many(self, graph: GraphLike, inputs: Iterable[Named], *,
                     timeout: float | None = None,
                     **options: Any) -> Iterator[Gradients | GradserveError]:
        """Bulk work over the stream: one outcome per item of ``inputs``, in order, each the
        item's Gradients or, if the server refused that item, its GradserveError (the others
        go on). ``timeout`` bounds the whole stream."""
        call = self._graphs.call(graph, options)
        graph_id = self._register(call)  # (re)registered now: a stream cannot re-register
        messages = (pb.ComputeStreamRequest(request=call.message(graph_id, item, str(k)))
                    for k, item in enumerate(inputs))
        order = _InOrder(call)
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

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._waiting: dict[int, pb.ComputeStreamResponse] = {}
        self._next = 0

    def add(self, reply: pb.ComputeStreamResponse) -> list[Gradients | GradserveError]:
        """The outcomes ``reply`` makes ready: its own, if it is next, and those after it."""
        self._waiting[int(reply.request_id)] = reply
        ready: list[Gradients | GradserveError] = []
        while self._next in self._waiting:
            done = self._waiting.pop(self._next)
            ready.append(stream_error(done.error) if done.WhichOneof("outcome") == "error"
                         else self._call.answer(done.response))
            self._next += 1
        return ready


class AsyncGradientClient:
    """The asyncio client: ``async with AsyncGradientClient(target) as client: await
    client.compute(L, {...})``. Its methods are :class:`GradientClient`'s, awaited."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 30.0,
                 credentials: Credentials | None = None) -> None:
        credentials = credentials or Credentials()
        self._channel = credentials.aio_channel(target, CHANNEL_OPTIONS)
        self._metadata = credentials.metadata
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        self._timeout = timeout
        self._graphs = _Graphs()

    async def __aenter__(self) -> AsyncGradientClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def register(self, graph: GraphLike) -> str:
        """As :meth:`GradientClient.register`."""
        return await self._register(self._graphs.call(graph, {}))

    async def register_onnx(self, model: onnx.ModelProto | bytes | str | os.PathLike[str],
                            inputs: Collection[str] = ()) -> Model:
        """As :meth:`GradientClient.register_onnx`."""
        loaded = load_model(model, inputs)
        await self.register(loaded)
        return loaded

    async def _register(self, call: _Call) -> str:
        try:
            reply = await self._stub.RegisterGraph(call.registration(), timeout=self._timeout,
                                                   metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from(e) from None
        self._graphs.registered(call, reply.graph_id)
        graph_id: str = reply.graph_id
        return graph_id

    async def compute(self, graph: GraphLike, inputs: Named, *, timeout: float | None = None,
                      **options: Any) -> Gradients:
        """As :meth:`GradientClient.compute`."""
        call = self._graphs.call(graph, options)
        if self._graphs.needs_registering(call):
            await self._register(call)
        try:
            return await self._compute(call, self._graphs.graph_id(call), inputs, timeout)
        except _UnknownIdError:  # see _UnknownIdError: the whole graph goes, now and later
            self._graphs.unknown(call)
            return await self._compute(call, None, inputs, timeout)

    async def jvp(self, graph: GraphLike, inputs: Named, tangents: Named, **options: Any
                  ) -> Gradients:
        """As :meth:`GradientClient.jvp`."""
        return await self.compute(graph, inputs, tangents=tangents, **options)

    async def hvp(self, graph: GraphLike, inputs: Named, vectors: Named, **options: Any
                  ) -> Gradients:
        """As :meth:`GradientClient.hvp`."""
        return await self.compute(graph, inputs, hvp_vectors=vectors, **options)

    async def jacobian(self, graph: GraphLike, inputs: Named, **options: Any) -> Gradients:
        """As :meth:`GradientClient.jacobian`."""
        return await self.compute(graph, inputs, jacobian=True, **options)

    async def hessian(self, graph: GraphLike, inputs: Named, **options: Any) -> Gradients:
        """As :meth:`GradientClient.hessian`."""
        return await self.compute(graph, inputs, hessian=True, **options)

    async def _compute(self, call: _Call, graph_id: str | None, inputs: Named,
                       timeout: float | None) -> Gradients:
        try:
            return call.answer(await self._stub.Compute(
                call.message(graph_id, inputs), metadata=self._metadata,
                timeout=self._timeout if timeout is None else timeout))
        except grpc.RpcError as e:
            raise _failure(e) from None

    async def compute_many(self, graph: GraphLike, inputs: Iterable[Named], *,
                           timeout: float | None = None,
                           **options: Any) -> AsyncIterator[Gradients | GradserveError]:
        """As :meth:`GradientClient.compute_many`."""
        call = self._graphs.call(graph, options)
        graph_id = await self._register(call)  # (re)registered now, as GradientClient's
        messages = [pb.ComputeStreamRequest(request=call.message(graph_id, item, str(k)))
                    for k, item in enumerate(inputs)]
        order = _InOrder(call)
        try:
            async for reply in self._stub.ComputeStream(iter(messages), timeout=timeout,
                                                        metadata=self._metadata):
                for outcome in order.add(reply):
                    yield outcome
        except grpc.RpcError as e:
            raise error_from(e) from None
