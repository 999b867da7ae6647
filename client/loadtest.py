"""``gradserve loadtest``: drive a running server with a workload and record every call.

Closed loop (the default): ``concurrency`` callers (or streams) each send their next request
when the last is answered. Open loop (``rps``): requests are sent on a fixed schedule whatever
the answers do, and each latency counts from the moment its request was due, not from when it
was sent, so a stalled server shows up as latency instead of hiding as fewer requests
("coordinated omission"). Unary calls or one stream per caller. Every run is bounded by a count
and a time; nothing is retried (the channel's retries are off), so every failure is counted as
it came, save one the Python client recovers from too: a request by graph id that a server does
not know (a replica behind a load balancer that never saw the graph) is sent again with the
graph whole, as is every later request, and the call counts once, with its final status. With
``verify``, a sample of the answers is compared with the engine run locally.

The benchmarks (``bench/``) drive their servers with the same loop, :func:`drive`, on channels
they hold open from one round to the next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import grpc
import numpy as np
from grpc import aio

from gradserve.client.api import MAX_MESSAGE_BYTES
from gradserve.client.credentials import Credentials
from gradserve.client.workloads import Arrays, Workload
from gradserve.engine import Graph, Plan
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request
from gradserve.wire.status import status_code
from gradserve.wire.tensors import tensors_from_wire

REGISTER_TIMEOUT = 60.0  # seconds to register (compile) the workload's graph before the run
POOL = 64  # distinct input sets drawn before the run and sent in turn
# No retry policy: a load test reports each failure instead of hiding it behind a retry.
OPTIONS = [("grpc.enable_retries", 0), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
           ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


@dataclass(frozen=True)
class LoadConfig:
    """What to run: the workload, examples per request (None: one, unbatched), unary or
    stream, callers (or streams) and the requests each stream keeps in flight in a closed
    loop, the bounds (requests, seconds), an open-loop rate (None: closed loop), each call's
    deadline (None: none), the share of answers to verify, the random seed, and the TLS files
    and token to reach the server with."""

    target: str
    workload: Workload
    batch: int | None = None
    mode: str = "unary"
    concurrency: int = 8
    window: int = 1
    requests: int = 200
    seconds: float = 600.0
    rps: float | None = None
    deadline: float | None = 30.0
    verify: float = 0.0
    seed: int = 0
    credentials: Credentials = field(default_factory=Credentials)


@dataclass(slots=True)
class Call:
    """One request's outcome: when it was due (seconds from the start), its latency, its
    status, the error's message, and whether its answer was checked and found wrong. (Not
    frozen: a frozen dataclass takes half a microsecond longer to build, once per call.)"""

    due: float
    latency: float
    code: str
    error: str = ""
    checked: bool = False
    wrong: bool = False


@dataclass
class Run:
    """Everything a run recorded."""

    config: LoadConfig
    calls: list[Call] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def examples_per_request(self) -> int:
        return self.config.batch or 1


Progress = Callable[[int], None]  # told the number of calls finished so far
# The unary method a run calls: Compute, or any method taking a ComputeRequest (a benchmark's
# bare echo answers bytes); and the stream method.
Unary = aio.UnaryUnaryMultiCallable[pb.ComputeRequest, Any]
Stream = aio.StreamStreamMultiCallable[pb.ComputeStreamRequest, pb.ComputeStreamResponse]


async def run_load(config: LoadConfig, progress: Progress | None = None) -> Run:
    """Run ``config`` against its target; return every call's outcome."""
    rng = np.random.default_rng(config.seed)
    pool = [config.workload.inputs(rng, config.batch) for _ in range(POOL)]
    async with config.credentials.aio_channel(config.target, OPTIONS) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        workload = config.workload
        registered = await stub.RegisterGraph(
            pb.RegisterGraphRequest(graph=graph_to_wire(workload.graph))
            if workload.model is None else
            pb.RegisterGraphRequest(onnx_model=pb.OnnxModel(model=workload.model)),
            timeout=REGISTER_TIMEOUT, metadata=config.credentials.metadata)
        return await drive(config, pool, registered.graph_id, stub.Compute, stub.ComputeStream,
                           progress)


async def drive(config: LoadConfig, pool: list[Arrays], graph_id: str | None, compute: Unary,
                stream: Stream | None = None, progress: Progress | None = None) -> Run:
    """Run ``config``'s load (its target aside) through methods already bound to a channel:
    ``compute``, or ``stream`` in stream mode. The requests carry ``pool``'s input sets in
    turn, by ``graph_id`` (None: the graph whole)."""
    requests = _Requests(config.workload.graph, graph_id, pool, config.batch)
    run = Run(config)
    driver = _Driver(config, requests, _Checker(config, pool), compute, stream, run, progress)
    start = time.perf_counter()
    await driver.go(start)
    run.seconds = time.perf_counter() - start
    return run


