"""A refused request leaves nothing behind: once its call has ended, no reference to it
remains, so its memory goes at once rather than whenever the cyclic collector next runs (a
refused million-node request used to hold 185 MB each until then)."""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Iterator

import grpc
import pytest

from gradserve.v1 import gradserve_pb2 as pb
from tests.server.conftest import RPC_TIMEOUT, WAIT, ServerFactory

NODES = 2_000  # in the refused graph; the server here takes at most 1,000
OUTPUT = "refused-and-forgotten"  # its output's name: what tells its requests from others


@pytest.fixture
def no_cycle_collection() -> Iterator[None]:
    """Only reference counting frees memory meanwhile: what a cycle holds stays visible."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def alive_requests() -> int:
    # type(), not isinstance(): isinstance reads __class__, which warns on torch's deprecated
    # module proxies among the collected objects
    return sum(1 for o in gc.get_objects()
               if type(o) in (pb.ComputeRequest, pb.RegisterGraphRequest)
               and o.graph.outputs[:] == [OUTPUT])


@pytest.mark.usefixtures("no_cycle_collection")
@pytest.mark.parametrize("method", ["Compute", "RegisterGraph"])
def test_a_refused_request_is_not_kept(make_server: ServerFactory, method: str) -> None:
    served = make_server(max_nodes=1_000)
    names = [OUTPUT, *(f"n{k}" for k in range(1, NODES)), "x"]
    graph = pb.Graph(inputs=[pb.Input(name="x", dtype=pb.DATA_TYPE_FLOAT64)], outputs=[OUTPUT],
                     nodes=[pb.Node(name=a, op="neg", inputs=[b])
                            for a, b in itertools.pairwise(names)])
    message = (pb.ComputeRequest(graph=graph) if method == "Compute"
               else pb.RegisterGraphRequest(graph=graph))
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = served.channel.unary_unary(
        f"/gradserve.v1.GradientService/{method}")
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as info:
            call(message.SerializeToString(), timeout=RPC_TIMEOUT)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    del message, graph
    # The server may still be finishing the last call as its status reaches the client.
    deadline = time.monotonic() + WAIT
    while alive_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive_requests() == 0
