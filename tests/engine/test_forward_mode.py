"""Forward mode and second order: every op's JVP and HVP against finite differences, Hessians
by hand, symmetry, batched against looped, the dense kinds' limits and the ORDER refusal.

Each op of the table is drawn as tests/engine/test_ops.py draws it (float64, away from kinks
and ties; some operands as constants), and checked against oracles that are not the code under
test:

- its JVP along a random direction against central differences of the op's numpy reference;
- its Hessian-vector product (reverse mode over the forward-mode graph) against central
  differences of the first-order gradient (``Plan(graph).run(...).gradients``), and v . H v
  against second differences of upstream . reference along v (numpy alone);
- the dense Jacobian along the direction against the same differences, the dense Hessian
  symmetric and agreeing with the HVP;
- masks (comparisons, logic, a condition, a choice's selector) have tangents that are exactly 0;
- a stack of three examples gives what each example gives alone, for jvp and hvp.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from math import prod
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradserve.engine import OP_TABLE, DType, EngineError, ErrorKind, Graph, Plan
from gradserve.engine import derivatives as derivatives_module
from gradserve.engine.builder import GraphBuilder
from gradserve.engine.derivatives import Kind, compute, derive
from gradserve.engine.forward import jvp_graph
from gradserve.engine.validate import Limits
from tests.engine.test_ops import BY_NAME, Case, graph_for

Arr = Any
H = 1e-6  # central differences of the reference (first derivatives)
H_GRAD = 1e-5  # central differences of the gradient (second derivatives)
H2 = 1e-4  # second differences of the reference
DENSE_MAX = 40  # dense Jacobian/Hessian checks on draws with at most this many input elements

OPS = sorted(OP_TABLE)
MASKS = {"equal", "less", "less_equal", "greater", "greater_equal", "not", "and", "or"}
PER_OP = settings(max_examples=30, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def case_of(op: str) -> Case:
    case = BY_NAME.get(op)
    if case is None:
        pytest.fail(f"op {op!r} has no case in tests/engine/test_ops.py: add one there")
    return case


@dataclasses.dataclass
class Drawn:
    """One op's graph at a drawn point: which operands are fed (x0, x1, ...), which float
    inputs get tangents, which of those are selectors (their tangent must not count)."""

    case: Case
    operands: list[Arr]
    attrs: dict[str, Any]
    graph: Graph
    feed: dict[str, Arr]
    floats: list[str]  # float inputs: every one gets a direction
    selectors: set[str]  # float inputs the op does not differentiate (masks, conditions)

    def ref(self, moved: Mapping[str, Arr]) -> Arr:
        args = [moved.get(f"x{k}", x) for k, x in enumerate(self.operands)]
        return np.asarray(self.case.ref(self.attrs, *args), dtype=np.float64)

    def along(self, v: Mapping[str, Arr], eps: float) -> dict[str, Arr]:
        """The inputs moved by eps along v, selectors held (their direction does not count)."""
        return {k: x + eps * v[k] if k in v and k not in self.selectors else x
                for k, x in self.feed.items()}


def draw_case(op: str, data: st.DataObject) -> Drawn:
    case = case_of(op)
    operands, attrs = case.draw(data.draw)
    constant = [k > 0 and data.draw(st.booleans(), label=f"x{k} constant")
                for k in range(len(operands))]
    graph = graph_for(case, operands, attrs, constant)
    fed = {i.name for i in graph.inputs}
    feed = {f"x{k}": x for k, x in enumerate(operands) if f"x{k}" in fed}
    floats = [n for n, x in feed.items() if x.dtype == np.float64]
    selectors = {n for n in floats if int(n[1:]) in case.nondiff}
    return Drawn(case, operands, attrs, graph, feed, floats, selectors)


def scale_of(a: Arr) -> float:
    """The magnitude differences are measured against: an error of 1e-6 of the largest
    element is the differences' own (steep ops, such as a layer norm of nearly equal
    values, have large third derivatives)."""
    return 1.0 + float(np.max(np.abs(a), initial=0.0))


def random_like(rng: np.random.Generator, names: list[str], feed: Mapping[str, Arr]
                ) -> dict[str, Arr]:
    return {n: rng.standard_normal(np.shape(feed[n])) for n in names}


@pytest.mark.parametrize("op", OPS)
@PER_OP
@given(data=st.data())
def test_jvp_and_hvp_match_finite_differences(op: str, data: st.DataObject) -> None:
    d = draw_case(op, data)
    if not d.floats:  # an int-only mask: no input has a tangent
        return
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    v = random_like(rng, d.floats, d.feed)
    expected = d.ref({})

    # (a) JVP against central differences of the numpy reference
    answer = compute(d.graph, Kind.JVP, d.feed, directions=v)
    jvp = answer.jvp["y"]
    assert jvp.shape == expected.shape and jvp.dtype == np.float64
    np.testing.assert_allclose(answer.outputs["y"], expected, rtol=1e-12, atol=1e-12)
    numeric = (d.ref(d.along(v, H)) - d.ref(d.along(v, -H))) / (2 * H)
    np.testing.assert_allclose(jvp, numeric, rtol=1e-5, atol=1e-6 * scale_of(numeric),
                               err_msg="jvp")
    if op in MASKS or not set(d.floats) - d.selectors:
        np.testing.assert_array_equal(jvp, np.zeros_like(expected), err_msg="a mask's tangent")

    # (b) HVP against central differences of the reverse-mode gradient
    u = rng.standard_normal(expected.shape)
    hvp = compute(d.graph, Kind.HVP, d.feed, directions=v, upstream={"y": u}, wrt=d.floats).hvp
    assert set(hvp) == set(d.floats)
    plan = Plan(d.graph)

    def gradient(eps: float) -> dict[str, Arr]:
        return plan.run(d.along(v, eps), wrt=d.floats, upstream={"y": u}).gradients

    up, down = gradient(H_GRAD), gradient(-H_GRAD)
    for name in d.floats:
        assert hvp[name].shape == d.feed[name].shape, name
        numeric = (up.get(name, 0.0) - down.get(name, 0.0)) / (2 * H_GRAD)
        np.testing.assert_allclose(hvp[name], numeric, rtol=1e-4, atol=1e-6 * scale_of(numeric),
                                   err_msg=name)
        if name in d.selectors or op in MASKS:
            np.testing.assert_array_equal(hvp[name], 0.0, err_msg=f"selector {name}")
    # v . H v against second differences of u . reference along v: numpy alone
    vhv = sum(float(np.sum(v[n] * hvp[n])) for n in d.floats if n not in d.selectors)

    def s(eps: float) -> float:
        return float(np.sum(u * d.ref(d.along(v, eps))))

    second = (s(H2) - 2 * s(0.0) + s(-H2)) / H2**2
    assert vhv == pytest.approx(second, rel=1e-3, abs=1e-4 * (1 + abs(s(0.0))))

    # the dense Jacobian along v, and the dense Hessian: symmetric, H v as the HVP
    if sum(d.feed[n].size for n in d.floats) > DENSE_MAX:
        return
    jacobian = compute(d.graph, Kind.JACOBIAN, d.feed, wrt=d.floats).blocks
    along = np.zeros(expected.shape)
    for name in d.floats:
        block = jacobian[("y", name)]
        assert block.shape == (*expected.shape, *d.feed[name].shape), name
        if name in d.selectors:
            np.testing.assert_array_equal(block, 0.0, err_msg=f"selector {name}")
        along = along + np.tensordot(block, v[name], axes=v[name].ndim)
    np.testing.assert_allclose(along, jvp, rtol=1e-9, atol=1e-12, err_msg="J v")
    blocks = compute(d.graph, Kind.HESSIAN, d.feed, upstream={"y": u}, wrt=d.floats).blocks
    sizes = [d.feed[n].size for n in d.floats]
    full = np.block([[np.reshape(blocks[(r, c)], (d.feed[r].size, d.feed[c].size))
                      for c in d.floats] for r in d.floats])
    scale = 1.0 + float(np.max(np.abs(full), initial=0.0))
    np.testing.assert_allclose(full, full.T, rtol=0, atol=1e-9 * scale, err_msg="symmetry")
    flat_v = np.concatenate([v[n].ravel() for n in d.floats])
    flat_hvp = np.concatenate([hvp[n].ravel() for n in d.floats])
    np.testing.assert_allclose(full @ flat_v, flat_hvp, rtol=1e-9, atol=1e-10 * scale)
    assert full.shape == (sum(sizes), sum(sizes))


def scaled(data: st.DataObject, x: Arr) -> Arr:
    """Another example of x's shape: float values rescaled, signs kept (domains hold)."""
    if x.dtype != np.float64:
        return x
    return x * np.asarray(data.draw(hnp.arrays(np.float64, x.shape,
                                               elements=st.floats(0.5, 1.5))))


