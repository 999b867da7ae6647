"""The compose stack, for real: docker-compose.yml run by podman-compose, its gradserve
replicas behind nginx, and Prometheus scraping them.

What is run differs from `docker compose up` in these ways only, each because of these
machines:
- nginx and Prometheus are stand-ins, built by deploy/container-test.sh from Debian's packages
  (deploy/containers/nginx, deploy/containers/prometheus) under the names compose uses
  (nginx:1.28-alpine, prom/prometheus:v3.5.0): no registry serves the real images here. The
  nginx stand-in is Debian's 1.22, which lacks two directives of deploy/nginx/nginx.conf: its
  entry point drops `resolve` from the upstream's server (so nginx resolves the replicas once,
  at start) and writes `http2 on;` as `listen ... http2;`, and prints that difference (shown
  in the figures). The configuration files themselves are mounted as they are.
- Grafana is left out (Debian does not package it); its dashboard is checked statically by
  tests/test_deploy.py.
- The compose file is copied with its published ports moved to free loopback ports (the
  file's fixed 50051 and 9090 may be taken), its relative paths made absolute and the project
  named for this run; nothing else is changed.
- podman 4.3 cannot wait for `condition: service_healthy` (podman-compose says so and goes
  on): the test starts the replicas (`deploy.replicas` of them) and Prometheus, waits for
  every replica's HEALTHCHECK, then starts nginx, which is the order that condition gives.
Everything the stack started is removed at the end (podman-compose down, then a check that
no container, network or volume of the project is left).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gradserve.client.api import GradientClient, GradserveError
from gradserve.engine.builder import GraphBuilder
from tests.container.conftest import (
    ROOT,
    Image,
    Podman,
    free_port,
    gradserve,
    http_get,
    output,
    record,
    unique_name,
    wait_for,
)

COMPOSE = ROOT / "docker-compose.yml"
RUN_SERVICES = ("gradserve", "nginx", "prometheus")  # all but grafana
PROMETHEUS_TIMEOUT = 60.0  # DNS discovery every 10 s, scrapes every 5 s
STACK_TIMEOUT = 120.0


@dataclass(frozen=True)
class Stack:
    project: str
    file: Path
    spec: dict[str, Any]  # the compose file as run
    replicas: list[str]  # container names
    target: str  # nginx's published gRPC port
    prometheus: str  # Prometheus' published URL


def compose_for_test(project: str, nginx_port: int, prometheus_port: int) -> dict[str, Any]:
    """docker-compose.yml as run here: ports on free loopback ports, absolute paths, no
    Grafana, this run's project name."""
    spec: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    spec["name"] = project
    services = spec["services"]
    for name in set(services) - set(RUN_SERVICES):
        del services[name]
    spec["volumes"] = {k: v for k, v in spec.get("volumes", {}).items()
                       if any(str(m).startswith(f"{k}:") for s in services.values()
                              for m in s.get("volumes", []))}
    published = {"nginx": nginx_port, "prometheus": prometheus_port}
    for name, service in services.items():
        if "ports" in service:
            (port,) = service["ports"]  # one published port each
            service["ports"] = [f"127.0.0.1:{published[name]}:{str(port).split(':')[-1]}"]
        service["volumes"] = [str(ROOT / v[2:]) if str(v).startswith("./") else v
                              for v in service.get("volumes", [])]
        if "build" in service:
            service["build"]["context"] = str(ROOT)
    return spec


def compose(podman: Podman, stack_file: Path, project: str, *args: str,
            timeout: float = 120.0) -> None:
    result = podman.run_python("-m", "podman_compose", "-f", str(stack_file), "-p", project,
                               *args, timeout=timeout)
    assert result.returncode == 0, output(result)


def project_containers(podman: Podman, project: str, service: str | None = None) -> list[str]:
    filters = ["--filter", f"label=io.podman.compose.project={project}"]
    if service:
        filters += ["--filter", f"label=com.docker.compose.service={service}"]
    names = podman.run("ps", "--all", *filters, "--format", "{{.Names}}").stdout.split()
    return sorted(names)


def running(podman: Podman, names: list[str]) -> list[str]:
    return [n for n in names if podman.inspect(n, "{{.State.Status}}") == "running"]


