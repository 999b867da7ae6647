"""Fixtures of the container tests: podman prepared by deploy/container-test.sh, the image built
from the repository's Dockerfile, free loopback ports, and the figures the tests measure.

Every figure (build time, image size, time to healthy, stop time, status counts, the stack's
checks) is printed as the test measures it (`pytest -s`) and again in a "container figures"
section at the end of the run, which pytest shows without -s.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "container-test.sh"
VENV_BIN = Path(sys.executable).parent
SKIP_STATUS = 77  # deploy/container-test.sh: containers cannot run on this machine
IMAGE = "localhost/gradserve:local"  # the name docker-compose.yml gives the built image

# The image-size budget. The local base image (Debian bookworm minbase with Python 3.11,
# made by deploy/container-test.sh) is about 150 MB, a little more than the official
# python:3.11-slim-bookworm; what the Dockerfile adds (the venv: numpy, grpcio, protobuf, ...)
# is about 125 MB. A compiler, a pip cache or the source tree slipping into the final stage
# would break one of these.
IMAGE_BUDGET_MB = 350
LAYERS_BUDGET_MB = 175  # the image less its base

FIGURES: list[tuple[str, str]] = []


def record(name: str, value: str) -> None:
    """Keep a measured figure for the run's summary, and print it now."""
    FIGURES.append((name, value))
    print(f"\n[container] {name}: {value}", flush=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            exitstatus: int | pytest.ExitCode, config: pytest.Config) -> None:
    if FIGURES:
        terminalreporter.section("container figures")
        for name, value in FIGURES:
            terminalreporter.write_line(f"{name}: {value}")


def free_port() -> int:
    """A loopback port free now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(what: str, check: Callable[[], bool], timeout: float,
             interval: float = 0.2) -> float:
    """Poll ``check`` until it holds; the seconds it took. Fails after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - start


def http_get(url: str, timeout: float = 5.0) -> str:
    assert url.startswith("http://127.0.0.1:"), url  # loopback only
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        text: str = reply.read().decode()
        return text


def output(result: subprocess.CompletedProcess[str]) -> str:
    """A command's exit status and output, for an assertion message."""
    return f"{result.args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"


@dataclass(frozen=True)
class Podman:
    """podman with the containers.conf deploy/container-test.sh wrote."""

    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["podman", *args], capture_output=True, text=True,
                                env=self.env, timeout=timeout, check=False)
        if check:
            assert result.returncode == 0, output(result)
        return result

    def run_python(self, *args: str, timeout: float = 120.0
                   ) -> subprocess.CompletedProcess[str]:
        """This Python (the venv's, where podman-compose is installed), with podman's
        environment."""
        return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout, check=False)

    def inspect(self, name: str, template: str, *, kind: str = "container") -> str:
        return self.run(kind, "inspect", "--format", template, name).stdout.strip()

    def healthy(self, name: str) -> bool:
        """Run the container's HEALTHCHECK now (its timers need systemd, absent here)."""
        return self.run("healthcheck", "run", name, check=False, timeout=30).returncode == 0

    def logs(self, name: str) -> list[str]:
        result = subprocess.run(["podman", "logs", name], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=self.env,
                                timeout=30, check=False)
        return result.stdout.splitlines()

    def remove(self, name: str) -> None:
        """Stop (SIGTERM, then SIGKILL after 10 s) and remove a container, if it exists."""
        self.run("rm", "--force", "--time", "10", "--ignore", name, check=False)


def gradserve(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """The venv's ``gradserve`` command."""
    return subprocess.run([str(VENV_BIN / "gradserve"), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="session")
def podman() -> Podman:
    """podman, prepared by deploy/container-test.sh (packages, containers.conf, the local
    base image and the stand-ins); skipped, saying why, where containers cannot run."""
    if os.geteuid() != 0:
        pytest.skip("container tests need root: rootful podman, apt-get and debootstrap "
                    "(deploy/container-test.sh)")
    env = {**os.environ, "GRADSERVE_PYTHON": sys.executable}
    start = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT), "prepare"], capture_output=True, text=True,
                            env=env, timeout=600, check=False)
    if result.returncode == SKIP_STATUS:
        reasons = [line for line in result.stderr.splitlines() if "SKIP:" in line]
        pytest.skip(f"deploy/container-test.sh: {(reasons or ['cannot run here'])[-1]}")
    assert result.returncode == 0, output(result)
    record("prepare (deploy/container-test.sh prepare)", f"{time.monotonic() - start:.1f} s")
    conf = [line.split("=", 1)[1] for line in result.stdout.splitlines()
            if line.startswith("CONTAINERS_CONF=")]
    assert conf, output(result)
    return Podman({**env, "CONTAINERS_CONF": conf[-1]})


@dataclass(frozen=True)
class Image:
    name: str
    build_seconds: float
    size: int  # bytes
    base_size: int  # bytes


@pytest.fixture(scope="session")
def image(podman: Podman) -> Image:
    """The image, built from the repository's Dockerfile as it is (docker format, so the
    HEALTHCHECK is kept; build cache used as docker would)."""
    start = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT), "build"], capture_output=True, text=True,
                            env=podman.env, timeout=600, check=False)
    seconds = time.monotonic() - start
    assert result.returncode == 0, output(result)
    size = int(podman.inspect(IMAGE, "{{.Size}}", kind="image"))
    base = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines()
            if line.upper().startswith("FROM ")][-1]
    base_size = int(podman.inspect(base, "{{.Size}}", kind="image"))
    record("image build time", f"{seconds:.1f} s (podman build, docker format)")
    record("image size", f"{size / 1e6:.0f} MB (budget {IMAGE_BUDGET_MB} MB); "
           f"base {base} {base_size / 1e6:.0f} MB, gradserve's layers "
           f"{(size - base_size) / 1e6:.0f} MB (budget {LAYERS_BUDGET_MB} MB)")
    return Image(IMAGE, seconds, size, base_size)


_COUNTER = itertools.count(1)


def unique_name(kind: str) -> str:
    """A container or project name of this run's own: this process's id and a counter."""
    return f"gradserve-test-{os.getpid()}-{kind}-{next(_COUNTER)}"


def json_lines(lines: list[str]) -> list[dict[str, object]]:
    """The lines of a log that are JSON objects (the server's GRADSERVE_LOG_JSON records)."""
    records: list[dict[str, object]] = []
    for line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records
