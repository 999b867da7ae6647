"""Scaling out on one machine: ``--workers 2`` against ``--workers 1``, and through nginx against
direct, measured side by side in one run.

Run: ``python bench/scale.py`` (``--quick`` for a short smoke run). It starts, as processes on
127.0.0.1: gradserve with one worker, gradserve with two, and nginx (Debian nginx-light, its
own prefix in a temporary folder, configured from deploy/nginx/local.conf.template) in front of
the one-worker server. ``gradserve loadtest``'s driver (bench/load_driver.py) drives each over
several connections (the kernel spreads connections, not calls, across workers) with
two workloads: the 21-op scalar expression one example per call (requests/s), and 1,024
examples per call (examples/s). Rows show the medians of the rounds; the ratios are the two
the ops issue asks for. Client and servers share this machine's cores, which caps what a second
worker can add.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from string import Template

import load_driver
import numpy as np
from grpc import aio
from servers import free_port, gradserve, process

from gradserve.client.api import CHANNEL_OPTIONS
from gradserve.client.workloads import Arrays
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

CONNECTIONS = 4  # client connections to each server
NGINX_TEMPLATE = Path(__file__).resolve().parent.parent / "deploy/nginx/local.conf.template"


@contextmanager
def nginx(backend: int, port: int) -> Iterator[tuple[str, int]]:
    """nginx on 127.0.0.1:port passing gRPC to 127.0.0.1:backend, stopped (by PID) after."""
    with tempfile.TemporaryDirectory(prefix="gradserve-nginx-") as prefix:
        conf = Path(prefix) / "nginx.conf"
        conf.write_text(Template(NGINX_TEMPLATE.read_text()).substitute(
            prefix=prefix, port=port, servers=f"        server 127.0.0.1:{backend};"))
        with process(["nginx", "-p", prefix, "-c", str(conf)], port) as running:
            yield running


async def measure(seconds: float, max_calls: int, rounds: int) -> list[tuple[str, float, str]]:
    one = {"x": np.asarray(0.7), "y": np.asarray(-1.3)}
    rng = np.random.default_rng(0)
    bulk = {"x": rng.uniform(-2, 2, 1024), "y": rng.uniform(-2, 2, 1024)}

    async with AsyncExitStack() as stack:
        async def stubs(target: str) -> list[pb_grpc.GradientServiceAsyncStub]:
            """One stub per connection: channels with subchannel pools of their own."""
            options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
            return [pb_grpc.GradientServiceStub(await stack.enter_async_context(
                aio.insecure_channel(target, options=options))) for _ in range(CONNECTIONS)]

        async def server(*flags: str) -> str:
            port = free_port()
            target, _ = stack.enter_context(process(gradserve(port, *flags), port))
            return target

        one_worker = await server("--workers", "1")
        targets = {"--workers 1": one_worker, "--workers 2": await server("--workers", "2")}
        if shutil.which("nginx"):
            port = free_port()
            targets["nginx -> --workers 1"], _ = stack.enter_context(
                nginx(int(one_worker.rsplit(":", 1)[1]), port))

        def load(connections: list[pb_grpc.GradientServiceAsyncStub], inputs: Arrays,
                 batch: int | None, per_connection: int) -> Callable[[], Awaitable[float]]:
            """Requests/s over all connections, the graph sent whole with each request (a
            worker may not know an id another registered)."""
            async def rate() -> float:
                runs = await asyncio.gather(*(
                    load_driver.unary(stub.Compute, None, inputs, per_connection, seconds,
                                      max_calls, batch) for stub in connections))
                return sum(len(run.calls) / run.seconds for run in runs)
            return rate

        cases: dict[tuple[str, str], Callable[[], Awaitable[float]]] = {}
        for name, target in targets.items():
            connections = await stubs(target)
            cases[name, "req/s"] = load(connections, one, None, 16)
            cases[name, "examples/s"] = load(connections, bulk, 1024, 2)
        rates: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
        for _ in range(rounds):
            for key, rate in cases.items():
                value = await rate()
                rates[key].append(value * (1024 if key[1] == "examples/s" else 1))
    return [(name, statistics.median(values), unit) for (name, unit), values in rates.items()]


def main() -> None:
    seconds, rounds, quick = load_driver.timing(__doc__.splitlines()[0])
    rows = asyncio.run(measure(seconds, 100 if quick else 1_000_000, rounds))
    table = {(name, unit): rate for name, rate, unit in rows}
    print(f"{'server':24s} {'scalar, 1 example/call':>24s} {'1,024 examples/call':>22s}")
    for name in dict.fromkeys(name for name, _, _ in rows):
        print(f"{name:24s} {table[name, 'req/s']:16,.0f} req/s "
              f"{table[name, 'examples/s']:13,.0f} ex/s")
    for unit in ("req/s", "examples/s"):
        base = table["--workers 1", unit]
        ratios = [f"--workers 2 / --workers 1: {table['--workers 2', unit] / base:.2f}x"]
        if ("nginx -> --workers 1", unit) in table:
            ratios.append(f"nginx / direct: {table['nginx -> --workers 1', unit] / base:.2f}x")
        print(f"{unit:11s} " + "; ".join(ratios))
    print(f"(medians of {rounds} rounds of {seconds:g} s per case, {CONNECTIONS} connections "
          f"per server; client and servers on this machine: {os.cpu_count()} cores"
          f"{'' if shutil.which('nginx') else '; nginx not installed: no nginx rows'})")


if __name__ == "__main__":
    main()
