"""Service throughput, client and server on this machine, measured side by side in one run.

Run: ``python bench/service_vs_echo.py`` (``--quick`` for a short smoke run). It starts, as
separate processes on 127.0.0.1 (bench/servers.py): a bare echo server on gradserve's gRPC
stack, grpc.aio (the ceiling: what one RPC costs with no work), the same echo on the threaded
server (to compare the stacks), a no-op handler of gradserve's own messages (what parsing the
request and sending a response cost: the ceiling for any service speaking this contract),
gradserve on its defaults (adaptive batching), with a fixed queue delay (Triton's way) and with
batching off (``--max-batch-size 1``), and the plain servers a user would otherwise write
(bench/torch_server.py: each request computed on its own by hand-written numpy, and by
torch.autograd when PyTorch is installed). Every server's answers are checked against
hand-written numpy first. ``gradserve loadtest``'s driver (bench/load_driver.py) then drives
each case with a bounded number of calls for a bounded time, the cases taking turns in each
round (bench/suite_load.py's ``run_rounds``, as the suite runs them), and this prints requests
(or examples) per second, each row also as a ratio of the echo's rate, the server process's CPU
time per request (user + system, read from /proc), also as a ratio of the echo's (where the
time goes on the server's side), and p50 and p99 latency; then the batching issue's targets,
each met or missed by how much (bench/suite_report.py's ``load_goals``, as BENCHMARKS.md states
them).

Workloads: the engine benchmark's 21-op scalar expression (``expr21``), registered once and
called by id; and the served MLP 784-256-10 (``mlp-model``: weights constant, one example per
request, the gradient with respect to x), batching on against off, alone and at concurrency 64.
Targets: unary at concurrency 64 >= 0.8x the echo's rate, server CPU per request <= 1.3x the
echo's, >= 1.0x the plain numpy server, >= 2.5x the plain torch.autograd server; p50 latency at
concurrency 1 with batching <= 1.1x that without; batching on / off >= 1.5x on mlp-model at
concurrency 64 and >= 1.0x wherever both are measured; the stream at concurrency 64 >= 0.8x the
echo; >= 500,000 examples/s with 1,024 examples per request.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import partial

import load_driver
import numpy as np
from servers import echo_method, echo_server, gradserve, plain_server
from suite_engine import duration
from suite_load import (
    BATCHING_OFF,
    ECHO_SERVER,
    EXPR21,
    GRADSERVE,
    MODEL,
    PLAIN_NUMPY,
    PLAIN_TORCH,
    SERVICE,
    LoadCase,
    LoadRow,
    Served,
    Servers,
    run_rounds,
)
from suite_report import Goal, load_goals, number

from gradserve.wire.requests import request

DELAY_US = 2000  # the fixed queue delay of the third gradserve server (Triton's max_queue_delay)
FIXED_DELAY = f"gradserve, fixed {DELAY_US // 1000} ms queue delay"
THREADED_ECHO, NO_OP = "echo, threaded server", "no-op handler of gradserve's messages"
BULK = 1024  # examples per request in the bulk row
BULK_TARGET = 500_000  # examples/s


def label(case: LoadCase) -> str:
    """A row's name: server, call, calls in flight, workload, and examples per request."""
    size = f", {case.examples:,} examples per request" if case.examples > 1 else ""
    return f"{case.server}, {case.mode}, c{case.concurrency}, {case.workload}{size}"