@pytest.fixture(scope="module")
def stack(podman: Podman, image: Image, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    project = unique_name("stack")
    nginx_port, prometheus_port = free_port(), free_port()
    spec = compose_for_test(project, nginx_port, prometheus_port)
    stack_file = tmp_path_factory.mktemp("stack") / "docker-compose.yml"
    stack_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    replicas = int(spec["services"]["gradserve"]["deploy"]["replicas"])
    start = time.monotonic()
    try:
        compose(podman, stack_file, project, "up", "--detach", "--no-build",
                "gradserve", "prometheus")
        names = project_containers(podman, project, "gradserve")
        assert len(names) == replicas, names
        created = time.monotonic() - start
        for name in names:
            wait_for(f"{name}'s HEALTHCHECK", partial(podman.healthy, name), STACK_TIMEOUT)
        healthy = time.monotonic() - start
        compose(podman, stack_file, project, "up", "--detach", "--no-build", "--no-deps",
                "nginx")
        target = f"127.0.0.1:{nginx_port}"
        wait_for("gradserve health through nginx",
                 lambda: gradserve("health", "--target", target, "--timeout", "2").returncode
                 == 0, STACK_TIMEOUT)
        record("stack up", f"{time.monotonic() - start:.1f} s: {replicas} gradserve replicas "
               f"and Prometheus created in {created:.1f} s, replicas healthy at {healthy:.1f} s, "
               "then nginx answering (podman-compose "
               f"{podman.run_python('-m', 'podman_compose', 'version').stdout.split()[2]})")
        (nginx,) = project_containers(podman, project, "nginx")
        version = podman.run("exec", nginx, "nginx", "-v").stderr.strip()
        rewritten = [line for line in podman.logs(nginx) if line[:1] in "<>"]
        record("nginx stand-in", f"Debian's {version}; deploy/nginx/nginx.conf as it runs "
               "there (< the file, > the stand-in's copy): " + " | ".join(rewritten))
        yield Stack(project, stack_file, spec, names, target,
                    f"http://127.0.0.1:{prometheus_port}")
    finally:
        teardown(podman, stack_file, project)


def teardown(podman: Podman, stack_file: Path, project: str) -> None:
    """podman-compose down (volumes too); then anything of the project still there goes."""
    podman.run_python("-m", "podman_compose", "-f", str(stack_file), "-p", project, "down",
                      "--volumes", "--timeout", "40", timeout=300)
    left = project_containers(podman, project)
    for name in left:
        podman.remove(name)
    podman.run("network", "rm", "--force", f"{project}_default", check=False)
    for volume in podman.run("volume", "ls", "--quiet", "--filter",
                             f"label=io.podman.compose.project={project}").stdout.split():
        podman.run("volume", "rm", "--force", volume, check=False)
    assert not left, f"podman-compose down left {left}"


# --- helpers -----------------------------------------------------------------------------------


def quadratic_graph() -> Any:
    g = GraphBuilder()
    x = g.input("x")
    return 2 * x**2 - 3 * x + 4


def requests_ok(podman: Podman, replica: str) -> float:
    """OK calls a replica has answered, read from its own /metrics (inside its container:
    replicas publish no port)."""
    fetch = podman.run("exec", replica, "python", "-c",
                       "import urllib.request; print(urllib.request.urlopen("
                       "'http://127.0.0.1:9464/metrics', timeout=5).read().decode())")
    return sum(s.value for f in text_string_to_metric_families(fetch.stdout)
               for s in f.samples
               if s.name == "gradserve_requests_total" and s.labels.get("code") == "OK")


def prometheus_query(stack: Stack, query: str) -> list[dict[str, Any]]:
    url = f"{stack.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    reply = json.loads(http_get(url))
    assert reply["status"] == "success", reply
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


class Load:
    """Callers computing the quadratic through nginx with the Python client (which re-sends
    a call by graph id with the whole graph to a replica that never saw it, and retries
    UNAVAILABLE), counting how each call ended; wrong answers counted apart."""

    def __init__(self, target: str, callers: int) -> None:
        self.target = target
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._call, daemon=True)
                         for _ in range(callers)]

    def _call(self) -> None:
        graph = quadratic_graph()
        with GradientClient(self.target, timeout=20.0) as client:
            while not self._stop.is_set():
                try:
                    r = client.compute(graph, {"x": 2.0})
                    ok = float(r.output) == 6.0 and float(r.gradients["x"]) == 5.0
                    code = "OK" if ok else "WRONG"
                except GradserveError as e:
                    code = e.code.name
                with self._lock:
                    self.counts[code] += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)


