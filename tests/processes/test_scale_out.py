"""Scaling out with standard parts, all on 127.0.0.1: ``--workers 2`` on one port, nginx as a
gRPC load balancer in front of two servers, and client-side round-robin across them. Every
answer is checked against the hand-derived f(x) = 2x^2 - 3x + 4, f'(x) = 4x - 3; which
backend served is read from each backend's own metrics; one backend is killed with SIGKILL
mid-run, and the client must go on succeeding through the other. ``gradserve loadtest`` through
nginx sends its graph whole to the replica that never saw it, and counts every call once. nginx
is configured from deploy/nginx/local.conf.template, as bench/scale.py configures it."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradserve.client import loadreport
from gradserve.client.api import GradientClient, GradserveError
from gradserve.client.loadtest import LoadConfig, run_load
from gradserve.client.workloads import WORKLOADS
from gradserve.engine.builder import GraphBuilder, Value
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from tests.processes.conftest import EXIT_TIMEOUT, Backend, metric
from tests.server.conftest import (
    HOST,
    RPC_TIMEOUT,
    SERVING,
    WAIT,
    assert_slow_answer,
    health_check,
    slow_request,
)
from tests.server.test_process import free_port


def quadratic(g: GraphBuilder) -> Value:
    x = g.input("x")
    return 2 * x**2 - 3 * x + 4


@dataclass
class Load:
    """Threads computing f at x = k / 10 through ``target``, each request checked by hand.
    Every request sent ends as an answer (right or wrong) or an explicit error."""

    target: str
    per_thread: int
    threads: int = 4
    sent: int = 0
    right: int = 0
    wrong: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> list[threading.Thread]:
        workers = [threading.Thread(target=self._work, args=(t,), daemon=True)
                   for t in range(self.threads)]
        for w in workers:
            w.start()
        return workers

    def _work(self, t: int) -> None:
        g = GraphBuilder()
        f = quadratic(g)
        with GradientClient(self.target, timeout=RPC_TIMEOUT) as client:
            for k in range(self.per_thread):
                x = (t * self.per_thread + k) / 10
                with self._lock:
                    self.sent += 1
                try:
                    r = client.compute(f, {"x": x})
                except GradserveError as e:
                    with self._lock:
                        self.errors.append(f"{e.code.name}: {e}")
                    continue
                ok = (float(r.output) == 2 * x * x - 3 * x + 4
                      and float(r.gradients["x"]) == 4 * x - 3)
                with self._lock:
                    if ok:
                        self.right += 1
                    else:
                        self.wrong.append(f"x={x}: {r.output}, {r.gradients}")

    def answered(self) -> int:
        with self._lock:
            return self.right + len(self.wrong) + len(self.errors)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def kill_one_midway(load: Load, victim: Backend, others: list[Backend]) -> None:
    """Run ``load``; once a third of it is answered, check both backends have served, then
    SIGKILL ``victim``; then check every request got a right answer."""
    total = load.per_thread * load.threads
    threads = load.run()
    wait_until(lambda: load.answered() >= total // 3, "a third of the load is answered")
    assert all(sum(b.served()) > 0 for b in (victim, *others)), "a backend served nothing"
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=EXIT_TIMEOUT)
    before = sum(sum(b.served()) for b in others)
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a client thread hung"
    assert load.sent == total == load.answered()  # nothing left without an outcome
    assert load.wrong == []
    # Calls in flight on the killed backend may fail, explicitly and as UNAVAILABLE (a proxy
    # that has begun answering cannot retry them); at most one per client thread. Every
    # other call is retried onto the live backend and succeeds.
    assert len(load.errors) <= load.threads, load.errors
    assert all(e.startswith("UNAVAILABLE") for e in load.errors), load.errors
    assert load.right == total - len(load.errors)
    assert sum(sum(b.served()) for b in others) > before  # which served the rest


# --- nginx ------------------------------------------------------------------------------------

NGINX_TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "local.conf.template"


@pytest.fixture
def nginx(processes: list[subprocess.Popen[bytes]], tmp_path: Path
          ) -> Callable[[list[Backend]], str]:
    if shutil.which("nginx") is None:
        pytest.skip("nginx (Debian nginx-light) is not installed")

    def start(backends: list[Backend]) -> str:
        prefix, port = tmp_path / "nginx", free_port()
        prefix.mkdir()
        servers = "\n".join(f"        server {b.target} max_fails=1 fail_timeout=30s;"
                            for b in backends)
        conf = prefix / "nginx.conf"
        conf.write_text(Template(NGINX_TEMPLATE.read_text()).substitute(
            prefix=prefix, servers=servers, port=port))
        proc = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(proc)
        target = f"{HOST}:{port}"
        with grpc.insecure_channel(target) as channel:
            wait_until(lambda: proc.poll() is None and _healthy(channel), "nginx passes calls")
        return target

    return start


def _healthy(channel: grpc.Channel) -> bool:
    try:
        return health_check(channel, timeout=1.0) == SERVING
    except grpc.RpcError:
        return False


def test_nginx_balances_two_backends_and_survives_one_killed(
        backend: Callable[..., Backend], nginx: Callable[[list[Backend]], str]) -> None:
    a, b = backend(), backend()
    kill_one_midway(Load(nginx([a, b]), per_thread=60), a, [b])


@pytest.mark.parametrize(("mode", "method"), [("unary", "Compute"), ("stream", "ComputeStream")])
def test_loadtest_through_nginx_sends_the_graph_whole_where_its_id_is_unknown(
        backend: Callable[..., Backend], nginx: Callable[[list[Backend]], str], mode: str,
        method: str) -> None:
    """``gradserve loadtest`` registers its graph with one replica and sends by id; the other
    answers NOT_FOUND, and the load test then sends the graph whole, as the Python client does:
    every call is answered, right, and counted once."""
    a, b = backend(), backend()
    config = LoadConfig(target=nginx([a, b]), workload=WORKLOADS["quadratic"](), mode=mode,
                        requests=300, concurrency=8, verify=1.0)
    summary = loadreport.summarize(asyncio.run(run_load(config)))
    assert summary.statuses == {"OK": 300}, summary.errors
    assert summary.checked == 300 and summary.wrong == 0
    computed = [metric(r.metrics_ports[0], "gradserve_requests_total", method=method, code="OK")
                for r in (a, b)]
    assert min(computed) > 0 and sum(computed) == 300, computed  # both replicas, none twice


def test_client_side_round_robin_survives_one_backend_killed(
        backend: Callable[..., Backend]) -> None:
    a, b = backend(), backend()
    kill_one_midway(Load(f"ipv4:{a.target},{b.target}", per_thread=60), b, [a])


# --- --workers ---------------------------------------------------------------------------------


def test_two_workers_share_the_port_and_both_drain_on_sigterm(
        backend: Callable[..., Backend]) -> None:
    served = backend(workers=2)
    # Connections (not requests) are spread by the kernel: each slow call gets a connection
    # of its own, until both workers hold one in flight.
    request, out = slow_request()
    channels: list[grpc.Channel] = []
    calls: list[grpc.Future[pb.ComputeResponse]] = []
    try:
        while min(busy(served)) == 0:
            assert len(channels) < 24, "every connection went to the same worker"
            channel = grpc.insecure_channel(served.target,
                                            options=[("grpc.use_local_subchannel_pool", 1)])
            channels.append(channel)
            calls.append(pb_grpc.GradientServiceStub(channel).Compute.future(
                request, timeout=RPC_TIMEOUT))
            wait_until(lambda: sum(busy(served)) >= len(calls) or calls[-1].done(),
                       "the call is in flight")
        served.proc.send_signal(signal.SIGTERM)
        for call in calls:  # every call in flight when SIGTERM came is answered in full
            assert_slow_answer(call.result(timeout=RPC_TIMEOUT), out)
        assert served.proc.wait(timeout=EXIT_TIMEOUT) == 0, served.log.read_text()
    finally:
        for channel in channels:
            channel.close()
    log = served.log.read_text()
    assert log.count("shutting down") == 2 and log.count("stopped") == 2, log


def busy(b: Backend) -> list[float]:
    """Requests in flight, per worker."""
    counts = []
    for port in b.metrics_ports:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        counts.append(sum(s.value for family in text_string_to_metric_families(text)
                          for s in family.samples if s.name == "gradserve_requests_in_flight"))
    return counts
