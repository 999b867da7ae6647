"""What an import gives: engine inputs and constants, the batch axis, names, folded shape
arithmetic, what it describes of the model; and how long a large model takes."""

from __future__ import annotations

import time
from itertools import pairwise

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from gradserve.engine import DType, Plan, gradcheck
from gradserve.importer import CONVERTERS, REVIEWED_OPSET, TensorInfo, import_model
from tests.importer.models import LATEST, Arr, In, ints, make, node, reference
from tests.importer.test_ops import CASES


def test_initializers_are_constants_unless_named_as_inputs() -> None:
    model = make([node("Gemm", ["x", "w", "b"], transB=1)], {"x": In(("N", 3))}, ["y"],
                 initializers={"w": np.arange(6.0).reshape(2, 3), "b": np.ones(2)})
    plain = import_model(model)
    assert [i.name for i in plain.graph.inputs] == ["x"]
    assert plain.inputs == (TensorInfo("x", (None, 3), "float64"),)
    named = import_model(model, inputs=["w"])
    assert named.inputs[1] == TensorInfo("w", (2, 3), "float64")
    assert [(i.name, i.shape) for i in named.graph.inputs] == [("x", (3,)), ("w", (2, 3))]
    assert "w" not in {c.name for c in named.graph.constants}
    feed = {"x": np.array([0.5, -1.0, 2.0]), "w": np.arange(6.0).reshape(2, 3) / 3}
    assert gradcheck(named.graph, feed).ok
    grads = Plan(named.graph).run(feed).gradients
    np.testing.assert_allclose(grads["w"], np.stack([feed["x"]] * 2))


def test_a_dynamic_batch_becomes_the_engines_batch_axis() -> None:
    model = make([node("Softmax", ["x"], ["s"]), node("ReduceSum", ["s", "axes"])],
                 {"x": In(("batch", 4, 3))}, ["y"], initializers={"axes": ints(2)})
    imported = import_model(model)
    assert imported.batched
    assert imported.inputs == (TensorInfo("x", (None, 4, 3), "float64"),)
    assert imported.outputs == (TensorInfo("y", (None, 4, 1), "float64"),)
    assert imported.graph.inputs[0].shape == (4, 3)
    x = np.random.default_rng(0).standard_normal((5, 4, 3))
    got = Plan(imported.graph).run({"x": x}, batched=True).outputs["y"]
    np.testing.assert_allclose(got, reference(model, {"x": x})[0], rtol=1e-12)


def test_a_fixed_batch_is_part_of_each_example() -> None:
    model = make([node("Softmax", ["x"], axis=0)], {"x": In((2, 3))}, ["y"])
    imported = import_model(model)
    assert not imported.batched
    assert imported.graph.inputs[0].shape == (2, 3)
    assert imported.outputs == (TensorInfo("y", (2, 3), "float64"),)


def test_shape_arithmetic_is_folded_away() -> None:
    """What an exporter computes from shapes (Shape, Gather, Range, Equal, Where ...) leaves
    no node in the engine graph: only the differentiable ops remain."""
    ops = {c.id: sorted(n.op for n in import_model(c.model(c.opsets[-1])).graph.nodes)
           for c in CASES if c.id.startswith(("Shape-", "Range-", "Constant-"))}
    assert ops == {"Shape-Gather-Concat-Reshape": ["reshape"],
                   "Range-ConstantOfShape-Expand-Equal-Where":
                       ["mul", "mul", "reshape", "reshape", "softmax", "where"],
                   "Constant-Floor-Ceil": ["mul"]}


def test_engine_nodes_take_the_onnx_names() -> None:
    model = make([node("Gemm", ["x", "w"], ["hidden"]), node("Relu", ["hidden"], ["act"]),
                  node("Identity", ["act"], ["y"]), node("Identity", ["x"], ["copy"]),
                  node("Shape", ["x"], ["dims"])],
                 {"x": In((1, 2))}, ["y", "act", "copy", "dims"],
                 initializers={"w": np.ones((2, 2))})
    graph = import_model(model).graph
    assert graph.outputs == ("y", "act", "copy", "dims")
    assert {n.name for n in graph.nodes} >= {"hidden", "act", "y", "copy"}
    result = Plan(graph).run({"x": np.array([[1.0, -3.0]])}).outputs
    np.testing.assert_array_equal(result["dims"], [1, 2])
    np.testing.assert_array_equal(result["copy"], [[1.0, -3.0]])


