"""The benchmark suite: gradserve's engine and service against what they replace, side by side
in one run, written to BENCHMARKS.md with plots under docs/benchmarks/.

Run: ``python bench/suite.py`` (about four minutes on two cores). ``--quick`` is a smoke run of
under a minute (CI's): short timings, one round, a smaller large tensor, written to a temporary
folder unless ``--markdown``/``--plots`` say otherwise, so a smoke run never replaces the
committed figures. Only 127.0.0.1 is used; every load loop is bounded in calls and in time; every
server started is stopped by its PID.

Absolute times on a shared machine drift by tens of percent from one minute to the next, so
every figure judged against a target is a ratio of two measurements taken in the same run,
interleaved: rounds that alternate the two sides, the best round of each (engine section, as
bench/engine.py does), or rounds that run every load case once, those compared next to each
other, each ratio the median of the rounds' ratios (load sections).

1. Engine against hand-written numpy (the same forward and backward pass written out; BLAS held
   at one thread) and, when PyTorch is installed, ``torch.autograd`` on CPU (one thread): the
   seed expressions, the 21-op scalar expression on one and on 1,024 examples, and an MLP's loss
   at batch 64 and 1,024 in float64 and float32. Every result is checked against numpy first.
2. Service ceiling: a bare echo RPC on gradserve's gRPC stack (grpc.aio) against gradserve on the
   21-op expression, unary and on the bidirectional stream, at concurrency 1, 16 and 64:
   requests/s, p50 and p99 latency, and the ratio to the echo.
3. What a user would otherwise write: bench/torch_server.py, a plain grpc.aio server of the same
   contract computing each request on its own, with torch.autograd (when installed) and with
   hand-written numpy; the same loads as 2.
4. Dynamic batching on (the default server) against off (``--max-batch-size 1``) with 1, 64 and
   1,024 examples per request: examples/s.
5. Large tensors: one request carrying a 1e7-element float64 input through sum(x*x), end to end
   (request built, sent, computed, the 80 MB gradient sent back and decoded) against serialising
   that request with protobuf and copying its bytes once.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import google.protobuf
import grpc
import numpy as np
import service
from grpc import aio
from service import ECHO, free_port, gradserve, process
from threadpoolctl import threadpool_info, threadpool_limits

from engine import compare, expression_numpy, mlp_inputs, mlp_numpy, sigmoid
from gradserve.client.api import CHANNEL_OPTIONS
from gradserve.client.workloads import WORKLOADS, expression, mlp
from gradserve.engine import DType, Graph, Plan
from gradserve.engine.builder import GraphBuilder
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request
from gradserve.wire.responses import decode_response as decode

Arr = np.ndarray[Any, Any]
REPO = Path(__file__).resolve().parent.parent
TORCH_SERVER = Path(__file__).resolve().parent / "torch_server.py"
CONCURRENCY = (1, 16, 64)
BATCH_CONCURRENCY = 16  # calls in flight in the batching section
EXAMPLES = (1, 64, 1024)  # examples per request in the batching section
LARGE_ELEMENTS, QUICK_LARGE_ELEMENTS = 10_000_000, 1_000_000
LARGE_MESSAGE_BYTES = 256 << 20
# the large-tensor server: messages that large, and freed memory reused rather than re-zeroed
LARGE_SERVER_FLAGS = ("--max-message-bytes", str(LARGE_MESSAGE_BYTES),
                      "--malloc-retain-bytes", str(1 << 30))
# Rounds per engine pairing: more than bench/engine.py's 6, as one slow spell of this shared
# machine can cover several short rounds, and each side keeps its best.
ENGINE_ROUNDS = 10


# --- targets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """A target the benchmark issue sets, and the figure this run measured for it."""

    what: str
    measured: float
    bound: float
    higher: bool  # the target is measured >= bound (else measured <= bound)
    unit: str = "x"

    @property
    def met(self) -> bool:
        return self.measured >= self.bound if self.higher else self.measured <= self.bound

    @property
    def verdict(self) -> str:
        """"met", or by how much it was missed, relative to the bound."""
        if self.met:
            return "met"
        short = 1 - self.measured / self.bound if self.higher else self.measured / self.bound - 1
        return f"missed by {short:.1%}" if short < 0.1 else f"missed by {short:.0%}"

    @property
    def target(self) -> str:
        return f"{'>=' if self.higher else '<='} {number(self.bound, self.unit)}"


def number(value: float, unit: str) -> str:
    """A figure with its unit: ratios as 1.23x, rates with thousands separators."""
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "examples/s":
        return f"{value:,.0f} examples/s"
    return f"{value:.2f} {unit}"


def duration(seconds: float) -> str:
    """A time in the unit that suits it (us, ms or s)."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


# --- 1. the engine against hand-written numpy and torch.autograd ----------------------------


def quadratic_numpy(x: Any) -> tuple[Any, Any]:
    """f(x) = 2x^2 - 3x + 4 and df/dx, by hand."""
    return 2 * x * x - 3 * x + 4, 4 * x - 3


