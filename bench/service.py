"""Service throughput, client and server on this machine, measured side by side in one run.

Run: ``python bench/service.py`` (``--quick`` for a short smoke run). It starts, as separate
processes on 127.0.0.1: a bare echo server on gradserve's gRPC stack, grpc.aio (the ceiling:
what one RPC costs with no work), the same echo on the threaded server (to compare the stacks),
a no-op handler of gradserve's own messages (what parsing the request and sending a response
cost: the ceiling for any service speaking this contract), and gradserve servers with batching
on (without and with a queue delay) and off. An asyncio client then drives each with a bounded
number of calls for a bounded time and prints requests (or examples) per second, each row also
as a ratio of the echo's rate, and the server process's CPU time per request (user + system,
read from /proc), also as a ratio of the echo's: where the time goes on the server's side.

Workload: the engine benchmark's 21-op scalar expression, registered once and called by id.
Targets: unary at concurrency 64 >= 0.8x the echo's rate; >= 500,000 examples/s with 1,024
examples per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from functools import partial

import grpc
import numpy as np
from grpc import aio

from gradserve.client.api import CHANNEL_OPTIONS
from gradserve.client.workloads import expression
from gradserve.engine.builder import GraphBuilder
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.requests import request
from gradserve.wire.tensors import tensor_to_wire

ECHO = "/bench.Echo/Echo"
DELAY_US = 2000  # the queue delay of the second batching server (Triton's max_queue_delay)


def serve_echo(port: int) -> None:
    """A bare echo on the threaded gRPC server, with no work per call."""
    from concurrent.futures import ThreadPoolExecutor

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server = grpc.server(ThreadPoolExecutor(32))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve_aio(port: int, *, parse: bool) -> None:
    """The echo on grpc.aio with gradserve's event loop (uvloop), gradserve's stack; with
    ``parse``, a handler that parses a ComputeRequest and answers a fixed ComputeResponse."""
    import uvloop

    answer = pb.ComputeResponse(outputs={"out": tensor_to_wire(np.float64(1.0))},
                                gradients={n: tensor_to_wire(np.float64(1.0)) for n in "xy"},
                                nonfinite=[False])

    async def echo(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    async def no_op(request: pb.ComputeRequest,
                    context: aio.ServicerContext[pb.ComputeRequest, pb.ComputeResponse]
                    ) -> pb.ComputeResponse:
        return answer

    handler = (grpc.unary_unary_rpc_method_handler(
        no_op, request_deserializer=pb.ComputeRequest.FromString,
        response_serializer=pb.ComputeResponse.SerializeToString) if parse else
        grpc.unary_unary_rpc_method_handler(echo))

    async def run() -> None:
        server = aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(run())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def process(args: list[str], port: int) -> Iterator[tuple[str, int]]:
    """A server process listening on 127.0.0.1:port (its target and PID), stopped (by PID)
    afterwards."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        yield target, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def gradserve(port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "gradserve.server", "--port", str(port), "--metrics-port",
            "-1", *flags]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used, from /proc (NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def drive(call: Callable[[], Awaitable[object]], concurrency: int, seconds: float,
                max_calls: int) -> tuple[int, float]:
    """Calls made and seconds taken with ``concurrency`` calls in flight, bounded in time and
    count."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while done < max_calls and time.perf_counter() < deadline:
            await call()
            done += 1

    await call()  # warm up the connection
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, time.perf_counter() - start


async def stream(stub: pb_grpc.GradientServiceAsyncStub, message: pb.ComputeRequest,
                 count: int) -> tuple[int, float]:
    requests = [pb.ComputeStreamRequest(request=message) for _ in range(count)]
    start = time.perf_counter()
    answered = 0
    async for reply in stub.ComputeStream(iter(requests)):
        assert reply.WhichOneof("outcome") == "response", reply
        answered += 1
    return answered, time.perf_counter() - start


@dataclass(frozen=True)
class Case:
    """One row: what it measures, how (a coroutine returning the requests made and the
    seconds taken), the server process it drives, the examples per request, its target."""

    name: str
    run: Callable[[], Awaitable[tuple[int, float]]]
    pid: int
    examples: int = 1
    target: str = ""

    @property
    def unit(self) -> str:
        return "req/s" if self.examples == 1 else "examples/s"


@dataclass(frozen=True)
class Row:
    """A case's medians over the rounds: its rate (in its unit) and its server's CPU time per
    request."""

    case: Case
    rate: float
    cpu_us: float


async def measure(seconds: float, max_calls: int, rounds: int) -> list[Row]:
    """Every case's medians over ``rounds`` rounds, the cases taking turns in each round (so
    a slow spell of this shared machine falls on all of them alike)."""
    g = GraphBuilder()
    graph = g.build(expression(g.input("x"), g.input("y")))
    one_example = {"x": np.float64(0.7), "y": np.float64(-1.3)}
    payload = request(None, graph, one_example).SerializeToString()
    rng = np.random.default_rng(0)
    big = {"x": rng.uniform(-2, 2, 1024), "y": rng.uniform(-2, 2, 1024)}

    def unary(call: Callable[[], Awaitable[object]], concurrency: int
              ) -> Callable[[], Awaitable[tuple[int, float]]]:
        return partial(drive, call, concurrency, seconds, max_calls)

    async with AsyncExitStack() as stack:
        async def channel(args: Callable[[int], list[str]]) -> tuple[aio.Channel, int]:
            port = free_port()
            target, pid = stack.enter_context(process(args(port), port))
            return await stack.enter_async_context(
                aio.insecure_channel(target, options=CHANNEL_OPTIONS)), pid

        async def echo(kind: str) -> tuple[Callable[[], Awaitable[bytes]], int]:
            ch, pid = await channel(lambda port: [sys.executable, __file__, f"--serve-{kind}",
                                                  str(port)])
            call: aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(ECHO)
            return partial(call, payload), pid

        async def gradserve_stub(*flags: str) -> tuple[pb_grpc.GradientServiceAsyncStub, str,
                                                        int]:
            ch, pid = await channel(lambda port: gradserve(port, *flags))
            stub = pb_grpc.GradientServiceStub(ch)
            registered = await stub.RegisterGraph(
                pb.RegisterGraphRequest(graph=request(None, graph, {}).graph))
            return stub, registered.graph_id, pid

        on, on_id, on_pid = await gradserve_stub()
        delayed, delayed_id, delayed_pid = await gradserve_stub("--max-queue-delay-us",
                                                                 str(DELAY_US))
        off, off_id, off_pid = await gradserve_stub("--max-batch-size", "1")

        def compute(stub: pb_grpc.GradientServiceAsyncStub, graph_id: str
                    ) -> Callable[[], Awaitable[pb.ComputeResponse]]:
            return partial(stub.Compute, request(graph_id, None, one_example))

        aio_echo, aio_pid = await echo("aio")
        threaded_echo, threaded_pid = await echo("threaded")
        no_op, no_op_pid = await echo("no-op")
        cases = [
            Case("echo, grpc.aio server, concurrency 64", unary(aio_echo, 64), aio_pid),
            Case("echo, threaded server, concurrency 64", unary(threaded_echo, 64),
                 threaded_pid),
            Case("no-op handler of gradserve's messages, c64", unary(no_op, 64), no_op_pid),
            Case("unary, concurrency 1, batching on", unary(compute(on, on_id), 1), on_pid),
            Case("unary, concurrency 16, batching on", unary(compute(on, on_id), 16), on_pid),
            Case("unary, concurrency 64, batching on", unary(compute(on, on_id), 64), on_pid,
                 target=">= 0.8x target"),
            Case(f"unary, concurrency 64, batching on, {DELAY_US // 1000} ms queue delay",
                 unary(compute(delayed, delayed_id), 64), delayed_pid,
                 target=">= 0.8x target"),
            Case("unary, concurrency 64, batching off", unary(compute(off, off_id), 64),
                 off_pid),
            Case("stream, 1 example per message",
                 partial(stream, on, request(on_id, None, one_example),
                         min(max_calls, int(2000 * seconds))), on_pid),
            Case("unary, 1,024 examples per request",
                 unary(partial(on.Compute, request(on_id, None, big, batch_size=1024)), 4),
                 on_pid, examples=1024, target=">= 500,000 target"),
        ]
        rates: dict[str, list[float]] = {case.name: [] for case in cases}
        cpu: dict[str, list[float]] = {case.name: [] for case in cases}
        for _ in range(rounds):
            for case in cases:
                used = cpu_seconds(case.pid)
                calls, elapsed = await case.run()
                cpu[case.name].append((cpu_seconds(case.pid) - used) / calls * 1e6)
                rates[case.name].append(calls * case.examples / elapsed)
    return [Row(case, statistics.median(rates[case.name]), statistics.median(cpu[case.name]))
            for case in cases]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the median is shown)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    for stack in ("aio", "threaded", "no-op"):
        parser.add_argument(f"--serve-{stack}", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_threaded:
        serve_echo(args.serve_threaded)
        return
    if args.serve_aio or args.serve_no_op:
        serve_aio(args.serve_aio or args.serve_no_op, parse=bool(args.serve_no_op))
        return
    seconds = 0.5 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    rows = asyncio.run(measure(seconds, 200 if args.quick else 1_000_000, rounds))
    echo = rows[0]
    print(f"{'case':52s} {'rate':>12s}  {'unit':11s} {'vs echo':>8s}  {'server CPU':>14s} "
          f"{'vs echo':>8s}  target")
    for row in rows:
        case = row.case
        ratio = "ceiling" if row is echo else (
            "" if case.examples > 1 else f"{row.rate / echo.rate:.2f}x")
        print(f"{case.name:52s} {row.rate:12,.0f}  {case.unit:11s} {ratio:>8s}  "
              f"{row.cpu_us:8,.0f} us/req {row.cpu_us / echo.cpu_us:7.2f}x  "
              f"{case.target}".rstrip())
    print(f"(medians of {rounds} rounds of {seconds:g} s per case, the cases taking turns; "
          f"client and servers on this machine: {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