@pytest.mark.parametrize("op", OPS)
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_batched_equals_looped(op: str, data: st.DataObject) -> None:
    d = draw_case(op, data)
    if not d.floats:
        return
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    examples = [d.feed] + [{n: scaled(data, x) for n, x in d.feed.items()} for _ in range(2)]
    stacked = {n: np.stack([ex[n] for ex in examples]) for n in d.feed}
    v = {n: rng.standard_normal((3, *d.feed[n].shape)) for n in d.floats}
    out_shape = d.ref({}).shape
    u = rng.standard_normal((3, *out_shape))
    jvp = compute(d.graph, Kind.JVP, stacked, directions=v, batch=3)
    hvp = compute(d.graph, Kind.HVP, stacked, directions=v, upstream={"y": u}, wrt=d.floats,
                  batch=3)
    assert jvp.jvp["y"].shape == (3, *out_shape)
    for j, ex in enumerate(examples):
        vj = {n: a[j] for n, a in v.items()}
        alone = compute(d.graph, Kind.JVP, ex, directions=vj)
        np.testing.assert_allclose(jvp.outputs["y"][j], alone.outputs["y"], rtol=1e-12,
                                   atol=1e-12, err_msg=f"outputs, example {j}")
        np.testing.assert_allclose(jvp.jvp["y"][j], alone.jvp["y"], rtol=1e-10, atol=1e-12,
                                   err_msg=f"jvp, example {j}")
        hv = compute(d.graph, Kind.HVP, ex, directions=vj, upstream={"y": u[j]},
                     wrt=d.floats).hvp
        for name in d.floats:
            assert hvp.hvp[name].shape == (3, *d.feed[name].shape), name
            np.testing.assert_allclose(hvp.hvp[name][j], hv[name], rtol=1e-10, atol=1e-12,
                                       err_msg=f"hvp {name}, example {j}")


