"""Everything the importer cannot import is a ModelError naming what and where: malformed
bytes, no graph, dangling names, unsupported data types, unsupported ops (with their op type
and opset), models over the limits (refused before conversion) and more; and no input, however
mangled, makes it raise anything else."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradserve.engine import Limits
from gradserve.importer import ModelError, import_model
from tests.importer.models import LATEST, In, ints, make, node

X = {"x": In(("N", 3))}


def _refused(model: Any, **kwargs: Any) -> ModelError:
    with pytest.raises(ModelError) as info:
        import_model(model, **kwargs)
    assert isinstance(info.value, ValueError)
    return info.value


def _relu(opset: int = LATEST) -> onnx.ModelProto:
    return make([node("Relu", ["x"])], X, ["y"], opset=opset)


def test_bytes_that_are_not_a_model() -> None:
    e = _refused(b"\x0a\xff\xff\xff\xff not protobuf")
    assert e.field == "bytes"
    assert "not an ONNX model" in e.message


@pytest.mark.parametrize("model", [b"", onnx.ModelProto(), oh.make_model(onnx.GraphProto())
                                   .SerializeToString()[:2]], ids=["empty", "proto", "cut"])
def test_a_model_without_a_graph(model: Any) -> None:
    e = _refused(model)
    assert e.field == "graph"
    assert e.message == "the model has no graph"


def test_what_is_not_a_model_at_all(tmp_path: Path) -> None:
    assert _refused(42).field == "model"
    e = _refused(tmp_path / "absent.onnx")
    assert e.field == "path"
    assert "cannot read" in e.message


def test_a_model_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_relu(), str(path))
    assert import_model(path).batched
    assert import_model(str(path)).graph.outputs == ("y",)


def test_a_dangling_node_input_names_the_node_and_the_input() -> None:
    model = make([node("Relu", ["x"], ["r"], name="first"), node("Add", ["r", "ghost"],
                                                                  name="second")], X, ["y"])
    e = _refused(model)
    assert (e.node, e.op_type, e.opset, e.field) == ("second", "Add", LATEST,
                                                     "graph.node[1].input[1]")
    assert "'ghost' is not computed by any node" in e.message


def test_an_input_used_before_its_node_is_out_of_order() -> None:
    model = make([node("Relu", ["r"]), node("Relu", ["x"], ["r"])], X, ["y"])
    e = _refused(model)
    assert e.field == "graph.node[0].input[0]"
    assert "topological order" in e.message


def test_a_dangling_output() -> None:
    model = make([node("Relu", ["x"])], X, ["y", "nowhere"])
    e = _refused(model)
    assert (e.node, e.field) == ("nowhere", "graph.output[1]")


def test_a_name_assigned_twice() -> None:
    model = make([node("Relu", ["x"]), node("Neg", ["x"])], X, ["y"])
    assert "assigned twice" in _refused(model).message


@pytest.mark.parametrize("elem", [onnx.TensorProto.FLOAT16, onnx.TensorProto.INT32,
                                  onnx.TensorProto.STRING, onnx.TensorProto.BOOL])
def test_an_input_of_an_unsupported_dtype(elem: int) -> None:
    model = _relu()
    model.graph.input[0].type.tensor_type.elem_type = elem
    e = _refused(model)
    assert (e.node, e.field) == ("x", "graph.input[0].type.tensor_type.elem_type")
    assert onnx.TensorProto.DataType.Name(elem) in e.message


def test_a_constant_of_an_unsupported_dtype() -> None:
    model = make([node("Add", ["x", "h"])], X, ["y"],
                 initializers={"h": np.ones(3, np.float16)})
    e = _refused(model)
    assert (e.node, e.op_type) == ("y", "Add")
    assert "float16 is not supported" in e.message


def test_an_unsupported_op_names_the_node_its_op_type_and_opset() -> None:
    model = make([node("Relu", ["x"], ["r"]), node("Hardmax", ["r"], name="hm")], X, ["y"],
                 opset=17)
    e = _refused(model)
    assert (e.node, e.op_type, e.opset, e.field) == ("hm", "Hardmax", 17,
                                                     "graph.node[1].op_type")
    assert str(e).startswith("hm (Hardmax, opset 17): op 'Hardmax'")
    assert not e.limit  # what the model is, not its size


def test_an_op_of_another_domain() -> None:
    model = make([oh.make_node("FusedGemm", ["x"], ["y"], domain="com.microsoft")], X, ["y"])
    model.opset_import.append(oh.make_opsetid("com.microsoft", 1))
    e = _refused(model)
    assert (e.op_type, e.opset) == ("FusedGemm", 1)
    assert "domain 'com.microsoft'" in e.message


def test_an_attribute_the_importer_does_not_know_is_refused_not_ignored() -> None:
    model = make([node("Relu", ["x"], mystery=3)], X, ["y"])
    e = _refused(model)
    assert e.field == "graph.node[0].attribute.mystery"


def test_an_attribute_of_the_wrong_type() -> None:
    model = make([node("Softmax", ["x"], axis=1.5)], X, ["y"])
    assert _refused(model).field == "graph.node[0].attribute.axis"


@pytest.mark.parametrize("opset", [10, LATEST + 1])
def test_an_opset_outside_the_range(opset: int) -> None:
    e = _refused(_relu(opset))
    assert (e.field, e.opset) == ("opset_import", opset)


def test_an_op_newer_than_the_reviewed_opset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gradserve.importer.convert.REVIEWED_OPSET", 13)
    e = _refused(make([node("Relu", ["x"])], X, ["y"], opset=14))
    assert "Relu version 14 is newer" in e.message


@pytest.mark.parametrize(("limits", "field", "size"), [
    (Limits(max_nodes=2), "graph.node", True),
    (Limits(max_nodes=3), "graph.initializer", True),
    (Limits(max_elements=5), "graph.initializer[0]", True),
    (Limits(max_total_elements=1), "bytes", True),
    (Limits(max_rank=1), "graph.initializer[0]", True),
    (Limits(max_name_length=4), "graph.node[0].output", False),  # a bad name, as in a graph
])
def test_a_model_over_the_limits_is_refused_before_it_is_converted(
        limits: Limits, field: str, size: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused for its size (``limit``: a server answers RESOURCE_EXHAUSTED), before any node
    is converted."""
    model = make([node("Add", ["x", "w"], ["sum_1"]), node("Mul", ["sum_1", "v"], ["y2"]),
                  node("Neg", ["y2"], ["y3"])], {"x": In((2, 3))}, ["y3"],
                 initializers={"w": np.ones((2, 3)), "v": np.ones(3)})
    monkeypatch.setattr("gradserve.importer.convert._Conversion.run", _never)
    e = _refused(model, limits=limits)
    assert (e.field, e.limit) == (field, size)


