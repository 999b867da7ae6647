"""The GradientService: decodes requests, queues them for the batcher, encodes results.

Every handler turns bad input into a rich status (see ``errors``) before anything is queued,
so a bad request never reaches a batch that other clients' requests share.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial

import grpc
import numpy as np

from gradserve.client.codec import (
    WireError,
    attribute_to_wire,
    graph_from_wire,
    tensors_from_wire,
    tensors_to_wire,
)
from gradserve.engine import OP_TABLE, EngineError, Graph, Plan, Result, gradcheck
from gradserve.server.batcher import Batcher, ClosedError, ExpiredError, Job, QueueFullError
from gradserve.server.config import ServerConfig
from gradserve.server.errors import (
    RequestError,
    exhausted,
    from_engine_error,
    from_wire_error,
    invalid,
)
from gradserve.server.metrics import Metrics
from gradserve.server.plans import PlanCache
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

log = logging.getLogger("gradserve.server")

GRADCHECK_MAX_ELEMENTS = 4096  # finite differences cost two forward passes per element
STREAM_WINDOW = 256  # requests one stream may have in flight
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
NO_DEADLINE = 1e7  # seconds: a "deadline" further off than this means the call has none


class GradientService(pb_grpc.GradientServiceServicer):
    """The gradserve.v1.GradientService implementation."""

    def __init__(self, config: ServerConfig, batcher: Batcher, metrics: Metrics) -> None:
        self._config = config
        self._batcher = batcher
        self._metrics = metrics
        self._compute_latency = metrics.latency.labels("Compute")  # looked up once: hot path
        self._compute_ok = metrics.requests.labels("Compute", "OK")
        self.plans = PlanCache(config.plan_cache_size, config.limits)

    # --- RPCs ------------------------------------------------------------------------------

    def Compute(self, request: pb.ComputeRequest,  # noqa: N802 - gRPC's method name
                context: grpc.ServicerContext) -> pb.ComputeResponse:
        with self._compute_latency.time():
            try:
                call = self._submit(request, _time_left(context))
                context.add_callback(call.cancel)
                response = call.response(_time_left(context))
            except Exception as e:  # every failure becomes a status; no trace reaches clients
                error = _as_request_error(e, request.request_id)
                self._metrics.requests.labels("Compute", error.code.name).inc()
                context.abort_with_status(error.to_status())
        self._compute_ok.inc()
        return response

    def ComputeStream(self, request_iterator: Iterator[pb.ComputeStreamRequest],  # noqa: N802
                      context: grpc.ServicerContext) -> Iterator[pb.ComputeStreamResponse]:
        """A reader thread decodes and queues the requests; this handler's thread computes
        batches while it waits, and sends each answer as it completes, in any order. At most
        STREAM_WINDOW requests of one stream are in flight (backpressure)."""
        answers: queue.SimpleQueue[pb.ComputeStreamResponse | None] = queue.SimpleQueue()
        window = threading.BoundedSemaphore(STREAM_WINDOW)
        in_flight: set[Call] = set()
        lock = threading.Lock()

        def answer(response: pb.ComputeStreamResponse) -> None:
            code = ("OK" if response.WhichOneof("outcome") == "response"
                    else _CODE_NAMES[response.error.code])
            self._metrics.requests.labels("ComputeStream", code).inc()
            answers.put(response)
            window.release()

        def done(call: Call, future: Future[Result]) -> None:
            with lock:
                in_flight.discard(call)
            answer(call.stream_answer())

        def cancel_all() -> None:  # the client went away: drop what is still queued
            with lock:
                calls = list(in_flight)
            for call in calls:
                call.cancel()

        def read() -> None:
            try:
                for item in _until_cancelled(request_iterator):
                    window.acquire()
                    rid = item.request.request_id
                    try:
                        call = self._submit(item.request, _time_left(context))
                    except Exception as e:  # the stream goes on; this request gets its error
                        answer(_stream_error(rid, _as_request_error(e, rid)))
                        self._batcher.wake()
                        continue
                    with lock:
                        in_flight.add(call)
                    call.future.add_done_callback(partial(done, call))
            finally:
                for _ in range(STREAM_WINDOW):  # every answer in flight has been put
                    window.acquire()
                answers.put(None)
                self._batcher.wake()

        context.add_callback(cancel_all)
        threading.Thread(target=read, name="gradserve-stream-reader", daemon=True).start()
        try:
            while True:
                self._batcher.work_until(lambda: not answers.empty())
                response = answers.get()
                if response is None:
                    return
                yield response
        finally:
            cancel_all()

    def RegisterGraph(self, request: pb.RegisterGraphRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> pb.RegisterGraphResponse:
        try:
            plan, _ = self._compile(request.graph)
        except Exception as e:  # every failure becomes a status; no trace reaches clients
            context.abort_with_status(_as_request_error(e, "RegisterGraph").to_status())
        return pb.RegisterGraphResponse(graph_id=plan.key)

    def ListOps(self, request: pb.ListOpsRequest,  # noqa: N802
                context: grpc.ServicerContext) -> pb.ListOpsResponse:
        return pb.ListOpsResponse(ops=[
            pb.OpInfo(
                name=op.name, doc=op.doc, min_arity=op.min_arity,
                max_arity=-1 if op.max_arity is None else op.max_arity,
                attributes=[
                    pb.AttributeInfo(
                        name=name, kind=str(spec.kind), doc=spec.doc, required=spec.required,
                        choices=spec.choices,
                        default_value=None if spec.default is None
                        else attribute_to_wire(spec.default))
                    for name, spec in op.attrs.items()
                ])
            for op in sorted(OP_TABLE.values(), key=lambda o: o.name)
        ])

    # --- the pieces ------------------------------------------------------------------------

    def _compile(self, message: pb.Graph) -> tuple[Plan, Graph]:
        try:
            graph = graph_from_wire(message, "graph", self._config.max_tensor_elements)
        except WireError as e:
            raise from_wire_error(e) from None
        try:
            return self.plans.compile(graph), graph
        except EngineError as e:
            raise from_engine_error(e, graph, running=False) from None

    def _plan(self, request: pb.ComputeRequest) -> tuple[Plan, Graph]:
        source = request.WhichOneof("graph_source")
        if source == "graph":
            return self._compile(request.graph)
        if source == "graph_id":
            entry = self.plans.get(request.graph_id)
            if entry is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"graph_id {request.graph_id!r} is not registered (or was "
                                   "evicted): register the graph again",
                                   (("graph_id", "unknown graph id"),))
            return entry
        raise invalid("graph_source", "set graph or graph_id")

    def _submit(self, request: pb.ComputeRequest, time_remaining: float | None) -> Call:
        """Decode and check a request completely, then queue it: only good requests reach the
        batcher, so a bad one never fails a batch that other clients' requests share."""
        plan, graph = self._plan(request)
        limit = self._config.max_request_elements
        try:
            inputs = tensors_from_wire(request.inputs, "inputs", limit)
            upstream = tensors_from_wire(request.upstream, "upstream", limit)
        except WireError as e:
            raise from_wire_error(e) from None
        total = sum(a.size for a in (*inputs.values(), *upstream.values()))
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
        options = request.options
        if options.check_gradients:
            _gradcheck_allowed(examples, sum(a.size for a in inputs.values()))
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        job = Job(feed, deadline, keep_intermediates=options.return_intermediates,
                  time_limit=self._config.max_compute_seconds)
        try:
            future = self._batcher.submit(job)
        except QueueFullError:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               "the server is busy (its queue is full): back off and "
                               "retry") from None
        except ClosedError:
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               "the server is shutting down") from None
        return Call(request, job, graph, future, self._batcher)