def test_every_op_has_a_forward_mode_rule() -> None:
    assert [name for name, op in OP_TABLE.items() if op.jvp is None] == []


# --- the seeds and other functions by hand -------------------------------------------------


def seeds() -> tuple[Graph, Graph, Graph]:
    g = GraphBuilder()
    x = g.input("x")
    quadratic = g.build(2 * x**2 - 3 * x + 4)
    g = GraphBuilder()
    a, b, c, f = (g.input(n) for n in "abcf")
    loss = g.build((a * b + c) * f)
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    staged = g.build((x + y.sigmoid()) / (x.sigmoid() + (x + y) ** 2))
    return quadratic, loss, staged


LOSS_POINT = {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0}


def loss_hessian(a: float, b: float, c: float, f: float) -> Arr:
    """The Hessian of L = (a*b + c) * f over (a, b, c, f), by hand."""
    return np.array([[0, f, 0, b], [f, 0, 0, a], [0, 0, 0, 1], [b, a, 1, 0]], dtype=float)


@pytest.mark.parametrize("x", [-2.0, 0.0, 2.0, 6.0, 1e3])
def test_the_quadratic(x: float) -> None:
    quadratic, _, _ = seeds()
    out = quadratic.outputs[0]
    assert compute(quadratic, Kind.HESSIAN, {"x": x}).blocks[("x", "x")] == 4.0  # f'' = 4
    jvp = compute(quadratic, Kind.JVP, {"x": x}, directions={"x": 1.0})
    assert float(jvp.jvp[out]) == pytest.approx(4 * x - 3, rel=1e-15)  # f' = 4x - 3
    assert float(jvp.outputs[out]) == pytest.approx(2 * x**2 - 3 * x + 4, rel=1e-15)
    hvp = compute(quadratic, Kind.HVP, {"x": x}, directions={"x": -2.5}).hvp
    assert float(hvp["x"]) == -10.0
    jacobian = compute(quadratic, Kind.JACOBIAN, {"x": x}).blocks[(out, "x")]
    assert float(jacobian) == pytest.approx(4 * x - 3, rel=1e-15)


