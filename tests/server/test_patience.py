"""The adaptive batcher's patience, on its own with clocks made here: a group waits for more
requests only while the loop is busy and more callers are about, and stops when arrivals
pause; and a lone caller of a real server never waits, however long the bound."""

from __future__ import annotations

import time

import pytest

from gradserve.server.patience import BUSY, IDLE, PAUSE, WINDOW, Patience
from tests.server.conftest import RPC_TIMEOUT, ServerFactory, quadratic, request, scalars

GAP = 0.001  # seconds between two arrivals here


class Clock:
    """The loop thread's CPU seconds, driven by the test: ``load`` of each second worked."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.load = 0.0

    def advance(self, seconds: float) -> None:
        self.cpu += self.load * seconds


def arrivals(patience: Patience, clock: Clock, count: int, start: float) -> float:
    """``count`` arrivals GAP apart from ``start``; the time of the last."""
    now = start
    for _ in range(count):
        now += GAP
        clock.advance(GAP)
        patience.arrived(now)
    return now


def patience_after(load: float, open_requests: int) -> tuple[Patience, Clock, float]:
    """A patience that has seen two windows of arrivals at ``load`` with ``open_requests``."""
    clock = Clock()
    clock.load = load
    patience = Patience(lambda: open_requests, cpu=lambda: clock.cpu)
    now = arrivals(patience, clock, int(3 * WINDOW / GAP), 1.0)
    return patience, clock, now


def test_a_busy_loop_with_callers_about_waits_until_arrivals_pause() -> None:
    patience, _, now = patience_after(load=0.95, open_requests=64)
    assert patience.wait(4, now) == pytest.approx(PAUSE * GAP, rel=0.05)
    assert patience.wait(4, now + PAUSE * GAP / 2) == pytest.approx(PAUSE * GAP / 2, rel=0.1)
    assert patience.wait(4, now + PAUSE * GAP * 1.01) == 0.0  # arrivals paused: go


def test_no_wait_when_everyone_about_is_queued_or_the_loop_is_not_busy() -> None:
    patience, _, now = patience_after(load=0.95, open_requests=8)
    assert patience.wait(8, now) == 0.0  # every recent caller is in the group
    assert patience.wait(7, now) > 0.0
    idle, _, now = patience_after(load=BUSY - 0.1, open_requests=64)
    assert idle.wait(1, now) == 0.0  # a loop with time to spare answers at once
    alone, _, now = patience_after(load=1.0, open_requests=1)
    assert alone.wait(1, now) == 0.0  # one caller: nobody else is coming


def test_busy_has_a_gap_between_starting_and_stopping_to_wait() -> None:
    patience, clock, now = patience_after(load=0.95, open_requests=64)
    clock.load = (BUSY + IDLE) / 2  # between the two: still waiting
    now = arrivals(patience, clock, int(2 * WINDOW / GAP), now)
    assert patience.wait(1, now) > 0.0
    clock.load = IDLE - 0.1
    now = arrivals(patience, clock, int(2 * WINDOW / GAP), now)
    assert patience.wait(1, now) == 0.0
    clock.load = (BUSY + IDLE) / 2  # and not waiting again until BUSY
    now = arrivals(patience, clock, int(2 * WINDOW / GAP), now)
    assert patience.wait(1, now) == 0.0


def test_a_lone_caller_never_waits_for_company(make_server: ServerFactory) -> None:
    """A bound of ten seconds: a fixed wait would cost every call that much."""
    served = make_server(max_queue_delay_us=10_000_000)
    q = quadratic()
    start = time.monotonic()
    for x in range(50):
        response = served.stub.Compute(request(q.graph, {"x": float(x)}), timeout=RPC_TIMEOUT)
        assert scalars(response.outputs) == {q.out: 2.0 * x * x - 3.0 * x + 4.0}
    assert time.monotonic() - start < 5.0
    assert served.batches.batches == [(1, 1)] * 50
