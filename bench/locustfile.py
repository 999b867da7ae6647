"""Load-test a gradserve server with Locust, for those who prefer it to bench/suite.py.

Run (Locust is not a gradserve dependency: ``pip install locust`` first)::

    locust -f bench/locustfile.py --headless -u 16 -r 4 -t 30s --host 127.0.0.1:50051

Each simulated user holds one :class:`GradientClient` (gradserve's own client library, so the
graph is registered once and then called by id, as real clients do) and computes one of the
built-in workloads (``gradserve.client.workloads``) in a loop, reporting every call to Locust's
request event: its name, its time in milliseconds, and the exception if it failed.

Environment:

- ``GRADSERVE_WORKLOAD``: which workload (default ``expr21``; also ``quadratic``, ``loss-l``,
  ``staged``, ``mlp``).
- ``GRADSERVE_EXAMPLES``: examples stacked in each request (default 0: one example, no batch
  axis).
- ``GRADSERVE_WAIT``: the most seconds a user waits between calls (default 0: none).

Locust runs users as gevent greenlets, so gRPC is switched to gevent first; otherwise a blocking
call would stall every user in the process.
"""

from __future__ import annotations

import os
import time
from typing import Any

import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import User, between, events, task

from gradserve.client.api import GradientClient
from gradserve.client.workloads import WORKLOADS, Workload

grpc_gevent.init_gevent()

WORKLOAD = os.environ.get("GRADSERVE_WORKLOAD", "expr21")
EXAMPLES = int(os.environ.get("GRADSERVE_EXAMPLES", "0"))
WAIT = float(os.environ.get("GRADSERVE_WAIT", "0"))
if WORKLOAD not in WORKLOADS:
    raise SystemExit(f"GRADSERVE_WORKLOAD={WORKLOAD!r}: choose one of {', '.join(WORKLOADS)}")


class GradserveUser(User):  # type: ignore[misc]  # locust ships no type information
    """One client computing the chosen workload in a loop."""

    wait_time = between(0, WAIT)

    def on_start(self) -> None:
        self.workload: Workload = WORKLOADS[WORKLOAD]()
        self.inputs: dict[str, Any] = self.workload.inputs(np.random.default_rng(),
                                                           EXAMPLES or None)
        self.label = f"Compute {self.workload.name}" + (f" x{EXAMPLES}" if EXAMPLES else "")
        self.client = GradientClient(self.host)
        self.client.register(self.workload.graph)  # not timed: done once per client

    def on_stop(self) -> None:
        self.client.close()

    @task  # type: ignore[untyped-decorator]  # locust ships no type information
    def compute(self) -> None:
        """One call, reported to Locust whether it succeeded or not."""
        start = time.perf_counter()
        exception: Exception | None = None
        try:
            self.client.compute(self.workload.graph, self.inputs, batch_size=EXAMPLES or None)
        except Exception as e:  # every failure is reported, and none ends the run
            exception = e
        events.request.fire(request_type="grpc", name=self.label,
                            response_time=(time.perf_counter() - start) * 1000,
                            response_length=0, exception=exception, context={})
