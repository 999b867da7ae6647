"""RegisterGraph and Compute by graph_id, ListOps, and the grpc.health.v1 service."""

from __future__ import annotations

import grpc
import pytest

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.tensors import tensors_to_wire
from tests.server.conftest import (
    RPC_TIMEOUT,
    SERVING,
    Served,
    compute_failure,
    health_check,
    loss_l,
    quadratic,
    scalars,
)

# The engine's op table, written out by hand: name -> (min_arity, max_arity).
ARITIES = {
    "abs": (1, 1), "add": (2, 2), "broadcast_to": (1, 1), "concat": (1, -1), "cos": (1, 1),
    "div": (2, 2), "exp": (1, 1), "log": (1, 1), "log_softmax": (1, 1), "logsumexp": (1, 1),
    "matmul": (2, 2), "max": (1, 1), "maximum": (2, 2), "mean": (1, 1), "min": (1, 1),
    "minimum": (2, 2), "mul": (2, 2), "neg": (1, 1), "pow": (2, 2), "relu": (1, 1),
    "reshape": (1, 1), "sigmoid": (1, 1), "sin": (1, 1), "slice": (1, 1), "softmax": (1, 1),
    "softmax_cross_entropy": (2, 2), "sqrt": (1, 1), "sub": (2, 2), "sum": (1, 1),
    "tanh": (1, 1), "transpose": (1, 1), "where": (3, 3),
    # the ops ONNX models need
    "and": (2, 2), "average_pool": (1, 1), "batch_norm": (5, 5), "clip": (1, 3), "conv": (2, 3),
    "equal": (2, 2), "erf": (1, 1), "expm1": (1, 1), "gather": (2, 2), "gelu": (1, 1),
    "global_average_pool": (1, 1), "greater": (2, 2), "greater_equal": (2, 2),
    "layer_norm": (2, 3), "leaky_relu": (1, 1), "less": (2, 2), "less_equal": (2, 2),
    "log1p": (1, 1), "max_pool": (1, 1), "max_pool_choice": (2, 2), "not": (1, 1),
    "or": (2, 2), "softplus": (1, 1),
}


def test_register_same_graph_same_id_and_compute_by_id(stub: pb_grpc.GradientServiceStub) -> None:
    q = quadratic()
    first = stub.RegisterGraph(pb.RegisterGraphRequest(graph=graph_to_wire(q.graph)),
                               timeout=RPC_TIMEOUT).graph_id
    # the same graph built afresh, and sent with double_data constants: same content, same id
    again = stub.RegisterGraph(pb.RegisterGraphRequest(graph=graph_to_wire(quadratic().graph,
                                                                           raw=False)),
                               timeout=RPC_TIMEOUT).graph_id
    other = stub.RegisterGraph(pb.RegisterGraphRequest(graph=graph_to_wire(loss_l().graph)),
                               timeout=RPC_TIMEOUT).graph_id
    assert first and other
    assert first == again
    assert other != first
    response = stub.Compute(pb.ComputeRequest(graph_id=first,
                                              inputs=tensors_to_wire({"x": 6.0})),
                            timeout=RPC_TIMEOUT)
    assert scalars(response.outputs) == {q.out: 58.0}
    assert scalars(response.gradients) == {"x": 21.0}
    response = stub.Compute(pb.ComputeRequest(
        graph_id=other, inputs=tensors_to_wire({"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0})),
        timeout=RPC_TIMEOUT)
    assert scalars(response.gradients) == {"a": 4.0, "b": -6.0, "c": -2.0, "f": 2.0}


def test_changed_constant_changes_id(stub: pb_grpc.GradientServiceStub) -> None:
    wire = graph_to_wire(quadratic().graph)
    changed = pb.Graph()
    changed.CopyFrom(wire)
    changed.constants[0].value.CopyFrom(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, double_data=[7.0]))
    ids = {stub.RegisterGraph(pb.RegisterGraphRequest(graph=g), timeout=RPC_TIMEOUT).graph_id
           for g in (wire, changed)}
    assert len(ids) == 2


def test_unknown_graph_id_is_not_found(stub: pb_grpc.GradientServiceStub) -> None:
    fail = compute_failure(stub, pb.ComputeRequest(graph_id="no-such-graph",
                                                   inputs=tensors_to_wire({"x": 1.0})))
    assert fail.code is grpc.StatusCode.NOT_FOUND
    assert "no-such-graph" in fail.message
    assert fail.fields == ["graph_id"]


def test_register_bad_graph_is_invalid(stub: pb_grpc.GradientServiceStub) -> None:
    wire = graph_to_wire(quadratic().graph)
    wire.nodes[0].op = "frobnicate"
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterGraph(pb.RegisterGraphRequest(graph=wire), timeout=RPC_TIMEOUT)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "graph.nodes[0].op" in (info.value.details() or "")


def test_list_ops(stub: pb_grpc.GradientServiceStub) -> None:
    ops = stub.ListOps(pb.ListOpsRequest(), timeout=RPC_TIMEOUT).ops
    names = [op.name for op in ops]
    assert names == sorted(ARITIES)  # all 55, sorted by name
    assert len(names) == 55
    by_name = {op.name: op for op in ops}
    for name, (low, high) in ARITIES.items():
        assert (by_name[name].min_arity, by_name[name].max_arity) == (low, high), name
        assert by_name[name].doc, name

    attrs = {a.name: a for a in by_name["sum"].attributes}
    assert set(attrs) == {"axis", "keepdims"}
    assert attrs["axis"].kind == "ints" and not attrs["axis"].required
    assert not attrs["axis"].HasField("default_value")  # absent: reduce all axes
    assert attrs["keepdims"].kind == "bool" and not attrs["keepdims"].required
    assert attrs["keepdims"].default_value.WhichOneof("value") == "bool_value"
    assert attrs["keepdims"].default_value.bool_value is False

    (axis,) = by_name["concat"].attributes
    assert (axis.name, axis.kind) == ("axis", "int")
    assert axis.default_value.WhichOneof("value") == "int_value"
    assert axis.default_value.int_value == 0

    (reduction,) = by_name["softmax_cross_entropy"].attributes
    assert reduction.kind == "string"
    assert sorted(reduction.choices) == ["mean", "none", "sum"]

    attrs = {a.name: a for a in by_name["batch_norm"].attributes}
    assert attrs["epsilon"].kind == "float"
    assert attrs["epsilon"].default_value.WhichOneof("value") == "float_value"
    assert attrs["epsilon"].default_value.float_value == 1e-5
    assert reduction.default_value.string_value == "mean"

    (shape,) = by_name["reshape"].attributes
    assert (shape.kind, shape.required) == ("ints", True)
    assert [a.name for a in by_name["add"].attributes] == []


@pytest.mark.parametrize("service", ["", "gradserve.v1.GradientService"])
def test_health_serving(served: Served, service: str) -> None:
    assert health_check(served.channel, service) == SERVING


def test_health_unknown_service_not_found(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as info:
        health_check(served.channel, "no.such.Service")
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
