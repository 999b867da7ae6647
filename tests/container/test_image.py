"""The image, for real: built from the repository's Dockerfile as it is, run with podman as an
operator would run it in production, and stopped under load.

The container runs as the image's non-root user, with a read-only root file system (plus a
tmpfs on /tmp), every capability dropped, no new privileges and a 512 MiB memory limit, and is
reached only through ports published on 127.0.0.1 (free ports picked at run time). Its settings
come from GRADSERVE_* variables, as compose or Kubernetes would give them.

podman, its configuration and the base image come from deploy/container-test.sh (no registry
serves images here; the base is a local Debian bookworm with Python 3.11 under the name the
Dockerfile's FROM uses). Every container a test starts is removed at its end.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.container.conftest import (
    IMAGE_BUDGET_MB,
    LAYERS_BUDGET_MB,
    VENV_BIN,
    Image,
    Podman,
    free_port,
    gradserve,
    http_get,
    json_lines,
    output,
    record,
    unique_name,
    wait_for,
)

USER = "10001:10001"
MEMORY = 512 * 1024 * 1024
GRACE_SECONDS = 5.0  # GRADSERVE_GRACE_SECONDS below
METRICS_PORT = 9400  # GRADSERVE_METRICS_PORT below: not the default 9464
MAX_NODES = 32  # GRADSERVE_MAX_NODES below
SETTINGS = {
    "GRADSERVE_LOG_JSON": "true",
    "GRADSERVE_GRACE_SECONDS": f"{GRACE_SECONDS:g}",
    "GRADSERVE_METRICS_PORT": str(METRICS_PORT),
    "GRADSERVE_MAX_NODES": str(MAX_NODES),
}
HEALTHY_TIMEOUT = 60.0
LOAD_RPS = 300
# The statuses a call may end with across the stop. CANCELLED is gRPC's answer to a call that
# reaches the server as it shuts down (seen for 0 to 7 calls a stop, of a few hundred); clients
# do not retry it, unlike UNAVAILABLE, so it stays counted in the figures.
EXPLICIT = {"OK", "UNAVAILABLE", "CANCELLED"}


@dataclass(frozen=True)
class Container:
    name: str
    target: str  # host:port of the published gRPC port
    metrics: str  # URL of the published /metrics
    healthy_after: float  # seconds from `podman run` to the HEALTHCHECK passing


def start(podman: Podman, image: Image, kind: str) -> Container:
    """Run the image hardened as in production, and wait for its HEALTHCHECK to pass."""
    name = unique_name(kind)
    grpc_port, metrics_port = free_port(), free_port()
    environment = [arg for key, value in SETTINGS.items() for arg in ("--env", f"{key}={value}")]
    started = time.monotonic()
    podman.run("run", "--detach", "--name", name,
               "--read-only", "--tmpfs", "/tmp",
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--memory", str(MEMORY),
               "--publish", f"127.0.0.1:{grpc_port}:50051",
               "--publish", f"127.0.0.1:{metrics_port}:{METRICS_PORT}",
               *environment, image.name)
    try:
        wait_for(f"{name}'s HEALTHCHECK", lambda: podman.healthy(name), HEALTHY_TIMEOUT)
    except BaseException:
        print("\n".join(podman.logs(name)))
        podman.remove(name)
        raise
    return Container(name, f"127.0.0.1:{grpc_port}",
                     f"http://127.0.0.1:{metrics_port}/metrics", time.monotonic() - started)


@pytest.fixture(scope="module")
def container(podman: Podman, image: Image) -> Iterator[Container]:
    """One running container for the checks that leave it running."""
    running = start(podman, image, "image")
    record("time to healthy", f"{running.healthy_after:.2f} s (podman run to the image's "
           "HEALTHCHECK passing, run by `podman healthcheck run`)")
    yield running
    podman.remove(running.name)


# --- the build --------------------------------------------------------------------------------


def test_image_builds_within_its_size_budget(podman: Podman, image: Image) -> None:
    assert image.size <= IMAGE_BUDGET_MB * 1e6, f"{image.size / 1e6:.0f} MB"
    assert image.size - image.base_size <= LAYERS_BUDGET_MB * 1e6
    # docker format: the HEALTHCHECK is in the image (podman's default OCI format drops it).
    check = json.loads(podman.inspect(image.name, "{{json .Config.Healthcheck}}", kind="image"))
    assert check["Test"][:3] == ["CMD", "gradserve", "health"], check
    assert podman.inspect(image.name, "{{.Config.User}}", kind="image") == USER


# --- running ---------------------------------------------------------------------------------


def test_container_runs_as_non_root_read_only_without_capabilities(
        podman: Podman, container: Container) -> None:
    def inside(*command: str) -> subprocess.CompletedProcess[str]:
        return podman.run("exec", container.name, *command, check=False)

    assert inside("id", "-u").stdout.strip() == "10001"
    assert inside("id", "-g").stdout.strip() == "10001"
    status = dict(line.split(":\t", 1) for line in
                  inside("cat", "/proc/1/status").stdout.splitlines() if ":\t" in line)
    assert status["Uid"].split()[0] == "10001"  # the server itself, PID 1
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert podman.inspect(container.name, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    for path in ("/opt/venv/written", "/written"):
        denied = inside("touch", path)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, \
            output(denied)
    assert inside("touch", "/tmp/written").returncode == 0  # the tmpfs
    assert int(podman.inspect(container.name, "{{.HostConfig.Memory}}")) == MEMORY
    limit = inside("sh", "-c", "cat /sys/fs/cgroup/memory.max 2>/dev/null "
                   "|| cat /sys/fs/cgroup/memory/memory.limit_in_bytes")
    assert int(limit.stdout.strip()) == MEMORY, output(limit)


def test_healthcheck_reports_healthy(podman: Podman, container: Container) -> None:
    assert podman.healthy(container.name)
    assert podman.inspect(container.name, "{{.State.Health.Status}}") == "healthy"


def test_health_and_the_seeds_answer_through_the_published_port(container: Container) -> None:
    health = gradserve("health", "--target", container.target, "--timeout", "5")
    assert health.returncode == 0 and "SERVING" in health.stdout, output(health)

    quadratic = gradserve("grad", "2*x**2 - 3*x + 4", "x=2", "--target", container.target,
                          "--json")
    assert quadratic.returncode == 0, output(quadratic)
    assert json.loads(quadratic.stdout) == {"outputs": {"out": 6.0}, "gradients": {"x": 5.0}}

    loss = gradserve("grad", "L = (a*b + c) * f", "a=3", "b=-2", "c=8", "f=-2",
                     "--target", container.target, "--json")
    assert loss.returncode == 0, output(loss)
    assert json.loads(loss.stdout) == {
        "outputs": {"L": -4.0}, "gradients": {"a": 4.0, "b": -6.0, "c": -2.0, "f": 2.0}}
    record("seeds through the container", "f(2) = 6, df/dx = 5; L = -4, dL/da = 4, "
           "dL/db = -6, dL/dc = -2, dL/df = 2: as expected")


def test_metrics_answer_on_the_configured_port(container: Container) -> None:
    assert gradserve("grad", "x*x", "x=3", "--target", container.target).returncode == 0
    text = http_get(container.metrics)
    assert 'gradserve_requests_total{code="OK",method="Compute"}' in text, text[:2000]


def test_configuration_reaches_the_server_from_the_environment(
        podman: Podman, container: Container) -> None:
    # GRADSERVE_METRICS_PORT: /metrics answered on 9400 (the test above), not on 9464.
    default_port = podman.run("exec", container.name, "python", "-c",
                              "import urllib.request; "
                              "urllib.request.urlopen('http://127.0.0.1:9464/metrics')",
                              check=False)
    assert default_port.returncode != 0, "metrics on the default port too"
    # GRADSERVE_LOG_JSON: one JSON object per log line.
    records = json_lines(podman.logs(container.name))
    assert any(str(r.get("message", "")).startswith("serving on 0.0.0.0:50051")
               for r in records), podman.logs(container.name)
    # GRADSERVE_MAX_NODES: a graph of more nodes is refused, one within the limit answers.
    too_big = gradserve("grad", "+".join(["x"] * (MAX_NODES + 8)), "x=1",
                        "--target", container.target)
    assert too_big.returncode != 0 and f"limit is {MAX_NODES}" in too_big.stderr + \
        too_big.stdout, output(too_big)
    fits = gradserve("grad", "+".join(["x"] * (MAX_NODES // 2)), "x=1", "--json",
                     "--target", container.target)
    assert fits.returncode == 0, output(fits)
    assert json.loads(fits.stdout)["gradients"] == {"x": MAX_NODES // 2}


# --- stopping -----------------------------------------------------------------------------------


def requests_served(metrics_url: str) -> float:
    """Calls the server has answered, from its /metrics."""
    total = 0.0
    for line in http_get(metrics_url).splitlines():
        if line.startswith("gradserve_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_podman_stop_under_load_exits_zero_and_loses_no_call(
        podman: Podman, image: Image) -> None:
    """SIGTERM (podman stop) while `gradserve loadtest` drives the container (open loop, 300
    calls/s, answers checked): the server drains and exits 0 within its grace period, its log
    ends with "stopped", and every call of the load test ended with an explicit status and
    none was wrong. Explicit: OK; UNAVAILABLE (refused once the server stopped, which clients
    retry); CANCELLED, which the server's gRPC gives a few calls that arrive as it shuts down
    (counted and printed; see EXPLICIT). Lost would be a call that ran out of its deadline or
    ended UNKNOWN or INTERNAL."""
    running = start(podman, image, "stop")
    try:
        load = subprocess.Popen(
            [str(VENV_BIN / "gradserve"), "loadtest", "--target", running.target,
             "--workload", "quadratic", "--rps", str(LOAD_RPS), "-z", "5s", "--verify", "0.2",
             "--deadline", "20", "--format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for("load reaching the server",
                     lambda: requests_served(running.metrics) >= 200, 30)
            stopping = time.monotonic()
            stop = podman.run("stop", "--time", "20", running.name, timeout=60)
            stop_seconds = time.monotonic() - stopping
            stdout, stderr = load.communicate(timeout=60)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        exit_code = int(podman.inspect(running.name, "{{.State.ExitCode}}"))
        logs = podman.logs(running.name)
    finally:
        podman.remove(running.name)

    summary: dict[str, Any] = json.loads(stdout) if stdout.strip() else {}
    statuses: dict[str, int] = summary.get("statuses", {})
    record("podman stop under load", f"{stop_seconds:.2f} s, exit code {exit_code} "
           f"(grace {GRACE_SECONDS:g} s, podman stop --time 20)")
    record("load test across the stop", f"{summary.get('count')} calls: "
           + ", ".join(f"{code} {n}" for code, n in statuses.items())
           + f"; {summary.get('checked')} answers checked, {summary.get('wrong')} wrong")

    assert stop.returncode == 0, output(stop)
    assert exit_code == 0, "\n".join(logs)
    assert stop_seconds < GRACE_SECONDS + 3, stop_seconds
    messages = [str(r.get("message")) for r in json_lines(logs)]
    assert f"shutting down (grace {GRACE_SECONDS:.1f}s)" in messages, logs
    assert messages[-1] == "stopped", logs
    assert load.returncode == 0, f"loadtest exit {load.returncode}\n{stdout}\n{stderr}"
    assert summary["wrong"] == 0 and summary["checked"] > 0, summary
    assert sum(statuses.values()) == summary["count"], summary
    assert statuses.get("OK", 0) > 0, summary
    assert statuses.get("UNAVAILABLE", 0) > 0, summary  # the stop came during the run
    assert set(statuses) <= EXPLICIT, summary["errors"]
    assert statuses.get("CANCELLED", 0) <= 0.05 * statuses["OK"], summary
