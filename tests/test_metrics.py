"""Prometheus metrics reflect what the server did: counted from the traffic each test sends,
linted by promtool on the live endpoint, and scraped by a real Prometheus server whose query
API then gives back the request counts and a latency quantile."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradserve.server.app import GradServer
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from tests.conftest import StartServer
from tests.server.conftest import RPC_TIMEOUT, WAIT, quadratic, request

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
    return text


def scrape(port: int) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(scrape_text(port))
            for s in family.samples}


def traffic(server: GradServer, good: int) -> tuple[int, int, int]:
    """Register the quadratic, compute it ``good`` times by id, send one bad request; return
    the bytes of the Compute requests, of the RegisterGraph request, and of the Compute
    responses, as protobuf serialises them."""
    q = quadratic()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        register = pb.RegisterGraphRequest(graph=graph_to_wire(q.graph))
        graph_id = stub.RegisterGraph(register, timeout=RPC_TIMEOUT).graph_id
        sent = answered = 0
        for k in range(good):
            message = pb.ComputeRequest(graph_id=graph_id, inputs=request(
                q.graph, {"x": float(k)}).inputs)
            answered += stub.Compute(message, timeout=RPC_TIMEOUT).ByteSize()
            sent += message.ByteSize()
        bad = pb.ComputeRequest(graph_id=graph_id)  # no value for x
        with pytest.raises(grpc.RpcError):
            stub.Compute(bad, timeout=RPC_TIMEOUT)
        sent += bad.ByteSize()
    return sent, register.ByteSize(), answered


def test_requests_latency_batches_cache_bytes_and_refusals(start_server: StartServer) -> None:
    server = start_server(metrics_port=0)
    assert server.metrics_port
    sent, registered, answered = traffic(server, 5)
    s = scrape(server.metrics_port)
    compute = (("method", "Compute"),)
    assert s["gradserve_requests_total", (("code", "OK"), *compute)] == 5
    assert s["gradserve_requests_total", (("code", "INVALID_ARGUMENT"), *compute)] == 1
    assert s["gradserve_request_duration_seconds_count", compute] == 6
    assert s["gradserve_rejected_requests_total", (("reason", "invalid"),)] == 1
    assert s["gradserve_rejected_requests_total", (("reason", "queue_full"),)] == 0
    # the bad request never reached the engine: five passes of one example each
    for name in ("gradserve_batch_examples", "gradserve_batch_requests"):
        assert (s[f"{name}_count", ()], s[f"{name}_sum", ()]) == (5, 5)
    for name in ("queue_wait", "forward_duration", "backward_duration", "compute_duration"):
        assert s[f"gradserve_{name}_seconds_count", ()] == 5
        assert 0 < s[f"gradserve_{name}_seconds_sum", ()] < WAIT
    assert s["gradserve_queue_depth", ()] == 0
    assert s["gradserve_requests_in_flight", ()] == 0
    # registered once (compiled: a miss), then found by id for each of the six requests
    assert s["gradserve_graph_cache_misses_total", ()] == 1
    assert s["gradserve_graph_cache_hits_total", ()] == 6
    assert s["gradserve_graph_cache_entries", ()] == 1
    assert s["gradserve_received_bytes_total", compute] == sent
    assert s["gradserve_received_bytes_total", (("method", "RegisterGraph"),)] == registered
    assert s["gradserve_sent_bytes_total", compute] == answered
    assert s["process_cpu_seconds_total", ()] > 0
    assert s["process_resident_memory_bytes", ()] > 0


def test_latency_buckets_resolve_sub_millisecond_to_seconds(start_server: StartServer) -> None:
    server = start_server(metrics_port=0)
    assert server.metrics_port
    traffic(server, 1)
    bounds = {float(dict(labels)["le"]) for (name, labels), _ in scrape(
        server.metrics_port).items() if name == "gradserve_request_duration_seconds_bucket"}
    assert min(bounds) <= 0.0001 and max(bounds - {math.inf}) >= 10


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus)")
def test_promtool_finds_nothing_to_lint_on_the_live_endpoint(
        start_server: StartServer) -> None:
    server = start_server(metrics_port=0)
    assert server.metrics_port
    traffic(server, 2)
    lint = subprocess.run(["promtool", "check", "metrics"], input=scrape_text(
        server.metrics_port), capture_output=True, text=True, timeout=60, check=False)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (
        lint.stdout + lint.stderr)


# --- a real Prometheus server ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A Prometheus server on 127.0.0.1 (its config file, to be written, and its port)."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus (Debian package) is not installed")
    config, port = tmp_path / "prometheus.yml", free_port()
    yield config, port


def run_prometheus(config: Path, port: int, data: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={data}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """histogram_quantile as Prometheus defines it, over cumulative (upper bound, count)
    buckets: linear interpolation inside the bucket the rank falls in."""
    buckets = sorted(buckets)
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return math.nan


def test_prometheus_scrapes_counts_and_a_latency_quantile(
        start_server: StartServer, prometheus: tuple[Path, int], tmp_path: Path) -> None:
    server = start_server(metrics_port=0)
    metrics_port = server.metrics_port
    assert metrics_port
    config, port = prometheus
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: gradserve\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
    process = run_prometheus(config, port, tmp_path / "data")
    try:
        traffic(server, 40)
        ok = 'sum(gradserve_requests_total{method="Compute",code="OK"})'
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                result = query(port, ok)
            except OSError:  # not listening yet
                result = []
            if result and float(result[0]["value"][1]) == 40:
                break
            time.sleep(0.5)
        assert result and float(result[0]["value"][1]) == 40, result
        bad = query(port, 'sum(gradserve_rejected_requests_total{reason="invalid"})')
        assert float(bad[0]["value"][1]) == 1
        p50 = query(port, "histogram_quantile(0.5, sum by (le) "
                          '(gradserve_request_duration_seconds_bucket{method="Compute"}))')
        served = float(p50[0]["value"][1])
        # the same quantile computed here from the buckets the server shows now
        buckets = [(float(dict(labels)["le"]), value) for (name, labels), value in
                   scrape(metrics_port).items()
                   if name == "gradserve_request_duration_seconds_bucket"
                   and ("method", "Compute") in labels]
        assert served == pytest.approx(quantile(buckets, 0.5), rel=1e-9)
        assert 0 < served < 1
    finally:
        process.terminate()
        process.wait(timeout=WAIT)