def test_a_batched_output_whose_batch_axis_is_not_first() -> None:
    model = make([node("Transpose", ["x"], perm=[1, 0, 2])], {"x": In(("N", 2, 3))}, ["y"],
                 declare={"y": (2, "N", 3)})
    imported = import_model(model)
    assert imported.outputs == (TensorInfo("y", (2, None, 3), "float64"),)
    x = np.arange(24.0).reshape(4, 2, 3)
    got = Plan(imported.graph).run({"x": x}, batched=True).outputs["y"]
    np.testing.assert_array_equal(got, x)  # per example, (2, 3): the batch axis leads


def test_a_declared_output_shape_must_match_what_is_computed() -> None:
    model = make([node("Relu", ["x"])], {"x": In(("N", 3))}, ["y"], declare={"y": ("N", 4)})
    with pytest.raises(ValueError, match=r"declared \[None, 4\] but computes \[1, 3\]"):
        import_model(model)


def test_integer_inputs_feed_indices_and_labels_without_a_batch_axis() -> None:
    model = make([node("Gather", ["e", "t"], ["h"]),
                  node("ReduceSum", ["h", "axes"], ["s"], keepdims=0),
                  node("SoftmaxCrossEntropyLoss", ["s", "label"])],
                 {"t": In(("N", 4), np.int64, 0, 5), "label": In(("N",), np.int64, 0, 3)},
                 ["y"], initializers={"e": np.arange(15.0).reshape(5, 3) / 5, "axes": ints(1)})
    imported = import_model(model, inputs=["e"])
    assert [(i.name, i.shape, i.dtype) for i in imported.graph.inputs] == [
        ("t", (4,), DType.INT64), ("label", (), DType.INT64), ("e", (5, 3), DType.FLOAT64)]
    feed = {"t": np.array([0, 4, 4, 1]), "label": np.array(2),
            "e": np.arange(15.0).reshape(5, 3) / 5}
    assert gradcheck(imported.graph, feed).ok


def test_local_functions_are_inlined() -> None:
    square = oh.make_function("local", "Square", ["a"], ["b"], [node("Mul", ["a", "a"], ["b"])],
                              [oh.make_opsetid("", LATEST)])
    model = make([oh.make_node("Square", ["x"], ["y"], domain="local")], {"x": In(("N", 3))},
                 ["y"], declare={"y": ("N", 3)})
    model.functions.append(square)
    model.opset_import.append(oh.make_opsetid("local", 1))
    graph = import_model(model).graph
    assert [n.op for n in graph.nodes] == ["mul"]


def test_the_converters_know_each_op_at_the_newest_opset() -> None:
    """A newer onnx that defines a new version of an op the table converts fails here, so the
    converter is reviewed (and REVIEWED_OPSET raised) before models use that version."""
    newest = onnx.defs.onnx_opset_version()
    later = {op: onnx.defs.get_schema(op, newest, "").since_version for op in CONVERTERS}
    assert {op: v for op, v in later.items() if v > REVIEWED_OPSET} == {}


def test_a_million_parameters_import_and_compile_within_a_second() -> None:
    rng = np.random.default_rng(0)
    dims = (784, 1024, 200, 10)
    weights: dict[str, Arr] = {}
    nodes, h = [], "x"
    for k, (a, b) in enumerate(pairwise(dims)):
        weights |= {f"w{k}": rng.standard_normal((b, a)).astype(np.float32),
                    f"b{k}": rng.standard_normal(b).astype(np.float32)}
        nodes += [node("Gemm", [h, f"w{k}", f"b{k}"], [f"g{k}"], transB=1),
                  node("Relu", [f"g{k}"], [f"r{k}"])]
        h = f"r{k}"
    data = make(nodes, {"x": In(("N", 784), np.float32)}, [h], initializers=weights,
                output_dtype=np.float32, declare={h: ("N", 10)}).SerializeToString()
    assert sum(w.size for w in weights.values()) > 1_000_000
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        plan = Plan(import_model(data).graph)
        plan.program(plan.default_wrt)
        best = min(best, time.perf_counter() - start)
    print(f"1M-parameter model: import and compile in {best * 1000:.1f} ms")
    assert best < 1.0
