"""Prometheus metrics: what the server does, scraped from ``http://HOST:METRICS_PORT/metrics``.

Latency is a histogram (so p99 can be computed across replicas, which Triton's counters do not
allow); batching shows as requests and examples per engine pass; the queue depth is live.
"""

from __future__ import annotations

from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)


class Metrics:
    """The server's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gradserve_requests", "Requests answered, by method and status",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("gradserve_request_duration_seconds",
                                 "Time from receiving a request to answering it", ["method"],
                                 buckets=_LATENCY, registry=self.registry)
        self.batch_requests = Histogram("gradserve_batch_requests",
                                        "Requests stacked into one engine pass", buckets=_SIZES,
                                        registry=self.registry)
        self.batch_examples = Histogram("gradserve_batch_examples",
                                        "Examples computed by one engine pass", buckets=_SIZES,
                                        registry=self.registry)
        self.compute = Histogram("gradserve_compute_duration_seconds",
                                 "Engine time of one pass (forward and backward)",
                                 buckets=_LATENCY, registry=self.registry)
        self.cancelled = Counter("gradserve_passes_cancelled",
                                 "Engine passes stopped early: none of their requests was "
                                 "still wanted (callers gone or out of time)",
                                 registry=self.registry)
        self.queue_depth = Gauge("gradserve_queue_depth", "Requests waiting for the engine",
                                 registry=self.registry)
        self.plans = Gauge("gradserve_cached_plans", "Compiled plans in the cache",
                           registry=self.registry)
        self._http: WSGIServer | None = None

    def observe_batch(self, requests: int, examples: int, seconds: float,
                      cancelled: bool) -> None:
        """Record one engine pass (the batcher's hook)."""
        self.batch_requests.observe(requests)
        self.batch_examples.observe(examples)
        self.compute.observe(seconds)
        if cancelled:
            self.cancelled.inc()

    def track(self, queue_depth: Callable[[], float], plans: Callable[[], float]) -> None:
        """Read the live gauges from these functions at every scrape."""
        self.queue_depth.set_function(queue_depth)
        self.plans.set_function(plans)

    def serve(self, host: str, port: int) -> int:
        """Expose ``/metrics`` over HTTP on ``host:port`` (port 0: any free one); return it."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
