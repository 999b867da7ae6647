"""Service throughput, client and server on this machine, measured side by side in one run.

Run: ``python bench/service_vs_echo.py`` (``--quick`` for a short smoke run). It starts, as
separate processes on 127.0.0.1 (bench/servers.py): a bare echo server on gradserve's gRPC
stack, grpc.aio (the ceiling: what one RPC costs with no work), the same echo on the threaded
server (to compare the stacks), a no-op handler of gradserve's own messages (what parsing the
request and sending a response cost: the ceiling for any service speaking this contract), and
gradserve servers with batching on (without and with a queue delay) and off. ``gradserve
loadtest``'s driver (bench/load_driver.py) then drives each with a bounded number of calls for
a bounded time, and this prints requests (or examples) per second, each row also as a ratio of
the echo's rate, and the server process's CPU time per request (user + system, read from
/proc), also as a ratio of the echo's: where the time goes on the server's side.

Workload: the engine benchmark's 21-op scalar expression, registered once and called by id.
Targets: unary at concurrency 64 >= 0.8x the echo's rate; >= 500,000 examples/s with 1,024
examples per request.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial

import load_driver
import numpy as np
from grpc import aio
from servers import echo_method, echo_server, free_port, gradserve, process

from gradserve.client.api import CHANNEL_OPTIONS
from gradserve.client.loadtest import Run
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request

DELAY_US = 2000  # the queue delay of the second batching server (Triton's max_queue_delay)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used, from /proc (NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@dataclass(frozen=True)
class Case:
    """One row: what it measures, how (a coroutine returning the run), the server process it
    drives, the examples per request, its target."""

    name: str
    run: Callable[[], Awaitable[Run]]
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
    graph = load_driver.WORKLOAD.graph
    one_example = {"x": np.asarray(0.7), "y": np.asarray(-1.3)}
    rng = np.random.default_rng(0)
    big = {"x": rng.uniform(-2, 2, 1024), "y": rng.uniform(-2, 2, 1024)}
    unary = partial(load_driver.unary, seconds=seconds, max_calls=max_calls)

    async with AsyncExitStack() as stack:
        async def channel(args: Callable[[int], list[str]]) -> tuple[aio.Channel, int]:
            port = free_port()
            target, pid = stack.enter_context(process(args(port), port))
            return await stack.enter_async_context(
                aio.insecure_channel(target, options=CHANNEL_OPTIONS)), pid

        async def gradserve_stub(*flags: str) -> tuple[pb_grpc.GradientServiceAsyncStub, str,
                                                        int]:
            ch, pid = await channel(lambda port: gradserve(port, *flags))
            stub = pb_grpc.GradientServiceStub(ch)
            registered = await stub.RegisterGraph(
                pb.RegisterGraphRequest(graph=graph_to_wire(graph)))
            return stub, registered.graph_id, pid

        on, on_id, on_pid = await gradserve_stub()
        delayed, delayed_id, delayed_pid = await gradserve_stub("--max-queue-delay-us",
                                                                 str(DELAY_US))
        off, off_id, off_pid = await gradserve_stub("--max-batch-size", "1")
        # the echoes get the request bytes gradserve gets
        payload = request(on_id, None, one_example).SerializeToString()

        async def echo(kind: str) -> tuple[Callable[[int], Awaitable[Run]], int]:
            """The echo ``kind``'s unary load at a given concurrency, and its PID."""
            ch, pid = await channel(partial(echo_server, kind))
            call = echo_method(ch, payload)
            await call(pb.ComputeRequest())  # warm up the connection
            return partial(unary, call, on_id, one_example), pid

        aio_echo, aio_pid = await echo("aio")
        threaded_echo, threaded_pid = await echo("threaded")
        no_op, no_op_pid = await echo("no-op")
        count = min(max_calls, int(2000 * seconds))  # requests on the stream, all at once
        cases = [
            Case("echo, grpc.aio server, concurrency 64", partial(aio_echo, 64), aio_pid),
            Case("echo, threaded server, concurrency 64", partial(threaded_echo, 64),
                 threaded_pid),
            Case("no-op handler of gradserve's messages, c64", partial(no_op, 64), no_op_pid),
            Case("unary, concurrency 1, batching on",
                 partial(unary, on.Compute, on_id, one_example, 1), on_pid),
            Case("unary, concurrency 16, batching on",
                 partial(unary, on.Compute, on_id, one_example, 16), on_pid),
            Case("unary, concurrency 64, batching on",
                 partial(unary, on.Compute, on_id, one_example, 64), on_pid,
                 target=">= 0.8x target"),
            Case(f"unary, concurrency 64, batching on, {DELAY_US // 1000} ms queue delay",
                 partial(unary, delayed.Compute, delayed_id, one_example, 64), delayed_pid,
                 target=">= 0.8x target"),
            Case("unary, concurrency 64, batching off",
                 partial(unary, off.Compute, off_id, one_example, 64), off_pid),
            Case("stream, 1 example per message",
                 partial(load_driver.stream, on, on_id, one_example, count, seconds, count),
                 on_pid),
            Case("unary, 1,024 examples per request",
                 partial(unary, on.Compute, on_id, big, 4, batch=1024), on_pid, examples=1024,
                 target=">= 500,000 target"),
        ]
        rates: dict[str, list[float]] = {case.name: [] for case in cases}
        cpu: dict[str, list[float]] = {case.name: [] for case in cases}
        for _ in range(rounds):
            for case in cases:
                used = cpu_seconds(case.pid)
                run = await case.run()
                calls = len(run.calls)
                cpu[case.name].append((cpu_seconds(case.pid) - used) / calls * 1e6)
                rates[case.name].append(calls * case.examples / run.seconds)
    return [Row(case, statistics.median(rates[case.name]), statistics.median(cpu[case.name]))
            for case in cases]


def main() -> None:
    seconds, rounds, quick = load_driver.timing(__doc__.splitlines()[0])
    rows = asyncio.run(measure(seconds, 200 if quick else 1_000_000, rounds))
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
