"""The worked examples of the seed notes, reproduced exactly.

Expected numbers are derived by hand (or with ``math``/numpy following the notes' own code),
never taken from the engine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradserve.engine import Plan
from gradserve.engine.builder import GraphBuilder, Value

TIGHT = 1e-12


def approx(expected: float | list[float]) -> object:
    """``pytest.approx`` with the tight relative tolerance every seed example is held to."""
    return pytest.approx(expected, rel=TIGHT, abs=TIGHT)


# --- f(x) = 2x^2 - 3x + 4 (derivatives from first principles) ------------------------------------


def quadratic() -> tuple[Plan, str]:
    b = GraphBuilder()
    x = b.input("x")
    f = 2 * x**2 - 3 * x + 4
    return Plan(b.build(f)), f.name


@pytest.mark.parametrize(("x", "value", "slope"), [(2.0, 6.0, 5.0), (6.0, 58.0, 21.0),
                                                   (-2.0, 18.0, -11.0)])
def test_quadratic_value_and_slope(x: float, value: float, slope: float) -> None:
    # f(x) = 2x^2 - 3x + 4, f'(x) = 4x - 3
    plan, out = quadratic()
    result = plan.run({"x": x})
    assert float(result.outputs[out]) == approx(value)
    assert float(result.gradients["x"]) == approx(slope)
    assert not result.nonfinite


def test_quadratic_batched_matches_single_runs() -> None:
    plan, out = quadratic()
    result = plan.run({"x": np.array([2.0, 6.0, -2.0])}, batched=True)
    assert result.outputs[out].shape == (3,)
    assert result.outputs[out].tolist() == approx([6.0, 58.0, 18.0])
    assert result.gradients["x"].tolist() == approx([5.0, 21.0, -11.0])
    assert result.nonfinite.tolist() == [False, False, False]


def test_quadratic_slope_is_zero_at_vertex() -> None:
    plan, _ = quadratic()
    assert float(plan.run({"x": 0.75}).gradients["x"]) == approx(0.0)


# --- d = a*b + c and L = (a*b + c) * f ----------------------------------------------------------

ABCF = {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0}


def test_d_equals_ab_plus_c() -> None:
    b = GraphBuilder()
    a, bb, c = b.input("a"), b.input("b"), b.input("c")
    d = a * bb + c
    result = Plan(b.build(d)).run({k: ABCF[k] for k in "abc"})
    assert float(result.outputs[d.name]) == approx(2.0)
    # dd/da = b, dd/db = a, dd/dc = 1
    assert {k: float(v) for k, v in result.gradients.items()} == {"a": -2.0, "b": 3.0, "c": 1.0}


def test_L_with_operators() -> None:  # noqa: N802 - the notes' name
    b = GraphBuilder()
    a, bb, c, f = (b.input(n) for n in "abcf")
    loss = (a * bb + c) * f
    result = Plan(b.build(loss)).run(ABCF)
    assert float(result.outputs[loss.name]) == approx(-4.0)
    # dL/da = f*b = 4, dL/db = f*a = -6, dL/dc = f = -2, dL/df = a*b + c = 2
    grads = {k: float(v) for k, v in result.gradients.items()}
    assert grads == {"a": 4.0, "b": -6.0, "c": -2.0, "f": 2.0}


def test_L_named_intermediates() -> None:  # noqa: N802 - the notes' name
    b = GraphBuilder()
    a, bb, c, f = (b.input(n) for n in "abcf")
    d = b.op("mul", a, bb, name="d")
    e = b.op("add", d, c, name="e")
    loss = b.op("mul", e, f, name="L")
    result = Plan(b.build(loss)).run(ABCF, keep_intermediates=True)
    assert result.values is not None
    assert result.value_gradients is not None
    assert {k: float(v) for k, v in result.values.items()} == {
        "a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0, "d": -6.0, "e": 2.0, "L": -4.0,
    }
    vg = {k: float(v) for k, v in result.value_gradients.items()}
    assert vg["L"] == 1.0  # dL/dL
    assert vg["e"] == -2.0  # dL/de = f
    assert vg["d"] == -2.0  # dL/dd = dL/de * de/dd
    assert vg["f"] == 2.0  # dL/df = e
    assert vg["a"] == 4.0  # dL/dd * dd/da = -2 * b
    assert vg["b"] == -6.0
    assert vg["c"] == -2.0


# --- staged computation: f(x,y) = (x + sigmoid(y)) / (sigmoid(x) + (x+y)^2) ---------------------


def sigmoid(t: float) -> float:
    return 1 / (1 + math.exp(-t))


def staged_by_hand(x: float, y: float) -> tuple[float, float, float]:
    """The notes' forward and backward code, line by line: (f, dx, dy)."""
    sigy = 1.0 / (1 + math.exp(-y))  # (1)
    num = x + sigy  # (2)
    sigx = 1.0 / (1 + math.exp(-x))  # (3)
    xpy = x + y  # (4)
    xpysqr = xpy**2  # (5)
    den = sigx + xpysqr  # (6)
    invden = 1.0 / den  # (7)
    f = num * invden  # (8)
    dnum = invden  # (8)
    dinvden = num  # (8)
    dden = (-1.0 / (den**2)) * dinvden  # (7)
    dsigx = (1) * dden  # (6)
    dxpysqr = (1) * dden  # (6)
    dxpy = (2 * xpy) * dxpysqr  # (5)
    dx = (1) * dxpy  # (4)
    dy = (1) * dxpy  # (4)
    dx += ((1 - sigx) * sigx) * dsigx  # (3)
    dx += (1) * dnum  # (2)
    dsigy = (1) * dnum  # (2)
    dy += ((1 - sigy) * sigy) * dsigy  # (1)
    return f, dx, dy