class _Requests:
    """A run's requests, one per input set of its pool, sent in turn: by graph id until a
    server does not know the id (NOT_FOUND: a replica behind a load balancer that never saw the
    graph, or a server that evicted it); whole from then on, the graph inlined, which whichever
    server takes them compiles or finds cached, as the Python client does."""

    def __init__(self, graph: Graph, graph_id: str | None, pool: list[Arrays],
                 batch: int | None) -> None:
        self.by_id = graph_id is not None  # whether the requests sent now go by id
        self._graph, self._pool, self._batch = graph, pool, batch
        self._messages: list[pb.ComputeRequest | None] = [
            request(graph_id, graph, inputs, batch_size=batch) for inputs in pool]

    def __len__(self) -> int:
        return len(self._pool)

    def __getitem__(self, index: int) -> pb.ComputeRequest:
        """Request ``index``, the pool taken in turn (a whole one is built when first sent)."""
        k = index % len(self._pool)
        message = self._messages[k]
        if message is None:
            message = self._messages[k] = request(None, self._graph, self._pool[k],
                                                  batch_size=self._batch)
        return message

    def unknown(self) -> None:
        """A server did not know the graph id: every request goes whole from now on."""
        if self.by_id:
            self.by_id = False
            self._messages = [None] * len(self._pool)


class _Frames:
    """One stream's messages: each request of the pool framed once and reused with the next
    request id (a stream serialises each message as it writes it, before it asks for the
    next), as a new frame per message would cost the client a microsecond each."""

    def __init__(self, requests: _Requests) -> None:
        self._requests = requests
        self._frames: dict[int, tuple[pb.ComputeRequest, pb.ComputeStreamRequest]] = {}

    def __call__(self, index: int, request_id: str) -> pb.ComputeStreamRequest:
        message = self._requests[index]
        k = index % len(self._requests)
        framed = self._frames.get(k)
        if framed is None or framed[0] is not message:  # new, or the request went whole since
            framed = self._frames[k] = (message, pb.ComputeStreamRequest(request=message))
        frame = framed[1]
        frame.request.request_id = request_id
        return frame


class _Driver:
    """Sends the requests, by the schedule the config asks for, and records each call once,
    with its final outcome."""

    def __init__(self, config: LoadConfig, requests: _Requests, check: _Checker, compute: Unary,
                 stream: Stream | None, run: Run, progress: Progress | None) -> None:
        self.config, self.requests, self.check = config, requests, check
        self.compute, self.stream = compute, stream
        self.run, self.progress = run, progress
        self.deadline, self.metadata = config.deadline, config.credentials.metadata
        self.issued, self.limit = 0, config.requests
        self.until = 0.0  # when the time bound is reached (set at the start)

    def issue(self) -> int | None:
        """The index of the next request to send, or None when the bounds are reached."""
        issued = self.issued
        if issued >= self.limit or time.perf_counter() >= self.until:
            return None
        self.issued = issued + 1
        return issued

    async def wait_due(self, index: int, start: float) -> float:
        """Wait until request ``index`` is due; when it was due (closed loop: now)."""
        if self.config.rps is None:
            return time.perf_counter()
        due = start + index / self.config.rps
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        return due

    def record(self, call: Call) -> None:
        self.run.calls.append(call)
        if self.progress is not None:
            self.progress(len(self.run.calls))

    async def go(self, start: float) -> None:
        self.until = start + self.config.seconds
        if self.config.mode == "stream":
            await asyncio.gather(*(_Stream(self, start).run()
                                   for _ in range(self.config.concurrency)))
        elif self.config.rps is None:
            await asyncio.gather(*(self._unary(self.issue(), time.perf_counter(), start)
                                   for _ in range(self.config.concurrency)))
        else:
            await self._open_loop(start)

    async def _open_loop(self, start: float) -> None:
        """Send each request when due, however many are still out (bounded by the count)."""
        tasks = []
        while (index := self.issue()) is not None:
            due = await self.wait_due(index, start)
            tasks.append(asyncio.create_task(self._unary(index, due, start)))
        await asyncio.gather(*tasks)

    async def _unary(self, index: int | None, due: float, start: float) -> None:
        """Request ``index``, recorded once, with its final outcome; in a closed loop, then the
        next request as soon as that one is answered, until the bounds are reached (one
        coroutine per caller: one per call would cost a third of a microsecond each)."""
        closed_loop = self.config.rps is None
        while index is not None:
            message = self.requests[index]
            try:
                try:
                    response = await self.compute(message, timeout=self.deadline,
                                                  metadata=self.metadata)
                except grpc.RpcError as e:
                    if not (e.code() is grpc.StatusCode.NOT_FOUND and _by_id(message)):
                        raise
                    self.requests.unknown()  # and this call goes again, whole (see _Requests)
                    response = await self.compute(self.requests[index], timeout=self.deadline,
                                                  metadata=self.metadata)
            except grpc.RpcError as e:  # an aio call fails with an AioRpcError
                self.record(_failed(e, due - start, time.perf_counter() - due))
            else:
                self.record(self.check(index, response, due - start, time.perf_counter() - due))
            if not closed_loop:
                return
            index, due = self.issue(), time.perf_counter()