async def measure(seconds: float, max_calls: int, rounds: int) -> list[LoadRow]:
    """Every server started and checked; every case's runs over ``rounds`` rounds."""
    torch = importlib.util.find_spec("torch") is not None
    async with AsyncExitStack() as stack:
        servers = Servers(stack)
        expr, model = servers.workloads[EXPR21], servers.workloads[MODEL]
        rng = np.random.default_rng(0)
        one = expr.inputs(rng, None)
        big = expr.inputs(rng, BULK)
        model_inputs = {1: model.inputs(rng, None), 4: model.inputs(rng, 4)}

        both = (EXPR21, MODEL)
        starts: dict[str, tuple[Callable[[int], list[str]], tuple[str, ...]]] = {
            GRADSERVE: (gradserve, both),
            FIXED_DELAY: (lambda port: gradserve(port, "--batch-wait", "fixed",
                                                 "--max-queue-delay-us", str(DELAY_US)),
                          (EXPR21,)),
            BATCHING_OFF: (lambda port: gradserve(port, "--max-batch-size", "1"), both),
            PLAIN_NUMPY: (lambda port: plain_server(port, "--backend", "numpy"), (EXPR21,))}
        if torch:
            starts[PLAIN_TORCH] = (lambda port: plain_server(port, "--backend", "torch"),
                                   (EXPR21,))
        served: dict[str, Served] = {}
        for name, (args, names) in starts.items():
            served[name] = each = await servers.service(args, names)
            await servers.check(name, each, EXPR21, {1: one, BULK: big})
            if MODEL in names:
                await servers.check(name, each, MODEL, model_inputs)

        on = served[GRADSERVE]
        # the echoes get the request bytes gradserve gets
        message = request(on.graph_ids[EXPR21], None, one)
        unary = partial(load_driver.unary, seconds=seconds, max_calls=max_calls)

        async def echo(kind: str, name: str) -> LoadCase:
            """The echo ``kind``'s unary load at concurrency 64."""
            channel, pid = await servers.channel(partial(echo_server, kind))
            call = echo_method(channel, message.SerializeToString())
            await call(message)  # warm up the connection
            return LoadCase(SERVICE, name, "unary", 64, 1, partial(
                unary, call, on.graph_ids[EXPR21], one, 64), pid=pid)

        def compute(name: str, concurrency: int, workload: str = EXPR21,
                    examples: int = 1) -> LoadCase:
            """Unary calls of ``workload`` to server ``name``."""
            each = served[name]
            inputs = (one if examples == 1 else big) if workload == EXPR21 else model_inputs[1]
            return LoadCase(SERVICE, name, "unary", concurrency, examples, partial(
                unary, each.stub.Compute, each.graph_ids[workload], inputs, concurrency,
                batch=examples if examples > 1 else None,
                workload=servers.workloads[workload]), workload, each.pid)

        cases = [
            await echo("aio", ECHO_SERVER),
            await echo("threaded", THREADED_ECHO),
            await echo("no-op", NO_OP),
            compute(GRADSERVE, 64),
            compute(BATCHING_OFF, 64),
            compute(FIXED_DELAY, 64),
            *(compute(name, 64) for name in (PLAIN_NUMPY, PLAIN_TORCH) if name in served),
            LoadCase(SERVICE, GRADSERVE, "stream", 64, 1, partial(
                load_driver.stream, on.stub, on.graph_ids[EXPR21], one, 64, seconds,
                max_calls), pid=on.pid),
            compute(GRADSERVE, 1),
            compute(BATCHING_OFF, 1),
            compute(GRADSERVE, 16),
            compute(GRADSERVE, 4, examples=BULK),
            compute(GRADSERVE, 64, MODEL),
            compute(BATCHING_OFF, 64, MODEL),
            compute(GRADSERVE, 1, MODEL),
            compute(BATCHING_OFF, 1, MODEL),
        ]
        return await run_rounds(cases, rounds, seconds)


def goals(rows: list[LoadRow]) -> list[Goal]:
    """The batching issue's targets (as BENCHMARKS.md states them), then the bulk rate's."""
    bulk = next(r for r in rows if r.case.examples == BULK)
    return [*load_goals(rows), Goal(f"examples/s, {BULK:,} examples per request, concurrency "
                                    f"{bulk.case.concurrency}", bulk.examples_rate,
                                    BULK_TARGET, True, "examples/s")]


def main() -> None:
    seconds, rounds, quick = load_driver.timing(__doc__.splitlines()[0])
    rows = asyncio.run(measure(seconds, 200 if quick else 1_000_000, rounds))
    echo = rows[0]
    print(f"{'case':58s} {'rate':>10s} {'unit':10s} {'vs echo':>7s} {'server CPU':>14s} "
          f"{'vs echo':>7s} {'p50':>9s} {'p99':>9s}")
    for row in rows:
        case = row.case
        one = case.examples == 1
        # ratios to the echo at its own concurrency only
        alike = one and case.concurrency == echo.case.concurrency
        ratio = "ceiling" if row is echo else f"{row.over(echo):.2f}x" if alike else ""
        cpu = "ceiling" if row is echo else f"{row.cpu_over(echo):.2f}x" if alike else ""
        print(f"{label(case):58s} {row.rate * case.examples:10,.0f} "
              f"{'req/s' if one else 'examples/s':10s} {ratio:>7s} "
              f"{row.cpu * 1e6:7,.1f} us/req {cpu:>7s} {duration(row.p50):>9s} "
              f"{duration(row.p99):>9s}")
    print(f"(medians of {rounds} round(s) of {seconds:g} s per case, the cases taking turns; "
          f"ratios to the echo at concurrency {echo.case.concurrency}, the medians of the "
          f"rounds' ratios; client and servers on this machine: {os.cpu_count()} cores)")
    print()
    print(f"{'target':72s} {'measured':>20s} {'wanted':>23s}  verdict")
    for goal in goals(rows):
        print(f"{goal.what:72s} {number(goal.measured, goal.unit):>20s} {goal.target:>23s}  "
              f"{goal.verdict}")


if __name__ == "__main__":
    main()