class Call:
    """A queued request and how to turn its outcome into a response."""

    def __init__(self, request: pb.ComputeRequest, job: Job, graph: Graph,
                 future: Future[Result], batcher: Batcher) -> None:
        self.request = request
        self.job = job
        self.graph = graph
        self.future = future
        self.batcher = batcher

    def cancel(self) -> None:
        """The client went away: drop the request if it is still queued."""
        self.future.cancel()

    def response(self, timeout: float | None) -> pb.ComputeResponse:
        """Wait for the result (up to ``timeout`` seconds), computing batches meanwhile, and
        encode it, or raise RequestError."""
        try:
            if not self.batcher.work_until(self.future.done, timeout):
                raise FutureTimeout
            result = self.future.result()
        except (FutureTimeout, ExpiredError):
            self.future.cancel()
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "the deadline passed before the request was computed") from None
        except CancelledError:  # the client went away: the status reaches nobody
            raise RequestError(grpc.StatusCode.CANCELLED, "the client cancelled") from None
        except EngineError as e:
            raise from_engine_error(e, self.graph, running=True) from None
        response = pb.ComputeResponse(
            request_id=self.request.request_id,
            outputs=tensors_to_wire(result.outputs),
            gradients=tensors_to_wire(result.gradients),
            nonfinite=np.atleast_1d(result.nonfinite).tolist(),
            values=tensors_to_wire(result.values or {}),
            value_gradients=tensors_to_wire(result.value_gradients or {}),
        )
        if self.request.options.check_gradients:
            try:
                feed = self.job.feed
                names = [i.name for i in feed.plan.inputs]
                report = gradcheck(self.graph, dict(zip(names, feed.values, strict=True)),
                                   wrt=sorted(names[s] for s in feed.wrt),
                                   upstream=dict(zip(feed.plan.outputs, feed.seeds, strict=True)),
                                   time_limit=self.job.time_limit)
            except EngineError as e:
                raise from_engine_error(e, self.graph, running=True) from None
            for name, c in report.inputs.items():
                response.gradient_checks[name].CopyFrom(pb.GradientCheck(
                    worst_abs_error=c.worst_abs_error, worst_excess=c.worst_excess, ok=c.ok))
        return response

    def stream_answer(self) -> pb.ComputeStreamResponse:
        """The stream message for this (completed) request: its response or its error."""
        rid = self.request.request_id
        try:
            return pb.ComputeStreamResponse(request_id=rid, response=self.response(0))
        except Exception as e:  # the stream goes on; this request gets its error
            return _stream_error(rid, _as_request_error(e, rid))