class _Stream:
    """One stream: requests written as due (closed loop: ``window`` of them in flight, the next
    once one is answered), answers matched to them by request id. A request by id that the
    stream's server did not know is written again whole (see _Requests), keeping its place in
    the window and its due time."""

    def __init__(self, driver: _Driver, start: float) -> None:
        self.driver, self.start = driver, start
        self.sent: dict[str, tuple[int, float, bool]] = {}  # request id: index, due, went by id
        self.again: list[str] = []  # request ids to write again, whole
        self.replied = asyncio.Event()  # set at every answer, and when the stream ends
        self.ended = False
        self.window = driver.config.window if driver.config.rps is None else None
        self.frame = _Frames(driver.requests)

    async def writes(self) -> AsyncIterator[pb.ComputeStreamRequest]:
        """The messages the stream writes, each as it is due or written again."""
        driver, sent, again = self.driver, self.sent, self.again
        issued_all = False
        while not self.ended:
            if again:
                rid = again.pop()
                yield self.frame(sent[rid][0], rid)
            elif not issued_all and (self.window is None or len(sent) < self.window):
                if (index := driver.issue()) is None:
                    issued_all = True
                    continue
                due = await driver.wait_due(index, self.start)
                rid = str(index)
                sent[rid] = (index, due, driver.requests.by_id)
                yield self.frame(index, rid)
            elif issued_all and not sent:
                return
            else:  # until an answer frees a place, or asks for a request again
                await self.replied.wait()
                self.replied.clear()

    def outcome(self, reply: pb.ComputeStreamResponse) -> Call | None:
        """The outcome ``reply`` brings; None when its request goes again, whole."""
        rid = reply.request_id
        index, due, by_id = self.sent[rid]
        latency = time.perf_counter() - due
        if reply.WhichOneof("outcome") == "response":
            outcome = self.driver.check(index, reply.response, due - self.start, latency)
        else:
            code = status_code(reply.error.code)
            if by_id and code is grpc.StatusCode.NOT_FOUND:
                self.driver.requests.unknown()
                self.sent[rid] = (index, due, False)
                self.again.append(rid)
                self.replied.set()
                return None
            outcome = Call(due - self.start, latency, code.name, reply.error.message)
        del self.sent[rid]
        self.replied.set()
        return outcome

    async def run(self) -> None:
        driver, deadline = self.driver, self.driver.deadline
        # The stream lasts as long as the run may; each request in it is timed on its own.
        if driver.stream is None:
            raise ValueError("stream mode needs the stream method")
        call = driver.stream(self.writes(), metadata=driver.metadata, timeout=None
                             if deadline is None else driver.config.seconds + deadline)
        try:
            async for reply in call:
                if (outcome := self.outcome(reply)) is not None:
                    driver.record(outcome)
        except grpc.RpcError as e:  # the stream broke: what it still owed failed with it
            for _, due, _ in self.sent.values():
                driver.record(_failed(e, due - self.start, time.perf_counter() - due))
        finally:
            self.ended = True
            self.replied.set()


def _by_id(message: pb.ComputeRequest) -> bool:
    return message.WhichOneof("graph_source") == "graph_id"


def _failed(e: grpc.RpcError, due: float, latency: float) -> Call:
    code = e.code()  # aio errors carry code() and details()
    return Call(due, latency, code.name, e.details() or "")


class _Checker:
    """Compares a sample of the answers with the engine run here on the same inputs."""

    def __init__(self, config: LoadConfig, pool: list[Arrays]) -> None:
        self._every = 0 if config.verify <= 0 else max(1, round(1 / config.verify))
        self._graph = config.workload.graph
        self._pool = pool
        self._batched = config.batch is not None
        self._expected: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}

    @cached_property
    def _plan(self) -> Plan:
        """The engine's plan, compiled at the first answer checked (a run may check none)."""
        return Plan(self._graph)

    def __call__(self, index: int, response: pb.ComputeResponse, due: float,
                 latency: float) -> Call:
        if not self._every or index % self._every:
            return Call(due, latency, "OK")
        key = index % len(self._pool)
        if key not in self._expected:
            r = self._plan.run(self._pool[key], batched=self._batched)
            self._expected[key] = (r.outputs, r.gradients)
        outputs, gradients = self._expected[key]
        wrong = not (_close(tensors_from_wire(response.outputs, "outputs"), outputs)
                     and _close(tensors_from_wire(response.gradients, "gradients"), gradients))
        return Call(due, latency, "OK", checked=True, wrong=wrong)


def _close(got: dict[str, Any], want: dict[str, Any]) -> bool:
    return got.keys() == want.keys() and all(
        np.shape(got[k]) == np.shape(want[k]) and np.allclose(got[k], want[k], rtol=1e-9,
                                                             atol=1e-12, equal_nan=True)
        for k in want)
