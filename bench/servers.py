"""The servers the benchmarks start, as processes on 127.0.0.1, and how they start and stop them:
a free port, a process stopped by its PID (and the CPU time it used, from /proc), gradserve's
command line and bench/torch_server.py's, and the bare echo servers that give the ceiling for
any service (with the echo's client method).

Run ``python bench/servers.py {aio,threaded,no-op} PORT`` to serve one of the echoes: ``aio``,
the bare echo on gradserve's gRPC stack (grpc.aio on uvloop): what one RPC costs with no work;
``threaded``, the same echo on gRPC's threaded server, to compare the stacks; ``no-op``, a
handler of gradserve's own messages (it parses the ComputeRequest and answers a fixed
ComputeResponse): what parsing a request and sending a response cost.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
from grpc import aio

from gradserve.client.loadtest import Unary
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.tensors import tensor_to_wire

ECHO = "/bench.Echo/Echo"
ECHOES = ("aio", "threaded", "no-op")
PLAIN_SERVER = Path(__file__).resolve().parent / "torch_server.py"


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


def plain_server(port: int, *flags: str) -> list[str]:
    """bench/torch_server.py's command line (``--backend numpy``, ``--model cnn``, ...)."""
    return [sys.executable, str(PLAIN_SERVER), "--port", str(port), *flags]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all its threads) process ``pid`` has used, from /proc (NaN
    where there is none)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def echo_server(kind: str, port: int) -> list[str]:
    """The command line serving echo ``kind`` (one of ECHOES) on ``port``."""
    return [sys.executable, __file__, kind, str(port)]


def echo_method(channel: aio.Channel, payload: bytes) -> Unary:
    """The echo's method on ``channel`` as the load driver calls it: whatever request it is
    given, it sends ``payload`` (serialised once, before the run), and it keeps the answer's
    bytes as they come, so the client does no work per call beyond gRPC's own."""
    return channel.unary_unary(ECHO, request_serializer=lambda _: payload)


def serve_threaded(port: int) -> None:
    """The bare echo on the threaded gRPC server, with no work per call."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description="serve one of the benchmarks' echo servers")
    parser.add_argument("kind", choices=ECHOES)
    parser.add_argument("port", type=int, help="port on 127.0.0.1")
    args = parser.parse_args()
    if args.kind == "threaded":
        serve_threaded(args.port)
    else:
        serve_aio(args.port, parse=args.kind == "no-op")


if __name__ == "__main__":
    main()
