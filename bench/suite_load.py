"""The suite's sections 2 to 4, under load: gradserve against a bare echo on its own gRPC stack
(the ceiling for any service) and against plain servers of the same contract that compute each
request on its own (bench/torch_server.py: torch.autograd, or hand-written numpy), unary and on
the bidirectional stream at three concurrencies; and dynamic batching on against off: the 21-op
expression at three concurrencies and three request sizes, and the served MLP (``mlp-model``,
one example per request) alone and with 64 calls in flight. Every server is started as a
process and its answers checked first; every case is driven by ``gradserve loadtest``'s driver
(bench/load_driver.py), once per round, for several rounds, the server's CPU time per request
read from /proc around each run.

bench/service_vs_echo.py builds its cases from the same parts (``Servers``, ``check_server``,
``LoadCase``, ``run_rounds``) and judges them by the same targets (suite_report's
``load_goals``)."""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import load_driver
import numpy as np
from engine_vs_numpy import expression_numpy, mlp_model_numpy
from grpc import aio
from servers import cpu_seconds, echo_method, echo_server, free_port, gradserve, plain_server
from servers import process as server_process
from suite_engine import check

from gradserve.client.api import CHANNEL_OPTIONS
from gradserve.client.loadtest import Run, Unary
from gradserve.client.workloads import WORKLOADS, Arrays, Workload
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request
from gradserve.wire.responses import decode_response as decode

CONCURRENCY = (1, 16, 64)
BATCH_CONCURRENCY = 16  # calls in flight with several examples per request
EXAMPLES = (1, 64, 1024)  # examples per request in the batching section
MODEL_CONCURRENCY = (1, 64)  # calls in flight on the model workload
SERVICE, BATCHING = "service", "batching"  # the sections a load case belongs to
EXPR21, MODEL = "expr21", "mlp-model"  # the workloads (client/workloads.py's names)

ECHO_SERVER = "echo (grpc.aio)"
GRADSERVE = "gradserve"
BATCHING_OFF = "gradserve, --max-batch-size 1"
PLAIN_NUMPY = "plain server, numpy"
PLAIN_TORCH = "plain server, torch.autograd"

# The batching table, batching on (gradserve's default) against off: (workload, calls in
# flight, examples per request). The one-example expression rows are the service section's.
BATCHING_TABLE: tuple[tuple[str, int, int], ...] = (
    *((EXPR21, c, 1) for c in CONCURRENCY),
    *((EXPR21, BATCH_CONCURRENCY, n) for n in EXAMPLES if n > 1),
    *((MODEL, c, 1) for c in MODEL_CONCURRENCY))

Key = tuple[str, str, int, int, str]  # server, mode, concurrency, examples, workload


@dataclass(frozen=True)
class LoadCase:
    """One load row: its section (the table it is shown in), which server, unary or stream,
    calls in flight, examples per request, how to run it once, the workload, and the server's
    process (its CPU time per request is measured; None: not measured)."""

    section: str
    server: str
    mode: str
    concurrency: int
    examples: int
    run: Callable[[], Awaitable[Run]]
    workload: str = EXPR21
    pid: int | None = None

    @property
    def key(self) -> Key:
        return self.server, self.mode, self.concurrency, self.examples, self.workload


@dataclass(frozen=True)
class LoadRow:
    """A load case's runs, one per round: requests/s, p50 and p99 latency (seconds), and the
    server's CPU seconds per request (NaN when not measured), each."""

    case: LoadCase
    rates: list[float]
    p50s: list[float]
    p99s: list[float]
    cpus: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, case: LoadCase, runs: Sequence[Run], cpus: Sequence[float] = ()) -> LoadRow:
        latencies = [[c.latency for c in r.calls] for r in runs]
        return cls(case, [len(r.calls) / r.seconds for r in runs],
                   [float(np.percentile(each, 50)) for each in latencies],
                   [float(np.percentile(each, 99)) for each in latencies], list(cpus))

    @property
    def rate(self) -> float:
        """Requests/s, the median of the rounds."""
        return statistics.median(self.rates)

    @property
    def examples_rate(self) -> float:
        return self.rate * self.case.examples

    @property
    def p50(self) -> float:
        return statistics.median(self.p50s)

    @property
    def p99(self) -> float:
        return statistics.median(self.p99s)

    @property
    def cpu(self) -> float:
        """The server's CPU seconds per request, the median of the rounds (NaN: unmeasured)."""
        return statistics.median(self.cpus) if self.cpus else math.nan

    def over(self, other: LoadRow) -> float:
        """This row's rate over another's: the median of the rounds' ratios (the two ran
        next to each other in each round, so a slow spell hits both sides of a ratio)."""
        return _median_ratio(self.rates, other.rates)

    def p50_over(self, other: LoadRow) -> float:
        """This row's p50 latency over another's, the median of the rounds' ratios."""
        return _median_ratio(self.p50s, other.p50s)

    def cpu_over(self, other: LoadRow) -> float:
        """This row's server CPU per request over another's, the median of the rounds'
        ratios (NaN if either is unmeasured)."""
        if not self.cpus or not other.cpus:
            return math.nan
        return _median_ratio(self.cpus, other.cpus)


