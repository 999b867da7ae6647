"""The GradientService: decodes requests, queues them for the batcher, encodes results.

Handlers are coroutines on the server's event loop. Every handler turns bad input into a rich
status (see ``errors``) before anything is queued, so a bad request never reaches a batch that
other clients' requests share.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, NoReturn

import grpc
from grpc import aio

from gradserve.engine import EngineError, ErrorKind, Feed, Graph, Plan, Result, gradcheck
from gradserve.engine.cache import LRU
from gradserve.engine.derivatives import Derived, Kind, derive
from gradserve.server.batcher import Batcher, ClosedError, ExpiredError, Job, QueueFullError
from gradserve.server.budget import ByteBudget, Ticket
from gradserve.server.config import ServerConfig
from gradserve.server.metrics import Metrics
from gradserve.server.offload import Caller, OffLoop
from gradserve.server.plans import PlanCache
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.bulk import RawData
from gradserve.wire.derivatives import DERIVATIVE_FIELDS, answer_to_wire, kind_of
from gradserve.wire.graphs import graph_from_wire
from gradserve.wire.models import model_digest, model_from_wire, signature_to_wire
from gradserve.wire.ops import op_infos
from gradserve.wire.requests import (
    TENSOR_OVERHEAD,
    Detached,
    Malformed,
    decode_cost,
    decoded,
    request_elements,
)
from gradserve.wire.responses import encode_response, serialise_response
from gradserve.wire.status import (
    DECODE_COST,
    QUEUE_FULL,
    RequestError,
    exhausted,
    expired,
    from_engine_error,
    from_wire_error,
    invalid,
    shown,
)
from gradserve.wire.tensors import WireError, tensors_from_wire

log = logging.getLogger("gradserve.server")

GRADCHECK_MAX_ELEMENTS = 4096  # finite differences cost two forward passes per element
STREAM_WINDOW = 256  # requests one stream may have in flight
METHODS = ("Compute", "ComputeStream")  # the methods whose requests are counted and timed
NO_DEADLINE = 1e7  # seconds: a "deadline" further off than this means the call has none
DEADLINE_MARGIN = 2e-3  # seconds: a call with less time left cannot be answered in time

Context = aio.ServicerContext[object, object]


class Source(NamedTuple):
    """What a request's graph source comes to: the compiled plan, its graph, and, for an ONNX
    model, the signature its response carries."""

    plan: Plan
    graph: Graph
    signature: pb.GraphSignature | None = None


class Prepared(NamedTuple):
    """A request decoded and checked: the feed the batcher runs, and for a derivative beyond
    the gradient, the derived graph that feed runs and the request's examples."""

    feed: Feed
    derived: Derived | None = None
    examples: int | None = None


class Run(NamedTuple):
    """A request computed: its result, the job that ran it, its source, whether the result
    is too large to encode on the loop, and how it was prepared."""

    result: Result
    job: Job
    source: Source
    large: bool
    prepared: Prepared


