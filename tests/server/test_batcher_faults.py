"""The batcher never strands a request: stacking failures fall back, limits do not re-run, and a
cancelled stream's queued requests are dropped, never computed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from gradserve.client.api import request
from gradserve.client.codec import graph_to_wire
from gradserve.engine import EngineError, ErrorKind, Plan
from gradserve.engine.builder import GraphBuilder
from gradserve.server import batcher as batcher_module
from gradserve.server.batcher import Batcher, Job
from gradserve.v1 import gradserve_pb2 as pb
from tests.server.conftest import RPC_TIMEOUT, WAIT, ServerFactory


def square_plan() -> Plan:
    g = GraphBuilder()
    x = g.input("x")
    return Plan(g.build(x * x))


def run_batch(plan: Plan, xs: list[float]) -> list[Job]:
    """Queue one job per x on a fresh batcher, on an event loop of its own; return the jobs
    once all are settled (bounded in time)."""

    async def go() -> list[Job]:
        batcher = Batcher(max_batch_size=16, max_queue_delay=0, max_queue_size=16, threads=1,
                          inline_max_elements=1 << 16)
        jobs = [Job(plan.prepare({"x": np.array(x)}, wrt={"x"})) for x in xs]
        for job in jobs:
            batcher.submit(job)
        await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs),
                                              return_exceptions=True), timeout=10)
        await batcher.close()
        return jobs

    return asyncio.run(go())


def test_an_unexpected_stacking_failure_falls_back_to_each_request_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(jobs: list[Job]) -> Any:
        raise MemoryError("no room to stack")

    monkeypatch.setattr(batcher_module, "_stacked", broken)
    jobs = run_batch(square_plan(), [2.0, 3.0])
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
    jobs = run_batch(square_plan(), [2.0, 3.0])
    assert runs == []
    for job in jobs:
        error = job.future.exception()
        assert isinstance(error, EngineError) and error.kind is ErrorKind.LIMIT


def test_a_cancelled_stream_drops_its_queued_requests(make_server: ServerFactory) -> None:
    # one request per engine pass, each a few milliseconds of real work on the one engine thread
    served = make_server(batch_threads=1, max_batch_size=1)
    g = GraphBuilder()
    m = g.input("m", (200, 200))
    graph = g.build(((m @ m).tanh() @ m).sum())
    graph_id = served.stub.RegisterGraph(pb.RegisterGraphRequest(graph=graph_to_wire(graph)),
                                         timeout=RPC_TIMEOUT).graph_id
    messages = [pb.ComputeStreamRequest(request=request(graph_id, None, {"m": np.eye(200)},
                                                        request_id=str(k))) for k in range(60)]
    replies = served.stub.ComputeStream(iter(messages), timeout=RPC_TIMEOUT)
    next(replies)
    replies.cancel()
    deadline = time.monotonic() + WAIT
    while served.server.batcher.queued and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.server.batcher.queued == 0, "the cancelled stream's requests stayed queued"
    computed = sum(r for r, _ in served.batches.batches)
    time.sleep(0.2)  # nothing more is computed for the stream that went away
    assert sum(r for r, _ in served.batches.batches) == computed < len(messages)
