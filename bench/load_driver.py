"""The benchmarks' load, run by ``gradserve loadtest``'s own driver (``drive`` in
gradserve.client.loadtest) on channels a benchmark holds open from one round to the next: closed
loops of unary calls, or of requests on one stream, computing the 21-op expression (or another
workload), bounded in calls and in time, with no deadline per call (as a bare channel calls),
and every answer required to be OK (a failed call fails the benchmark); and the command-line
options the load benchmarks share."""

from __future__ import annotations

import argparse

from gradserve.client.loadtest import LoadConfig, Run, Unary, drive
from gradserve.client.workloads import WORKLOADS, Arrays, Workload
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

WORKLOAD = WORKLOADS["expr21"]()  # the 21-op scalar expression


async def unary(compute: Unary, graph_id: str | None, inputs: Arrays, concurrency: int,
                seconds: float, max_calls: int, batch: int | None = None, *,
                workload: Workload = WORKLOAD) -> Run:
    """``concurrency`` callers, each calling ``compute`` again once its last call is answered,
    with ``inputs`` (``batch`` examples stacked, or one) by ``graph_id`` (None: the graph
    whole) of ``workload``."""
    config = LoadConfig("", workload, batch=batch, concurrency=concurrency, requests=max_calls,
                        seconds=seconds, deadline=None)
    return answered(await drive(config, [inputs], graph_id, compute))


async def stream(stub: pb_grpc.GradientServiceAsyncStub, graph_id: str, inputs: Arrays,
                 window: int, seconds: float, max_calls: int, *,
                 workload: Workload = WORKLOAD) -> Run:
    """One stream with ``window`` requests of ``inputs`` (of ``workload``) in flight, a new one
    written as each answer arrives."""
    config = LoadConfig("", workload, mode="stream", concurrency=1, window=window,
                        requests=max_calls, seconds=seconds, deadline=None)
    return answered(await drive(config, [inputs], graph_id, stub.Compute, stub.ComputeStream))


def answered(run: Run) -> Run:
    """``run``, once every one of its calls is known to be answered OK."""
    failed = [c for c in run.calls if c.code != "OK"]
    assert not failed, f"{len(failed)} of {len(run.calls)} calls failed, the first: {failed[0]}"
    return run


def timing(description: str) -> tuple[float, int, bool]:
    """The load benchmarks' command-line options: seconds per case and round, rounds, and
    whether this is a ``--quick`` smoke run (half a second, one round)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the median is shown)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    return (0.5, 1, True) if args.quick else (args.seconds, args.rounds, False)
