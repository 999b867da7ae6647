"""Prometheus metrics reflect what the server did."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradserve.client.api import GradientClient, GradserveError
from gradserve.engine.builder import GraphBuilder
from tests.conftest import StartServer


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_requests_latency_batches_and_gauges(start_server: StartServer) -> None:
    server = start_server(metrics_port=0)
    assert server.metrics_port
    g = GraphBuilder()
    x = g.input("x", (2,))
    loss = (x * x).sum()
    with GradientClient(server.target) as client:
        for k in range(5):
            client.compute(loss, {"x": [float(k), 1.0]})
        with pytest.raises(GradserveError):
            client.compute(loss, {"x": [1.0, 2.0, 3.0]})  # wrong shape
    samples = scrape(server.metrics_port)
    assert samples[("gradserve_requests_total", (("code", "OK"), ("method", "Compute")))] == 5
    assert samples[("gradserve_requests_total",
                    (("code", "INVALID_ARGUMENT"), ("method", "Compute")))] == 1
    assert samples[("gradserve_request_duration_seconds_count", (("method", "Compute"),))] == 6
    # The bad request never reached the engine: five passes of one example each.
    assert samples[("gradserve_batch_examples_count", ())] == 5
    assert samples[("gradserve_batch_examples_sum", ())] == 5
    assert samples[("gradserve_queue_depth", ())] == 0
    assert samples[("gradserve_cached_plans", ())] == 1
