"""Work nobody wants any more stops, against real server processes: gradient checks and graph
compiles whose callers' deadlines pass stop within moments (the server's CPU goes idle, and a
small call behind them is answered at once), and SIGTERM ends the process within its grace
period whatever it is running, with a clean log.

Busy or idle is read from the kernel's count of the process's CPU time (/proc/PID/stat)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from gradserve.client.api import GradientClient, GradserveError
from gradserve.engine import Graph
from gradserve.engine.builder import GraphBuilder
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request
from tests.processes.conftest import Backend

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads CPU time from /proc")

CHECKS = 8  # concurrent gradient checks, as the issue sent them
SHORT = 2.0  # seconds: their deadline
LONG = 60.0  # seconds: a deadline no call here reaches
GRACE = 2.0  # the servers' --grace-seconds
# After work is abandoned, the process may use at most this much CPU per second of wall time
# (two cores busy would be 2.0): the gRPC and Python housekeeping of an idle server.
IDLE_CPU = 0.2
# Seconds past the grace period a stop may take: the loop's own teardown, and the interpreter's.
EXIT_SLACK = 1.5
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_over(pid: int, seconds: float) -> float:
    """CPU seconds the process uses per second over the next ``seconds``."""
    start = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - start) / seconds


def spread() -> Graph:
    """sum(sin(x)) with x of 4,096 elements broadcast to 4096 x 256: a gradient check of it
    takes two passes of a million elements per input element, minutes in all."""
    g = GraphBuilder()
    x = g.input("x", (4096, 1))
    return g.build(g.op("sin", g.op("broadcast_to", x, shape=(4096, 256))).sum())


def chain(length: int) -> Graph:
    """-(-(...(x))): seconds to compile at 100,000 nodes."""
    g = GraphBuilder()
    x = g.input("x")
    y = x
    for _ in range(length):
        y = -y
    return g.build(y)


def start_checks(b: Backend, deadline: float) -> tuple[list[str], list[threading.Thread]]:
    """CHECKS gradient checks of ``spread`` with ``deadline``, each in a thread; the codes
    they end with land in the list."""
    codes: list[str] = []
    xs = np.linspace(0.0, 1.0, 4096).reshape(4096, 1)
    graph = spread()

    def check() -> None:
        with GradientClient(b.target, timeout=deadline) as client:
            try:
                client.compute(graph, {"x": xs}, check_gradients=True)
                codes.append("OK")
            except GradserveError as e:
                codes.append(e.code.name)

    threads = [threading.Thread(target=check) for _ in range(CHECKS)]
    for t in threads:
        t.start()
    return codes, threads


def small_call_answers(b: Backend) -> float:
    """Seconds a RegisterGraph of a one-node graph takes (it must succeed within 2 s)."""
    g = GraphBuilder()
    x = g.input("x")
    start = time.monotonic()
    with grpc.insecure_channel(b.target) as channel:
        pb_grpc.GradientServiceStub(channel).RegisterGraph(
            pb.RegisterGraphRequest(graph=graph_to_wire(g.build(2 * x))), timeout=2.0)
    return time.monotonic() - start


def test_gradient_checks_past_their_deadline_stop(backend: Callable[..., Backend]) -> None:
    b = backend()
    codes, threads = start_checks(b, SHORT)
    for t in threads:
        t.join(SHORT + 30)
    assert codes == ["DEADLINE_EXCEEDED"] * CHECKS
    assert small_call_answers(b) < 1.0
    used = cpu_over(b.proc.pid, 1.0)
    assert used < IDLE_CPU, f"the server used {used:.2f} CPU s/s after every caller had gone"


def test_a_compile_past_its_deadline_stops(backend: Callable[..., Backend]) -> None:
    b = backend()
    with grpc.insecure_channel(b.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Compute(request(None, chain(99_999), {"x": 2.0}), timeout=0.5)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.3)  # the compile's next check comes within milliseconds
        used = cpu_over(b.proc.pid, 1.0)
        assert used < IDLE_CPU, f"the server used {used:.2f} CPU s/s after its caller had gone"


def test_sigterm_exits_within_the_grace_period_whatever_runs(
        backend: Callable[..., Backend]) -> None:
    """Gradient checks that would run for minutes, and one matmul of two 4096 x 4096 matrices
    (a single numpy call of many seconds, which no check can interrupt)."""
    b = backend("--grace-seconds", str(GRACE))
    codes, threads = start_checks(b, LONG)
    g = GraphBuilder()
    a = g.input("a", (4096, 4096))
    big = g.build((a @ a).sum())
    matmul_code: list[grpc.StatusCode] = []

    def multiply() -> None:
        with grpc.insecure_channel(b.target, options=[
                ("grpc.max_send_message_length", 256 << 20)]) as channel:
            try:
                pb_grpc.GradientServiceStub(channel).Compute(
                    request(None, big, {"a": np.ones((4096, 4096))}), timeout=LONG)
                matmul_code.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                matmul_code.append(e.code())

    threads.append(threading.Thread(target=multiply))
    threads[-1].start()
    time.sleep(3.0)  # the checks and the matmul are running
    assert cpu_over(b.proc.pid, 0.5) > 0.5, "the server is not busy: nothing to interrupt"
    start = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    code = b.proc.wait(timeout=GRACE + 30)
    took = time.monotonic() - start
    for t in threads:
        t.join(10)
    assert code == 0
    assert took < GRACE + EXIT_SLACK, f"SIGTERM took {took:.1f} s with a {GRACE} s grace"
    log = b.log.read_text()
    assert "Traceback" not in log and "Error" not in log, log
    assert log.splitlines()[-1].endswith("stopped"), log
    # Every call ended with an explicit status: cut off by the shutdown, none hung.
    assert len(codes) == CHECKS and set(codes) <= {"UNAVAILABLE", "CANCELLED"}, codes
    assert len(matmul_code) == 1