def test_loss_l_hessian_hvp_jvp_and_jacobian() -> None:
    _, loss, _ = seeds()
    out = loss.outputs[0]
    want = loss_hessian(**LOSS_POINT)
    blocks = compute(loss, Kind.HESSIAN, LOSS_POINT).blocks
    assert set(blocks) == {(r, c) for r in "abcf" for c in "abcf"}
    got = np.array([[blocks[(r, col)] for col in "abcf"] for r in "abcf"])
    np.testing.assert_array_equal(got, want)
    v = {"a": 1.0, "b": 2.0, "c": 0.5, "f": -1.0}
    hvp = compute(loss, Kind.HVP, LOSS_POINT, directions=v).hvp
    np.testing.assert_array_equal([float(hvp[n]) for n in "abcf"], want @ list(v.values()))
    # an upstream scales the Hessian of upstream . L
    hvp = compute(loss, Kind.HVP, LOSS_POINT, directions=v, upstream={out: -3.0}).hvp
    np.testing.assert_array_equal([float(hvp[n]) for n in "abcf"],
                                  -3.0 * want @ list(v.values()))
    a, b, c, f = LOSS_POINT.values()
    grad = np.array([b * f, a * f, f, a * b + c])
    jvp = compute(loss, Kind.JVP, LOSS_POINT, directions=v).jvp[out]
    assert float(jvp) == float(grad @ list(v.values()))
    jvp = compute(loss, Kind.JVP, LOSS_POINT, directions={"c": 1.0}).jvp[out]  # a, b, f held
    assert float(jvp) == f
    jacobian = compute(loss, Kind.JACOBIAN, LOSS_POINT).blocks
    np.testing.assert_array_equal([float(jacobian[(out, n)]) for n in "abcf"], grad)
    # a differentiated subset: the Hessian over it alone
    blocks = compute(loss, Kind.HESSIAN, LOSS_POINT, wrt=["f", "a"]).blocks
    assert set(blocks) == {("f", "f"), ("f", "a"), ("a", "f"), ("a", "a")}
    assert float(blocks[("a", "f")]) == b and float(blocks[("f", "a")]) == b
    assert float(blocks[("a", "a")]) == 0.0 and float(blocks[("f", "f")]) == 0.0


def sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


def staged_value(x: float, y: float) -> float:
    return (x + sigmoid(y)) / (sigmoid(x) + (x + y) ** 2)


def staged_gradient(x: float, y: float) -> tuple[float, float]:
    """By hand: f = N / D, N = x + s(y), D = s(x) + (x + y)^2, s' = s (1 - s)."""
    n, d = x + sigmoid(y), sigmoid(x) + (x + y) ** 2
    dn_dx, dn_dy = 1.0, sigmoid(y) * (1 - sigmoid(y))
    dd_dx, dd_dy = sigmoid(x) * (1 - sigmoid(x)) + 2 * (x + y), 2 * (x + y)
    return (dn_dx * d - n * dd_dx) / d**2, (dn_dy * d - n * dd_dy) / d**2


