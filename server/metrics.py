"""Prometheus metrics: what the server does, scraped from ``http://HOST:METRICS_PORT/metrics``.

Latencies are histograms (so p50 and p99 can be computed, and aggregated across replicas, which
Triton's counters do not allow) with buckets from 50 us to 30 s; batching shows as requests and
examples per engine pass; refusals are counted by reason. Values the server keeps anyway (queue
depth, requests in flight, the graph cache's hits and size, bytes on the wire) are read when
Prometheus scrapes, so the hot path pays nothing for them. Process metrics (CPU, memory, file
descriptors) and Python's garbage collector and platform come along.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gradserve.wire.status import REJECTION_REASONS

_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)



@dataclass(frozen=True, slots=True)
class PassReport:
    """One engine pass, as the batcher reports it: how many requests and examples it
    computed, how long it took in all and in each direction, how long each request had waited
    in the queue, and whether it stopped early because no request wanted it any more."""

    requests: int
    examples: int
    seconds: float
    forward_seconds: float
    backward_seconds: float
    waits: tuple[float, ...]
    cancelled: bool


@dataclass(frozen=True, slots=True)
class Live:
    """What the server can tell at any moment, read at every scrape."""

    queue_depth: Callable[[], int]
    in_flight: Callable[[], int]
    stream_buffered: Callable[[], int]  # bytes
    cache_hits: Callable[[], int]
    cache_misses: Callable[[], int]
    cache_entries: Callable[[], int]
    received_bytes: Callable[[], Mapping[str, int]]  # by method
    sent_bytes: Callable[[], Mapping[str, int]]


class Metrics:
    """The server's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        r = self.registry
        self.requests = Counter("gradserve_requests", "Requests answered, by method and status",
                                ["method", "code"], registry=r)
        self.latency = Histogram("gradserve_request_duration_seconds",
                                 "Time from receiving a request to answering it", ["method"],
                                 buckets=_SECONDS, registry=r)
        self.rejected = Counter("gradserve_rejected_requests",
                                "Requests refused, by reason: " + ", ".join(REJECTION_REASONS),
                                ["reason"], registry=r)
        for reason in REJECTION_REASONS:  # every series exists from the start, at 0
            self.rejected.labels(reason)
        self.queue_wait = Histogram("gradserve_queue_wait_seconds",
                                    "Time a request waited in the queue for its engine pass",
                                    buckets=_SECONDS, registry=r)
        self.compute = Histogram("gradserve_compute_duration_seconds",
                                 "Engine time of one pass (forward and backward)",
                                 buckets=_SECONDS, registry=r)
        self.forward = Histogram("gradserve_forward_duration_seconds",
                                 "Engine time of one pass's forward direction",
                                 buckets=_SECONDS, registry=r)
        self.backward = Histogram("gradserve_backward_duration_seconds",
                                  "Engine time of one pass's backward direction",
                                  buckets=_SECONDS, registry=r)
        self.batch_requests = Histogram("gradserve_batch_requests",
                                        "Requests stacked into one engine pass", buckets=_SIZES,
                                        registry=r)
        self.batch_examples = Histogram("gradserve_batch_examples",
                                        "Examples computed by one engine pass", buckets=_SIZES,
                                        registry=r)
        self.cancelled = Counter("gradserve_passes_cancelled",
                                 "Engine passes stopped early: none of their requests was "
                                 "still wanted (callers gone or out of time)", registry=r)
        self._http: WSGIServer | None = None

    def observe_pass(self, report: PassReport) -> None:
        """Record one engine pass (the batcher's hook)."""
        self.batch_requests.observe(report.requests)
        self.batch_examples.observe(report.examples)
        self.compute.observe(report.seconds)
        if report.cancelled:
            self.cancelled.inc()
        else:
            self.forward.observe(report.forward_seconds)
            self.backward.observe(report.backward_seconds)
        for wait in report.waits:
            self.queue_wait.observe(wait)

    def track(self, live: Live) -> None:
        """Read these values at every scrape."""
        self.registry.register(_LiveCollector(live))

    def serve(self, host: str, port: int) -> int:
        """Expose ``/metrics`` over HTTP on ``host:port`` (port 0: any free one); return it."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


class _LiveCollector(Collector):
    """The values of :class:`Live` as metric families, at scrape time."""

    def __init__(self, live: Live) -> None:
        self._live = live

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        live = self._live
        yield GaugeMetricFamily("gradserve_queue_depth", "Requests waiting for the engine",
                                value=live.queue_depth())
        yield GaugeMetricFamily("gradserve_requests_in_flight",
                                "Requests received and not yet answered", value=live.in_flight())
        yield GaugeMetricFamily("gradserve_stream_buffered_bytes",
                                "Bytes of answers streams hold, being computed or not yet read "
                                "by their clients", value=live.stream_buffered())
        yield CounterMetricFamily("gradserve_graph_cache_hits",
                                  "Graphs found compiled in the cache", value=live.cache_hits())
        yield CounterMetricFamily("gradserve_graph_cache_misses",
                                  "Graphs compiled because the cache did not hold them",
                                  value=live.cache_misses())
        yield GaugeMetricFamily("gradserve_graph_cache_entries", "Compiled graphs in the cache",
                                value=live.cache_entries())
        for name, what, read in (("received", "Request", live.received_bytes),
                                 ("sent", "Response", live.sent_bytes)):
            family = CounterMetricFamily(f"gradserve_{name}_bytes",
                                         f"{what} message bytes, by method", labels=["method"])
            for method, count in sorted(read().items()):
                family.add_metric([method], count)
            yield family
