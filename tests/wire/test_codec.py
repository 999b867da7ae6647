"""The wire codec against hand-built messages: values, byte layout, and every decoding error."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from gradserve.engine import DType, Plan
from gradserve.engine.builder import GraphBuilder
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.graphs import graph_from_wire, graph_to_wire
from gradserve.wire.tensors import WireError, tensor_from_wire, tensor_to_wire


def test_raw_float64_is_little_endian_and_zero_copy() -> None:
    raw = struct.pack("<3d", 1.5, -2.0, 4.25)
    t = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[3], raw_data=raw)
    arr = tensor_from_wire(t, "x")
    np.testing.assert_array_equal(arr, [1.5, -2.0, 4.25])
    assert not arr.flags.writeable and not arr.flags.owndata  # a view of the message's bytes


def test_raw_float32_and_int64_layouts() -> None:
    f = tensor_from_wire(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 1],
                                   raw_data=struct.pack("<2f", 0.5, 3.0)), "f")
    assert f.dtype == np.float32 and f.shape == (2, 1)
    np.testing.assert_array_equal(f.ravel(), [0.5, 3.0])
    i = tensor_from_wire(pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[2],
                                   raw_data=struct.pack("<2q", 7, -1)), "i")
    np.testing.assert_array_equal(i, [7, -1])


def test_double_and_int_data_for_hand_written_clients() -> None:
    scalar = tensor_from_wire(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, double_data=[2.0]), "x")
    assert scalar.shape == () and scalar == 2.0
    labels = tensor_from_wire(pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[2], int64_data=[1, 0]),
                              "labels")
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [1, 0])


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_tensor_round_trip(raw: bool, dtype: type) -> None:
    a: np.ndarray[Any, Any] = (np.arange(6).reshape(2, 3) * 3 - 4).astype(dtype)
    back = tensor_from_wire(tensor_to_wire(a, raw=raw), "a")
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)


@pytest.mark.parametrize(("tensor", "field", "words"), [
    (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[3], raw_data=b"\0" * 16), "x.raw_data",
     "16 bytes"),
    (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[2]), "x", "got none"),
    (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[1], double_data=[1], raw_data=b"\0" * 8), "x",
     "raw_data and double_data"),
    (pb.Tensor(shape=[1], double_data=[1]), "x.dtype", "dtype 0"),
    (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[0], double_data=[1]), "x.shape", "below 1"),
    (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[3], double_data=[1, 2]), "x.double_data",
     "2 values"),
    (pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[1], double_data=[1.5]), "x.double_data",
     "integral"),
    *((pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[2], double_data=[1, bad]), "x.double_data",
       f"not {bad!r}") for bad in (np.inf, -np.inf, 1e30, 2.0**63, -(2.0**63) * 2, np.nan)),
    (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1], int64_data=[1]), "x.int64_data",
     "cannot hold"),
    (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[1 << 20, 1 << 20], double_data=[1]), "x.shape",
     "the limit"),
])
def test_bad_tensors_name_the_field(tensor: pb.Tensor, field: str, words: str) -> None:
    with pytest.raises(WireError) as info:
        tensor_from_wire(tensor, "x")
    assert info.value.field == field
    assert words in info.value.description


def test_graph_round_trip_computes_the_same_gradients() -> None:
    g = GraphBuilder()
    x = g.input("x", (3,))
    w = g.input("w", (3, 2), requires_grad=False)
    labels = g.constant([1], dtype=DType.INT64)
    logits = (x @ w).reshape(1, 2) + g.constant([0.5, -0.5])
    loss = g.op("softmax_cross_entropy", logits, labels, reduction="sum")
    graph = g.build(loss)
    decoded = graph_from_wire(graph_to_wire(graph, raw=False))
    assert [i.requires_grad for i in decoded.inputs] == [True, False]
    assert [n.attrs for n in decoded.nodes] == [dict(n.attrs) for n in graph.nodes]
    feed = {"x": np.array([1.0, -2.0, 0.5]), "w": np.arange(6.0).reshape(3, 2) / 6}
    want, got = Plan(graph).run(feed), Plan(decoded).run(feed)
    np.testing.assert_array_equal(got.gradients["x"], want.gradients["x"])
    # And the hand-derived value: logits = x@w + [.5, -.5], loss = lse(logits) - logits[1].
    z = feed["x"] @ feed["w"] + [0.5, -0.5]
    assert got.outputs[loss.name] == pytest.approx(np.log(np.exp(z).sum()) - z[1])


def test_absent_requires_grad_means_true() -> None:
    g = pb.Graph(inputs=[pb.Input(name="x", dtype=pb.DATA_TYPE_FLOAT64)],
                 nodes=[pb.Node(name="y", op="neg", inputs=["x"])], outputs=["y"])
    assert graph_from_wire(g).inputs[0].requires_grad is True


def test_bad_graph_fields_are_named() -> None:
    g = pb.Graph(inputs=[pb.Input(name="x", dtype=pb.DATA_TYPE_FLOAT64, shape=[2, 0])])
    with pytest.raises(WireError) as info:
        graph_from_wire(g)
    assert info.value.field == "graph.inputs[0].shape"
    g = pb.Graph(nodes=[pb.Node(name="y", op="sum", inputs=["x"],
                                attributes={"axis": pb.AttributeValue()})])
    with pytest.raises(WireError) as info:
        graph_from_wire(g)
    assert info.value.field == "graph.nodes[0].attributes.axis"
