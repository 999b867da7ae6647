"""Forward mode and second order: every op's JVP and HVP against finite differences, Hessians
by hand, symmetry, batched against looped, the dense kinds' limits and the ORDER refusal.

Each op is drawn as tests/engine/test_ops.py draws it (float64, away from kinks and ties): its
JVP along a random direction must match central differences of the op's numpy reference (an
oracle independent of the engine), and its Hessian-vector product (reverse mode over the
forward-mode graph) central differences of the first-order gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradserve.engine import OP_TABLE, EngineError, ErrorKind, Graph, Plan
from gradserve.engine.builder import GraphBuilder
from gradserve.engine.derivatives import Kind, compute
from gradserve.engine.validate import Limits
from tests.engine.test_ops import BY_NAME, graph_for

Arr = Any
H = 1e-6


def directions(operands: list[Arr], nondiff: tuple[int, ...], rng: np.random.Generator
               ) -> dict[str, Arr]:
    return {f"x{k}": rng.standard_normal(x.shape) for k, x in enumerate(operands)
            if k not in nondiff and x.dtype == np.float64}


@pytest.mark.parametrize("op", sorted(BY_NAME))
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_jvp_and_hvp_match_finite_differences(op: str, data: st.DataObject) -> None:
    case = BY_NAME[op]
    operands, attrs = case.draw(data.draw)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    graph = graph_for(case, operands, attrs)
    feed = {f"x{k}": x for k, x in enumerate(operands)}
    v = directions(operands, case.nondiff, rng)
    if not v:
        return

    def ref(eps: float) -> Arr:
        moved = [x + eps * v[f"x{k}"] if f"x{k}" in v else x for k, x in enumerate(operands)]
        return np.asarray(case.ref(attrs, *moved), dtype=np.float64)

    jvp = compute(graph, Kind.JVP, feed, directions=v).jvp["y"]
    np.testing.assert_allclose(jvp, (ref(H) - ref(-H)) / (2 * H), rtol=1e-5, atol=1e-6)

    u = rng.standard_normal(np.shape(ref(0.0)))
    plan = Plan(graph)

    def gradient(eps: float) -> dict[str, Arr]:
        moved = {k: x + eps * v[k] if k in v else x for k, x in feed.items()}
        return plan.run(moved, wrt=list(v), upstream={"y": u}).gradients

    hvp = compute(graph, Kind.HVP, feed, directions=v, upstream={"y": u}, wrt=list(v)).hvp
    up, down = gradient(1e-5), gradient(-1e-5)
    for name in v:
        numeric = (up.get(name, 0.0) - down.get(name, 0.0)) / 2e-5
        np.testing.assert_allclose(hvp[name], numeric, rtol=1e-4, atol=1e-6, err_msg=name)


def test_every_op_has_a_forward_mode_rule() -> None:
    assert [name for name, op in OP_TABLE.items() if op.jvp is None] == []


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


def test_the_seeds_hessians_by_hand() -> None:
    quadratic, loss, staged = seeds()
    for x in (-2.0, 0.0, 2.0, 6.0):  # f'' = 4 everywhere, f' = 4x - 3
        answer = compute(quadratic, Kind.HESSIAN, {"x": x})
        assert answer.blocks[("x", "x")] == pytest.approx(4.0, abs=1e-12)
        assert compute(quadratic, Kind.JVP, {"x": x}, directions={"x": 1.0}).jvp[
            quadratic.outputs[0]] == pytest.approx(4 * x - 3)
    a, b, c, f = 3.0, -2.0, 8.0, -2.0
    want = np.array([[0, f, 0, b], [f, 0, 0, a], [0, 0, 0, 1], [b, a, 1, 0]])
    blocks = compute(loss, Kind.HESSIAN, {"a": a, "b": b, "c": c, "f": f}).blocks
    got = np.array([[blocks[(r, col)] for col in "abcf"] for r in "abcf"])
    np.testing.assert_array_equal(got, want)
    # the staged expression: nested central differences of the function itself
    fn = Plan(staged)
    point = {"x": 3.0, "y": -4.0}

    def value(x: float, y: float) -> float:
        return float(fn.run({"x": x, "y": y}, wrt=[]).outputs[staged.outputs[0]])

    h = 1e-4
    numeric = {
        ("x", "x"): (value(3 + h, -4) - 2 * value(3, -4) + value(3 - h, -4)) / h**2,
        ("y", "y"): (value(3, -4 + h) - 2 * value(3, -4) + value(3, -4 - h)) / h**2,
        ("x", "y"): (value(3 + h, -4 + h) - value(3 + h, -4 - h) - value(3 - h, -4 + h)
                     + value(3 - h, -4 - h)) / (4 * h * h),
    }
    blocks = compute(staged, Kind.HESSIAN, point).blocks
    for key, want_value in numeric.items():
        assert float(blocks[key]) == pytest.approx(want_value, rel=1e-5, abs=1e-7), key
    assert float(blocks[("x", "y")]) == pytest.approx(float(blocks[("y", "x")]), rel=1e-14)


def mlp() -> tuple[Graph, dict[str, Arr]]:
    rng = np.random.default_rng(1)
    g = GraphBuilder()
    x, w1, w2 = g.input("x", (4,)), g.input("w1", (4, 3)), g.input("w2", (3, 2))
    out = g.op("logsumexp", ((x @ w1).tanh() @ w2).sigmoid())
    return g.build(out), {"x": rng.standard_normal(4), "w1": rng.standard_normal((4, 3)),
                          "w2": rng.standard_normal((3, 2))}


def test_a_hessian_is_symmetric_and_matches_its_hvps() -> None:
    graph, feed = mlp()
    blocks = compute(graph, Kind.HESSIAN, feed).blocks
    names = ["x", "w1", "w2"]
    sizes = [feed[n].size for n in names]
    full = np.block([[np.reshape(blocks[(r, c)], (feed[r].size, feed[c].size)) for c in names]
                     for r in names])
    np.testing.assert_allclose(full, full.T, atol=1e-12)
    v = {n: np.random.default_rng(2).standard_normal(feed[n].shape) for n in names}
    hvp = compute(graph, Kind.HVP, feed, directions=v).hvp
    flat_v = np.concatenate([v[n].ravel() for n in names])
    flat_hvp = np.concatenate([hvp[n].ravel() for n in names])
    np.testing.assert_allclose(full @ flat_v, flat_hvp, rtol=1e-10, atol=1e-12)
    assert full.shape == (sum(sizes), sum(sizes))


def test_a_jacobian_by_hand() -> None:
    g = GraphBuilder()
    x = g.input("x", (3,))
    y = g.op("softmax", x)
    x0 = np.array([0.5, -1.0, 2.0])
    answer = compute(g.build(y), Kind.JACOBIAN, {"x": x0})
    s = np.exp(x0) / np.exp(x0).sum()
    np.testing.assert_allclose(answer.blocks[(y.name, "x")], np.diag(s) - np.outer(s, s),
                               atol=1e-15)
    np.testing.assert_allclose(answer.outputs[y.name], s, atol=1e-15)


@pytest.mark.parametrize("kind", list(Kind))
def test_batched_equals_looped(kind: Kind) -> None:
    graph, feed = mlp()
    rng = np.random.default_rng(3)
    batch = {n: np.stack([a + 0.1 * k for k in range(3)]) for n, a in feed.items()}
    given = {n: rng.standard_normal((3, *a.shape)) for n, a in feed.items()}
    together = compute(graph, kind, batch, directions=given, batch=3)
    for k in range(3):
        alone = compute(graph, kind, {n: a[k] for n, a in batch.items()},
                        directions={n: a[k] for n, a in given.items()})
        for field in ("outputs", "jvp", "hvp", "blocks"):
            for key, value in getattr(alone, field).items():
                np.testing.assert_allclose(getattr(together, field)[key][k], value,
                                           rtol=1e-12, atol=1e-14, err_msg=f"{field} {key}")


def test_dense_kinds_past_the_limit_are_refused_before_computing() -> None:
    graph, feed = mlp()
    with pytest.raises(EngineError) as caught:
        compute(graph, Kind.HESSIAN, feed, limits=Limits(max_total_elements=100))
    assert caught.value.kind is ErrorKind.LIMIT


def test_an_op_without_a_rule_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    table = dict(OP_TABLE)
    table["tanh"] = dataclasses.replace(OP_TABLE["tanh"], jvp=None)
    monkeypatch.setattr("gradserve.engine.forward.OP_TABLE", table)
    graph, feed = mlp()
    with pytest.raises(EngineError) as caught:
        compute(graph, Kind.HVP, feed, directions={n: np.ones_like(a) for n, a in feed.items()})
    assert caught.value.kind is ErrorKind.ORDER and "'tanh'" in caught.value.message
