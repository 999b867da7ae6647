"""``gradserve grad --onnx`` and ``gradserve inspect`` on a model file, through a live server
and in-process.

The model is y = tanh(x W + b) with a dynamic batch N, written here with onnx.helper, so
every answer has a hand-derived oracle: dy/dx = (g * (1 - y**2)) W^T for an upstream g (ones
by default), dy/db = g * (1 - y**2) per example.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gradserve.cli.main import main
from gradserve.server.app import GradServer

W = np.array([[0.5, -1.0], [0.25, 0.75], [-0.5, 0.125]])
B = np.array([0.1, -0.2])
X = np.array([[1.0, 2.0, -1.0], [0.5, -0.25, 2.0]])


def write_model(path: Path, op: str = "Tanh") -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["z"]),
         helper.make_node(op, ["z"], ["y"], name="squash")],
        "tanh_layer",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 2])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def expected(g: Any = 1.0) -> tuple[Any, Any, Any]:
    y = np.tanh(X @ W + B)
    local = g * (1 - y**2)
    return y, local @ W.T, local


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    np.save(tmp_path / "x.npy", X)
    return write_model(tmp_path / "layer.onnx"), tmp_path / "x.npy"


@pytest.mark.parametrize("where", ["server", "local"])
def test_grad_onnx_gives_outputs_and_input_gradients(
        server: GradServer, capsys: pytest.CaptureFixture[str], files: tuple[Path, Path],
        where: str) -> None:
    model, x = files
    at = ["--target", server.target] if where == "server" else ["--local"]
    code, out, err = run(capsys, "grad", "--onnx", str(model), f"x=@{x}", "--json", *at)
    assert code == 0, err
    result = json.loads(out)
    y, dx, _ = expected()
    assert list(result["gradients"]) == ["x"]  # the weights stay constants
    np.testing.assert_allclose(result["outputs"]["y"], y, rtol=1e-12)
    np.testing.assert_allclose(result["gradients"]["x"], dx, rtol=1e-12)


def test_grad_onnx_initializer_wrt_and_upstream(server: GradServer,
                                                capsys: pytest.CaptureFixture[str],
                                                files: tuple[Path, Path], tmp_path: Path) -> None:
    model, x = files
    g = np.array([[2.0, -1.0], [0.5, 3.0]])
    np.save(tmp_path / "g.npy", g)
    code, out, err = run(capsys, "grad", "--onnx", str(model), f"x=@{x}", "--initializer", "b",
                         "--wrt", "b", "--upstream", f"y=@{tmp_path / 'g.npy'}", "--json",
                         "--target", server.target)
    assert code == 0, err
    result = json.loads(out)
    _, _, db = expected(g)
    assert list(result["gradients"]) == ["b"]  # only what --wrt names
    # b fed at the model's own value, once per example: its gradient is per example
    np.testing.assert_allclose(result["gradients"]["b"], db, rtol=1e-12)


def test_grad_onnx_draws_the_imported_graph(capsys: pytest.CaptureFixture[str],
                                            files: tuple[Path, Path], tmp_path: Path) -> None:
    model, x = files
    target = tmp_path / "model.svg"
    code, _, err = run(capsys, "grad", "--onnx", str(model), f"x=@{x}", "--local",
                       "--dot", str(target))
    assert code == 0, err
    text = target.read_text()
    assert "matmul" in text and "tanh" in text


def test_grad_onnx_refusals_exit_1_naming_the_problem(
        capsys: pytest.CaptureFixture[str], files: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = files
    code, _, err = run(capsys, "grad", "--onnx", str(model), "x=[1,2,3]", "--local")
    assert code == 1 and "'x' has shape [3]" in err and "[N, 3]" in err
    bad = write_model(tmp_path / "bad.onnx", op="Celu")
    code, _, err = run(capsys, "grad", "--onnx", str(bad), "x=[[1,2,3]]", "--local")
    assert code == 1 and "squash (Celu, opset 18)" in err and "not supported" in err
    code, _, err = run(capsys, "grad", "2*x", "x=1", "--initializer", "b", "--local")
    assert code == 1 and "--initializer goes with --onnx" in err


def test_inspect_lists_the_model_and_says_it_imports(capsys: pytest.CaptureFixture[str],
                                                     files: tuple[Path, Path]) -> None:
    model, _ = files
    code, out, _ = run(capsys, "inspect", str(model))
    assert code == 0
    assert "x: float64 ['N', 3]" in out and "y: float64 ['N', 2]" in out
    assert "initializers: 2 (8 weights)" in out
    assert "ops: Add x1, MatMul x1, Tanh x1" in out
    assert "imports as" in out and "batch axis" in out
    code, out, _ = run(capsys, "inspect", str(model), "--json", "--initializer", "W")
    found = json.loads(out)
    assert code == 0 and found["refusal"] is None and found["batched"] is True
    assert [i["name"] for i in found["inputs"]] == ["x", "W"]  # W made an input
    assert found["ops"] == {"Add": 1, "MatMul": 1, "Tanh": 1} and found["unsupported"] == []


def test_inspect_says_what_would_be_refused(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    bad = write_model(tmp_path / "bad.onnx", op="Celu")
    code, out, _ = run(capsys, "inspect", str(bad))
    assert code == 1
    assert "Celu x1 (unsupported)" in out
    assert "refused: squash (Celu, opset 18): op 'Celu'" in out
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model")
    code, _, err = run(capsys, "inspect", str(tmp_path / "junk.onnx"))
    assert code == 1 and "not an ONNX model" in err