# --- the checks ----------------------------------------------------------------------------------


def test_calls_through_nginx_reach_every_replica(podman: Podman, stack: Stack) -> None:
    before = {r: requests_ok(podman, r) for r in stack.replicas}
    with Load(stack.target, callers=6) as load:
        wait_for("300 calls through nginx", lambda: load.snapshot()["OK"] >= 300, 60)
    counts = load.snapshot()
    served = {r: requests_ok(podman, r) - before[r] for r in stack.replicas}
    record("calls through nginx", f"{sum(counts.values())} calls: "
           + ", ".join(f"{code} {n}" for code, n in counts.items())
           + "; answered per replica (its own /metrics): "
           + ", ".join(f"{r.rsplit('_', 1)[-1]}: {n:.0f}" for r, n in served.items()))
    assert set(counts) == {"OK"}, counts
    for replica, n in served.items():
        assert n > 0, f"{replica} answered no call: {served}"


def test_prometheus_sees_every_replica_up(podman: Podman, stack: Stack) -> None:
    live = running(podman, stack.replicas)
    addresses = {podman.inspect(r, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
                 for r in live}

    def every_replica_up() -> bool:
        up = prometheus_query(stack, 'up{job="gradserve"}')
        found = {s["metric"]["instance"].rsplit(":", 1)[0] for s in up if s["value"][1] == "1"}
        return addresses <= found

    seconds = wait_for("Prometheus scraping every replica", every_replica_up,
                       PROMETHEUS_TIMEOUT, interval=1.0)
    up = prometheus_query(stack, 'up{job="gradserve"}')
    record("Prometheus", 'up{job="gradserve"}: '
           + ", ".join(f"{s['metric']['instance']}={s['value'][1]}" for s in up)
           + f" ({len(live)} replicas running; all up {seconds:.0f} s after the check began)")
    served = prometheus_query(stack, 'sum by (instance) (gradserve_requests_total)')
    assert {s["metric"]["instance"] for s in served} >= {s["metric"]["instance"] for s in up}


def test_one_replica_stopped_leaves_the_service_answering(podman: Podman, stack: Stack) -> None:
    stopped = stack.replicas[0]
    grace_period = str(stack.spec["services"]["gradserve"]["stop_grace_period"]).rstrip("s")
    with Load(stack.target, callers=6) as load:
        wait_for("calls flowing", lambda: load.snapshot()["OK"] >= 100, 60)
        stopping = time.monotonic()
        stop = podman.run("stop", "--time", grace_period, stopped, timeout=120)
        stop_seconds = time.monotonic() - stopping
        during = load.snapshot()
        wait_for("calls after the stop", lambda: load.snapshot()["OK"] >= during["OK"] + 300,
                 60)
    counts = load.snapshot()
    exit_code = int(podman.inspect(stopped, "{{.State.ExitCode}}"))
    after = Counter({code: n - during[code] for code, n in counts.items()})
    record("one replica stopped under load", f"{stopped} stopped in {stop_seconds:.2f} s, "
           f"exit code {exit_code}; calls through nginx across the stop: "
           + ", ".join(f"{code} {n}" for code, n in counts.items())
           + "; after the stop: " + ", ".join(f"{code} {n}" for code, n in after.items()))
    assert stop.returncode == 0 and exit_code == 0, output(stop)
    assert counts["WRONG"] == 0, counts
    # The service kept answering: after the stop, every call was answered, by the others.
    assert set(+after) == {"OK"}, after
    failed = sum(n for code, n in counts.items() if code != "OK")
    assert failed <= 0.01 * counts["OK"], counts
    health = gradserve("health", "--target", stack.target, "--timeout", "5")
    assert health.returncode == 0, output(health)
    seed = gradserve("grad", "L = (a*b + c) * f", "a=3", "b=-2", "c=8", "f=-2",
                     "--target", stack.target, "--json")
    assert seed.returncode == 0, output(seed)
    assert json.loads(seed.stdout) == {
        "outputs": {"L": -4.0}, "gradients": {"a": 4.0, "b": -6.0, "c": -2.0, "f": 2.0}}