class GradientService:
    """The gradserve.v1.GradientService implementation (registered by ``decoding.add_service``:
    a request that does not decode arrives as ``Malformed``)."""

    def __init__(self, config: ServerConfig, batcher: Batcher, offloop: OffLoop,
                 metrics: Metrics) -> None:
        self._config = config
        self._batcher = batcher
        self._offloop = offloop
        self._metrics = metrics
        self._latency = {m: metrics.latency.labels(m) for m in METHODS}  # hot path: looked up
        self._ok = {m: metrics.requests.labels(m, "OK") for m in METHODS}  # once
        self.plans = PlanCache(config.plan_cache_size, config.limits, config.plan_cache_nodes)
        # ONNX models seen, by digest: their plan's key and their signature
        self._models: LRU[bytes, tuple[str, pb.GraphSignature]] = LRU(config.plan_cache_size)
        # derivatives beyond the gradient: by graph, kind and inputs, the derived graph
        self._derived: LRU[tuple[str, Kind, tuple[str, ...]], tuple[Derived, Plan]] = LRU(
            config.plan_cache_size)
        self.in_flight = 0  # Compute calls and stream requests received, not yet answered
        self.stream_buffered = 0  # bytes every stream's budget holds

    # --- RPCs ------------------------------------------------------------------------------

    async def Compute(  # noqa: N802 - gRPC's name
            self, request: Detached[pb.ComputeRequest] | Malformed,
            context: Context) -> pb.ComputeResponse | bytes:
        """A large answer comes serialised already, its tensors written straight from the
        result's arrays."""
        response: pb.ComputeResponse | bytes
        try:
            with self._call("Compute", context):
                detached = decoded(request)
                message = detached.message
                caller = self._offloop.caller(_deadline(context))
                run = await self._run(message, caller, detached.size // 8, raw=detached.raw)
                if run.large and not message.options.check_gradients and \
                        run.prepared.derived is None:
                    response = await self._offloop.run(
                        caller, serialise_response, message.request_id, run.result,
                        run.source.signature)
                else:
                    response = await self._respond(message, run)
                if _out_of_time(context):
                    raise expired()
        except RequestError as error:  # every failure is one; no trace reaches clients
            if _out_of_time(context):  # gRPC ends the call itself: an answer would race it
                await _expire(context)
            await context.abort_with_status(error.to_status())
        return response

    async def ComputeStream(  # noqa: N802
            self, request_iterator: AsyncIterator[pb.ComputeStreamRequest | Malformed],
            context: Context) -> AsyncIterator[pb.ComputeStreamResponse]:
        """Each request is computed as it arrives, and its answer sent as soon as it is ready,
        in any order. At most STREAM_WINDOW requests of one stream are in flight, answers not
        yet sent included, and at most --max-stream-buffer-bytes of their answers (backpressure:
        a client that stops reading stops being served); when the client goes away, those
        still queued are dropped."""
        answers: asyncio.Queue[tuple[pb.ComputeStreamResponse, Ticket] | None] = \
            asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        budget = ByteBudget(self._config.max_stream_buffer_bytes, self._buffered)
        in_flight: set[asyncio.Task[None]] = set()

        async def answer(item: pb.ComputeStreamRequest, ticket: Ticket) -> None:
            rid = item.request.request_id
            try:
                with self._call("ComputeStream", context):
                    run = await self._run(item.request, self._offloop.caller(deadline),
                                          request_elements(item.request), ticket)
                    message = pb.ComputeStreamResponse(
                        request_id=rid, response=await self._respond(item.request, run))
            except BaseException as e:
                ticket.give()
                if not isinstance(e, RequestError):  # cancelled: the stream is ending
                    raise
                # the stream goes on; this request gets its error
                message = pb.ComputeStreamResponse(request_id=rid, error=e.to_stream_error())
            finally:
                ticket.settled.set()  # refused before it was admitted, if it was not
            answers.put_nowait((message, ticket))

        async def read() -> None:
            try:
                async for item in request_iterator:
                    await window.acquire()
                    ticket = budget.ticket()
                    task = asyncio.create_task(answer(decoded(item), ticket))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    await ticket.settled.wait()
                if in_flight:
                    await asyncio.wait(set(in_flight))
            finally:
                answers.put_nowait(None)  # the end of the answers, however reading ended

        deadline = _deadline(context)  # the stream's: every request in it shares it
        reader = asyncio.create_task(read())
        try:
            while (sent := await answers.get()) is not None:
                if _out_of_time(context):  # as for Compute: gRPC ends the stream itself
                    await _expire(context)
                yield sent[0]
                window.release()  # sent: its place in the window is free, and its bytes
                sent[1].give()
            await reader  # re-raises what ended the reading, if anything did
        except RequestError as e:  # a malformed message: the stream cannot go on
            await context.abort_with_status(e.to_status())
        finally:
            reader.cancel()
            for task in list(in_flight):
                task.cancel()
            budget.close()

    async def RegisterGraph(self, request: pb.RegisterGraphRequest | Malformed,  # noqa: N802
                            context: Context) -> pb.RegisterGraphResponse:
        caller = self._offloop.caller(_deadline(context))
        try:
            message = decoded(request)
            if message.HasField("onnx_model") == message.HasField("graph"):
                raise invalid("graph", "set exactly one of graph and onnx_model")
            if message.HasField("onnx_model"):
                source = await self._model(message.onnx_model, caller)
            else:
                source = await self._offloop.run(caller, self._compile, message.graph, caller)
        except Exception as e:  # every failure becomes a status; no trace reaches clients
            await context.abort_with_status(
                _as_request_error(e, "RegisterGraph").to_status())
        return pb.RegisterGraphResponse(
            graph_id=source.plan.key,
            signature=source.signature or signature_to_wire(source.plan))

    async def ListOps(self, request: pb.ListOpsRequest | Malformed,  # noqa: N802
                      context: Context) -> pb.ListOpsResponse:
        try:
            decoded(request)
        except RequestError as e:
            await context.abort_with_status(e.to_status())
        return pb.ListOpsResponse(ops=op_infos())

    # --- the pieces ------------------------------------------------------------------------

    @contextmanager
    def _call(self, method: str, context: Context) -> Iterator[None]:
        """One request's bookkeeping (a Compute call, or one request of a stream): in flight
        while it runs, timed, and counted by how it ended. A failure comes out as the
        RequestError its client is told (logged first if it is the server's fault)."""
        self.in_flight += 1
        try:
            with self._latency[method].time():
                yield
        except asyncio.CancelledError:  # the client went away, or gRPC ended the call
            self._count_cancelled(method, context)
            raise
        except Exception as e:
            raise self._failed(method, e) from None
        else:
            self._ok[method].inc()
        finally:
            self.in_flight -= 1

    def _buffered(self, change: int) -> None:
        """A stream's budget changed by ``change`` bytes."""
        self.stream_buffered += change

    def _failed(self, method: str, e: Exception) -> RequestError:
        """The status a failed request gets, counted by code and, for a refusal, by reason."""
        error = _as_request_error(e, method)
        self._metrics.requests.labels(method, error.code.name).inc()
        if error.rejection is not None:
            self._metrics.rejected.labels(error.rejection).inc()
        return error

    def _count_cancelled(self, method: str, context: Context) -> None:
        """Count a call gRPC cancelled: at its deadline (a refusal), or as its client left."""
        left = context.time_remaining()
        if left is not None and left <= 0:
            self._metrics.requests.labels(method, "DEADLINE_EXCEEDED").inc()
            self._metrics.rejected.labels("deadline").inc()
        else:
            self._metrics.requests.labels(method, "CANCELLED").inc()

    async def _run(self, request: pb.ComputeRequest, caller: Caller, elements: int,
                   ticket: Ticket | None = None, raw: RawData | None = None) -> Run:
        """One request computed (``raw``: its detached tensors' bytes); a refusal raises
        RequestError. A large request (``elements``: about how many values it carries) is
        decoded on a worker thread: the loop goes on serving meanwhile. An answer too large
        to send is refused before it is computed; a stream's request (with its ``ticket``)
        waits for room in the stream's budget first, and holds it when this returns."""
        source = await self._plan(request, caller)
        plan, graph = source.plan, source.graph
        kind = kind_of(request)
        if raw or kind is not None or not self._batcher.fits_inline(elements):
            prepared = await self._offloop.run(caller, self._feed, request, plan, graph,
                                               elements, raw, kind)
        else:
            prepared = self._feed(request, plan, graph, elements)
        feed = prepared.feed
        keep = request.options.return_intermediates
        if not feed.plan.compiled(feed.wrt, keep):  # compiling a large graph's passes takes
            try:                                    # a while
                await self._offloop.run(caller, feed.plan.program, feed.wrt, keep,
                                        caller.abandoned)
            except EngineError as e:
                raise from_engine_error(e, graph, running=False) from None
        size = feed.result_bytes(keep)
        if size > self._config.max_message_bytes:
            raise exhausted("request", f"the answer would hold {size} bytes of tensors; the "
                            f"largest message is {self._config.max_message_bytes} bytes")
        if ticket is not None:
            await ticket.take(size)
        result, job = await self._computed(request, feed, graph, caller)
        # encoding costs what the answer holds (about 8 bytes an element), whatever the graph
        return Run(result, job, source, not self._batcher.fits_inline(size // 8), prepared)

    async def _computed(self, request: pb.ComputeRequest, feed: Feed, graph: Graph,
                        caller: Caller) -> tuple[Result, Job]:
        """A checked request queued and computed: its result, and the job that ran it."""
        job = self._submit(request, feed, caller)
        try:
            return await job.future, job
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            self._batcher.withdraw(job)
            raise
        except ExpiredError:
            raise expired() from None
        except EngineError as e:
            raise from_engine_error(e, graph, running=True) from None

    async def _respond(self, request: pb.ComputeRequest, run: Run) -> pb.ComputeResponse:
        """The response to a computed request (a large one encoded on a worker thread), with
        the gradient checks it asked for."""
        source, derived = run.source, run.prepared.derived
        if derived is not None:
            answer = derived.answer(run.result, run.prepared.examples)
            return await self._offloop.run(run.job.caller, answer_to_wire, request.request_id,
                                           answer, derived.kind, run.prepared.examples)
        if run.large:
            response = await self._offloop.run(run.job.caller, encode_response,
                                               request.request_id, run.result, source.signature)
        else:
            response = encode_response(request.request_id, run.result, source.signature)
        if request.options.check_gradients:
            await self._check_gradients(response, run.job, source.graph)
        return response

    def _compile(self, message: pb.Graph | pb.OnnxModel, caller: Caller) -> Source:
        """The plan of a Graph message, or of an OnnxModel's model (thread-safe)."""
        model = isinstance(message, pb.OnnxModel)
        try:
            if isinstance(message, pb.OnnxModel):
                graph, batched = model_from_wire(message, "onnx_model", self._config.limits)
            else:
                graph = graph_from_wire(message, "graph", self._config.max_tensor_elements,
                                        self._config.max_nodes)
        except WireError as e:
            raise from_wire_error(e) from None
        try:
            plan = self.plans.compile(graph, caller.abandoned)
            # the passes most requests run, compiled here too
            plan.program(plan.default_wrt, cancelled=caller.abandoned)
        except EngineError as e:
            raise from_engine_error(e, graph, running=False) from None
        return Source(plan, graph, signature_to_wire(plan, batched) if model else None)

    async def _model(self, message: pb.OnnxModel, caller: Caller) -> Source:
        """The plan of an ONNX model: imported and compiled on a worker thread the first
        time, found by the digest of its bytes after that (while its plan stays cached)."""
        digest = model_digest(message)
        known = self._models.get(digest)
        entry = None if known is None else self.plans.get(known[0])
        if known is not None and entry is not None:
            return Source(*entry, known[1])
        source: Source = await self._offloop.run(caller, self._compile, message, caller)
        signature = source.signature
        if signature is not None:  # a model's source always has one
            self._models.get_or_make(digest, lambda: (source.plan.key, signature))
        return source

    async def _plan(self, request: pb.ComputeRequest, caller: Caller) -> Source:
        kind = request.WhichOneof("graph_source")
        if kind == "graph":  # decoding and compiling may take a while: on a worker thread
            return await self._offloop.run(caller, self._compile, request.graph, caller)
        if kind == "onnx_model":
            return await self._model(request.onnx_model, caller)
        if kind == "graph_id":
            entry = self.plans.get(request.graph_id)
            if entry is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"graph_id {shown(request.graph_id)} is not registered (or was "
                                   "evicted): register the graph again",
                                   (("graph_id", "unknown graph id"),))
            return Source(*entry)
        raise invalid("graph_source", "set graph, graph_id or onnx_model")

    def _feed(self, request: pb.ComputeRequest, plan: Plan, graph: Graph, elements: int,
              raw: RawData | None = None, kind: Kind | None = None) -> Prepared:
        """Decode and check a request's values and options completely (thread-safe): only
        good requests reach the batcher, so a bad one never fails a batch that other clients'
        requests share. A derivative beyond the gradient (``kind``) is checked as a gradient
        request first, then fed to its derived graph."""
        self._affordable(request, plan, graph, elements)
        limit = self._config.max_request_elements
        detached = raw or {}
        try:
            inputs = tensors_from_wire(request.inputs, "inputs", limit, detached.get("inputs"))
            upstream = tensors_from_wire(request.upstream, "upstream", limit,
                                         detached.get("upstream")) if request.upstream else {}
        except WireError as e:
            raise from_wire_error(e) from None
        total = sum(a.size for a in inputs.values()) + sum(a.size for a in upstream.values())
        if total > limit:
            raise exhausted("inputs", f"the request holds {total} elements; the limit is {limit}")
        if request.batch_size < 0:
            raise invalid("batch_size", f"{request.batch_size} is negative")
        examples = request.batch_size or None
        wrt = frozenset(request.wrt) if request.wrt else None  # None: requires_grad inputs
        try:
            feed = plan.prepare(inputs, wrt=wrt, upstream=upstream, batched=examples is not None)
        except EngineError as e:
            raise from_engine_error(e, graph, running=True) from None
        if feed.batch != examples:
            raise invalid("batch_size", f"batch_size is {request.batch_size} but the inputs' "
                          f"leading axis is {feed.batch}")
        if request.options.check_gradients:
            _gradcheck_allowed(examples, sum(a.size for a in inputs.values()))
        if kind is None:
            return Prepared(feed)
        return self._derived_feed(request, kind, feed, graph, inputs, upstream, examples)

    def _derived_feed(self, request: pb.ComputeRequest, kind: Kind, feed: Feed, graph: Graph,
                      inputs: dict[str, Any], upstream: dict[str, Any],
                      examples: int | None) -> Prepared:
        """The feed of a derivative request's derived graph (derived once per graph, kind and
        inputs, then cached), from the request's checked values."""
        plan = feed.plan
        field = DERIVATIVE_FIELDS[kind]
        given = request.tangents if kind is Kind.JVP else request.hvp_vectors
        names = {i.name for i in plan.inputs}
        for name in given:
            if name not in names:
                raise invalid(f"{field}.{name}", f"{shown(name)} is not an input of the graph")
        wrt = tuple(given) if kind is Kind.JVP else tuple(
            plan.inputs[k].name for k in sorted(feed.wrt))
        if kind is Kind.HVP:
            for name in wrt:
                if name not in given:
                    raise invalid(f"{field}.{name}", f"the differentiated input {shown(name)} "
                                  "needs a vector")
        try:
            directions = tensors_from_wire(given, field, self._config.max_request_elements)
            _check_directions(directions, plan, field, examples)
            derived, dplan = self._derived.get_or_make(
                (plan.key, kind, wrt), self._derive, graph, kind, wrt)
            run = derived.feed(inputs, upstream, directions, examples,
                               self._config.max_request_elements)
            derived_feed = dplan.prepare(run.inputs, wrt=run.wrt, upstream=run.upstream,
                                         batched=run.batch is not None)
        except WireError as e:
            raise from_wire_error(e) from None
        except EngineError as e:
            if e.kind is ErrorKind.LIMIT:
                raise exhausted(field, e.message) from None
            if e.kind is ErrorKind.ORDER:
                raise from_engine_error(e, graph, running=False) from None
            raise invalid(field if e.node is None else f"{field}.{e.node}", e.message) from None
        return Prepared(derived_feed, derived, examples)

    def _derive(self, graph: Graph, kind: Kind, wrt: tuple[str, ...]) -> tuple[Derived, Plan]:
        derived = derive(graph, kind, wrt, self._config.limits)
        return derived, self.plans.compile(derived.graph)

    def _affordable(self, request: pb.ComputeRequest, plan: Plan, graph: Graph,
                    elements: int) -> None:
        """Refuse, before decoding any tensor, a request that feeds a name the graph does not
        have (so no more tensors than the graph takes), or whose tensors would take more than
        --max-decode-bytes decoded (a million tiny tensors cost far more as objects than as
        bytes on the wire). ``elements`` bounds what the request's values hold, at 8 bytes
        each (a varint of int64_data may be a byte): under the limit even then, the exact
        estimate is not worked out."""
        try:
            plan.check_names(request.inputs, request.upstream)
        except EngineError as e:
            raise from_engine_error(e, graph, running=True) from None
        limit = self._config.max_decode_bytes
        tensors = len(request.inputs) + len(request.upstream)
        if 64 * elements + tensors * TENSOR_OVERHEAD <= limit:
            return
        cost = decode_cost(request)
        if cost > limit:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"request: its tensors would take about {cost} bytes decoded; "
                               f"the limit is {limit} (--max-decode-bytes)",
                               (("request", f"{cost} bytes decoded; the limit is {limit}"),),
                               reason=DECODE_COST)

    def _submit(self, request: pb.ComputeRequest, feed: Feed, caller: Caller) -> Job:
        """Queue a checked request (RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE
        when shutting down)."""
        job = Job(feed, caller, keep_intermediates=request.options.return_intermediates,
                  time_limit=self._config.max_compute_seconds)
        try:
            self._batcher.submit(job)
        except QueueFullError:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               "the server is busy (its queue is full): back off and "
                               "retry", reason=QUEUE_FULL) from None
        except ClosedError:
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               "the server is shutting down") from None
        return job

    async def _check_gradients(self, response: pb.ComputeResponse, job: Job,
                               graph: Graph) -> None:
        """Add finite-difference checks of the gradients to ``response`` (on a worker thread:
        two forward passes per input element)."""
        feed = job.feed
        names = [i.name for i in feed.plan.inputs]
        try:
            report = await self._offloop.run(
                job.caller, gradcheck, graph, dict(zip(names, feed.values, strict=True)),
                wrt=sorted(names[s] for s in feed.wrt),
                upstream=dict(zip(feed.plan.outputs, feed.seeds, strict=True)),
                time_limit=job.time_limit, cancelled=job.caller.abandoned)
        except EngineError as e:
            raise from_engine_error(e, graph, running=True) from None
        for name, c in report.inputs.items():
            response.gradient_checks[name].CopyFrom(pb.GradientCheck(
                worst_abs_error=c.worst_abs_error, worst_excess=c.worst_excess, ok=c.ok))