def _never(self: object) -> None:
    raise AssertionError("converted a model over the limits")


def test_tensors_over_the_total_of_a_run() -> None:
    model = make([node("Add", ["x", "w"])], {"x": In((101,), np.float32)}, ["y"],
                 initializers={"w": np.ones(101, np.float32)}, output_dtype=np.float32)
    e = _refused(model, limits=Limits(max_total_elements=100))
    assert (e.field, e.message) == ("graph.initializer", "the model's tensors hold 101 "
                                    "elements; the limit is 100")
    assert e.limit


def test_an_input_over_the_limits() -> None:
    e = _refused(make([node("Relu", ["x"])], {"x": In(("N", 1000, 1000))}, ["y"]),
                 limits=Limits(max_elements=1000))
    assert (e.node, e.field, e.limit) == ("x", "graph.input[0]", True)


def test_an_array_made_at_import_over_the_limits() -> None:
    model = make([node("ConstantOfShape", ["s"], ["c"]), node("Add", ["x", "c"])],
                 {"x": In((1,), np.float32)}, ["y"], initializers={"s": ints(10 ** 6, 10 ** 6)},
                 output_dtype=np.float32)
    e = _refused(model)
    assert (e.op_type, e.field, e.limit) == ("ConstantOfShape", "graph.node[0].limits", True)


def test_tensors_stored_outside_the_model() -> None:
    model = make([node("Add", ["x", "w"])], X, ["y"], initializers={"w": np.ones(3)})
    w = model.graph.initializer[0]
    w.data_location = onnx.TensorProto.EXTERNAL
    w.ClearField("raw_data")
    w.external_data.add(key="location", value="w.bin")
    assert "outside the model" in _refused(model).message


