"""``gradserve loadtest``: drive a running server with a workload and record every call.

Closed loop (the default): ``concurrency`` callers (or streams) each send their next request
when the last is answered. Open loop (``rps``): requests are sent on a fixed schedule whatever
the answers do, and each latency counts from the moment its request was due, not from when it
was sent, so a stalled server shows up as latency instead of hiding as fewer requests
("coordinated omission"). Unary calls or one stream per caller. Every run is bounded by a count
and a time; nothing is retried (the channel's retries are off), so every failure is counted as
it came. With ``verify``, a sample of the answers is compared with the engine run locally.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from gradserve.client.api import MAX_MESSAGE_BYTES
from gradserve.client.credentials import Credentials
from gradserve.client.workloads import Arrays, Workload
from gradserve.engine import Plan
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
    stream, callers, the bounds (requests, seconds), an open-loop rate (None: closed loop),
    each call's deadline, the share of answers to verify, the random seed, and the TLS files
    and token to reach the server with."""

    target: str
    workload: Workload
    batch: int | None = None
    mode: str = "unary"
    concurrency: int = 8
    requests: int = 200
    seconds: float = 600.0
    rps: float | None = None
    deadline: float = 30.0
    verify: float = 0.0
    seed: int = 0
    credentials: Credentials = field(default_factory=Credentials)


@dataclass(frozen=True, slots=True)
class Call:
    """One request's outcome: when it was due (seconds from the start), its latency, its
    status, the error's message, and whether its answer was checked and found wrong."""

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


async def run_load(config: LoadConfig, progress: Progress | None = None) -> Run:
    """Run ``config`` against its target; return every call's outcome."""
    rng = np.random.default_rng(config.seed)
    pool = [config.workload.inputs(rng, config.batch) for _ in range(POOL)]
    check = _Checker(config, pool)
    run = Run(config)
    async with config.credentials.aio_channel(config.target, OPTIONS) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        registered = await stub.RegisterGraph(
            pb.RegisterGraphRequest(graph=graph_to_wire(config.workload.graph)),
            timeout=REGISTER_TIMEOUT, metadata=config.credentials.metadata)
        messages = [request(registered.graph_id, None, inputs, batch_size=config.batch)
                    for inputs in pool]
        driver = _Driver(config, stub, messages, check, run, progress)
        start = time.perf_counter()
        await driver.go(start)
        run.seconds = time.perf_counter() - start
    return run


class _Driver:
    """Sends the requests, by the schedule the config asks for, and records each call."""

    def __init__(self, config: LoadConfig, stub: pb_grpc.GradientServiceAsyncStub,
                 messages: list[pb.ComputeRequest], check: _Checker, run: Run,
                 progress: Progress | None) -> None:
        self.config, self.stub, self.messages = config, stub, messages
        self.check, self.run, self.progress = check, run, progress
        self.issued = 0

    def _next(self, start: float) -> int | None:
        """The index of the next request to send, or None when the bounds are reached."""
        if self.issued >= self.config.requests or (
                time.perf_counter() - start >= self.config.seconds):
            return None
        self.issued += 1
        return self.issued - 1

    async def _due(self, index: int, start: float) -> float:
        """Wait until request ``index`` is due; when it was due (closed loop: now)."""
        if self.config.rps is None:
            return time.perf_counter()
        due = start + index / self.config.rps
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        return due

    def _record(self, call: Call) -> None:
        self.run.calls.append(call)
        if self.progress is not None:
            self.progress(len(self.run.calls))

    async def go(self, start: float) -> None:
        if self.config.mode == "stream":
            await asyncio.gather(*(self._stream(start) for _ in range(self.config.concurrency)))
        elif self.config.rps is None:
            await asyncio.gather(*(self._caller(start) for _ in range(self.config.concurrency)))
        else:
            await self._open_loop(start)

    async def _caller(self, start: float) -> None:
        while (index := self._next(start)) is not None:
            await self._unary(index, await self._due(index, start), start)

    async def _open_loop(self, start: float) -> None:
        """Send each request when due, however many are still out (bounded by the count)."""
        tasks = []
        while (index := self._next(start)) is not None:
            due = await self._due(index, start)
            tasks.append(asyncio.create_task(self._unary(index, due, start)))
        await asyncio.gather(*tasks)

    async def _unary(self, index: int, due: float, start: float) -> None:
        message = self.messages[index % len(self.messages)]
        try:
            response = await self.stub.Compute(message, timeout=self.config.deadline,
                                               metadata=self.config.credentials.metadata)
        except grpc.RpcError as e:  # an aio call fails with an AioRpcError
            self._record(_failed(e, due - start, time.perf_counter() - due))
            return
        latency = time.perf_counter() - due
        self._record(self.check(index, response, due - start, latency))

    async def _stream(self, start: float) -> None:
        """One stream: requests sent as due (closed loop: each once the last is answered),
        answers matched to them by request id."""
        sent: dict[str, tuple[int, float]] = {}
        answered = asyncio.Event()
        answered.set()
        closed_loop = self.config.rps is None

        async def requests() -> AsyncIterator[pb.ComputeStreamRequest]:
            while True:
                if closed_loop:
                    await answered.wait()
                    answered.clear()
                if (index := self._next(start)) is None:
                    return
                due = await self._due(index, start)
                rid = str(index)
                sent[rid] = (index, due)
                message = pb.ComputeStreamRequest(request=self.messages[index % POOL])
                message.request.request_id = rid
                yield message

        # The stream lasts as long as the run may; each request in it is timed on its own.
        call = self.stub.ComputeStream(requests(),
                                       timeout=self.config.seconds + self.config.deadline,
                                       metadata=self.config.credentials.metadata)
        try:
            async for reply in call:
                answered.set()
                index, due = sent.pop(reply.request_id)
                latency = time.perf_counter() - due
                if reply.WhichOneof("outcome") == "error":
                    code = status_code(reply.error.code).name
                    self._record(Call(due - start, latency, code, reply.error.message))
                else:
                    self._record(self.check(index, reply.response, due - start, latency))
        except grpc.RpcError as e:  # the stream broke: what it still owed failed with it
            for _, due in sent.values():
                self._record(_failed(e, due - start, time.perf_counter() - due))




def _failed(e: grpc.RpcError, due: float, latency: float) -> Call:
    code = e.code()  # aio errors carry code() and details()
    return Call(due, latency, code.name, e.details() or "")


class _Checker:
    """Compares a sample of the answers with the engine run here on the same inputs."""

    def __init__(self, config: LoadConfig, pool: list[Arrays]) -> None:
        self._every = 0 if config.verify <= 0 else max(1, round(1 / config.verify))
        self._plan = Plan(config.workload.graph)
        self._pool = pool
        self._batched = config.batch is not None
        self._expected: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}

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
