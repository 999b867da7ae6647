"""The suite's sections 2 to 4, under load: gradserve against a bare echo on its own gRPC stack
(the ceiling for any service) and against plain servers of the same contract that compute each
request on its own (bench/torch_server.py: torch.autograd, or hand-written numpy), unary and on
the bidirectional stream at three concurrencies; and dynamic batching on against off at three
request sizes. Every server is started as a process and checked first; every case is driven
by ``gradserve loadtest``'s driver (bench/load_driver.py), once per round, for several rounds."""

from __future__ import annotations

import asyncio
import statistics
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import load_driver
import numpy as np
from engine_vs_numpy import expression_numpy
from grpc import aio
from servers import echo_method, echo_server, free_port, gradserve, process
from suite_engine import check

from gradserve.client.api import CHANNEL_OPTIONS
from gradserve.client.loadtest import Run, Unary
from gradserve.client.workloads import Arrays
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request
from gradserve.wire.responses import decode_response as decode

TORCH_SERVER = Path(__file__).resolve().parent / "torch_server.py"
CONCURRENCY = (1, 16, 64)
BATCH_CONCURRENCY = 16  # calls in flight in the batching section
EXAMPLES = (1, 64, 1024)  # examples per request in the batching section
SERVICE, BATCHING = "service", "batching"  # the sections a load case belongs to


@dataclass(frozen=True)
class LoadCase:
    """One load row: its section, which server, unary or stream, calls in flight, examples per
    request, and how to run it once."""

    section: str
    server: str
    mode: str
    concurrency: int
    examples: int
    run: Callable[[], Awaitable[Run]]

    @property
    def key(self) -> tuple[str, str, str, int, int]:
        return self.section, self.server, self.mode, self.concurrency, self.examples


@dataclass(frozen=True)
class LoadRow:
    """A load case's runs, one per round: requests/s, p50 and p99 latency (seconds) each."""

    case: LoadCase
    rates: list[float]
    p50s: list[float]
    p99s: list[float]

    @classmethod
    def of(cls, case: LoadCase, runs: Sequence[Run]) -> LoadRow:
        latencies = [[c.latency for c in r.calls] for r in runs]
        return cls(case, [len(r.calls) / r.seconds for r in runs],
                   [float(np.percentile(each, 50)) for each in latencies],
                   [float(np.percentile(each, 99)) for each in latencies])

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

    def over(self, other: LoadRow) -> float:
        """This row's rate over another's: the median of the rounds' ratios (the two ran
        next to each other in each round, so a slow spell hits both sides of a ratio)."""
        return statistics.median(a / b for a, b in zip(self.rates, other.rates, strict=True))


ECHO_SERVER = "echo (grpc.aio)"
GRADSERVE = "gradserve"
BATCHING_OFF = "gradserve, --max-batch-size 1"
PLAIN_NUMPY = "plain server, numpy"
PLAIN_TORCH = "plain server, torch.autograd"


