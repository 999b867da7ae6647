"""Expressions to graphs: the whitelist, statement forms, and the values they compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gradserve.client.expr import ExpressionError, parse_expression, parse_value
from gradserve.engine import Plan


def run(text: str, **values: float | list[float]) -> tuple[float, dict[str, float]]:
    shapes = {k: np.shape(v) for k, v in values.items()}
    result = Plan(parse_expression(text, shapes)).run(values)
    (out,) = result.outputs.values()
    return float(out), {k: float(np.sum(v)) for k, v in result.gradients.items()}


@pytest.mark.parametrize(("x", "value", "slope"), [(2, 6, 5), (6, 58, 21), (-2, 18, -11)])
def test_seed_polynomial(x: float, value: float, slope: float) -> None:
    assert run("2*x**2 - 3*x + 4", x=x) == (value, {"x": slope})


def test_statements_assignments_and_augmented_assignments() -> None:
    # c = a + b = 3; c += c + 1 -> c = 2(a + b) + 1 = 7; out = c * d = 21
    value, grads = run("c = a + b; c += c + 1; c*d", a=1.0, b=2.0, d=3.0)
    assert value == 21.0
    assert grads == {"a": 6.0, "b": 6.0, "d": 7.0}


def test_newlines_separate_statements_and_the_last_assignment_is_the_output() -> None:
    graph = parse_expression("d = a*b\ne = d + c\nL = e*f", {})
    assert graph.outputs == ("L",)
    assert [n.name for n in graph.nodes] == ["d", "e", "L"]
    result = Plan(graph).run({"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0})
    assert result.outputs["L"] == -4.0
    assert {k: float(v) for k, v in result.gradients.items()} == {"a": 4.0, "b": -6.0,
                                                                   "c": -2.0, "f": 2.0}


def test_calls_with_attributes_and_tensors() -> None:
    value, grads = run("sum(relu(x) * w, axis=[0]) + maximum(y, 0.5)", x=[1.0, -1.0, 2.0],
                       w=[1.0, 2.0, 3.0], y=0.5)
    assert value == 1.0 + 6.0 + 0.5
    assert grads == {"x": 1.0 + 3.0, "w": 3.0, "y": 0.5}  # relu'(-1) = 0; tie: half


@pytest.mark.parametrize("text", [
    '__import__("os")', "x.real", "lambda: 1", "import os", "x[0]", "foo(x)", "open('f')",
    "[x for x in y]", "x if y else z", "x < y", "f(**k)", "sum(x, axis=y)", "'text'", "",
])
def test_anything_outside_the_whitelist_is_refused(text: str) -> None:
    with pytest.raises(ExpressionError):
        parse_expression(text, {})


def test_values_from_the_command_line() -> None:
    assert parse_value("2").shape == ()
    np.testing.assert_array_equal(parse_value("[[1, 2], [3, 4]]"), [[1, 2], [3, 4]])
    with pytest.raises(ExpressionError):
        parse_value("__import__('os')")


@pytest.mark.parametrize("text", ["1e400*x", "x - 1e400", "1" + "0" * 400 + "*x"])
def test_a_number_too_large_for_float64_is_refused_in_an_expression(text: str) -> None:
    with pytest.raises(ExpressionError, match="too large"):
        parse_expression(text, {})


@pytest.mark.parametrize("text", ["1e400", "-1e400", "[1, 1e400]", "1" + "0" * 400,
                                  "[[1], [-1" + "0" * 400 + "]]"])
def test_a_number_too_large_for_float64_is_refused_as_a_value(text: str) -> None:
    with pytest.raises(ExpressionError, match="too large"):
        parse_value(text)


@pytest.mark.parametrize("text", [
    "(" * 300 + "x" + ")" * 300, "+".join(["x"] * 3000), "2*" + "-" * 50000 + "x",
    "2*" + "+" * 50000 + "x", "2*" + "-" * 3000 + "x", "**".join(["x"] * 3000),
    "2*" + "~" * 50000 + "x", "not " * 20000 + "x", "relu(" * 300 + "x" + ")" * 300,
])
def test_deep_nesting_in_an_expression_is_one_clear_error(text: str) -> None:
    with pytest.raises(ExpressionError, match=r"^the expression is nested too deeply$"):
        parse_expression(text, {})


@pytest.mark.parametrize("text", ["[" * 50000 + "1" + "]" * 50000, "(" * 300 + "1" + ")" * 300,
                                  "-" * 50000 + "1", "+" * 3000 + "1"])
def test_deep_nesting_in_a_value_is_one_clear_error(text: str) -> None:
    with pytest.raises(ExpressionError, match=r"^the value is nested too deeply$"):
        parse_value(text)


@pytest.mark.parametrize("content", ["text", "object array", "strings", "npz"])
def test_a_file_that_is_not_a_npy_array_of_numbers_is_refused_never_unpickled(
        tmp_path: Path, content: str) -> None:
    path = tmp_path / "value.npy"
    if content == "text":
        path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    elif content == "object array":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif content == "strings":
        np.save(path, np.array(["1", "2"]))
    else:
        with path.open("wb") as f:
            np.savez(f, x=np.ones(2))
    with pytest.raises(ExpressionError) as refused:
        parse_value(f"@{path}")
    assert str(refused.value) == f"not a .npy array of numbers: {str(path)!r}"