def test_a_tensor_whose_data_does_not_fit_its_shape() -> None:
    model = make([node("Add", ["x", "w"])], X, ["y"], initializers={"w": np.ones(3)})
    model.graph.initializer[0].dims[0] = 4
    e = _refused(model)
    assert (e.node, e.field) == ("w", "graph.initializer[0]")


def test_inputs_must_name_initializers() -> None:
    model = make([node("Add", ["x", "w"])], X, ["y"], initializers={"w": np.ones(3)})
    assert _refused(model, inputs=["v"]).field == "inputs"
    assert _refused(model, inputs="w").field == "inputs"
    # a graph input is an input already: naming it says the caller misread the model
    assert _refused(model, inputs=["w", "x"]).message == "'x' is not an initializer of the model"
    assert import_model(model, inputs=["w"]).graph.inputs[1].name == "w"


def test_a_value_needed_at_import_that_depends_on_the_inputs() -> None:
    model = make([node("Reshape", ["x", "s"])], {"x": In((2, 3)), "s": In((2,), np.int64)},
                 ["y"])
    e = _refused(model)
    assert e.field == "graph.node[0].input[1]"
    assert "must be known when the model is imported" in e.message


def test_a_reshape_to_an_empty_tensor() -> None:
    model = make([node("Reshape", ["x", "s"], allowzero=1)], {"x": In((2, 3))}, ["y"],
                 initializers={"s": ints(0, 3)})
    assert "makes an empty tensor" in _refused(model).message
    model.graph.node[0].attribute.pop()  # without allowzero, 0 copies the input's dimension
    assert import_model(model).outputs[0].shape == (2, 3)


def test_a_symbolic_dimension_other_than_the_batch_axis() -> None:
    e = _refused(make([node("Relu", ["x"])], {"x": In(("N", "seq"))}, ["y"]))
    assert (e.node, e.field) == ("x", "graph.input[0].type.tensor_type.shape")
    e = _refused(make([node("Add", ["x", "z"])], {"x": In(("N", 3)), "z": In(("M", 3))}, ["y"]))
    assert "different symbolic dimensions" in e.message


def test_an_output_not_computed() -> None:
    model = make([node("MaxPool", ["x"], ["p", "i"], kernel_shape=[2]), node("Cast", ["i"], to=11)],
                 {"x": In(("N", 1, 4))}, ["y"])
    e = _refused(model)
    assert (e.op_type, e.field) == ("Cast", "graph.node[1].input[0]")
    assert "Indices output is not supported" in e.message


def test_training_modes_are_refused() -> None:
    dropout = make([node("Dropout", ["x", "r", "t"])], X, ["y"],
                   initializers={"r": np.array(0.5), "t": np.array(True)})
    assert "training mode" in _refused(dropout).message
    bn = make([node("BatchNormalization", ["x", "s", "b", "m", "v"], training_mode=1)],
              {"x": In(("N", 2))}, ["y"], initializers={k: np.ones(2) for k in "sbmv"})
    assert _refused(bn).field == "graph.node[0].attribute.training_mode"


def test_a_cast_the_engine_cannot_make() -> None:
    e = _refused(make([node("Cast", ["x"], to=1)], X, ["y"]))
    assert e.field == "graph.node[0].attribute.to"


def test_an_engine_refusal_names_the_onnx_node() -> None:
    model = make([node("MatMul", ["a", "b"], name="mm")], {"a": In((2, 3)), "b": In((4, 5))},
                 ["y"])
    e = _refused(model)
    assert (e.node, e.op_type) == ("mm", "MatMul")
    assert "the engine's matmul cannot take it" in e.message


_VALID = make([node("Gemm", ["x", "w", "b"], ["h"], transB=1), node("Relu", ["h"], ["r"]),
               node("Shape", ["r"], ["s"]), node("Reshape", ["r", "s"], ["y"])],
              {"x": In(("N", 3))}, ["y"],
              initializers={"w": np.ones((2, 3)), "b": np.zeros(2)}).SerializeToString()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), max_size=4),
       st.integers(0, len(_VALID)))
def test_no_mangled_model_raises_anything_but_a_model_error(
        edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_VALID[:cut] if cut < len(_VALID) // 2 else _VALID)
    for at, value in edits:
        if at < len(data):
            data[at] = value
    with contextlib.suppress(ModelError):
        import_model(bytes(data))