def test_the_staged_sigmoid_hessian_against_nested_differences() -> None:
    _, _, staged = seeds()
    out = staged.outputs[0]
    x, y = 3.0, -4.0
    h = 1e-4  # nested central differences of the function (plain math, not the engine)
    f = staged_value
    nested = np.array([
        [(f(x + h, y) - 2 * f(x, y) + f(x - h, y)) / h**2,
         (f(x + h, y + h) - f(x + h, y - h) - f(x - h, y + h) + f(x - h, y - h)) / (4 * h * h)],
        [0.0, (f(x, y + h) - 2 * f(x, y) + f(x, y - h)) / h**2]])
    nested[1, 0] = nested[0, 1]
    k = 1e-6  # central differences of the hand-written gradient: more digits
    gx = [(staged_gradient(x + k, y)[i] - staged_gradient(x - k, y)[i]) / (2 * k)
          for i in range(2)]
    gy = [(staged_gradient(x, y + k)[i] - staged_gradient(x, y - k)[i]) / (2 * k)
          for i in range(2)]
    from_gradient = np.array([gx, gy])
    np.testing.assert_allclose(from_gradient, nested, rtol=1e-4, atol=1e-7)
    blocks = compute(staged, Kind.HESSIAN, {"x": x, "y": y}).blocks
    got = np.array([[float(blocks[(r, c)]) for c in "xy"] for r in "xy"])
    np.testing.assert_allclose(got, from_gradient, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(got, nested, rtol=1e-4, atol=1e-7)
    assert got[0, 1] == pytest.approx(got[1, 0], rel=1e-14)
    v = np.array([0.3, -1.7])
    hvp = compute(staged, Kind.HVP, {"x": x, "y": y}, directions={"x": v[0], "y": v[1]}).hvp
    np.testing.assert_allclose([float(hvp["x"]), float(hvp["y"])], from_gradient @ v,
                               rtol=1e-7, atol=1e-10)
    jvp = compute(staged, Kind.JVP, {"x": x, "y": y}, directions={"x": v[0], "y": v[1]})
    assert float(jvp.jvp[out]) == pytest.approx(float(np.dot(staged_gradient(x, y), v)),
                                                rel=1e-12)
    assert float(jvp.outputs[out]) == pytest.approx(f(x, y), rel=1e-14)


def test_hessian_of_upstream_dot_several_outputs() -> None:
    """p = a*b and q = a**2 with upstream (2, 3): H = 2 [[0,1],[1,0]] + 3 [[2,0],[0,0]]."""
    g = GraphBuilder()
    a, b = g.input("a"), g.input("b")
    p, q = a * b, a**2
    graph = g.build(p, q)
    point = {"a": 1.5, "b": -0.5}
    blocks = compute(graph, Kind.HESSIAN, point, upstream={p.name: 2.0, q.name: 3.0}).blocks
    got = np.array([[float(blocks[(r, c)]) for c in "ab"] for r in "ab"])
    np.testing.assert_array_equal(got, [[6.0, 2.0], [2.0, 0.0]])
    hvp = compute(graph, Kind.HVP, point, directions={"a": 1.0, "b": 1.0}).hvp  # upstream 1s
    assert (float(hvp["a"]), float(hvp["b"])) == (3.0, 1.0)  # [[2,1],[1,0]] @ (1, 1)
    jvp = compute(graph, Kind.JVP, point, directions={"a": 1.0}).jvp
    assert (float(jvp[p.name]), float(jvp[q.name])) == (-0.5, 3.0)


def vector_function() -> tuple[Graph, dict[str, str], dict[str, Arr]]:
    """y = W @ x, z = sin(x) * 2, s = sum(x * x): hand-written Jacobians below."""
    g = GraphBuilder()
    x, w = g.input("x", (3,)), g.input("w", (2, 3))
    y = w @ x
    z = g.op("sin", x) * 2.0
    s = (x * x).sum()
    rng = np.random.default_rng(7)
    point = {"x": rng.standard_normal(3), "w": rng.standard_normal((2, 3))}
    return g.build(y, z, s), {"y": y.name, "z": z.name, "s": s.name}, point


def hand_jacobian(x: Arr, w: Arr) -> dict[tuple[str, str], Arr]:
    dy_dw = np.zeros((2, 2, 3))
    for i in range(2):
        dy_dw[i, i, :] = x
    return {("y", "x"): w, ("y", "w"): dy_dw,
            ("z", "x"): np.diag(2 * np.cos(x)), ("z", "w"): np.zeros((3, 2, 3)),
            ("s", "x"): 2 * x, ("s", "w"): np.zeros((2, 3))}


def test_a_jacobian_by_hand() -> None:
    graph, names, point = vector_function()
    answer = compute(graph, Kind.JACOBIAN, point)
    want = hand_jacobian(**point)
    assert set(answer.blocks) == {(names[o], i) for o, i in want}
    for (o, i), block in want.items():
        got = answer.blocks[(names[o], i)]
        assert got.shape == block.shape, (o, i)
        np.testing.assert_allclose(got, block, rtol=1e-14, atol=1e-15, err_msg=f"{o} {i}")
    np.testing.assert_allclose(answer.outputs[names["y"]], point["w"] @ point["x"], rtol=1e-15)
    np.testing.assert_allclose(answer.outputs[names["s"]], point["x"] @ point["x"], rtol=1e-15)
    # softmax: diag(s) - s s^T
    g = GraphBuilder()
    x = g.input("x", (3,))
    y = g.op("softmax", x)
    x0 = np.array([0.5, -1.0, 2.0])
    answer = compute(g.build(y), Kind.JACOBIAN, {"x": x0})
    s = np.exp(x0) / np.exp(x0).sum()
    np.testing.assert_allclose(answer.blocks[(y.name, "x")], np.diag(s) - np.outer(s, s),
                               atol=1e-15)
    np.testing.assert_allclose(answer.outputs[y.name], s, atol=1e-15)


def test_a_batched_jacobian_puts_the_batch_axis_first() -> None:
    graph, names, _ = vector_function()
    rng = np.random.default_rng(8)
    xs, ws = rng.standard_normal((2, 3)), rng.standard_normal((2, 2, 3))
    answer = compute(graph, Kind.JACOBIAN, {"x": xs, "w": ws}, batch=2)
    for j in range(2):
        for (o, i), block in hand_jacobian(xs[j], ws[j]).items():
            got = answer.blocks[(names[o], i)]
            assert got.shape == (2, *block.shape), (o, i)
            np.testing.assert_allclose(got[j], block, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(answer.outputs[names["y"]][j], ws[j] @ xs[j], rtol=1e-15)


def test_a_batched_hessian_by_hand() -> None:
    _, loss, _ = seeds()
    points = [LOSS_POINT, {"a": 1.0, "b": 0.5, "c": -1.0, "f": 4.0},
              {"a": -2.0, "b": 3.0, "c": 0.0, "f": 0.25}]
    stacked = {n: np.array([p[n] for p in points]) for n in "abcf"}
    blocks = compute(loss, Kind.HESSIAN, stacked, batch=3).blocks
    for j, p in enumerate(points):
        want = loss_hessian(**p)
        got = np.array([[blocks[(r, c)][j] for c in "abcf"] for r in "abcf"])
        np.testing.assert_array_equal(got, want, err_msg=f"example {j}")
    v = {n: np.array([1.0, -1.0, 2.0]) for n in "abcf"}
    hvp = compute(loss, Kind.HVP, stacked, directions=v, batch=3).hvp
    for j, p in enumerate(points):
        want = loss_hessian(**p) @ np.full(4, v["a"][j])
        np.testing.assert_array_equal([hvp[n][j] for n in "abcf"], want)


def mlp() -> tuple[Graph, dict[str, Arr]]:
    rng = np.random.default_rng(1)
    g = GraphBuilder()
    x, w1, w2 = g.input("x", (4,)), g.input("w1", (4, 3)), g.input("w2", (3, 2))
    out = g.op("logsumexp", ((x @ w1).tanh() @ w2).sigmoid())
    return g.build(out), {"x": rng.standard_normal(4), "w1": rng.standard_normal((4, 3)),
                          "w2": rng.standard_normal((3, 2))}


def test_a_hessian_is_symmetric_and_matches_its_hvps() -> None:
    graph, feed = mlp()
    names = ["x", "w1", "w2"]
    blocks = compute(graph, Kind.HESSIAN, feed).blocks
    for r in names:
        for c in names:
            assert blocks[(r, c)].shape == (*feed[r].shape, *feed[c].shape), (r, c)
    sizes = [feed[n].size for n in names]
    full = np.block([[np.reshape(blocks[(r, c)], (feed[r].size, feed[c].size)) for c in names]
                     for r in names])
    assert full.shape == (sum(sizes), sum(sizes))
    np.testing.assert_allclose(full, full.T, atol=1e-12)
    rng = np.random.default_rng(2)
    v = {n: rng.standard_normal(feed[n].shape) for n in names}
    hvp = compute(graph, Kind.HVP, feed, directions=v).hvp
    flat_v = np.concatenate([v[n].ravel() for n in names])
    flat_hvp = np.concatenate([hvp[n].ravel() for n in names])
    np.testing.assert_allclose(full @ flat_v, flat_hvp, rtol=1e-10, atol=1e-12)
    # and each column against central differences of the reverse-mode gradient
    plan = Plan(graph)
    h = 1e-5
    flat = np.concatenate([feed[n].ravel() for n in names])

    def gradient(at: Arr) -> Arr:
        parts, start = {}, 0
        for n, size in zip(names, sizes, strict=True):
            parts[n] = at[start:start + size].reshape(feed[n].shape)
            start += size
        g = plan.run(parts).gradients
        return np.concatenate([g[n].ravel() for n in names])

    for k in range(flat.size):
        e = np.zeros_like(flat)
        e[k] = h
        column = (gradient(flat + e) - gradient(flat - e)) / (2 * h)
        np.testing.assert_allclose(full[:, k], column, rtol=1e-5, atol=1e-8, err_msg=str(k))


def test_an_input_the_outputs_ignore_has_zero_second_derivatives() -> None:
    g = GraphBuilder()
    x = g.input("x", (2,))
    g.input("unused", (3,))
    graph = g.build((x * x).sum())
    point = {"x": np.array([1.0, -2.0]), "unused": np.ones(3)}
    hvp = compute(graph, Kind.HVP, point, directions={"x": np.ones(2), "unused": np.ones(3)}
                  ).hvp
    np.testing.assert_array_equal(hvp["x"], [2.0, 2.0])
    np.testing.assert_array_equal(hvp["unused"], np.zeros(3))
    blocks = compute(graph, Kind.HESSIAN, point).blocks
    np.testing.assert_array_equal(blocks[("x", "x")], 2 * np.eye(2))
    np.testing.assert_array_equal(blocks[("unused", "unused")], np.zeros((3, 3)))
    np.testing.assert_array_equal(blocks[("x", "unused")], np.zeros((2, 3)))
    jvp = compute(graph, Kind.JVP, point, directions={"unused": np.ones(3)}).jvp
    np.testing.assert_array_equal(jvp[graph.outputs[0]], 0.0)


@pytest.mark.parametrize("kind", list(Kind))
def test_batched_equals_looped_for_every_kind(kind: Kind) -> None:
    graph, feed = mlp()
    rng = np.random.default_rng(3)
    batch = {n: np.stack([a + 0.1 * k for k in range(3)]) for n, a in feed.items()}
    given = {n: rng.standard_normal((3, *a.shape)) for n, a in feed.items()}
    together = compute(graph, kind, batch, directions=given, batch=3)
    checked = 0
    for k in range(3):
        alone = compute(graph, kind, {n: a[k] for n, a in batch.items()},
                        directions={n: a[k] for n, a in given.items()})
        for field in ("outputs", "jvp", "hvp", "blocks"):
            for key, value in getattr(alone, field).items():
                np.testing.assert_allclose(getattr(together, field)[key][k], value,
                                           rtol=1e-12, atol=1e-14, err_msg=f"{field} {key}")
                checked += 1
    assert checked > 0


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [Kind.HESSIAN, Kind.JACOBIAN])
def test_dense_kinds_past_the_limit_are_refused_before_computing(
        kind: Kind, monkeypatch: pytest.MonkeyPatch) -> None:
    g = GraphBuilder()
    x = g.input("x", (30,))
    graph = g.build((x * x) * 0.5)  # about 100 elements alone; 30 passes of 30 elements dense
    feed = {"x": np.linspace(-1.0, 1.0, 30)}
    ran: list[Graph] = []

    class Watched(Plan):
        def __init__(self, g: Graph, *args: Any, **kwargs: Any) -> None:
            ran.append(g)
            super().__init__(g, *args, **kwargs)

    monkeypatch.setattr(derivatives_module, "Plan", Watched)
    with pytest.raises(EngineError) as caught:
        compute(graph, kind, feed, limits=Limits(max_total_elements=300))
    assert caught.value.kind is ErrorKind.LIMIT and str(kind) in caught.value.message
    assert ran == []  # refused before any plan was compiled or run
    blocks = compute(graph, kind, feed).blocks  # under the default limit: computed
    assert len(ran) == 1
    if kind is Kind.JACOBIAN:
        np.testing.assert_array_equal(blocks[(graph.outputs[0], "x")], np.diag(feed["x"]))
    else:  # the Hessian of sum(x * x / 2)
        np.testing.assert_array_equal(blocks[("x", "x")], np.eye(30))


def test_the_dense_limit_counts_every_direction_of_every_example() -> None:
    """A Hessian over n input elements takes n passes per example, each of n elements."""
    g = GraphBuilder()
    x = g.input("x", (10,))
    graph = g.build((x * x).sum())
    derived = derive(graph, Kind.HESSIAN, ["x"])
    one = {"x": np.ones(10)}
    derived.feed(one, {}, {}, None, 10 * 10)  # 10 passes of 10 elements: within
    with pytest.raises(EngineError) as caught:
        derived.feed(one, {}, {}, None, 10 * 10 - 1)
    assert caught.value.kind is ErrorKind.LIMIT
    three = {"x": np.ones((3, 10))}
    derived.feed(three, {}, {}, 3, 3 * 10 * 10)
    with pytest.raises(EngineError) as caught:
        derived.feed(three, {}, {}, 3, 3 * 10 * 10 - 1)
    assert caught.value.kind is ErrorKind.LIMIT


def patched_without_rule(monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    table = dict(OP_TABLE)
    table[op] = dataclasses.replace(OP_TABLE[op], jvp=None)
    monkeypatch.setattr("gradserve.engine.forward.OP_TABLE", table)


@pytest.mark.parametrize("kind", [Kind.JVP, Kind.HVP, Kind.HESSIAN])
def test_an_op_without_a_rule_is_refused_naming_it(kind: Kind,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    patched_without_rule(monkeypatch, "tanh")
    graph, feed = mlp()
    with pytest.raises(EngineError) as caught:
        compute(graph, kind, feed, directions={n: np.ones_like(a) for n, a in feed.items()})
    assert caught.value.kind is ErrorKind.ORDER and "'tanh'" in caught.value.message
    assert caught.value.node is not None
    assert next(n for n in graph.nodes if n.name == caught.value.node).op == "tanh"
    # the gradient (first order, reverse mode) needs no forward-mode rule
    assert set(Plan(graph).run(feed).gradients) == {"x", "w1", "w2"}
    # the dense Jacobian is reverse mode too
    compute(graph, Kind.JACOBIAN, feed)


def test_a_rule_is_needed_only_on_the_path_of_a_tangent(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    patched_without_rule(monkeypatch, "tanh")
    graph, feed = mlp()  # tanh(x @ w1) does not depend on w2
    v = np.random.default_rng(4).standard_normal(feed["w2"].shape)
    jvp = compute(graph, Kind.JVP, feed, directions={"w2": v}).jvp[graph.outputs[0]]
    plan = Plan(graph)

    def value(eps: float) -> float:
        return float(plan.run({**feed, "w2": feed["w2"] + eps * v}, wrt=[]).outputs[
            graph.outputs[0]])

    assert float(jvp) == pytest.approx((value(H) - value(-H)) / (2 * H), rel=1e-6)


def test_a_tangent_for_an_unknown_or_integer_input_is_refused() -> None:
    g = GraphBuilder()
    x = g.input("x", (3,))
    k = g.input("k", (), DType.INT64)
    graph = g.build(g.op("gather", x, k))
    with pytest.raises(EngineError) as caught:
        jvp_graph(graph, ["nope"])
    assert caught.value.kind is ErrorKind.UNKNOWN_NAME
    with pytest.raises(EngineError) as caught:
        jvp_graph(graph, ["k"])
    assert caught.value.kind is ErrorKind.DTYPE
    answer = compute(graph, Kind.JVP, {"x": np.array([1.0, 2.0, 3.0]), "k": np.array(2)},
                     directions={"x": np.array([0.5, -1.0, 4.0])})
    assert float(answer.jvp[graph.outputs[0]]) == 4.0


def test_an_hvp_missing_a_vector_is_an_engine_error() -> None:
    """Every differentiated input needs a vector: one left out is refused as the engine
    refuses a bad feed (EngineError naming it), not with a bare KeyError."""
    _, loss, _ = seeds()
    with pytest.raises(EngineError) as caught:
        compute(loss, Kind.HVP, LOSS_POINT, directions={"a": 1.0, "c": 1.0, "f": 1.0})
    assert "'b'" in caught.value.message or caught.value.node == "b"


def test_the_forward_graph_names_its_tangents() -> None:
    _, loss, _ = seeds()
    forward = jvp_graph(loss, ["a", "f"])
    assert set(forward.tangent_inputs) == {"a", "f"}
    assert set(forward.tangent_outputs) == set(loss.outputs)
    assert forward.graph.outputs[:len(loss.outputs)] == loss.outputs
    fed = {**LOSS_POINT, forward.tangent_inputs["a"]: 1.0, forward.tangent_inputs["f"]: 0.0}
    result = Plan(forward.graph).run(fed, wrt=[])
    out = loss.outputs[0]
    assert float(result.outputs[forward.tangent_outputs[out]]) == LOSS_POINT["b"] * LOSS_POINT[
        "f"]
    assert prod(np.shape(result.outputs[out])) == 1
