"""A request whose caller goes away stops its engine work between steps and frees its memory:
requests that run out of time do not delay the ones after them, nor grow the server."""

from __future__ import annotations

import ctypes
import os
import sys
import time
import tracemalloc

import grpc
import pytest

from gradserve.engine import Graph
from gradserve.engine.builder import GraphBuilder
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request as request_by_id
from tests.server.conftest import (
    RPC_TIMEOUT,
    WAIT,
    Served,
    ServerFactory,
    quadratic,
    request,
    scalars,
)

STEPS, N = 100, 400  # a chain of 400 x 400 matmuls: about 1.5 s of work for a full run


def matmul_chain() -> Graph:
    """sum(y_K) with y_0 = broadcast_to(x, [N, N]), y_{k+1} = (y_k @ y_0) / N: every entry of
    y_K is x^(K+1), so the value is N^2 x^(K+1)."""
    g = GraphBuilder()
    x = g.input("x")
    big = g.op("broadcast_to", x, shape=(N, N))
    y = big
    for _ in range(STEPS):
        y = (y @ big) * (1.0 / N)
    return g.build(y.sum())


def rss_bytes() -> int:
    """This process's resident memory, after glibc hands back what it holds free (else the
    figure says more about the allocator's caching than about what is alive)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def wait_idle(served: Served) -> None:
    batcher = served.server.batcher
    deadline = time.monotonic() + WAIT
    while (batcher.queued or batcher.running) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (batcher.queued or batcher.running), "the engine is still busy"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS as glibc Linux has it")
def test_requests_out_of_time_stop_their_passes_and_free_their_memory(
        make_server: ServerFactory) -> None:
    served = make_server(batch_threads=1, max_batch_size=1, inline_max_elements=0)
    graph_id = served.stub.RegisterGraph(pb.RegisterGraphRequest(
        graph=graph_to_wire(matmul_chain())), timeout=RPC_TIMEOUT).graph_id
    slow = request_by_id(graph_id, None, {"x": 1.0})

    def run_out_of_time() -> None:
        with pytest.raises(grpc.RpcError) as caught:
            served.stub.Compute(slow, timeout=0.4)  # a full run takes several times that
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        wait_idle(served)

    run_out_of_time()  # the first pass's thread makes its allocator arena
    rss = rss_bytes()
    tracemalloc.start()
    try:
        for _ in range(5):
            run_out_of_time()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    passes = served.batches.batches
    assert len(passes) == 6
    assert served.batches.cancelled == 6, "a pass ran on after its caller left"
    assert held < 1 << 20, f"{held} bytes of arrays still held"
    grown = rss_bytes() - rss
    assert grown < 64 << 20, f"the server grew by {grown >> 20} MiB"  # a pass holds ~300
    q = quadratic()
    response = served.stub.Compute(request(q.graph, {"x": 2.0}), timeout=RPC_TIMEOUT)
    assert scalars(response.gradients) == {"x": 5.0}
