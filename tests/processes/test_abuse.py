"""The abuse catalogue, against one real server process: every kind of hostile or odd request
the reliability issue names, each with the status it must get (or, where the request is odd
but valid, the answer it must get); then a minute of mixed load (``bench/soak.py``). The
process's resident memory afterwards must stay within a stated bound of what it was at the
start, and it must still answer correctly.

Answers are checked against hand-derived values (f(x) = 2x^2 - 3x + 4 and f'(x) = 4x - 3
computed here by numpy, a chain of negations, sums of nothing), never the engine's own output."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.tensors import tensors_to_wire
from tests.processes.conftest import Backend, metric, start_backend, stop_all
from tests.server.conftest import RPC_TIMEOUT, decode, failure, quadratic

MESSAGE_LIMIT = 16 << 20  # the server's --max-message-bytes here
F64, I64 = pb.DATA_TYPE_FLOAT64, pb.DATA_TYPE_INT64
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
COMPUTE = "/gradserve.v1.GradientService/Compute"
CHAIN = 99_999  # negations in the deep chain: the node limit is 100,000
SOAK_SECONDS = 60
# How much RSS may grow over the catalogue and the soak: the plan cache keeps what it compiled,
# the deep chain's 100,000-node plan above all (about 190 MB), and the allocator keeps some of
# what the largest requests needed. Within the soak, RSS must stay flat: a leak of a kilobyte
# a request would pass SOAK_DRIFT_MB within its minute.
RSS_GROWTH_MB = 260.0
SOAK_DRIFT_MB = 20.0
RSS = "process_resident_memory_bytes"
Check = Callable[[pb.ComputeResponse], None]


@dataclass(frozen=True)
class Abuse:
    """A request (a message, or raw bytes) and what it must get: a status with the field its
    violation names (a prefix), or an answer that ``check`` accepts."""

    request: pb.ComputeRequest | bytes
    code: grpc.StatusCode
    field: str = ""
    check: Check | None = None


def scalar(name: str = "x", dtype: pb.DataType.ValueType = F64,
           shape: tuple[int, ...] = ()) -> pb.Input:
    return pb.Input(name=name, dtype=dtype, shape=shape)


def node(name: str, op: str, *inputs: str, **attributes: pb.AttributeValue) -> pb.Node:
    return pb.Node(name=name, op=op, inputs=inputs, attributes=attributes)


def ints(*values: int) -> pb.AttributeValue:
    return pb.AttributeValue(ints_value=pb.IntList(values=values))


def graph(inputs: list[pb.Input], *nodes: pb.Node) -> pb.Graph:
    """The graph of ``nodes`` whose output is the last node."""
    return pb.Graph(inputs=inputs, nodes=nodes, outputs=[nodes[-1].name])


def fed(**values: object) -> dict[str, pb.Tensor]:
    return tensors_to_wire({k: np.asarray(v) for k, v in values.items()})


def compute(g: pb.Graph, batch_size: int = 0, /, **values: object) -> pb.ComputeRequest:
    return pb.ComputeRequest(graph=g, inputs=fed(**values), batch_size=batch_size)


def refused(request: pb.ComputeRequest | bytes, code: grpc.StatusCode, field: str) -> Abuse:
    return Abuse(request, code, field)


def answered(request: pb.ComputeRequest, check: Check) -> Abuse:
    return Abuse(request, grpc.StatusCode.OK, check=check)


# --- the requests -----------------------------------------------------------------------------

QUADRATIC = quadratic()
X = [float("nan"), float("inf"), float("-inf"), 2.0, -1e200]


def f(x: np.ndarray) -> np.ndarray:
    return np.asarray(2 * x**2 - 3 * x + 4)


def quadratic_of_specials(response: pb.ComputeResponse) -> None:
    """NaN and infinities go through like any number and are flagged, per example."""
    x = np.array(X)
    with np.errstate(all="ignore"):
        want, slope = f(x), 4 * x - 3
    out, grad = decode(response.outputs)[QUADRATIC.out], decode(response.gradients)["x"]
    np.testing.assert_allclose(out, want, rtol=1e-12)
    np.testing.assert_allclose(grad, slope, rtol=1e-12)
    assert list(response.nonfinite) == [True, True, True, False, True]


def log_of_negative(response: pb.ComputeResponse) -> None:
    out, grad = decode(response.outputs)["y"], decode(response.gradients)["x"]
    assert np.isnan(out)  # log(-1) is NaN, and so is the sum
    np.testing.assert_array_equal(grad, [-1.0, -0.5, 1.0])  # 1/x, defined for any x != 0
    assert list(response.nonfinite) == [True]


def deep_chain() -> pb.Graph:
    names = ["x", *(f"n{k}" for k in range(CHAIN))]
    return pb.Graph(inputs=[scalar()], outputs=[names[-1]],
                    nodes=[node(b, "neg", a) for a, b in itertools.pairwise(names)])


def minus_x(x: float) -> Check:
    def check(response: pb.ComputeResponse) -> None:
        assert decode(response.outputs)[f"n{CHAIN - 1}"] == -x  # an odd number of negations
        assert decode(response.gradients)["x"] == -1.0
    return check


def quadratic_named(name: str, x: float) -> Check:
    def check(response: pb.ComputeResponse) -> None:
        assert decode(response.outputs)[name] == 2 * x * x - 3 * x + 4
        assert decode(response.gradients)[name + "_x"] == 4 * x - 3
    return check


def unicode_quadratic(name: str) -> pb.Graph:
    x = scalar(name + "_x")
    return graph([x], node(name + "_sq", "mul", x.name, x.name),
                 node(name + "_2sq", "mul", name + "_sq", "two"),
                 node(name + "_3x", "mul", x.name, "three"),
                 node(name + "_d", "sub", name + "_2sq", name + "_3x"),
                 node(name, "add", name + "_d", "four"))


def with_constants(g: pb.Graph, **values: float) -> pb.Graph:
    for name, value in values.items():
        g.constants.add(name=name, value=tensors_to_wire({name: np.float64(value)})[name])
    return g


def million_nodes() -> bytes:
    """A ComputeRequest of 10^6 nodes, built as bytes: a repeated field is the concatenation
    of its elements' encodings, so one node's encoding repeated makes them without building
    a million messages here."""
    base = pb.Graph(inputs=[scalar()], outputs=["n"]).SerializeToString()
    one = pb.Graph(nodes=[node("n", "neg", "x")]).SerializeToString()
    body = base + one * 10**6
    number = pb.ComputeRequest.DESCRIPTOR.fields_by_name["graph"].number
    return varint(number << 3 | 2) + varint(len(body)) + body


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


WIDE = "\u03c7\u2081 \U0001f600 \u0645"  # chi, subscript one, an emoji, arabic meem
SQUARE = graph([scalar()], node("y", "mul", "x", "x"))
CATALOGUE: dict[str, Abuse] = {
    # shapes the data disagrees with
    "shape_declared_differs": refused(compute(SQUARE, x=np.zeros(3)), INVALID, "inputs.x"),
    "data_short_of_shape": refused(pb.ComputeRequest(graph=SQUARE, inputs={"x": pb.Tensor(
        dtype=F64, shape=[3], double_data=[1.0, 2.0])}), INVALID, "inputs.x"),
    "raw_data_not_whole_elements": refused(pb.ComputeRequest(graph=SQUARE, inputs={
        "x": pb.Tensor(dtype=F64, raw_data=b"\0" * 7)}), INVALID, "inputs.x"),
    "negative_dimension": refused(compute(graph([scalar(shape=(-1,))], node("y", "sum", "x"))),
                                  INVALID, "graph.inputs[0].shape"),
    # results past the memory limit, refused before anything is allocated
    "broadcast_to_huge": refused(compute(graph([scalar()], node(
        "y", "broadcast_to", "x", shape=ints(1 << 20, 1 << 20))), x=1.0), EXHAUSTED,
        "graph.nodes[0]"),
    "matmul_huge": refused(compute(graph(
        [scalar("a", shape=(100_000, 1)), scalar("b", shape=(1, 100_000))],
        node("y", "matmul", "a", "b")), a=np.ones((100_000, 1)), b=np.ones((1, 100_000))),
        EXHAUSTED, "graph.nodes[0]"),
    "concat_huge": refused(compute(graph(
        [scalar(n, shape=(1 << 23,)) for n in "abc"], node("y", "concat", "a", "b", "c"))),
        EXHAUSTED, "graph.nodes[0]"),
    "input_huge": refused(compute(graph([scalar(shape=(1 << 40,))], node("y", "sum", "x"))),
                          EXHAUSTED, "graph.inputs[0]"),
    # size of the graph
    "million_nodes": refused(million_nodes(), EXHAUSTED, "graph.nodes"),
    "deep_chain": answered(compute(deep_chain(), x=3.0), minus_x(3.0)),
    # references
    "self_reference": refused(compute(graph([scalar()], node("y", "add", "x", "y")), x=1.0),
                              INVALID, "graph.nodes[0].inputs"),
    "cycle": refused(compute(graph([scalar()], node("a", "add", "x", "b"), node("b", "neg", "a")),
                             x=1.0), INVALID, "graph.nodes[0].inputs"),
    "dangling_operand": refused(compute(graph([scalar()], node("y", "neg", "z")), x=1.0),
                                INVALID, "graph.nodes[0].inputs[0]"),
    # values
    "nan_and_inf_inputs": answered(
        compute(graph_to_wire(QUADRATIC.graph), len(X), x=np.array(X)),
        quadratic_of_specials),
    "log_of_negatives": answered(
        compute(graph([scalar(shape=(3,))], node("l", "log", "x"), node("y", "sum", "l")),
                x=np.array([-1.0, -2.0, 1.0])), log_of_negative),
    # dtypes
    "integers_into_float_op": refused(compute(graph([scalar(dtype=I64)], node("y", "exp", "x")),
                                              x=np.int64(2)), INVALID, "graph.nodes[0]"),
    "integers_for_floats": refused(compute(SQUARE, x=np.int64(2)), INVALID, "inputs.x"),
    # an INT64 input (the graph's output as it is) given as a double int64 cannot hold
    **{f"int64_as_double_{name}": refused(pb.ComputeRequest(
        graph=pb.Graph(inputs=[scalar(dtype=I64)], outputs=["x"]),
        inputs={"x": pb.Tensor(dtype=I64, double_data=[value])}), INVALID, "inputs.x.double_data")
       for name, value in (("inf", np.inf), ("minus_inf", -np.inf), ("1e30", 1e30),
                           ("2_to_63", 2.0**63))},
    "unknown_dtype": refused(compute(graph([scalar(dtype=pb.DataType.ValueType(99))],
                                           node("y", "neg", "x"))),
                             INVALID, "graph.inputs[0].dtype"),
    # empty and zero-sized
    "empty_request": refused(pb.ComputeRequest(), INVALID, "graph"),
    "empty_graph": refused(pb.ComputeRequest(graph=pb.Graph()), INVALID, "graph.outputs"),
    "empty_tensor": refused(pb.ComputeRequest(graph=SQUARE, inputs={"x": pb.Tensor()}),
                            INVALID, "inputs.x"),
    # (a zero-sized dimension is refused: no op needs one, and each would be a special case)
    "zero_length_vector": refused(
        compute(graph([scalar(shape=(0,))], node("y", "sum", "x")), x=np.zeros(0)),
        INVALID, "graph.inputs[0].shape"),
    "zero_sized_matrix": refused(
        compute(graph([scalar(shape=(2, 0))], node("y", "sum", "x")), x=np.zeros((2, 0))),
        INVALID, "graph.inputs[0].shape"),
    "zero_length_feed": refused(compute(graph([scalar(shape=(3,))], node("y", "sum", "x")),
                                        x=np.zeros(0)), INVALID, "inputs.x"),
    # names, ops and attributes
    "unknown_op": refused(compute(graph([scalar()], node("y", "frobnicate", "x")), x=1.0),
                          INVALID, "graph.nodes[0].op"),
    "unknown_attribute": refused(compute(graph([scalar(shape=(3,))], node(
        "y", "sum", "x", frob=ints(1))), x=np.zeros(3)), INVALID, "graph.nodes[0].attributes"),
    "unicode_names": answered(
        compute(with_constants(unicode_quadratic(WIDE), two=2.0, three=3.0, four=4.0),
                **{WIDE + "_x": 1.5}), quadratic_named(WIDE, 1.5)),
    "overlong_name": refused(compute(graph([scalar()], node("y" * 257, "neg", "x")), x=1.0),
                             INVALID, "graph.nodes[0].name"),
    "code_as_name": refused(compute(graph([scalar()], node("y", "__import__('os')", "x")),
                                    x=1.0), INVALID, "graph.nodes[0].op"),
    # messages
    "over_the_size_limit": refused(compute(SQUARE, x=np.zeros(MESSAGE_LIMIT // 8 + 1)),
                                   EXHAUSTED, ""),
    "not_a_message": refused(b"\x0a\xff\xff\xff\xff\x0f", INVALID, "request"),
}


# --- the server and the runs --------------------------------------------------------------------

@dataclass
class Abused:
    """The server under abuse, a channel to it, and its RSS when it started (warmed up)."""

    backend: Backend
    channel: grpc.Channel
    rss_at_start: float

    def rss(self) -> float:
        return metric(self.backend.metrics_ports[0], RSS)

    def call(self, request: pb.ComputeRequest | bytes) -> pb.ComputeResponse:
        data = request if isinstance(request, bytes) else request.SerializeToString()
        send: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(COMPUTE)
        return pb.ComputeResponse.FromString(send(data, timeout=RPC_TIMEOUT))


@pytest.fixture(scope="module")
def abused(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Abused]:
    started: list[subprocess.Popen[bytes]] = []
    options = [("grpc.max_send_message_length", 4 * MESSAGE_LIMIT),
               ("grpc.max_receive_message_length", 4 * MESSAGE_LIMIT)]
    try:
        backend = start_backend(started, tmp_path_factory.mktemp("abuse"),
                                "--max-message-bytes", str(MESSAGE_LIMIT))
        with grpc.insecure_channel(backend.target, options=options) as channel:
            served = Abused(backend, channel, 0.0)
            for x in np.linspace(-2, 2, 50):  # warm up: imports, the first plans, the threads
                assert_quadratic(served, float(x))
            served.rss_at_start = served.rss()
            yield served
    finally:
        stop_all(started)


def assert_quadratic(abused: Abused, x: float) -> None:
    response = abused.call(compute(graph_to_wire(QUADRATIC.graph), x=x))
    assert decode(response.outputs)[QUADRATIC.out] == 2 * x * x - 3 * x + 4
    assert decode(response.gradients)["x"] == 4 * x - 3


@pytest.mark.parametrize("name", CATALOGUE)
def test_abuse(abused: Abused, name: str) -> None:
    abuse = CATALOGUE[name]
    if abuse.check is not None:
        abuse.check(abused.call(abuse.request))
    else:
        with pytest.raises(grpc.RpcError) as info:
            abused.call(abuse.request)
        fail = failure(info.value)
        assert fail.code is abuse.code, f"{name}: {fail.code.name}: {fail.message}"
        if abuse.field:  # gRPC's own refusals (message size) carry no details
            assert fail.fields and fail.fields[0].startswith(abuse.field), (name, fail.fields)
        assert len(fail.message.encode()) <= 512
    assert_quadratic(abused, 2.0)  # and it still serves


def test_memory_stays_bounded_under_mixed_load_after_the_catalogue(abused: Abused) -> None:
    for abuse in CATALOGUE.values():  # once more, in case this test runs alone
        try:
            abused.call(abuse.request)
        except grpc.RpcError as e:
            assert failure(e).code is abuse.code
    soak = subprocess.run(
        [sys.executable, str(Path(__file__).parents[2] / "bench" / "soak.py"), "--target",
         abused.backend.target, "--metrics",
         f"http://127.0.0.1:{abused.backend.metrics_ports[0]}/metrics", "--duration",
         str(SOAK_SECONDS), "--interval", str(SOAK_SECONDS // 4), "--json"],
        capture_output=True, text=True, timeout=SOAK_SECONDS * 3, check=False)
    intervals = [json.loads(line) for line in soak.stdout.splitlines()]
    assert soak.returncode == 0, soak.stdout + soak.stderr
    assert len(intervals) == 4 and all(i["ok"] > 0 and i["refused"] > 0 for i in intervals)
    assert not any(i["unexpected"] for i in intervals)
    growth = (abused.rss() - abused.rss_at_start) / 2**20
    print(f"RSS {abused.rss_at_start / 2**20:.1f} MB at start, grew {growth:.1f} MB; "
          f"per interval: {[i['rss_mb'] for i in intervals]}")
    assert growth < RSS_GROWTH_MB
    assert intervals[-1]["rss_mb"] - intervals[0]["rss_mb"] < SOAK_DRIFT_MB
    assert_quadratic(abused, -2.0)