def loss_l_numpy(a: Any, b: Any, c: Any, f: Any) -> tuple[Any, ...]:
    """L = (a*b + c) * f and its gradient, by hand."""
    e = a * b + c
    return e * f, b * f, a * f, f, e


def staged_numpy(x: Any, y: Any) -> tuple[Any, Any, Any]:
    """(x + sigmoid(y)) / (sigmoid(x) + (x + y)^2) and its gradient, by hand, with
    bench/engine.py's overflow-free sigmoid (the engine's formula)."""
    sx, sy, s = sigmoid(x), sigmoid(y), x + y
    num, den = x + sy, sx + s * s
    dnum, dden = 1 / den, -num / (den * den)
    dx = dnum + dden * (sx * (1 - sx) + 2 * s)
    dy = dnum * sy * (1 - sy) + dden * 2 * s
    return num / den, dx, dy


def torch_forwards(torch: Any) -> dict[str, Callable[..., Any]]:
    """The workloads' forward passes on torch tensors, by workload name. The 21-op expression
    is the very function the engine's graph is built from (torch tensors have the same methods
    as the builder's values); the seeds are written as the workloads write them."""
    def mlp(X: Any, labels: Any, W1: Any, b1: Any, W2: Any, b2: Any) -> Any:
        return torch.nn.functional.cross_entropy((X @ W1 + b1).relu() @ W2 + b2, labels)

    return {
        "quadratic": lambda x: 2 * x**2 - 3 * x + 4,
        "loss-l": lambda a, b, c, f: (a * b + c) * f,
        "staged": lambda x, y: (x + y.sigmoid()) / (x.sigmoid() + (x + y) ** 2),
        "expr21": expression,
        "mlp": mlp,
    }


def torch_call(torch: Any, forward: Callable[..., Any], feed: Mapping[str, Any],
               wrt: Sequence[str]) -> Callable[[], tuple[Any, ...]]:
    """One forward and backward pass of ``forward`` with torch.autograd: the output and the
    gradients of the ``wrt`` inputs (leaf tensors made once, as a training loop holds them)."""
    leaves = {k: torch.tensor(v, requires_grad=k in wrt) for k, v in feed.items()}
    args, targets = list(leaves.values()), [leaves[k] for k in wrt]
    ones = torch.ones_like(forward(*args).detach())

    def run() -> tuple[Any, ...]:
        out = forward(*args)
        return (out, *torch.autograd.grad(out, targets, ones))

    return run


def as_float32(graph: Graph) -> Graph:
    """The graph with its float inputs declared float32: the engine then computes in float32
    end to end."""
    return dataclasses.replace(graph, inputs=tuple(
        dataclasses.replace(i, dtype=DType.FLOAT32) if i.dtype.is_float else i
        for i in graph.inputs))


@dataclass(frozen=True)
class EngineCase:
    """One engine row: a graph, its inputs, and the hand-written numpy function computing the
    same output and gradients (in the order of the differentiated inputs) from those inputs."""

    name: str
    workload: str  # the key of WORKLOADS (and of torch_forwards)
    graph: Graph
    feed: dict[str, Any]
    numpy: Callable[..., tuple[Any, ...]]
    batched: bool = False
    rtol: float = 1e-9
    atol: float = 1e-12
    goal: str = ""  # "numpy": engine/numpy <= 1.2; "node": us per node and torch speed-up

    @property
    def wrt(self) -> list[str]:
        return [i.name for i in self.graph.inputs if i.requires_grad and i.dtype.is_float]


@dataclass(frozen=True)
class EngineRow:
    """Seconds per call: the engine and numpy (best rounds, paired), and torch with the
    engine's time in that pairing (None without torch)."""

    case: EngineCase
    nodes: int
    engine: float
    numpy: float
    torch: tuple[float, float] | None  # (engine, torch)


def engine_cases(rng: np.random.Generator) -> list[EngineCase]:
    """The engine rows: the seeds and the 21-op expression on one example, the expression on
    1,024 stacked examples, the MLP at two batch sizes in float64 and float32."""
    def one(name: str) -> dict[str, Any]:
        return {k: np.float64(v) for k, v in WORKLOADS[name]().inputs(rng, None).items()}

    expr = WORKLOADS["expr21"]().graph
    cases = [
        EngineCase("quadratic 2x^2 - 3x + 4, one example", "quadratic",
                   WORKLOADS["quadratic"]().graph, one("quadratic"), quadratic_numpy),
        EngineCase("L = (a*b + c) * f, one example", "loss-l", WORKLOADS["loss-l"]().graph,
                   one("loss-l"), loss_l_numpy),
        EngineCase("staged sigmoid expression, one example", "staged",
                   WORKLOADS["staged"]().graph, one("staged"), staged_numpy),
        EngineCase("21-op expression, one example", "expr21", expr, one("expr21"),
                   expression_numpy, goal="node"),
        EngineCase("21-op expression, 1,024 stacked", "expr21", expr,
                   WORKLOADS["expr21"]().inputs(rng, 1024), expression_numpy, batched=True,
                   goal="numpy"),
    ]
    for batch in (64, 1024):
        graph, feed = mlp(batch).graph, mlp_inputs(batch, rng)
        cases.append(EngineCase(f"MLP 784-256-10, batch {batch}, float64", "mlp", graph, feed,
                                mlp_numpy, goal="numpy"))
        single = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in feed.items()}
        cases.append(EngineCase(f"MLP 784-256-10, batch {batch}, float32", "mlp",
                                as_float32(graph), single, mlp_numpy, rtol=2e-4, atol=1e-6,
                                goal="numpy"))
    return cases