def expected(inputs: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """The 21-op expression's output and gradients at ``inputs``, by hand-written numpy."""
    return expression_numpy(inputs["x"], inputs["y"])


def check_response(name: str, response: pb.ComputeResponse, output: str,
                   inputs: Mapping[str, Any]) -> None:
    """Fail loudly unless a server's answer matches the numpy reference."""
    got = decode(response)
    check(name, [got.outputs[output], got.gradients["x"], got.gradients["y"]], expected(inputs),
          1e-9, 1e-12)


def load_cases(echo: Unary, servers: Mapping[str, tuple[pb_grpc.GradientServiceAsyncStub, str]],
               inputs: Mapping[int, Arrays], seconds: float, max_calls: int) -> list[LoadCase]:
    """The load cases, in the order they run in each round, those compared with each other
    next to each other: at each concurrency, the echo, then gradserve and the plain servers
    unary and stream; then at each request size, batching on and off. ``servers``: each
    server's stub and graph id; ``inputs``: by examples per request."""
    unary = partial(load_driver.unary, seconds=seconds, max_calls=max_calls)
    stream = partial(load_driver.stream, seconds=seconds, max_calls=max_calls)
    one = inputs[1]
    cases = []
    for c in CONCURRENCY:
        cases.append(LoadCase(SERVICE, ECHO_SERVER, "unary", c, 1,
                              partial(unary, echo, servers[GRADSERVE][1], one, c)))
        for name in (GRADSERVE, PLAIN_NUMPY, PLAIN_TORCH):
            if name in servers:
                stub, graph_id = servers[name]
                cases += [
                    LoadCase(SERVICE, name, "unary", c, 1,
                             partial(unary, stub.Compute, graph_id, one, c)),
                    LoadCase(SERVICE, name, "stream", c, 1,
                             partial(stream, stub, graph_id, one, c))]
    for n in EXAMPLES:
        for name in (GRADSERVE, BATCHING_OFF):
            stub, graph_id = servers[name]
            cases.append(LoadCase(BATCHING, name, "unary", BATCH_CONCURRENCY, n, partial(
                unary, stub.Compute, graph_id, inputs[n], BATCH_CONCURRENCY,
                batch=n if n > 1 else None)))
    return cases


async def load_section(seconds: float, rounds: int, max_calls: int,
                       torch: Any) -> list[LoadRow]:
    """Sections 2-4: every server started, checked, then every case driven in turn for
    ``rounds`` rounds (a slow spell of the machine falls on all of them alike)."""
    workload = load_driver.WORKLOAD
    graph, output = workload.graph, workload.graph.outputs[0]
    rng = np.random.default_rng(1)
    inputs = {n: workload.inputs(rng, n) for n in EXAMPLES if n > 1}
    inputs[1] = workload.inputs(rng, None)  # one example: no batch axis

    async with AsyncExitStack() as stack:
        async def start(args: Callable[[int], list[str]]) -> aio.Channel:
            port = free_port()
            target, _ = stack.enter_context(process(args(port), port))
            return await stack.enter_async_context(
                aio.insecure_channel(target, options=CHANNEL_OPTIONS))

        async def service_stub(args: Callable[[int], list[str]]
                               ) -> tuple[pb_grpc.GradientServiceAsyncStub, str]:
            stub = pb_grpc.GradientServiceStub(await start(args))
            registered = await stub.RegisterGraph(pb.RegisterGraphRequest(
                graph=graph_to_wire(graph)))
            return stub, registered.graph_id

        def plain(backend: str) -> Callable[[int], list[str]]:
            return lambda port: [sys.executable, str(TORCH_SERVER), "--port", str(port),
                                 "--backend", backend]

        servers = {GRADSERVE: await service_stub(gradserve),
                   BATCHING_OFF: await service_stub(
                       lambda port: gradserve(port, "--max-batch-size", "1")),
                   PLAIN_NUMPY: await service_stub(plain("numpy"))}
        if torch is not None:
            servers[PLAIN_TORCH] = await service_stub(plain("torch"))
        echo_channel = await start(partial(echo_server, "aio"))

        for name, (stub, graph_id) in servers.items():
            for n, given in inputs.items():
                message = request(graph_id, None, given, batch_size=n if n > 1 else None)
                check_response(f"{name}, {n} example(s)", await stub.Compute(message), output,
                               given)
            async for reply in stub.ComputeStream(iter([pb.ComputeStreamRequest(
                    request=request(graph_id, None, inputs[1]))])):
                assert reply.WhichOneof("outcome") == "response", f"{name}, stream: {reply}"
                check_response(f"{name}, stream", reply.response, output, inputs[1])

        same = request(servers[GRADSERVE][1], None, inputs[1])  # the echo gets gradserve's bytes
        echo = echo_method(echo_channel, same.SerializeToString())
        await echo(same)  # warm up its connection
        cases = load_cases(echo, servers, inputs, seconds, max_calls)
        runs: list[list[Run]] = [[] for _ in cases]
        for k in range(rounds):
            print(f"  round {k + 1} of {rounds}: {len(cases)} cases of {seconds:g} s",
                  flush=True)
            for case, done in zip(cases, runs, strict=True):
                # a server that stopped answering fails the run instead of hanging it
                done.append(await asyncio.wait_for(case.run(), timeout=seconds + 60))
    return [LoadRow.of(case, done) for case, done in zip(cases, runs, strict=True)]
