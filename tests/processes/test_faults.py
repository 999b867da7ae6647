"""Overload and shutdown under load, against real server processes on 127.0.0.1, driven by the
load-test library (every call recorded with its status; nothing retried).

- A burst ten times the server's measured capacity: the excess is refused at once with
  RESOURCE_EXHAUSTED (the queue is full), what is accepted is answered correctly within the
  time its place in the queue implies, and the server serves normally the moment it ends.
- SIGTERM in the middle of a load: every call sent ends as a correct answer or an explicit
  UNAVAILABLE (the server is going away); none is left without an answer, none times out.

Bounds on time here are loose multiples of what the same test measures on the same server
first, so a slow machine does not fail them; a server that queued without limit would.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from gradserve.client.loadtest import Call, LoadConfig, run_load
from gradserve.client.workloads import Workload, from_graph, mlp
from gradserve.engine.builder import GraphBuilder
from tests.processes.conftest import EXIT_TIMEOUT, Backend, metric

QUEUE = 16  # the server's --max-queue-size
SLACK = 5.0  # how many times the expected latency an accepted call may take on a noisy machine
REJECTED = "gradserve_rejected_requests_total"
DEADLINE = 30.0  # seconds: far beyond any answer here, so a hang shows up as DEADLINE_EXCEEDED


def heavy() -> Workload:
    """A scalar spread over 400 x 400 values and put through a few ops: several milliseconds of
    engine work for a request of a few bytes, so the burst tests the queue, not the network."""
    g = GraphBuilder()
    x = g.input("x")
    y = g.op("broadcast_to", x, shape=(400, 400))
    z = g.op("sin", y * y).tanh() * y
    return from_graph(g.build(g.op("exp", z).sum()), "heavy")


def workload_config(b: Backend, workload: Workload, **changes: object) -> LoadConfig:
    """A fifth of the answers checked against the engine run here (checking costs the client
    as much as the server's work, on the same cores)."""
    return LoadConfig(b.target, workload, deadline=DEADLINE, verify=0.2,
                      **changes)  # type: ignore[arg-type]


def latencies(calls: list[Call], code: str) -> np.ndarray:
    return np.array([c.latency for c in calls if c.code == code])


def test_a_burst_past_capacity_is_refused_fast_and_the_rest_served(
        backend: Callable[..., Backend]) -> None:
    b = backend("--max-batch-size", "1", "--max-queue-size", str(QUEUE), "--batch-threads", "1")
    # Capacity: as many callers as the queue holds, closed loop, for two seconds.
    work = heavy()
    steady = asyncio.run(run_load(workload_config(b, work, concurrency=QUEUE, requests=100_000,
                                                  seconds=2.0)))
    assert {c.code for c in steady.calls} == {"OK"} and not any(c.wrong for c in steady.calls)
    capacity = len(steady.calls) / steady.seconds
    refused_before = metric(b.metrics_ports[0], REJECTED, reason="queue_full")

    burst_seconds = 2.0
    rate = 10 * capacity
    burst = asyncio.run(run_load(workload_config(
        b, work, rps=rate, requests=int(rate * burst_seconds), seconds=burst_seconds + DEADLINE)))
    codes = Counter(c.code for c in burst.calls)
    assert len(burst.calls) == int(rate * burst_seconds)  # every call ended, one way or another
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, (codes, Counter(
        c.error for c in burst.calls if c.code not in ("OK", "RESOURCE_EXHAUSTED")))
    assert codes["RESOURCE_EXHAUSTED"] > len(burst.calls) / 2, codes  # the excess is refused
    # ... while the server kept working (client and server share the cores, and refusing
    # takes some of them, so not at its full rate).
    assert codes["OK"] >= capacity * burst_seconds / 4, codes
    assert not any(c.wrong for c in burst.calls)
    assert all("queue" in c.error for c in burst.calls if c.code == "RESOURCE_EXHAUSTED")
    assert metric(b.metrics_ports[0], REJECTED, reason="queue_full") - refused_before == \
        codes["RESOURCE_EXHAUSTED"]
    # An accepted call waits for at most the queue ahead of it, at the rate calls were served
    # during the burst; a refusal does not wait for the queue at all. (Open-loop latency counts
    # from when a call was due, so the client's own lag is in both.)
    served_per_call = burst.seconds / codes["OK"]
    ok, no = latencies(burst.calls, "OK"), latencies(burst.calls, "RESOURCE_EXHAUSTED")
    assert np.percentile(ok, 99) < SLACK * (QUEUE + 2) * served_per_call
    assert np.median(no) < np.median(ok)

    # The moment the burst is over, calls are served as before it.
    after = asyncio.run(run_load(workload_config(b, work, concurrency=1, requests=20)))
    assert {c.code for c in after.calls} == {"OK"}
    assert np.median(latencies(after.calls, "OK")) < SLACK * np.median(
        latencies(steady.calls, "OK"))


def test_sigterm_under_load_leaves_no_call_unanswered(backend: Callable[..., Backend]) -> None:
    b = backend("--grace-seconds", "10")
    config = workload_config(b, mlp(batch=64, hidden=128, features=256), concurrency=8,
                             requests=100_000, seconds=4.0)

    async def load_and_stop() -> list[Call]:
        running = asyncio.create_task(run_load(config))
        await asyncio.sleep(1.5)
        b.proc.send_signal(signal.SIGTERM)
        return (await running).calls

    start = time.monotonic()
    calls = asyncio.run(load_and_stop())
    assert b.proc.wait(timeout=EXIT_TIMEOUT) == 0, b.log.read_text()
    codes = Counter(c.code for c in calls)
    # UNAVAILABLE: refused as the server shut down, or found gone. CANCELLED: gRPC's own, for
    # a call the server had received but not yet taken up when it stopped (none computed).
    assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, (codes, {c.error for c in calls})
    assert codes["OK"] > 0 and codes["UNAVAILABLE"] > 0, codes  # it served, then it went away
    assert not any(c.wrong for c in calls)
    assert time.monotonic() - start < 4.0 + DEADLINE / 2  # nothing waited out its deadline