def check(name: str, got: Sequence[Any], want: Sequence[Any], rtol: float, atol: float) -> None:
    """Fail loudly if a result differs from the numpy reference."""
    assert len(got) == len(want), (name, len(got), len(want))
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                                   err_msg=f"{name}: result {k}")


def engine_section(seconds: float, torch: Any) -> list[EngineRow]:
    """Every engine row, each checked against numpy (and torch against numpy) before timing."""
    rows = []
    forwards = torch_forwards(torch) if torch is not None else {}
    for case in engine_cases(np.random.default_rng(0)):
        plan = Plan(case.graph)
        run_engine = partial(plan.run, case.feed, batched=case.batched)
        run_numpy = partial(case.numpy, *case.feed.values())
        result = run_engine()
        want = run_numpy()
        check(f"engine, {case.name}", [result.outputs[plan.outputs[0]],
                                       *(result.gradients[k] for k in case.wrt)],
              want, case.rtol, case.atol)
        e, n = compare(run_engine, run_numpy, seconds, ENGINE_ROUNDS)
        paired = None
        if torch is not None:
            run_torch = torch_call(torch, forwards[case.workload], case.feed, case.wrt)
            check(f"torch, {case.name}", [t.detach().numpy() for t in run_torch()], want,
                  case.rtol, case.atol)
            paired = compare(run_engine, run_torch, seconds, ENGINE_ROUNDS)
        row = EngineRow(case, len(case.graph.nodes), e, n, paired)
        rows.append(row)
        print(f"  {case.name:42s} engine {duration(e):>10s}  numpy {duration(n):>10s}  "
              f"{e / n:6.2f}x" + (f"  torch {duration(paired[1]):>10s}" if paired else ""),
              flush=True)
    return rows


# --- 2-4. load: the service, the plain servers, batching ------------------------------------


@dataclass(frozen=True)
class Run:
    """One bounded load run: calls answered, seconds taken, and each call's latency."""

    calls: int
    seconds: float
    latencies: list[float]


async def drive_latencies(call: Callable[[], Awaitable[object]], concurrency: int,
                          seconds: float, max_calls: int) -> Run:
    """``concurrency`` callers in a loop, bounded in calls and in time, recording each call's
    latency (bench/service.py's ``drive`` counts calls only)."""
    latencies: list[float] = []
    started = 0
    await call()  # warm up the connection
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal started
        while started < max_calls and time.perf_counter() < deadline:
            started += 1
            begin = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - begin)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return Run(len(latencies), time.perf_counter() - start, latencies)


async def drive_stream(stub: pb_grpc.GradientServiceAsyncStub, template: pb.ComputeRequest,
                       concurrency: int, seconds: float, max_calls: int) -> Run:
    """One bidirectional stream with ``concurrency`` requests in flight (a new one is written as
    each answer arrives), bounded in requests and in time; latency from write to answer,
    matched by request_id (answers may come in any order)."""
    stream = stub.ComputeStream()
    window = asyncio.Semaphore(concurrency)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def write() -> None:
        for k in range(max_calls):
            await window.acquire()
            if time.perf_counter() >= deadline:
                break
            message = pb.ComputeStreamRequest(request=template)
            message.request.request_id = str(k)
            sent[message.request.request_id] = time.perf_counter()
            await stream.write(message)
        await stream.done_writing()

    async def read() -> None:
        while True:
            reply = await stream.read()
            if not isinstance(reply, pb.ComputeStreamResponse):  # the end of the stream
                return
            latencies.append(time.perf_counter() - sent.pop(reply.request_id))
            assert reply.WhichOneof("outcome") == "response", reply
            window.release()

    start = time.perf_counter()
    await asyncio.gather(write(), read())
    return Run(len(latencies), time.perf_counter() - start, latencies)


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
        return cls(case, [r.calls / r.seconds for r in runs],
                   [float(np.percentile(r.latencies, 50)) for r in runs],
                   [float(np.percentile(r.latencies, 99)) for r in runs])

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
ECHO_GOAL = "gradserve / echo, unary, concurrency 64"
TORCH_GOAL = "gradserve / plain torch.autograd server, unary, concurrency 64"
LARGE_GOAL = "large tensor ({:,} float64) end to end / serialise-and-copy"


