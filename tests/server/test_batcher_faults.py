"""The batcher never strands a request: stacking failures fall back, limits do not re-run, a
failing hook costs no answer, no pass stacks requests past the element limit, and a withdrawn
or cancelled request gives up its place, never computed."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

from gradserve.engine import EngineError, ErrorKind, Limits, Plan, Timer
from gradserve.engine.builder import GraphBuilder
from gradserve.server import batcher as batcher_module
from gradserve.server.batcher import Batcher, Job, QueueFullError
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request
from tests.server.conftest import RPC_TIMEOUT, WAIT, ServerFactory


def square_plan() -> Plan:
    g = GraphBuilder()
    x = g.input("x")
    return Plan(g.build(x * x))


def run_batch(plan: Plan, xs: list[float], *, batched: int = 0, **settings: Any) -> list[Job]:
    """Queue one job per x (a batch of ``batched`` copies of it, if set) on a fresh batcher,
    on an event loop of its own; return the jobs once all are settled (bounded in time)."""

    async def go() -> list[Job]:
        options: dict[str, Any] = {"max_batch_size": 4096, "max_queue_delay": 0,
                                   "max_queue_size": 16, "threads": 1,
                                   "inline_max_elements": 1 << 16, **settings}
        batcher = Batcher(**options)
        jobs = [Job(plan.prepare({"x": np.full(batched, x) if batched else np.array(x)},
                                 wrt={"x"}, batched=bool(batched))) for x in xs]
        for job in jobs:
            batcher.submit(job)
        await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs),
                                              return_exceptions=True), timeout=WAIT)
        batcher.close()
        await asyncio.wait_for(batcher.join(), timeout=WAIT)
        return jobs

    return asyncio.run(go())


def square_of(job: Job) -> Any:
    return job.future.result().outputs[job.feed.plan.outputs[0]]


def test_an_unexpected_stacking_failure_falls_back_to_each_request_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(jobs: list[Job], timer: Timer) -> Any:
        raise MemoryError("no room to stack")

    monkeypatch.setattr(batcher_module, "_stacked", broken)
    jobs = run_batch(square_plan(), [2.0, 3.0])
    assert [float(square_of(j)) for j in jobs] == [4.0, 9.0]


def test_a_time_limit_in_a_stacked_run_is_not_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    def overtime(jobs: list[Job], timer: Timer) -> Any:
        raise EngineError(ErrorKind.LIMIT, "over time", field="time")

    runs: list[Job] = []

    def run_alone(job: Job, timer: Timer | None = None) -> Any:
        runs.append(job)
        raise AssertionError("a request ran again after its batch ran out of time")

    monkeypatch.setattr(batcher_module, "_stacked", overtime)
    monkeypatch.setattr(Job, "run", run_alone)
    jobs = run_batch(square_plan(), [2.0, 3.0])
    assert runs == []
    for job in jobs:
        error = job.future.exception()
        assert isinstance(error, EngineError) and error.kind is ErrorKind.LIMIT


def test_requests_that_fit_alone_are_never_stacked_past_the_element_limit() -> None:
    # x * x holds 2 elements per example: a limit of 200 takes 100 examples; each request
    # has 60, so two fit alone but not together: they run in separate passes, both answered
    g = GraphBuilder()
    x = g.input("x")
    plan = Plan(g.build(x * x), Limits(max_total_elements=200))
    assert plan.total_elements == 2
    jobs = run_batch(plan, [2.0, 3.0], batched=60)
    assert [square_of(j).tolist() for j in jobs] == [[4.0] * 60, [9.0] * 60]


def test_a_failing_batch_hook_leaves_the_answers_standing(
        caplog: pytest.LogCaptureFixture) -> None:
    def hook(*details: Any) -> None:
        raise RuntimeError("metrics are down")

    for inline in (1 << 16, 0):  # a pass on the loop, and one on an engine thread
        jobs = run_batch(square_plan(), [2.0, 3.0], on_batch=hook, inline_max_elements=inline)
        assert [float(square_of(j)) for j in jobs] == [4.0, 9.0]
    assert "the on_batch hook failed" in caplog.text


def test_a_request_larger_than_a_batch_runs_where_its_size_says() -> None:
    # 100 examples of x * x hold 200 elements: over inline_max_elements, so the pass runs on an
    # engine thread, though max_batch_size (4) is smaller than the request
    threads: list[str] = []

    def hook(*details: Any) -> None:
        threads.append(threading.current_thread().name)

    jobs = run_batch(square_plan(), [3.0], batched=100, max_batch_size=4,
                     inline_max_elements=100, on_batch=hook)
    assert square_of(jobs[0]).tolist() == [9.0] * 100
    assert len(threads) == 1 and threads[0].startswith("gradserve-engine")


def test_a_withdrawn_request_frees_its_place_in_the_queue() -> None:
    async def go() -> tuple[int, int]:
        batcher = Batcher(max_batch_size=16, max_queue_delay=60.0, max_queue_size=1, threads=1,
                          inline_max_elements=1 << 16)
        feed = square_plan().prepare({"x": 2.0})
        first = Job(feed)
        batcher.submit(first)  # waits out its queue delay
        with pytest.raises(QueueFullError):
            batcher.submit(Job(feed))
        first.future.cancel()
        batcher.withdraw(first)
        queued_after = batcher.queued
        second = Job(feed)
        batcher.submit(second)
        batcher.close()  # no more waiting: the second runs now
        result = await asyncio.wait_for(second.future, timeout=WAIT)
        await asyncio.wait_for(batcher.join(), timeout=WAIT)
        return queued_after, int(result.outputs[feed.plan.outputs[0]])

    assert asyncio.run(go()) == (0, 4)


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
    batcher = served.server.batcher
    deadline = time.monotonic() + WAIT
    while (batcher.queued or batcher.running) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.queued == 0, "the cancelled stream's requests stayed queued"
    assert batcher.running == 0, "a pass for the cancelled stream went on computing"
    computed = sum(r for r, _ in served.batches.batches)
    time.sleep(0.2)  # nothing more is computed for the stream that went away
    assert sum(r for r, _ in served.batches.batches) == computed < len(messages)