def _deadline(context: Context) -> float | None:
    """The call's deadline on the time.monotonic() clock; None when it has none (gRPC then
    reports a huge time remaining)."""
    left = context.time_remaining()
    return None if left is None or left > NO_DEADLINE else time.monotonic() + left


def _out_of_time(context: Context) -> bool:
    """Whether the call's deadline has passed (or is about to): gRPC then ends the call with
    DEADLINE_EXCEEDED itself, and an answer or a status sent now would race it, fail, and be
    logged as an error by gRPC. A handler out of time ends quietly instead (``_expire``)."""
    left = context.time_remaining()
    return left is not None and left <= DEADLINE_MARGIN


async def _expire(context: Context) -> NoReturn:
    """Wait out the call's last moments: gRPC ends it with DEADLINE_EXCEEDED, cancelling this
    handler (a handler that ended first would have gRPC tell the client CANCELLED)."""
    await asyncio.sleep((context.time_remaining() or 0.0) + DEADLINE_MARGIN)
    raise asyncio.CancelledError  # gRPC had not ended it yet: ends it now, quietly


def _as_request_error(e: Exception, what: str) -> RequestError:
    """A RequestError as it is; anything else is a server bug: logged with its trace, and the
    client told only that it happened."""
    if isinstance(e, RequestError):
        return e
    log.error("a %s request failed", what, exc_info=e)
    return RequestError(grpc.StatusCode.INTERNAL, "internal error (logged on the server)")


def _check_directions(directions: dict[str, Any], plan: Plan, field: str,
                      examples: int | None) -> None:
    """Each direction (a tangent or an hvp vector) shaped and typed as its input is fed."""
    declared = {i.name: i for i in plan.inputs}
    for name, value in directions.items():
        given = declared[name]
        shape = given.shape if examples is None else (examples, *given.shape)
        if value.shape != shape:
            raise invalid(f"{field}.{name}", f"has shape {list(value.shape)}; input "
                          f"{shown(name)} is fed as {list(shape)}")
        if value.dtype != given.dtype.numpy:
            raise invalid(f"{field}.{name}", f"has dtype {value.dtype}; input "
                          f"{shown(name)} is {given.dtype}")


def _gradcheck_allowed(examples: int | None, elements: int) -> None:
    if examples is not None or elements > GRADCHECK_MAX_ELEMENTS:
        raise invalid("options.check_gradients", "gradient checks take one example (no "
                      f"batch_size) of at most {GRADCHECK_MAX_ELEMENTS} input elements")
