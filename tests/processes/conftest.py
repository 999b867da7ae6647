"""gradserve as real processes on 127.0.0.1, as an operator runs it: started with flags,
watched through its metrics endpoint, stopped (or killed) by PID."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import HOST, SERVING, WAIT, health_check
from tests.server.test_process import clean_env, free_port

EXIT_TIMEOUT = 20.0


@dataclass
class Backend:
    """A gradserve process: its gRPC port, its metrics ports (one per worker), its log."""

    proc: subprocess.Popen[bytes]
    port: int
    metrics_ports: list[int]
    log: Path

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    def served(self) -> list[float]:
        """Compute requests answered OK, per worker, from its metrics."""
        return [metric(port, "gradserve_requests_total", method="Compute", code="OK")
                for port in self.metrics_ports]


def metric(metrics_port: int, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` with ``labels`` on a live metrics endpoint."""
    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == name and s.labels == labels)


def start_backend(started: list[subprocess.Popen[bytes]], folder: Path, *flags: str,
                  workers: int = 1) -> Backend:
    """Start ``python -m gradserve.server`` with ``flags`` (its log in ``folder``), add it to
    ``started``, and wait until it is SERVING."""
    port, metrics = free_port(), ports_in_a_row(workers)  # workers' metrics: base + k
    log = folder / f"gradserve-{port}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gradserve.server", "--port", str(port), "--metrics-port",
             str(metrics[0]), "--workers", str(workers), *flags],
            stdout=sink, stderr=subprocess.STDOUT, env=clean_env(), cwd=folder)
    started.append(proc)
    backend = Backend(proc, port, metrics, log)
    wait_serving(backend)
    return backend


def stop_all(started: list[subprocess.Popen[bytes]]) -> None:
    """Stop what is still running, SIGTERM first (nginx's master then stops its workers)."""
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=EXIT_TIMEOUT)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """What a test starts; anything still running at teardown is stopped, by PID."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        stop_all(started)


@pytest.fixture
def backend(processes: list[subprocess.Popen[bytes]], tmp_path: Path) -> Callable[..., Backend]:
    """Start gradserve processes: ``backend(*flags, workers=1)``."""
    def start(*flags: str, workers: int = 1) -> Backend:
        return start_backend(processes, tmp_path, *flags, workers=workers)

    return start


def ports_in_a_row(count: int) -> list[int]:
    """``count`` consecutive ports free on 127.0.0.1 now."""
    for _ in range(100):
        base = free_port()
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind((HOST, port))
        except OSError:
            continue
        return list(range(base, base + count))
    raise AssertionError(f"no {count} free ports in a row")


def wait_serving(b: Backend) -> None:
    deadline = time.monotonic() + WAIT
    with grpc.insecure_channel(b.target) as channel:
        while time.monotonic() < deadline:
            assert b.proc.poll() is None, f"the server exited early:\n{b.log.read_text()}"
            try:
                if health_check(channel, timeout=1.0) == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"the server never became SERVING:\n{b.log.read_text()}")