def _median_ratio(ours: Sequence[float], theirs: Sequence[float]) -> float:
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def find(rows: Sequence[LoadRow], server: str, mode: str, concurrency: int, examples: int = 1,
         workload: str = EXPR21) -> LoadRow | None:
    """The row of that server, call, concurrency, request size and workload, if measured."""
    key = (server, mode, concurrency, examples, workload)
    return next((r for r in rows if r.case.key == key), None)


# --- the workloads, their answers checked against hand-written numpy ---------------------------


def workloads() -> dict[str, Workload]:
    """The workloads the load sections drive, by name."""
    return {EXPR21: load_driver.WORKLOAD, MODEL: WORKLOADS[MODEL]()}


def expected(workload: Workload, inputs: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
    """What a server's answer must hold at ``inputs``, by hand-written numpy: the names of
    the gradients, and the output then those gradients' values."""
    if "y" in inputs:  # the 21-op expression
        return ["x", "y"], list(expression_numpy(inputs["x"], inputs["y"]))
    weights = {c.name: c.value for c in workload.graph.constants}  # the served MLP's
    return ["x"], list(mlp_model_numpy(inputs["x"], inputs["label"], **weights))


def check_response(name: str, workload: Workload, response: pb.ComputeResponse,
                   inputs: Mapping[str, Any]) -> None:
    """Fail loudly unless a server's answer matches the numpy reference."""
    got = decode(response)
    names, want = expected(workload, inputs)
    check(name, [got.outputs[workload.graph.outputs[0]], *(got.gradients[n] for n in names)],
          want, 1e-9, 1e-12)


@dataclass(frozen=True)
class Served:
    """A gradient server started for a benchmark: its stub on a held-open channel, its
    process, and the graph ids of the workloads registered with it, by workload name."""

    stub: pb_grpc.GradientServiceAsyncStub
    pid: int
    graph_ids: dict[str, str]


class Servers:
    """Starts servers as processes on 127.0.0.1, each with a channel held open; ``stack``
    closes the channels and stops the processes (by PID)."""

    def __init__(self, stack: AsyncExitStack) -> None:
        self._stack = stack
        self.workloads = workloads()

    async def channel(self, args: Callable[[int], list[str]]) -> tuple[aio.Channel, int]:
        """A server from its command line on a free port: a channel to it, and its PID."""
        port = free_port()
        target, pid = self._stack.enter_context(server_process(args(port), port))
        return await self._stack.enter_async_context(
            aio.insecure_channel(target, options=CHANNEL_OPTIONS)), pid

    async def service(self, args: Callable[[int], list[str]], names: Sequence[str]) -> Served:
        """A GradientService server with the workloads ``names`` registered."""
        channel, pid = await self.channel(args)
        stub = pb_grpc.GradientServiceStub(channel)
        ids = {}
        for name in names:
            registered = await stub.RegisterGraph(pb.RegisterGraphRequest(
                graph=graph_to_wire(self.workloads[name].graph)), timeout=60)
            ids[name] = registered.graph_id
        return Served(stub, pid, ids)

    async def check(self, name: str, served: Served, workload: str,
                    inputs: Mapping[int, Arrays], stream: bool = True) -> None:
        """Fail loudly unless ``served`` answers ``workload`` right: unary with each of
        ``inputs`` (by examples per request, 1: one unstacked), and on the stream."""
        graph_id, w = served.graph_ids[workload], self.workloads[workload]
        for n, given in inputs.items():
            message = request(graph_id, None, given, batch_size=n if n > 1 else None)
            check_response(f"{name}, {workload}, {n} example(s)", w,
                           await served.stub.Compute(message, timeout=60), given)
        if stream:
            async for reply in served.stub.ComputeStream(iter([pb.ComputeStreamRequest(
                    request=request(graph_id, None, inputs[1]))]), timeout=60):
                assert reply.WhichOneof("outcome") == "response", f"{name}, stream: {reply}"
                check_response(f"{name}, {workload}, stream", w, reply.response, inputs[1])


async def run_rounds(cases: Sequence[LoadCase], rounds: int, seconds: float) -> list[LoadRow]:
    """Every case driven in turn for ``rounds`` rounds (a slow spell of the machine falls on
    all of them alike), each server's CPU time read around its runs."""
    runs: list[list[Run]] = [[] for _ in cases]
    cpus: list[list[float]] = [[] for _ in cases]
    for k in range(rounds):
        print(f"  round {k + 1} of {rounds}: {len(cases)} cases of {seconds:g} s", flush=True)
        for case, done, used in zip(cases, runs, cpus, strict=True):
            before = math.nan if case.pid is None else cpu_seconds(case.pid)
            # a server that stopped answering fails the run instead of hanging it
            run = await asyncio.wait_for(case.run(), timeout=seconds + 60)
            after = math.nan if case.pid is None else cpu_seconds(case.pid)
            done.append(run)
            used.append((after - before) / len(run.calls))
    return [LoadRow.of(case, done, () if case.pid is None else used)
            for case, done, used in zip(cases, runs, cpus, strict=True)]


def load_cases(echo: Unary, echo_pid: int, servers: Mapping[str, Served],
               inputs: Mapping[int, Arrays], model_one: Arrays, model: Workload,
               seconds: float, max_calls: int) -> list[LoadCase]:
    """The load cases, in the order they run in each round, those compared with each other
    next to each other: at each concurrency, the echo, then gradserve with batching on and off
    (unary), gradserve and the plain servers unary and stream; then at each request size,
    batching on and off; then the model workload, batching on and off at each concurrency.
    ``servers``: by name; ``inputs``: the expression's, by examples per request."""
    unary = partial(load_driver.unary, seconds=seconds, max_calls=max_calls)
    stream = partial(load_driver.stream, seconds=seconds, max_calls=max_calls)
    one = inputs[1]
    cases = []
    for c in CONCURRENCY:
        cases.append(LoadCase(SERVICE, ECHO_SERVER, "unary", c, 1, partial(
            unary, echo, servers[GRADSERVE].graph_ids[EXPR21], one, c), pid=echo_pid))
        for name in (GRADSERVE, BATCHING_OFF, PLAIN_NUMPY, PLAIN_TORCH):
            if name not in servers:
                continue
            served = servers[name]
            graph_id = served.graph_ids[EXPR21]
            cases.append(LoadCase(SERVICE, name, "unary", c, 1, partial(
                unary, served.stub.Compute, graph_id, one, c), pid=served.pid))
            if name != BATCHING_OFF:
                cases.append(LoadCase(SERVICE, name, "stream", c, 1, partial(
                    stream, served.stub, graph_id, one, c), pid=served.pid))
    for n in EXAMPLES[1:]:
        for name in (GRADSERVE, BATCHING_OFF):
            served = servers[name]
            cases.append(LoadCase(BATCHING, name, "unary", BATCH_CONCURRENCY, n, partial(
                unary, served.stub.Compute, served.graph_ids[EXPR21], inputs[n],
                BATCH_CONCURRENCY, batch=n), pid=served.pid))
    for c in MODEL_CONCURRENCY:
        for name in (GRADSERVE, BATCHING_OFF):
            served = servers[name]
            cases.append(LoadCase(BATCHING, name, "unary", c, 1, partial(
                unary, served.stub.Compute, served.graph_ids[MODEL], model_one, c,
                workload=model), MODEL, served.pid))
    return cases


async def load_section(seconds: float, rounds: int, max_calls: int,
                       torch: Any) -> list[LoadRow]:
    """Sections 2-4: every server started, checked, then every case driven in turn for
    ``rounds`` rounds."""
    async with AsyncExitStack() as stack:
        servers = Servers(stack)
        expr, model = servers.workloads[EXPR21], servers.workloads[MODEL]
        rng = np.random.default_rng(1)
        inputs = {n: expr.inputs(rng, n) for n in EXAMPLES if n > 1}
        inputs[1] = expr.inputs(rng, None)  # one example: no batch axis
        model_inputs = {1: model.inputs(rng, None), 4: model.inputs(rng, 4)}

        both = (EXPR21, MODEL)
        served = {GRADSERVE: await servers.service(gradserve, both),
                  BATCHING_OFF: await servers.service(
                      lambda port: gradserve(port, "--max-batch-size", "1"), both),
                  PLAIN_NUMPY: await servers.service(
                      lambda port: plain_server(port, "--backend", "numpy"), (EXPR21,))}
        if torch is not None:
            served[PLAIN_TORCH] = await servers.service(
                lambda port: plain_server(port, "--backend", "torch"), (EXPR21,))
        echo_channel, echo_pid = await servers.channel(partial(echo_server, "aio"))

        for name, each in served.items():
            await servers.check(name, each, EXPR21, inputs)
            if MODEL in each.graph_ids:
                await servers.check(name, each, MODEL, model_inputs)

        # the echo gets gradserve's bytes
        same = request(served[GRADSERVE].graph_ids[EXPR21], None, inputs[1])
        echo = echo_method(echo_channel, same.SerializeToString())
        await echo(same)  # warm up its connection
        cases = load_cases(echo, echo_pid, served, inputs, model_inputs[1], model, seconds,
                           max_calls)
        return await run_rounds(cases, rounds, seconds)