def expected(inputs: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """The 21-op expression's output and gradients at ``inputs``, by hand-written numpy."""
    return expression_numpy(inputs["x"], inputs["y"])


def check_response(name: str, response: pb.ComputeResponse, output: str,
                   inputs: Mapping[str, Any]) -> None:
    """Fail loudly unless a server's answer matches the numpy reference."""
    got = decode(response)
    check(name, [got.outputs[output], got.gradients["x"], got.gradients["y"]], expected(inputs),
          1e-9, 1e-12)


def load_cases(echo: Callable[[], Awaitable[object]],
               stubs: Mapping[str, pb_grpc.GradientServiceAsyncStub],
               messages: Mapping[tuple[str, int], pb.ComputeRequest],
               unary: Callable[[Callable[[], Awaitable[object]], int], Awaitable[Run]],
               stream: Callable[[pb_grpc.GradientServiceAsyncStub, pb.ComputeRequest, int],
                                Awaitable[Run]]) -> list[LoadCase]:
    """The load cases, in the order they run in each round, those compared with each other
    next to each other: at each concurrency, the echo, then gradserve and the plain servers
    unary and stream; then at each request size, batching on and off."""
    cases = []
    for c in CONCURRENCY:
        cases.append(LoadCase(SERVICE, ECHO_SERVER, "unary", c, 1, partial(unary, echo, c)))
        for name in (GRADSERVE, PLAIN_NUMPY, PLAIN_TORCH):
            stub = stubs.get(name)
            if stub is not None:
                message = messages[name, 1]
                cases += [
                    LoadCase(SERVICE, name, "unary", c, 1,
                             partial(unary, partial(stub.Compute, message), c)),
                    LoadCase(SERVICE, name, "stream", c, 1, partial(stream, stub, message, c))]
    for n in EXAMPLES:
        cases += [LoadCase(BATCHING, name, "unary", BATCH_CONCURRENCY, n, partial(
            unary, partial(stubs[name].Compute, messages[name, n]), BATCH_CONCURRENCY))
            for name in (GRADSERVE, BATCHING_OFF)]
    return cases


async def load_section(seconds: float, rounds: int, max_calls: int,
                       torch: Any) -> list[LoadRow]:
    """Sections 2-4: every server started, checked, then every case driven in turn for
    ``rounds`` rounds (a slow spell of the machine falls on all of them alike)."""
    workload = WORKLOADS["expr21"]()
    graph, output = workload.graph, workload.graph.outputs[0]
    rng = np.random.default_rng(1)
    stacked = {n: workload.inputs(rng, n) for n in EXAMPLES if n > 1}
    one = {k: np.float64(v) for k, v in workload.inputs(rng, None).items()}

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
        echo_channel = await start(lambda port: [sys.executable, str(service.__file__),
                                                 "--serve-aio", str(port)])

        messages: dict[tuple[str, int], pb.ComputeRequest] = {}
        for name, (stub, graph_id) in servers.items():
            messages[name, 1] = request(graph_id, None, one)
            check_response(f"{name}, unary", await stub.Compute(messages[name, 1]), output, one)
            async for reply in stub.ComputeStream(iter([pb.ComputeStreamRequest(
                    request=messages[name, 1])])):
                assert reply.WhichOneof("outcome") == "response", f"{name}, stream: {reply}"
                check_response(f"{name}, stream", reply.response, output, one)
            for n, inputs in stacked.items():
                messages[name, n] = request(graph_id, None, inputs, batch_size=n)
                check_response(f"{name}, {n} examples", await stub.Compute(messages[name, n]),
                               output, inputs)

        echo: aio.UnaryUnaryMultiCallable[bytes, bytes] = echo_channel.unary_unary(ECHO)
        payload = messages[GRADSERVE, 1].SerializeToString()  # the same bytes gradserve gets
        stubs = {name: stub for name, (stub, _) in servers.items()}
        cases = load_cases(partial(echo, payload), stubs, messages,
                           partial(drive_latencies, seconds=seconds, max_calls=max_calls),
                           partial(drive_stream, seconds=seconds, max_calls=max_calls))
        runs: list[list[Run]] = [[] for _ in cases]
        for k in range(rounds):
            print(f"  round {k + 1} of {rounds}: {len(cases)} cases of {seconds:g} s",
                  flush=True)
            for case, done in zip(cases, runs, strict=True):
                # a server that stopped answering fails the run instead of hanging it
                done.append(await asyncio.wait_for(case.run(), timeout=seconds + 60))
    return [LoadRow.of(case, done) for case, done in zip(cases, runs, strict=True)]


# --- 5. large tensors -------------------------------------------------------------------------


@dataclass(frozen=True)
class LargeResult:
    """Best-of-rounds seconds: end to end, and the floor's two parts; the request's size."""

    elements: int
    request_bytes: int
    end_to_end: float
    serialise: float
    copy: float

    @property
    def floor(self) -> float:
        return self.serialise + self.copy

    @property
    def ratio(self) -> float:
        return self.end_to_end / self.floor


def large_channel_options() -> list[tuple[str, Any]]:
    """The client's channel options with the message limits raised to the server's."""
    limits = ("grpc.max_receive_message_length", "grpc.max_send_message_length")
    return [*(o for o in CHANNEL_OPTIONS if o[0] not in limits),
            *((name, LARGE_MESSAGE_BYTES) for name in limits)]


async def large_section(elements: int, rounds: int) -> LargeResult:
    """One float64 input of ``elements`` through sum(x*x): end to end against serialising the
    request and copying its bytes, alternating, best of ``rounds`` each."""
    g = GraphBuilder()
    x = g.input("x", (elements,))
    graph = g.build((x * x).sum())
    values = np.random.default_rng(2).standard_normal(elements)
    port = free_port()
    with process(gradserve(port, *LARGE_SERVER_FLAGS), port) as (target, _):
        async with aio.insecure_channel(target, options=large_channel_options()) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            graph_id = (await stub.RegisterGraph(pb.RegisterGraphRequest(
                graph=graph_to_wire(graph)))).graph_id

            async def end_to_end() -> float:
                begin = time.perf_counter()
                got = decode(await stub.Compute(request(graph_id, None, {"x": values}),
                                                timeout=120))
                took = time.perf_counter() - begin
                assert got.gradients["x"].shape == (elements,)
                return took

            def serialise() -> tuple[bytes, float]:
                begin = time.perf_counter()
                payload = request(graph_id, None, {"x": values}).SerializeToString()
                return payload, time.perf_counter() - begin

            def copy(payload: bytes) -> float:
                begin = time.perf_counter()
                bytearray(payload)
                return time.perf_counter() - begin

            got = decode(await stub.Compute(request(graph_id, None, {"x": values}), timeout=120))
            np.testing.assert_allclose(got.output, values @ values, rtol=1e-9)
            np.testing.assert_allclose(got.gradients["x"], 2 * values, rtol=1e-12)
            del got
            times: dict[str, list[float]] = {"e2e": [], "serialise": [], "copy": []}
            size = 0
            for _ in range(rounds):
                times["e2e"].append(await end_to_end())
                payload, took = serialise()
                times["serialise"].append(took)
                times["copy"].append(copy(payload))
                size = len(payload)
                del payload
    return LargeResult(elements, size, min(times["e2e"]), min(times["serialise"]),
                       min(times["copy"]))


# --- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """Everything one run measured, and how."""

    command: str
    quick: bool
    started: datetime
    elapsed: float
    settings: str
    machine: list[tuple[str, str]]
    engine: list[EngineRow]
    load: list[LoadRow]
    large: LargeResult
    notes: list[str]

    def service(self, server: str, mode: str, concurrency: int) -> LoadRow | None:
        """A row of sections 2-3 (one example per request), if it was measured."""
        return next((r for r in self.load
                     if r.case.key == (SERVICE, server, mode, concurrency, 1)), None)

    def batching(self, server: str, examples: int) -> LoadRow | None:
        """A row of section 4, if it was measured."""
        return next((r for r in self.load if r.case.key == (
            BATCHING, server, "unary", BATCH_CONCURRENCY, examples)), None)

    def goals(self) -> list[Goal]:
        """The issue's targets against this run's figures (those it could measure)."""
        goals: list[Goal] = []
        for row in self.engine:
            if row.case.goal == "numpy":
                goals.append(Goal(f"engine / hand numpy, {row.case.name}",
                                  row.engine / row.numpy, 1.2, higher=False))
            elif row.case.goal == "node":
                goals.append(Goal(f"engine per node, {row.case.name}",
                                  row.engine / row.nodes * 1e6, 3.0, False, "us/node"))
                if row.torch is not None:
                    engine, torch = row.torch
                    goals.append(Goal(f"torch.autograd / engine, {row.case.name}",
                                      torch / engine, 3.0, higher=True))
        ours = self.service(GRADSERVE, "unary", 64)
        echo, plain = self.service(ECHO_SERVER, "unary", 64), self.service(PLAIN_TORCH, "unary",
                                                                            64)
        if ours is not None and echo is not None:
            goals.append(Goal(ECHO_GOAL, ours.over(echo), 0.8, higher=True))
        if ours is not None and plain is not None:
            goals.append(Goal(TORCH_GOAL, ours.over(plain), 4.0, higher=True))
        bulk = self.batching(GRADSERVE, 1024)
        if bulk is not None:
            goals.append(Goal(f"examples/s, 1,024 examples per request, concurrency "
                              f"{BATCH_CONCURRENCY}", bulk.examples_rate, 500_000, True,
                              "examples/s"))
        goals.append(Goal(LARGE_GOAL.format(self.large.elements), self.large.ratio, 3.0,
                          higher=False))
        return goals

    def ratios(self) -> list[tuple[str, float, Goal | None]]:
        """Every ratio of the run, labelled, with its target if it has one (for the plot)."""
        goals = {g.what: g for g in self.goals()}
        out: list[tuple[str, float, Goal | None]] = []
        for row in self.engine:
            out.append((f"engine/numpy: {row.case.name}", row.engine / row.numpy,
                        goals.get(f"engine / hand numpy, {row.case.name}")))
            if row.torch is not None:
                out.append((f"torch/engine: {row.case.name}", row.torch[1] / row.torch[0],
                            goals.get(f"torch.autograd / engine, {row.case.name}")))
        for load in self.load:
            case, echo = load.case, self.service(ECHO_SERVER, "unary", load.case.concurrency)
            if case.section == SERVICE and case.server != ECHO_SERVER and echo is not None:
                goal = goals.get(ECHO_GOAL) if (
                    case.server, case.mode, case.concurrency) == (GRADSERVE, "unary", 64) else None
                out.append((f"{case.server} / echo, {case.mode}, c{case.concurrency}",
                            load.over(echo), goal))
        ours, plain = self.service(GRADSERVE, "unary", 64), self.service(PLAIN_TORCH, "unary", 64)
        if ours is not None and plain is not None:
            out.append(("gradserve / plain torch.autograd server, unary, c64", ours.over(plain),
                        goals.get(TORCH_GOAL)))
        for n in EXAMPLES:
            on, off = self.batching(GRADSERVE, n), self.batching(BATCHING_OFF, n)
            if on is not None and off is not None:
                out.append((f"batching on/off, {n:,} example{'s' if n > 1 else ''} per request",
                            on.over(off), None))
        out.append(("large tensor: end to end / floor", self.large.ratio,
                    goals.get(LARGE_GOAL.format(self.large.elements))))
        return out


def machine(torch: Any) -> list[tuple[str, str]]:
    """What this machine is, and the versions that matter to the figures."""
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info
                          if line.startswith("model name")), "unknown")
    except OSError:
        model = platform.processor() or "unknown"
    cores = f"{os.cpu_count()}"
    if hasattr(os, "sched_getaffinity"):
        cores += f" ({len(os.sched_getaffinity(0))} usable by this process)"
    memory = "unknown"
    try:
        with open("/proc/meminfo") as info:
            kb = next(int(line.split()[1]) for line in info if line.startswith("MemTotal"))
        memory = f"{kb / (1 << 20):.1f} GiB"
    except (OSError, StopIteration):
        pass
    blas = "; ".join(f"{i['internal_api']} {i.get('version', '')} ({i['num_threads']} threads "
                     f"by default)" for i in threadpool_info() if i["user_api"] == "blas")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                            capture_output=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, text=True,
                           capture_output=True, check=False).stdout.strip()
    return [
        ("CPU", model),
        ("cores", cores),
        ("memory", memory),
        ("OS", platform.platform()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("numpy", np.__version__),
        ("grpcio", grpc.__version__),
        ("protobuf", google.protobuf.__version__),
        ("PyTorch", "not installed: its rows are skipped" if torch is None else
         f"{torch.__version__} (CPU, {torch.get_num_threads()} thread)"),
        ("BLAS", f"{blas or 'none found'}; held at 1 thread in section 1"),
        ("commit", (commit or "unknown") + (" with uncommitted changes" if dirty else "")),
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """A Markdown table: the first ``left`` columns left-aligned (names), the rest
    right-aligned (figures)."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if k < left else "---:" for k in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(report: Report, plots: Sequence[Path], markdown_path: Path) -> str:
    """BENCHMARKS.md: how it was made, the machine, the targets, each section, the plots."""
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `bench/suite.py` on {report.started:%Y-%m-%d %H:%M} UTC in "
        f"{report.elapsed:.0f} s ({report.settings}). Reproduce from the repository root:",
        "",
        "```sh",
        report.command,
        "```",
        "",
        "Absolute times on a shared machine drift, so every judged figure is a ratio of two "
        "measurements taken side by side in this run. Section 1 alternates the two sides in "
        "rounds and keeps each side's best round (as bench/engine.py does). Sections 2-4 run "
        "every case once per round, the cases compared with each other next to each other; "
        "rates and latencies are the medians of the rounds, and ratios the medians of the "
        "rounds' ratios. Section 5 alternates and keeps the best of each. The client and the "
        "servers share this machine's cores.",
        "",
    ]
    if report.quick:
        lines += ["**A `--quick` smoke run: too short for its figures to mean anything.**", ""]
    lines += [*(f"- {note}" for note in report.notes), ""] if report.notes else []
    lines += ["## Machine", "", *table(["", ""], report.machine, left=2), "",
              "## Targets", "",
              *table(["target", "measured", "wanted", "verdict"],
                     [[g.what, number(g.measured, g.unit), g.target, g.verdict]
                      for g in report.goals()]), ""]

    lines += ["## 1. Engine against hand-written numpy and torch.autograd", "",
              "Seconds per call of a forward and backward pass (outputs and every gradient), "
              "each checked against the hand-written numpy first. torch.autograd is paired with "
              "the engine separately; its ratio is torch's time over the engine's in that "
              "pairing (above 1: the engine is faster).", ""]
    lines += table(["case", "nodes", "engine", "numpy", "engine / numpy", "torch.autograd",
                    "torch / engine"],
                   [[r.case.name, str(r.nodes), duration(r.engine), duration(r.numpy),
                     f"{r.engine / r.numpy:.2f}x",
                     duration(r.torch[1]) if r.torch else "not installed",
                     f"{r.torch[1] / r.torch[0]:.2f}x" if r.torch else ""]
                    for r in report.engine])
    lines += ["", "## 2-3. Service against a bare echo, and against plain servers", "",
              "The 21-op scalar expression, one example per request, registered once and "
              "called by id; the echo returns the same request bytes on gradserve's gRPC stack "
              "(the ceiling for any service). Streams keep that many requests in flight on one "
              "stream; their ratio is to the unary echo at the same concurrency. The plain "
              "servers are bench/torch_server.py: grpc.aio, each request computed on its own "
              "(torch.autograd, or hand-written numpy).", ""]
    rows = []
    for row in report.load:
        if row.case.section != SERVICE:
            continue
        echo = report.service(ECHO_SERVER, "unary", row.case.concurrency)
        ratio = "ceiling" if row.case.server == ECHO_SERVER or echo is None else (
            f"{row.over(echo):.2f}x")
        rows.append([row.case.server, row.case.mode, str(row.case.concurrency),
                     f"{row.rate:,.0f}", ratio, duration(row.p50), duration(row.p99)])
    lines += table(["server", "call", "concurrency", "requests/s", "vs echo", "p50", "p99"],
                   rows, left=2)
    versus = []
    for plain in (PLAIN_NUMPY, PLAIN_TORCH):
        for mode in ("unary", "stream"):
            for c in CONCURRENCY:
                ours, theirs = report.service(GRADSERVE, mode, c), report.service(plain, mode, c)
                if ours is not None and theirs is not None:
                    versus.append([plain, mode, str(c), f"{ours.over(theirs):.2f}x"])
    lines += ["", "gradserve's requests/s over each plain server's:", "",
              *table(["plain server", "call", "concurrency", "gradserve / plain"], versus,
                     left=2)]
    if report.service(PLAIN_TORCH, "unary", 1) is None:
        lines += ["", "PyTorch is not installed here, so there are no torch.autograd rows."]
    lines += ["", "## 4. Dynamic batching", "",
              f"Unary calls, {BATCH_CONCURRENCY} in flight, examples stacked in each request; "
              "the default server (batching on) against `--max-batch-size 1` (off).", ""]
    rows = []
    for n in EXAMPLES:
        on, off = report.batching(GRADSERVE, n), report.batching(BATCHING_OFF, n)
        if on is not None and off is not None:
            rows.append([f"{n:,}", f"{on.examples_rate:,.0f}", f"{off.examples_rate:,.0f}",
                         f"{on.over(off):.2f}x", duration(on.p50), duration(off.p50)])
    lines += table(["examples per request", "on: examples/s", "off: examples/s", "on / off",
                    "on: p50", "off: p50"], rows)
    large = report.large
    lines += ["", "## 5. Large tensors", "",
              f"One request carrying {large.elements:,} float64 values "
              f"({large.request_bytes / 1e6:.0f} MB) through sum(x*x), the server started with "
              f"`{shlex.join(LARGE_SERVER_FLAGS)}` and the client channel's message limits "
              "raised to match. End "
              "to end: the request built, sent, computed, and the gradient (as large again) "
              "sent back and decoded. The floor: building and serialising that request with "
              "protobuf, plus one copy of its bytes. Best of the rounds, alternating. (gRPC's "
              "own round trip of such a message is not measured apart: bench/service.py's echo "
              "servers keep gRPC's 4 MB message limit.)", ""]
    lines += table(["", "time"], [
        ["end to end", duration(large.end_to_end)],
        ["floor: build and serialise the request", duration(large.serialise)],
        ["floor: copy its bytes once", duration(large.copy)],
        ["end to end / floor", f"{large.ratio:.2f}x"],
    ])
    if plots:
        lines += ["", "## Plots", ""]
        for path in plots:
            link = os.path.relpath(path, markdown_path.parent)
            lines += [f"![{path.stem}]({link})", ""]
    return "\n".join(lines).rstrip() + "\n"


def draw(report: Report, directory: Path) -> list[Path]:
    """The plots (matplotlib, Agg): every ratio, the service rows' latencies, batching.
    Without matplotlib, a note and no plots."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed; no plots")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    return [draw_ratios(plt, report, directory / "ratios.png"),
            draw_latency(plt, report, directory / "service_latency.png"),
            draw_batching(plt, report, directory / "batching.png")]


def draw_ratios(plt: Any, report: Report, path: Path) -> Path:
    """Every ratio as a bar (log scale), coloured by its target when it has one."""
    ratios = report.ratios()
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(ratios) + 1.2))
    labels = [label for label, _, _ in ratios]
    values = [value for _, value, _ in ratios]
    colours = ["tab:grey" if goal is None else "tab:green" if goal.met else "tab:red"
               for _, _, goal in ratios]
    ax.barh(range(len(ratios)), values, color=colours)
    for k, (_, value, goal) in enumerate(ratios):
        note = f" {value:.2f}x" + (f" (target {goal.target})" if goal else "")
        # right of the bar and of its target's mark
        at = max(value, goal.bound) * 1.03 if goal is not None and goal.unit == "x" else value
        ax.text(at, k, note, va="center", fontsize=7)
        if goal is not None and goal.unit == "x":
            ax.plot([goal.bound], [k], marker="|", color="black", markersize=10)
    ax.set_yticks(range(len(ratios)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.5)
    ax.set_xlabel("ratio (log scale); green: target met, red: missed, |: the target")
    ax.set_title("Every ratio of the run")
    return save(plt, fig, path)


def save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_latency(plt: Any, report: Report, path: Path) -> Path:
    """p50 and p99 of every one-example service row."""
    rows = [r for r in report.load if r.case.section == SERVICE]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.2))
    names = [f"{r.case.server}, {r.case.mode}, c{r.case.concurrency}" for r in rows]
    at = np.arange(len(rows))
    ax.barh(at - 0.2, [r.p50 * 1e6 for r in rows], height=0.4, label="p50")
    ax.barh(at + 0.2, [r.p99 * 1e6 for r in rows], height=0.4, label="p99")
    ax.set_yticks(at, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("latency per call, us (log scale)")
    ax.set_title("Service latency: the 21-op expression, one example per call")
    ax.legend()
    return save(plt, fig, path)


def draw_batching(plt: Any, report: Report, path: Path) -> Path:
    """Examples/s with batching on and off, by examples per request."""
    pairs = [(n, report.batching(GRADSERVE, n), report.batching(BATCHING_OFF, n))
             for n in EXAMPLES]
    fig, ax = plt.subplots(figsize=(7, 4))
    at = np.arange(len(pairs))
    ax.bar(at - 0.2, [on.examples_rate if on else 0 for _, on, _ in pairs], width=0.4,
           label="batching on (default)")
    ax.bar(at + 0.2, [off.examples_rate if off else 0 for _, _, off in pairs], width=0.4,
           label="--max-batch-size 1")
    ax.axhline(500_000, color="black", linewidth=0.5, linestyle="--",
               label="target at 1,024 per request: 500,000")
    ax.set_xticks(at, [f"{n:,} per request" for n, _, _ in pairs])
    ax.set_yscale("log")
    highest = max((r.examples_rate for _, on, off in pairs for r in (on, off) if r), default=1.0)
    ax.set_ylim(top=highest * 30)  # room for the legend above the bars
    ax.set_ylabel("examples/s (log scale)")
    ax.set_title(f"Dynamic batching, {BATCH_CONCURRENCY} calls in flight")
    ax.legend()
    return save(plt, fig, path)


# --- the command --------------------------------------------------------------------------


def load_torch() -> Any:
    """The torch module (one intra-op thread, as BLAS is held at one), or None with a note."""
    try:
        import torch
    except ImportError as e:
        print(f"note: PyTorch is not installed ({e}): its rows are skipped")
        return None
    torch.set_num_threads(1)
    return torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI's)")
    parser.add_argument("--seconds", type=float, help="engine: seconds per row and pairing "
                        "(default 3; quick 0.2)")
    parser.add_argument("--load-seconds", type=float, help="load: seconds per case and round "
                        "(default 1.5; quick 0.3)")
    parser.add_argument("--rounds", type=int, help="load: rounds, the median shown "
                        "(default 5; quick 1)")
    parser.add_argument("--markdown", type=Path, help="where to write the report (default "
                        "BENCHMARKS.md; quick: a temporary folder)")
    parser.add_argument("--plots", type=Path, help="folder for the plots (default "
                        "docs/benchmarks; quick: a temporary folder)")
    args = parser.parse_args()
    quick = args.quick
    scratch = Path(tempfile.gettempdir()) / "gradserve-bench-quick"
    markdown_path = args.markdown or (scratch / "BENCHMARKS.md" if quick else
                                      REPO / "BENCHMARKS.md")
    plots_dir = args.plots or (scratch / "benchmarks" if quick else REPO / "docs" / "benchmarks")
    seconds = args.seconds or (0.2 if quick else 3.0)
    load_seconds = args.load_seconds or (0.3 if quick else 1.5)
    rounds = args.rounds or (1 if quick else 5)
    max_calls = 300 if quick else 1_000_000
    elements = QUICK_LARGE_ELEMENTS if quick else LARGE_ELEMENTS

    started, clock = datetime.now(UTC), time.perf_counter()
    torch = load_torch()
    notes = [] if torch is not None else [
        "PyTorch is not installed on this machine: the torch.autograd columns and rows are "
        "skipped (install it and rerun to fill them)."]
    print("1. engine against hand-written numpy" + (" and torch.autograd" if torch else ""))
    with threadpool_limits(limits=1, user_api="blas"):
        engine_rows = engine_section(seconds, torch)
    print("2-4. service, plain servers, batching")
    load_rows = asyncio.run(load_section(load_seconds, rounds, max_calls, torch))
    print(f"5. large tensors: {elements:,} float64 values")
    large = asyncio.run(large_section(elements, 2 if quick else 5))

    report = Report(
        command=shlex.join(["python", "bench/suite.py", *sys.argv[1:]]),
        quick=quick, started=started, elapsed=time.perf_counter() - clock,
        settings=f"engine {seconds:g} s per row and pairing in {ENGINE_ROUNDS} rounds; load "
                 f"{rounds} round(s) of {load_seconds:g} s per case; large tensor best of "
                 f"{2 if quick else 5}",
        machine=machine(torch), engine=engine_rows, load=load_rows, large=large, notes=notes)
    plots = draw(report, plots_dir)
    text = markdown(report, plots, markdown_path)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(text)
    print()
    print(text)
    print(f"wrote {markdown_path}" + "".join(f", {p}" for p in plots))


if __name__ == "__main__":
    main()
