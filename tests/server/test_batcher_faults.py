"""The batcher never strands a request: stacking failures fall back, limits do not re-run, and a
cancelled stream's requests are dropped."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest

from gradserve.client.api import request
from gradserve.engine import EngineError, ErrorKind, Plan
from gradserve.engine.builder import GraphBuilder
from gradserve.server import batcher as batcher_module
from gradserve.server.batcher import Batcher, Job
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from tests.conftest import StartServer


def square_plan() -> Plan:
    g = GraphBuilder()
    x = g.input("x")
    return Plan(g.build(x * x))


def two_jobs(plan: Plan) -> list[Job]:
    return [Job(plan.prepare({"x": np.array(v)}, wrt={"x"})) for v in (2.0, 3.0)]


def run_batch(jobs: list[Job]) -> Batcher:
    batcher = Batcher(max_batch_size=16, max_queue_delay=0, max_queue_size=16, threads=1)
    for job in jobs:
        batcher.submit(job)
    assert batcher.work_until(lambda: all(j.future.done() for j in jobs), timeout=10)
    return batcher


def test_an_unexpected_stacking_failure_falls_back_to_each_request_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(jobs: list[Job]) -> Any:
        raise MemoryError("no room to stack")

    monkeypatch.setattr(batcher_module, "_stacked", broken)
    jobs = two_jobs(square_plan())
    run_batch(jobs)
    assert [float(j.future.result().outputs[j.feed.plan.outputs[0]]) for j in jobs] == [4.0, 9.0]


def test_a_time_limit_in_a_stacked_run_is_not_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    def overtime(jobs: list[Job]) -> Any:
        raise EngineError(ErrorKind.LIMIT, "over time", field="time")

    runs: list[Job] = []

    def run_alone(job: Job) -> Any:
        runs.append(job)
        raise AssertionError("a request ran again after its batch ran out of time")

    monkeypatch.setattr(batcher_module, "_stacked", overtime)
    monkeypatch.setattr(Job, "run", run_alone)
    jobs = two_jobs(square_plan())
    run_batch(jobs)
    assert runs == []
    for job in jobs:
        error = job.future.exception()
        assert isinstance(error, EngineError) and error.kind is ErrorKind.LIMIT


def stream_readers() -> int:
    return sum(t.name == "gradserve-stream-reader" for t in threading.enumerate())


def test_a_cancelled_stream_drops_its_queued_requests(start_server: StartServer) -> None:
    server = start_server(batch_threads=1)
    g = GraphBuilder()
    m = g.input("m", (150, 150))
    slow = ((m @ m).tanh() @ m).sum()
    graph = g.build(slow)
    messages = [pb.ComputeStreamRequest(request=request(None, graph, {"m": np.eye(150)},
                                                        request_id=str(k))) for k in range(60)]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        replies = stub.ComputeStream(iter(messages), timeout=30)
        next(replies)
        replies.cancel()
    deadline = time.monotonic() + 10
    while stream_readers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stream_readers() == 0, "the stream's reader thread outlived its stream"
    server.batcher.work_until(lambda: server.batcher.queued == 0, timeout=10)  # only skips
    assert server.batcher.queued == 0
