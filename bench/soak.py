"""A soak: a bounded mixed load against a running server, with its memory, errors and p99 per
interval, to show that nothing leaks or degrades over minutes.

Run: ``python bench/soak.py --target 127.0.0.1:50051 --metrics http://127.0.0.1:9464/metrics
--duration 5m --interval 1m``. At once, in every interval: unary calls of the 21-op expression,
streams of the quadratic (200 requests/s), 64-example batches of the staged sigmoid expression,
a small MLP's loss, and a trickle of invalid requests (an unknown op, a wrong shape, a missing
input, an unknown graph id, a tensor past the memory limit, bytes that are no message). A share
of the valid answers is checked against the engine run here; each invalid request must get its
own status. After each interval one line: calls answered OK, the invalid ones refused as they
should be, anything unexpected (another status, a wrong answer), the valid calls' p99, and the
server's resident memory (``process_resident_memory_bytes`` from ``--metrics``).

The exit status is 1 when anything unexpected happened. Every interval is bounded by its time
and every load in it by a count; nothing is retried.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace

import grpc
import numpy as np

from gradserve.cli.main import duration
from gradserve.client.loadreport import read_metrics
from gradserve.client.loadtest import OPTIONS, LoadConfig, Run, run_load
from gradserve.client.workloads import WORKLOADS, mlp
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.tensors import tensors_to_wire

REQUESTS_PER_INTERVAL = 1_000_000  # each load's count bound in one interval (time binds first)
DEADLINE = 10.0  # seconds, every call
RSS = "process_resident_memory_bytes"
COMPUTE = "/gradserve.v1.GradientService/Compute"


def loads(target: str) -> list[LoadConfig]:
    """The valid part of the mix (closed loop, a tenth of the answers verified)."""
    base = LoadConfig(target, WORKLOADS["expr21"](), concurrency=4, deadline=DEADLINE,
                      verify=0.1, requests=REQUESTS_PER_INTERVAL)
    return [base,
            replace(base, workload=WORKLOADS["quadratic"](), mode="stream", concurrency=2, rps=200),
            replace(base, workload=WORKLOADS["staged"](), batch=64, concurrency=2),
            replace(base, workload=mlp(batch=16, hidden=32, features=64), concurrency=1)]


def invalid_requests() -> list[tuple[bytes, grpc.StatusCode]]:
    """Serialized requests the server must refuse, each with the status it must give."""
    quadratic = graph_to_wire(WORKLOADS["quadratic"]().graph)
    x = pb.Input(name="x", dtype=pb.DATA_TYPE_FLOAT64)

    def compute(**fields: object) -> bytes:
        return pb.ComputeRequest(**fields).SerializeToString()  # type: ignore[arg-type]

    unknown_op = pb.Graph(inputs=[x], nodes=[pb.Node(name="y", op="frobnicate", inputs=["x"])],
                          outputs=["y"])
    huge = pb.Graph(inputs=[x], nodes=[pb.Node(
        name="y", op="broadcast_to", inputs=["x"],
        attributes={"shape": pb.AttributeValue(ints_value=pb.IntList(values=[1 << 20] * 2))})],
        outputs=["y"])
    bad, limit = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    return [
        (compute(graph=unknown_op, inputs=tensors_to_wire({"x": np.float64(1)})), bad),
        (compute(graph=quadratic, inputs=tensors_to_wire({"x": np.zeros(3)})), bad),
        (compute(graph=quadratic), bad),
        (compute(graph_id="no-such-graph", inputs=tensors_to_wire({"x": np.float64(1)})),
         grpc.StatusCode.NOT_FOUND),
        (compute(graph=huge, inputs=tensors_to_wire({"x": np.float64(1)})), limit),
        (b"\xff\xff\xff\xff", bad),
    ]


async def refuse(target: str, seconds: float, tally: Counter[str]) -> None:
    """Send the invalid requests in turn for ``seconds``; count each as ``refused`` when it
    got its status and as the status it got otherwise."""
    cases = invalid_requests()
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(COMPUTE)
        end = time.monotonic() + seconds
        sent = 0
        while time.monotonic() < end and sent < REQUESTS_PER_INTERVAL:
            data, code = cases[sent % len(cases)]
            sent += 1
            try:
                await call(data, timeout=DEADLINE)
            except grpc.aio.AioRpcError as e:
                tally["refused" if e.code() is code else f"invalid answered {e.code().name}"] += 1
            else:
                tally["invalid answered OK"] += 1
            await asyncio.sleep(0.01)  # a trickle, not a flood


@dataclass(frozen=True)
class Interval:
    """One interval's figures."""

    end: float  # seconds since the soak began
    ok: int
    refused: int
    unexpected: dict[str, int]  # what should not have happened -> how often
    p99_ms: float
    rss_mb: float | None


async def interval(target: str, seconds: float, metrics: str | None, began: float
                   ) -> Interval:
    """Run the whole mix for ``seconds``; its figures."""
    tally: Counter[str] = Counter()
    runs: list[Run]
    runs, _ = await asyncio.gather(
        asyncio.gather(*(run_load(replace(c, seconds=seconds)) for c in loads(target))),
        refuse(target, seconds, tally))
    calls = [c for run in runs for c in run.calls]
    tally.update(f"valid answered {c.code}: {c.error[:80]}" for c in calls if c.code != "OK")
    tally.update("wrong answer" for c in calls if c.wrong)
    latencies = [c.latency for c in calls if c.code == "OK"]
    rss = read_metrics(metrics, (RSS,)).get(RSS) if metrics else None
    return Interval(
        end=round(time.monotonic() - began, 1), ok=len(latencies), refused=tally.pop("refused", 0),
        unexpected=dict(tally),
        p99_ms=round(float(np.percentile(latencies, 99)) * 1e3, 2) if latencies else 0.0,
        rss_mb=None if rss is None else round(rss / 2**20, 1))


async def soak(target: str, duration: float, every: float, metrics: str | None,
               as_json: bool) -> bool:
    """Run intervals of ``every`` seconds for ``duration``, printing each; whether all went
    as they should."""
    began = time.monotonic()
    clean = True
    while (left := duration - (time.monotonic() - began)) > 0:
        figures = await interval(target, min(every, left), metrics, began)
        clean = clean and not figures.unexpected
        if as_json:
            print(json.dumps(asdict(figures)), flush=True)
        else:
            rss = "-" if figures.rss_mb is None else f"{figures.rss_mb:.1f} MB"
            print(f"{figures.end:7.1f} s  ok {figures.ok:8,}  refused {figures.refused:6,}  "
                  f"p99 {figures.p99_ms:8.2f} ms  rss {rss}  unexpected "
                  f"{figures.unexpected or 'none'}", flush=True)
    return clean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--metrics", metavar="URL", help="the server's /metrics (for RSS)")
    parser.add_argument("--duration", type=duration, default=300.0, help="5m, 60s, ...")
    parser.add_argument("--interval", type=duration, default=60.0)
    parser.add_argument("--json", action="store_true", help="one JSON object per interval")
    args = parser.parse_args()
    raise SystemExit(0 if asyncio.run(soak(args.target, args.duration, args.interval,
                                           args.metrics, args.json)) else 1)


if __name__ == "__main__":
    main()
