"""ComputeStream: many requests on one stream, each answered exactly once by request_id; bad
ones carry a StreamError and the stream goes on, then ends cleanly."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from gradserve.engine.builder import GraphBuilder
from gradserve.server.service import STREAM_WINDOW
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request as request_by_id
from gradserve.wire.tensors import tensors_to_wire
from tests.server.conftest import (
    RPC_TIMEOUT,
    ServerFactory,
    classifier,
    decode,
    loss_l,
    quadratic,
    request,
    scalars,
)

COUNT = 50


@dataclass(frozen=True)
class Item:
    message: pb.ComputeRequest
    field: str | None = None  # the violation a bad request must carry; None: a good request
    value: float = 0.0  # a good quadratic request's answer, by hand: 2x^2 - 3x + 4
    slope: float = 0.0  # and 4x - 3


def items() -> list[Item]:
    """50 requests: quadratic ones at x = k - 20 with every 5th one bad, in turn in one of
    five ways (two found decoding, two checking the feed, one only when computing)."""
    q = quadratic()
    xent = classifier()
    out: list[Item] = []
    for k in range(COUNT):
        rid = f"req-{k}"
        x = float(k - 20)
        good = request(q.graph, {"x": x}, request_id=rid, raw=k % 2 == 0)
        if k % 5 != 4:
            out.append(Item(good, None, 2 * x * x - 3 * x + 4, 4 * x - 3))
            continue
        bad = pb.ComputeRequest()
        bad.CopyFrom(good)
        match (k // 5) % 5:
            case 0:
                bad.graph.nodes[0].op = "frobnicate"
                field = "graph.nodes[0].op"
            case 1:
                bad.inputs["x"].CopyFrom(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, raw_data=b"\0" * 3))
                field = "inputs.x.raw_data"
            case 2:
                del bad.inputs["x"]
                field = "inputs.x"
            case 3:
                bad.inputs["x"].CopyFrom(tensors_to_wire({"x": np.zeros(2)})["x"])
                field = "inputs.x"
            case _:  # a label out of range: refused by the op while computing
                bad = request(xent, {"logits": np.zeros(5), "label": np.int64(5)},
                              request_id=rid)
                field = "inputs.label"  # the request field holding the label
        out.append(Item(bad, field))
    return out


def test_stream_answers_every_request_once(make_server: ServerFactory) -> None:
    served = make_server(max_queue_delay_us=2_000)
    sent = items()

    def requests() -> Iterator[pb.ComputeStreamRequest]:
        for item in sent:
            yield pb.ComputeStreamRequest(request=item.message)

    call = served.stub.ComputeStream(requests(), timeout=RPC_TIMEOUT)
    answers: dict[str, list[pb.ComputeStreamResponse]] = {}
    for k, answer in enumerate(call):
        assert k < 2 * COUNT, "more answers than requests"
        answers.setdefault(answer.request_id, []).append(answer)
    assert call.code() is grpc.StatusCode.OK  # the stream ended cleanly

    assert sorted(answers) == sorted(f"req-{k}" for k in range(COUNT))
    assert all(len(a) == 1 for a in answers.values()), "some request was answered twice"
    q = quadratic()
    for k, item in enumerate(sent):
        (answer,) = answers[f"req-{k}"]
        if item.field is None:
            assert answer.WhichOneof("outcome") == "response", answer
            assert answer.response.request_id == f"req-{k}"
            assert scalars(answer.response.outputs) == {q.out: item.value}
            assert scalars(answer.response.gradients) == {"x": item.slope}
            assert list(answer.response.nonfinite) == [False]
        else:
            assert answer.WhichOneof("outcome") == "error", answer
            assert answer.error.code == 3  # INVALID_ARGUMENT
            assert [v.field for v in answer.error.field_violations] == [item.field]
            assert all(v.description for v in answer.error.field_violations)
            assert item.field in answer.error.message


def test_stream_by_graph_id_and_batched(stub: pb_grpc.GradientServiceStub) -> None:
    lo = loss_l()
    gid = stub.RegisterGraph(pb.RegisterGraphRequest(graph=request(lo.graph, {}).graph),
                             timeout=RPC_TIMEOUT).graph_id
    feed = {"a": np.array([3.0, 1.0]), "b": np.array([-2.0, 2.0]), "c": np.array([8.0, -1.0]),
            "f": np.array([-2.0, 3.0])}
    messages = [
        pb.ComputeStreamRequest(request=pb.ComputeRequest(
            request_id="by-id", graph_id=gid, inputs=tensors_to_wire(feed), batch_size=2)),
        pb.ComputeStreamRequest(request=pb.ComputeRequest(
            request_id="unknown-id", graph_id="nope", inputs=tensors_to_wire(feed))),
    ]
    answers = {a.request_id: a for a in stub.ComputeStream(iter(messages), timeout=RPC_TIMEOUT)}
    assert set(answers) == {"by-id", "unknown-id"}
    got = answers["by-id"].response
    assert decode(got.outputs)[lo.out].tolist() == [-4.0, 3.0]
    assert {k: v.tolist() for k, v in decode(got.gradients).items()} == {
        "a": [4.0, 6.0], "b": [-6.0, 3.0], "c": [-2.0, 3.0], "f": [2.0, 1.0]}
    assert list(got.nonfinite) == [False, False]
    err = answers["unknown-id"].error
    assert err.code == 5  # NOT_FOUND
    assert [v.field for v in err.field_violations] == ["graph_id"]


def test_empty_stream_ends_cleanly(stub: pb_grpc.GradientServiceStub) -> None:
    call = stub.ComputeStream(iter(()), timeout=RPC_TIMEOUT)
    assert list(call) == []
    assert call.code() is grpc.StatusCode.OK


def test_a_client_that_stops_reading_stops_being_served(make_server: ServerFactory) -> None:
    # Each answer is 32 KB (y = 2x and dy/dx for 2,000 values). Not read, the answers fill the
    # stream's window (STREAM_WINDOW in flight) and gRPC's flow control: the server stops
    # computing well short of the 1,000 requests, then serves them all once they are read.
    served = make_server()
    g = GraphBuilder()
    x = g.input("x", (2000,))
    y = x * 2.0
    graph_id = served.stub.RegisterGraph(pb.RegisterGraphRequest(graph=graph_to_wire(g.build(y))),
                                         timeout=RPC_TIMEOUT).graph_id
    count = 1000
    messages = [pb.ComputeStreamRequest(request=request_by_id(
        graph_id, None, {"x": np.full(2000, float(k))}, request_id=str(k))) for k in range(count)]
    replies = served.stub.ComputeStream(iter(messages), timeout=RPC_TIMEOUT)

    def computed() -> int:
        return sum(r for r, _ in served.batches.batches)

    for _ in range(200):  # bounded wait until the server stops computing
        before = computed()
        time.sleep(0.05)
        if computed() == before > 0:
            break
    assert STREAM_WINDOW <= computed() < count * 2 // 3
    answered = {reply.request_id: reply for reply in replies}
    assert sorted(answered, key=int) == [str(k) for k in range(count)]
    for k in (0, 500, count - 1):
        response = answered[str(k)].response
        np.testing.assert_array_equal(decode(response.outputs)[y.name], np.full(2000, 2.0 * k))
        np.testing.assert_array_equal(decode(response.gradients)["x"], np.full(2000, 2.0))
