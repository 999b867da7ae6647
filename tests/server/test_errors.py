"""Every class of bad input: its status code, a message naming the field, and BadRequest field
violations naming it too; and the server still answers good requests afterwards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.tensors import tensor_to_wire, tensors_to_wire
from tests.server.conftest import RPC_TIMEOUT, compute_failure, quadratic, request, scalars

F64 = pb.DATA_TYPE_FLOAT64
F32 = pb.DATA_TYPE_FLOAT32
I64 = pb.DATA_TYPE_INT64
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
LIMIT = 1 << 24  # ServerConfig.max_tensor_elements, the default


def ints(*values: int) -> pb.AttributeValue:
    return pb.AttributeValue(ints_value=pb.IntList(values=list(values)))


def one_node(op: str, inputs: list[pb.Input], operands: list[str],
             attributes: dict[str, pb.AttributeValue] | None = None,
             constants: list[pb.Constant] | None = None) -> pb.Graph:
    """A graph of one node "out" applying ``op`` to ``operands``."""
    return pb.Graph(inputs=inputs, constants=constants or [],
                    nodes=[pb.Node(name="out", op=op, inputs=operands,
                                   attributes=attributes or {})],
                    outputs=["out"])


def scalar_in(name: str, dtype: pb.DataType.ValueType = F64,
              shape: tuple[int, ...] = ()) -> pb.Input:
    return pb.Input(name=name, dtype=dtype, shape=shape)


def feed(**values: object) -> dict[str, pb.Tensor]:
    return tensors_to_wire({k: np.asarray(v) for k, v in values.items()})


def quadratic_wire() -> pb.Graph:
    return graph_to_wire(quadratic().graph)


def with_node_change(change: Callable[[pb.Graph], None]) -> pb.Graph:
    g = quadratic_wire()
    change(g)
    return g


def set_op(g: pb.Graph) -> None:
    g.nodes[2].op = "frobnicate"


def set_operand(g: pb.Graph) -> None:
    g.nodes[1].inputs[1] = "nope"


LOGITS = [scalar_in("logits", shape=(3,)), scalar_in("label", I64)]
XENT = one_node("softmax_cross_entropy", LOGITS, ["logits", "label"])
CYCLE = pb.Graph(inputs=[scalar_in("x")],
                 nodes=[pb.Node(name="a", op="add", inputs=["x", "b"]),
                        pb.Node(name="b", op="neg", inputs=["a"])],
                 outputs=["b"])
# L = m + 1 with m = x*x: "m" is a node but not an output
SQUARE_PLUS_ONE = pb.Graph(
    inputs=[scalar_in("x")],
    constants=[pb.Constant(name="one", value=tensor_to_wire(np.float64(1.0)))],
    nodes=[pb.Node(name="m", op="mul", inputs=["x", "x"]),
           pb.Node(name="L", op="add", inputs=["m", "one"])],
    outputs=["L"])
LONG = "n" * 1_000_000  # a name of a megabyte; the limit is 256 characters


def name_input(g: pb.Graph) -> None:
    g.inputs[0].name = LONG


def name_operand(g: pb.Graph) -> None:
    g.nodes[1].inputs[1] = LONG


def name_op(g: pb.Graph) -> None:
    g.nodes[2].op = LONG


def name_attribute(g: pb.Graph) -> None:
    g.nodes[0].attributes[LONG].int_value = 1


def name_output(g: pb.Graph) -> None:
    g.outputs[0] = LONG


@dataclass(frozen=True)
class Bad:
    request: pb.ComputeRequest
    code: grpc.StatusCode
    field: str  # the field violation's exact field path
    words: tuple[str, ...] = ()  # further words the message holds


CASES = [
    pytest.param(Bad(pb.ComputeRequest(graph=with_node_change(set_op), inputs=feed(x=1.0)),
                     INVALID, "graph.nodes[2].op", ("frobnicate",)), id="unknown_op"),
    pytest.param(Bad(pb.ComputeRequest(graph=with_node_change(set_operand), inputs=feed(x=1.0)),
                     INVALID, "graph.nodes[1].inputs[1]", ("nope",)), id="unknown_operand"),
    pytest.param(Bad(pb.ComputeRequest(graph=CYCLE, inputs=feed(x=1.0)),
                     INVALID, "graph.nodes[0].inputs", ("cycle",)), id="cycle"),
    pytest.param(Bad(pb.ComputeRequest(
        graph=one_node("sum", [scalar_in("x", shape=(3,))], ["x"], {"axis": ints(5)}),
        inputs=feed(x=np.zeros(3))), INVALID, "graph.nodes[0].attributes.axis", ("axis",)),
        id="attribute_out_of_range"),
    pytest.param(Bad(pb.ComputeRequest(
        graph=one_node("sum", [scalar_in("x", shape=(3,))], ["x"],
                       {"keepdims": pb.AttributeValue(int_value=1)}),
        inputs=feed(x=np.zeros(3))), INVALID, "graph.nodes[0].attributes.keepdims", ("bool",)),
        id="attribute_wrong_kind"),
    pytest.param(Bad(pb.ComputeRequest(
        graph=one_node("sum", [scalar_in("x", shape=(3,))], ["x"], {"axes": ints(0)}),
        inputs=feed(x=np.zeros(3))), INVALID, "graph.nodes[0].attributes.axes", ("axes",)),
        id="attribute_unknown"),
    pytest.param(Bad(pb.ComputeRequest(
        graph=one_node("reshape", [scalar_in("x", shape=(3,))], ["x"]),
        inputs=feed(x=np.zeros(3))), INVALID, "graph.nodes[0].attributes.shape", ("shape",)),
        id="attribute_missing"),
    pytest.param(Bad(pb.ComputeRequest(
        graph=one_node("add", [scalar_in("x", shape=(3,)), scalar_in("y", shape=(4,))],
                       ["x", "y"]),
        inputs=feed(x=np.zeros(3), y=np.zeros(4))), INVALID, "graph.nodes[0]",
        ("[3]", "[4]")), id="shape_mismatch"),
    pytest.param(Bad(pb.ComputeRequest(
        graph=one_node("add", [scalar_in("x"), scalar_in("y", F32)], ["x", "y"]),
        inputs=feed(x=1.0, y=np.float32(1.0))), INVALID, "graph.nodes[0].inputs[1]",
        ("float32",)), id="dtype_mismatch_in_graph"),
    pytest.param(Bad(pb.ComputeRequest(graph=quadratic_wire(), inputs=feed(x=np.float32(2.0))),
                     INVALID, "inputs.x", ("float32",)), id="dtype_mismatch_in_feed"),
    pytest.param(Bad(pb.ComputeRequest(
        graph=quadratic_wire(), inputs={"x": pb.Tensor(dtype=F64, raw_data=b"\0" * 4)}),
        INVALID, "inputs.x.raw_data", ("4 bytes",)), id="raw_byte_count"),
    pytest.param(Bad(pb.ComputeRequest(
        graph=quadratic_wire(), inputs={"x": pb.Tensor(dtype=F64, shape=[2],
                                                       double_data=[1.0])}),
        INVALID, "inputs.x.double_data", ()), id="double_data_count"),
    pytest.param(Bad(pb.ComputeRequest(
        graph=quadratic_wire(), inputs={"x": pb.Tensor(double_data=[1.0])}),
        INVALID, "inputs.x.dtype", ()), id="dtype_unspecified"),
    pytest.param(Bad(pb.ComputeRequest(
        graph=quadratic_wire(), inputs={"x": pb.Tensor(dtype=F64, raw_data=b"\0" * 8,
                                                       double_data=[1.0])}),
        INVALID, "inputs.x", ("exactly one",)), id="two_data_fields"),
    pytest.param(Bad(pb.ComputeRequest(graph=quadratic_wire()), INVALID, "inputs.x",
                     ("missing",)), id="missing_input"),
    pytest.param(Bad(pb.ComputeRequest(graph=quadratic_wire(), inputs=feed(x=[1.0, 2.0])),
                     INVALID, "inputs.x", ("[2]",)), id="wrong_input_shape"),
    pytest.param(Bad(pb.ComputeRequest(graph=quadratic_wire(), inputs=feed(x=[1.0, 2.0]),
                                       batch_size=3),
                     INVALID, "batch_size", ("3", "2")), id="batch_size_not_leading_axis"),
    pytest.param(Bad(pb.ComputeRequest(graph=quadratic_wire(), inputs=feed(x=1.0),
                                       batch_size=-1),
                     INVALID, "batch_size", ("-1",)), id="batch_size_negative"),
    pytest.param(Bad(pb.ComputeRequest(graph=quadratic_wire(), inputs=feed(x=1.0),
                                       wrt=["zz"]), INVALID, "wrt", ("zz",)),
                 id="wrt_not_an_input"),
    pytest.param(Bad(pb.ComputeRequest(graph=XENT, inputs=feed(logits=np.zeros(3),
                                                               label=np.int64(1)),
                                       wrt=["label"]), INVALID, "wrt", ("label",)),
                 id="wrt_an_int_input"),
    pytest.param(Bad(pb.ComputeRequest(graph=SQUARE_PLUS_ONE, inputs=feed(x=1.0),
                                       upstream=feed(L=np.zeros(2))),
                     INVALID, "upstream.L", ("[2]",)), id="upstream_wrong_shape"),
    pytest.param(Bad(pb.ComputeRequest(graph=SQUARE_PLUS_ONE, inputs=feed(x=1.0),
                                       upstream=feed(m=1.0)),
                     INVALID, "upstream.m", ("not an output",)),
                 id="upstream_for_intermediate"),
    pytest.param(Bad(pb.ComputeRequest(graph=SQUARE_PLUS_ONE, inputs=feed(x=1.0),
                                       upstream=feed(x=1.0)),
                     INVALID, "upstream.x", ("not an output",)),
                 id="upstream_for_input"),
    pytest.param(Bad(pb.ComputeRequest(graph=SQUARE_PLUS_ONE, inputs=feed(x=1.0),
                                       upstream=feed(zz=1.0)),
                     INVALID, "upstream.zz", ("not an output",)),
                 id="upstream_for_unknown_name"),
    pytest.param(Bad(pb.ComputeRequest(graph=quadratic_wire(), inputs=feed(x=1.0, bogus=2.0)),
                     INVALID, "inputs.bogus", ("bogus",)), id="input_not_in_graph"),
    pytest.param(Bad(pb.ComputeRequest(inputs=feed(x=1.0)), INVALID, "graph_source", ()),
                 id="no_graph_source"),
    pytest.param(Bad(pb.ComputeRequest(
        graph=one_node("add", [scalar_in("x")], ["x", "c"], constants=[pb.Constant(
            name="c", value=pb.Tensor(dtype=F64, shape=[LIMIT + 1], raw_data=b""))]),
        inputs=feed(x=1.0)), EXHAUSTED, "graph.constants[0].value.shape",
        (str(LIMIT + 1), str(LIMIT))), id="constant_over_element_limit"),
    pytest.param(Bad(pb.ComputeRequest(
        graph=one_node("broadcast_to", [scalar_in("x")], ["x"], {"shape": ints(100_000, 100_000)}),
        inputs=feed(x=1.0)), EXHAUSTED, "graph.nodes[0]", ("10000000000",)),
        id="broadcast_to_huge"),
    pytest.param(Bad(pb.ComputeRequest(
        graph=one_node("broadcast_to", [scalar_in("x")], ["x"], {"shape": ints(LIMIT)}),
        inputs=feed(x=np.ones(32)), batch_size=32), EXHAUSTED, "batch_size", ("32",)),
        id="batch_over_run_limit"),
    pytest.param(Bad(pb.ComputeRequest(graph=XENT, inputs=feed(logits=np.zeros(3),
                                                               label=np.int64(7))),
                     INVALID, "inputs.label", ("7",)), id="label_out_of_range"),
    pytest.param(Bad(pb.ComputeRequest(graph=XENT, inputs=feed(logits=np.zeros((2, 3)),
                                                               label=np.array([1, -4])),
                                       batch_size=2),
                     INVALID, "inputs.label", ("-4",)),
                 id="label_out_of_range_batched"),
    *(pytest.param(Bad(pb.ComputeRequest(graph=with_node_change(change), inputs=feed(x=1.0)),
                       INVALID, field, ("1000000 characters", "256")), id=f"overlong_{what}")
      for what, change, field in (
          ("input", name_input, "graph.inputs[0].name"),
          ("operand", name_operand, "graph.nodes[1].inputs[1]"),
          ("op", name_op, "graph.nodes[2].op"),
          ("attribute", name_attribute, "graph.nodes[0].attributes"),
          ("output", name_output, "graph.outputs[0]"))),
    *(pytest.param(Bad(pb.ComputeRequest(graph=SQUARE_PLUS_ONE, **fed), INVALID, field,
                       ("1000000 characters",)), id=f"overlong_{field}_name")
      for field, fed in (
          ("inputs", {"inputs": feed(**{"x": 1.0, LONG: 2.0})}),
          ("upstream", {"inputs": feed(x=1.0), "upstream": feed(**{LONG: 1.0})}),
          ("wrt", {"inputs": feed(x=1.0), "wrt": [LONG]}))),
    pytest.param(Bad(pb.ComputeRequest(graph=pb.Graph(
        inputs=[scalar_in("x")], nodes=[pb.Node(name="", op="neg", inputs=["x"])], outputs=[""]),
        inputs=feed(x=1.0)), INVALID, "graph.nodes[0].name", ("needs a name",)),
        id="empty_node_name"),
    pytest.param(Bad(pb.ComputeRequest(graph=pb.Graph(
        inputs=[scalar_in("")], nodes=[pb.Node(name="y", op="neg", inputs=[""])], outputs=["y"]),
        inputs=feed(x=1.0)), INVALID, "graph.inputs[0].name", ("needs a name",)),
        id="empty_input_name"),
    pytest.param(Bad(pb.ComputeRequest(graph=pb.Graph(
        inputs=[scalar_in("x")], nodes=[pb.Node(name="y", op="neg", inputs=["x"]),
                                        pb.Node(name="y", op="exp", inputs=["x"])],
        outputs=["y"]), inputs=feed(x=1.0)), INVALID, "graph.nodes[1].name",
        ("assigned twice",)), id="duplicate_node_name"),
    pytest.param(Bad(pb.ComputeRequest(graph_id=LONG, inputs=feed(x=1.0)),
                     grpc.StatusCode.NOT_FOUND, "graph_id", ("not registered",)),
                 id="overlong_graph_id"),
]


@pytest.mark.parametrize("bad", CASES)
def test_bad_request(stub: pb_grpc.GradientServiceStub, bad: Bad) -> None:
    fail = compute_failure(stub, bad.request)
    assert fail.code is bad.code, fail.message
    assert fail.fields == [bad.field], fail.message
    assert bad.field in fail.message
    for word in bad.words:
        assert word in fail.message
    assert "Traceback" not in fail.message
    assert len(fail.message) <= 1024, "the message echoes too much of the request"


def test_server_still_answers_after_bad_requests(stub: pb_grpc.GradientServiceStub) -> None:
    for case in CASES:
        (bad,) = case.values
        assert isinstance(bad, Bad)
        with pytest.raises(grpc.RpcError):
            stub.Compute(bad.request, timeout=RPC_TIMEOUT)
    q = quadratic()
    response = stub.Compute(request(q.graph, {"x": -2.0}), timeout=RPC_TIMEOUT)
    assert scalars(response.outputs) == {q.out: 18.0}
    assert scalars(response.gradients) == {"x": -11.0}
    xent = stub.Compute(pb.ComputeRequest(graph=XENT, inputs=feed(logits=np.zeros(3),
                                                                  label=np.int64(2))),
                        timeout=RPC_TIMEOUT)
    # uniform logits: loss log 3, gradient softmax - onehot = 1/3 - [0, 0, 1]
    assert scalars(xent.outputs)["out"] == pytest.approx(np.log(3.0), rel=1e-12)
    np.testing.assert_allclose(
        np.frombuffer(xent.gradients["logits"].raw_data, "<f8"), [1 / 3, 1 / 3, -2 / 3],
        rtol=1e-12)


WIDE = "\U0001f600" * 256  # the longest name allowed, four bytes a character in UTF-8


@pytest.mark.parametrize("graph, fed, field", [
    (pb.Graph(inputs=[scalar_in(WIDE)], outputs=[WIDE]), {}, "inputs."),
    (pb.Graph(inputs=[scalar_in("x")],
              nodes=[pb.Node(name=WIDE[1:] + "a", op="add", inputs=["x", WIDE[1:] + "b"]),
                     pb.Node(name=WIDE[1:] + "b", op="neg", inputs=[WIDE[1:] + "a"])],
              outputs=[WIDE[1:] + "b"]), {"x": 1.0}, "graph.nodes[0].inputs"),
], ids=["missing_input", "cycle"])
def test_errors_about_the_widest_names_reach_the_client(
        stub: pb_grpc.GradientServiceStub, graph: pb.Graph, fed: dict[str, float],
        field: str) -> None:
    # Quoted whole, two such names would make trailers past the 8 KiB clients accept, and the
    # client would see RESOURCE_EXHAUSTED "received metadata size exceeds soft limit" instead.
    fail = compute_failure(stub, pb.ComputeRequest(graph=graph, inputs=feed(**fed)))
    assert fail.code is INVALID, fail.message
    assert fail.fields and fail.fields[0].startswith(field), fail.fields
    assert "\U0001f600" in fail.message
    assert len(fail.message.encode()) <= 512
