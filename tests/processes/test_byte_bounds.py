"""Memory bounded by bytes, not counts, against real server processes:

- a stream whose client never reads holds at most --max-stream-buffer-bytes of answers (the
  answers are counted by their size, known before they are computed), and lets go of them when
  it ends;
- a request of a million tiny tensors is refused in moments, without the server's memory
  growing by gigabytes or other clients waiting for seconds;
- a request whose tensors would take more than --max-decode-bytes decoded, or whose answer
  would not fit in a message, is refused before the work, with a metric for the first.

Memory is read from /proc/PID/status: VmRSS now, VmHWM its peak."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from gradserve.engine import Graph
from gradserve.engine.builder import GraphBuilder
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request
from gradserve.wire.tensors import tensor_to_wire
from tests.processes.conftest import Backend, metric
from tests.server.conftest import RPC_TIMEOUT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads memory from /proc")

MIB = 1 << 20
ANSWER = 1 << 19  # float64 elements of each stream answer: 4 MiB
BUFFER = 16 * MIB  # the stream's --max-stream-buffer-bytes here
SENT = 256  # requests the stream sends (the count window would let all of them run)
TINY = 10**6  # tensors in the hostile request
CONCURRENT = 4  # hostile requests at once


def memory_mib(pid: int, key: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def spread() -> Graph:
    """A scalar spread over ANSWER elements: a request of a few bytes, an answer of 4 MiB."""
    g = GraphBuilder()
    x = g.input("x")
    return g.build(g.op("broadcast_to", x, shape=(ANSWER,)) * 1.0)


def test_a_stream_never_read_holds_at_most_its_buffer(backend: Callable[..., Backend]) -> None:
    b = backend("--max-stream-buffer-bytes", str(BUFFER))
    port = b.metrics_ports[0]
    with grpc.insecure_channel(b.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        graph_id = stub.RegisterGraph(pb.RegisterGraphRequest(graph=graph_to_wire(spread())),
                                      timeout=RPC_TIMEOUT).graph_id
        before = memory_mib(b.proc.pid)
        sent = [pb.ComputeStreamRequest(request=request(graph_id, None, {"x": float(k)},
                                                        request_id=str(k))) for k in range(SENT)]
        call = stub.ComputeStream(iter(sent), timeout=60)
        time.sleep(4.0)  # long enough to compute all 256 answers, were they let run
        answered = metric(port, "gradserve_requests_total", method="ComputeStream", code="OK")
        buffered = metric(port, "gradserve_stream_buffered_bytes")
        grown = memory_mib(b.proc.pid) - before
        call.cancel()
    assert 1 <= answered <= BUFFER // (8 * ANSWER) + 1, (answered, buffered, grown)
    assert 0 < buffered <= BUFFER + 8 * ANSWER, buffered
    assert grown < 200, f"the server grew by {grown:.0f} MiB"  # 256 answers are 1 GiB
    deadline = time.monotonic() + 10
    while metric(port, "gradserve_stream_buffered_bytes") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(port, "gradserve_stream_buffered_bytes") == 0


def test_a_million_tiny_tensors_are_refused_in_moments(backend: Callable[..., Backend]) -> None:
    b = backend("--max-message-bytes", str(64 * MIB))
    g = GraphBuilder()
    x = g.input("x")
    graph = g.build(2.0 * x)
    hostile = pb.ComputeRequest(graph=graph_to_wire(graph))
    one = tensor_to_wire(np.float64(1.0))
    for k in range(TINY):
        hostile.inputs[f"x{k}"].CopyFrom(one)
    small = request(None, graph, {"x": 1.0})
    with grpc.insecure_channel(b.target, options=[("grpc.max_send_message_length",
                                                   64 * MIB)]) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        stub.Compute(small, timeout=RPC_TIMEOUT)
        before = memory_mib(b.proc.pid)
        codes: list[grpc.StatusCode] = []
        waits: list[float] = []
        stop = threading.Event()

        def hostile_call() -> None:
            try:
                stub.Compute(hostile, timeout=60)
            except grpc.RpcError as e:
                codes.append(e.code())

        def small_calls() -> None:
            while not stop.is_set():
                start = time.monotonic()
                stub.Compute(small, timeout=60)
                waits.append(time.monotonic() - start)
                time.sleep(0.05)

        others = threading.Thread(target=small_calls)
        others.start()
        start = time.monotonic()
        calls = [threading.Thread(target=hostile_call) for _ in range(CONCURRENT)]
        for t in calls:
            t.start()
        for t in calls:
            t.join(90)
        took = time.monotonic() - start
        stop.set()
        others.join(60)
    peak = memory_mib(b.proc.pid, "VmHWM") - before
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * CONCURRENT
    assert took < 8.0, f"{CONCURRENT} refusals took {took:.1f} s"
    assert peak < 1024, f"the server's peak grew by {peak:.0f} MiB"
    assert max(waits) < 5.0, f"a small call waited {max(waits):.1f} s meanwhile"  # it was 7


def test_tensors_too_costly_to_decode_are_refused_and_counted(
        backend: Callable[..., Backend]) -> None:
    """2,000 scalar inputs cost about 2 MiB as objects: over a 1 MiB bound."""
    b = backend("--max-decode-bytes", str(MIB))
    g = GraphBuilder()
    xs = [g.input(f"x{k}") for k in range(2000)]
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    graph = g.build(total)
    with grpc.insecure_channel(b.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Compute(request(None, graph, {f"x{k}": 1.0 for k in range(2000)}),
                         timeout=RPC_TIMEOUT)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-decode-bytes" in str(caught.value.details())
        # Under the bound, the same graph computes.
        answer = stub.Compute(request(None, graph.__class__(graph.inputs[:1], (), ("x0",)),
                                      {"x0": 3.0}), timeout=RPC_TIMEOUT)
        assert answer.outputs["x0"].raw_data == np.float64(3.0).tobytes()
    assert metric(b.metrics_ports[0], "gradserve_rejected_requests_total",
                  reason="decode_cost") == 1


def test_an_answer_too_large_to_send_is_refused_before_it_is_computed(
        backend: Callable[..., Backend]) -> None:
    b = backend("--max-message-bytes", str(4 * MIB))
    g = GraphBuilder()
    x = g.input("x")
    y = g.op("broadcast_to", x, shape=(1 << 20,))  # 8 MiB of float64
    graph = g.build(g.op("sin", y) * y)
    with grpc.insecure_channel(b.target) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.GradientServiceStub(channel).Compute(request(None, graph, {"x": 1.0}),
                                                     timeout=RPC_TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the answer would hold 8388616 bytes" in str(caught.value.details())
    assert metric(b.metrics_ports[0], "gradserve_compute_duration_seconds_count") == 0