def _time_left(context: grpc.ServicerContext) -> float | None:
    """Seconds until the call's deadline; None when it has none (gRPC then reports a huge
    number, which would overflow a timed wait)."""
    left = context.time_remaining()
    return None if left is None or left > NO_DEADLINE else left


def _until_cancelled(requests: Iterator[pb.ComputeStreamRequest]
                     ) -> Iterator[pb.ComputeStreamRequest]:
    """The stream's requests until the client half-closes it, or cancels it (then gRPC raises
    from the iterator; the answers in flight are dropped with the call)."""
    try:
        yield from requests
    except grpc.RpcError:
        log.debug("stream cancelled by the client")


def _as_request_error(e: Exception, what: str) -> RequestError:
    """A RequestError as it is; anything else is a server bug: logged with its trace, and the
    client told only that it happened."""
    if isinstance(e, RequestError):
        return e
    log.error("request %r failed", what, exc_info=e)
    return RequestError(grpc.StatusCode.INTERNAL, "internal error (logged on the server)")


def _stream_error(rid: str, e: RequestError) -> pb.ComputeStreamResponse:
    return pb.ComputeStreamResponse(request_id=rid, error=pb.StreamError(
        code=e.code.value[0], message=e.message,
        field_violations=[pb.FieldViolation(field=f, description=d) for f, d in e.violations]))


def _gradcheck_allowed(examples: int | None, elements: int) -> None:
    if examples is not None or elements > GRADCHECK_MAX_ELEMENTS:
        raise invalid("options.check_gradients", "gradient checks take one example (no "
                      f"batch_size) of at most {GRADCHECK_MAX_ELEMENTS} input elements")
