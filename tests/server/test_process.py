"""The server as a real process: ``python -m gradserve.server``, configured by flag or by
environment, answering on 127.0.0.1, and exiting 0 after a graceful stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from tests.server.conftest import (
    HOST,
    RPC_TIMEOUT,
    SERVING,
    health_check,
    quadratic,
    request,
    scalars,
)

START_ATTEMPTS = 100  # health checks, 0.1 s apart, with a 1 s deadline each
EXIT_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
    return port


def clean_env() -> dict[str, str]:
    """This environment without any GRADSERVE_* setting, listening on 127.0.0.1 only, and any
    metrics endpoint on an ephemeral port (a server without one ignores the variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADSERVE_")}
    env["GRADSERVE_HOST"] = HOST
    env["GRADSERVE_METRICS_PORT"] = "0"
    return env


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """The processes a test starts; any still running at teardown is killed (by its pid)."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=EXIT_TIMEOUT)


def wait_serving(channel: grpc.Channel, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(START_ATTEMPTS):
        assert proc.poll() is None, f"the server exited early:\n{log.read_text()}"
        try:
            status = health_check(channel, timeout=1.0)
        except grpc.RpcError:
            time.sleep(0.1)
            continue
        if status == SERVING:
            return
        time.sleep(0.1)
    raise AssertionError(f"the server never became SERVING:\n{log.read_text()}")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_server_process(launch: list[subprocess.Popen[bytes]], tmp_path: Path,
                        how: str) -> None:
    port = free_port()
    env = clean_env()
    args = [sys.executable, "-m", "gradserve.server"]
    if how == "flag":
        args += ["--port", str(port)]
    else:
        env["GRADSERVE_PORT"] = str(port)
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp_path)
    launch.append(proc)
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        wait_serving(channel, proc, log)
        q = quadratic()
        stub = pb_grpc.GradientServiceStub(channel)
        response = stub.Compute(request(q.graph, {"x": 2.0}), timeout=RPC_TIMEOUT)
        assert scalars(response.outputs) == {q.out: 6.0}
        assert scalars(response.gradients) == {"x": 5.0}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=EXIT_TIMEOUT) == 0, log.read_text()
    text = log.read_text()
    assert f"serving on {HOST}:{port}" in text
    assert "shutting down" in text
    assert "stopped" in text.splitlines()[-1]