def test_staged_computation() -> None:
    b = GraphBuilder()
    x, y = b.input("x"), b.input("y")
    f = (x + y.sigmoid()) / (x.sigmoid() + (x + y) ** 2)
    result = Plan(b.build(f)).run({"x": 3.0, "y": -4.0})
    value, dx, dy = staged_by_hand(3.0, -4.0)
    assert float(result.outputs[f.name]) == approx(value)
    assert float(result.gradients["x"]) == approx(dx)
    assert float(result.gradients["y"]) == approx(dy)
    # A sanity anchor independent of the staged code: f(3, -4) = (3 + s(-4)) / (s(3) + 1).
    assert value == pytest.approx((3 + sigmoid(-4)) / (sigmoid(3) + 1), rel=1e-15)


# --- the sigmoid neuron f(w, x) = 1 / (1 + exp(-(w0*x0 + w1*x1 + w2))) ---------------------------

W = (2.0, -3.0, -3.0)
X = (-1.0, -2.0)


def neuron(compose: bool) -> tuple[Plan, str]:
    b = GraphBuilder()
    w0, w1, w2 = (b.input(f"w{i}") for i in range(3))
    x0, x1 = (b.input(f"x{i}") for i in range(2))
    dot: Value = w0 * x0 + w1 * x1 + w2
    f = 1.0 / (1.0 + (-dot).exp()) if compose else dot.sigmoid()
    return Plan(b.build(f)), f.name


def neuron_feed() -> dict[str, float]:
    return {"w0": W[0], "w1": W[1], "w2": W[2], "x0": X[0], "x1": X[1]}


@pytest.mark.parametrize("compose", [False, True], ids=["sigmoid_op", "exp_div"])
def test_sigmoid_neuron(compose: bool) -> None:
    plan, out = neuron(compose)
    result = plan.run(neuron_feed())
    g = {k: float(v) for k, v in result.gradients.items()}
    value = float(result.outputs[out])
    # As printed in the cs231n notes (2 decimals). The notes' circuit shows +0.20 for w2:
    # df/dw2 = f(1-f) > 0.
    assert round(value, 2) == 0.73
    assert [round(g["x0"], 2), round(g["x1"], 2)] == [0.39, -0.59]
    assert [round(g["w0"], 2), round(g["w1"], 2), round(g["w2"], 2)] == [-0.2, -0.39, 0.2]
    # Exactly: dot = 2*-1 + -3*-2 - 3 = 1, f = sigmoid(1), ddot = f(1-f).
    f = 1 / (1 + math.exp(-1.0))
    ddot = (1 - f) * f
    assert value == approx(f)
    assert [g["x0"], g["x1"]] == approx([W[0] * ddot, W[1] * ddot])
    assert [g["w0"], g["w1"], g["w2"]] == approx([X[0] * ddot, X[1] * ddot, ddot])


def test_sigmoid_neuron_op_and_composition_agree() -> None:
    fused, out_f = neuron(compose=False)
    composed, out_c = neuron(compose=True)
    a, b = fused.run(neuron_feed()), composed.run(neuron_feed())
    assert float(a.outputs[out_f]) == approx(float(b.outputs[out_c]))
    for name in a.gradients:
        assert float(a.gradients[name]) == approx(float(b.gradients[name]))


# --- the matrix-multiply gradient: dW = dD @ X.T, dX = W.T @ dD ----------------------------------


def test_matmul_rule() -> None:
    rng = np.random.default_rng(231)
    w = rng.standard_normal((5, 10))
    x = rng.standard_normal((10, 3))
    b = GraphBuilder()
    d = b.input("W", (5, 10)) @ b.input("X", (10, 3))
    dd = rng.standard_normal((5, 3))
    result = Plan(b.build(d)).run({"W": w, "X": x}, upstream={d.name: dd})
    np.testing.assert_allclose(result.outputs[d.name], w.dot(x), rtol=TIGHT, atol=TIGHT)
    assert result.gradients["W"].shape == (5, 10)
    assert result.gradients["X"].shape == (10, 3)
    np.testing.assert_allclose(result.gradients["W"], dd.dot(x.T), rtol=TIGHT, atol=TIGHT)
    np.testing.assert_allclose(result.gradients["X"], w.T.dot(dd), rtol=TIGHT, atol=TIGHT)
