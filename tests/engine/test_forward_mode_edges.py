"""Forward mode where a tangent moves only some operands: the tangent keeps the output's
shape (a broadcast operand's tangent is broadcast too), and pow's rule at b == 0 follows its
VJP for a base too small or not a number. Oracles: hand-derived values."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve.engine.builder import GraphBuilder
from gradserve.engine.derivatives import Kind, compute


@pytest.mark.parametrize("op", ["add", "sub"])
def test_a_broadcast_operand_alone_moving_counts_once_per_copy(op: str) -> None:
    g = GraphBuilder()
    a, b = g.input("a", (2, 3)), g.input("b", (3,))
    out = g.op("sum", g.op(op, a, b))
    feed = {"a": np.ones((2, 3)), "b": np.ones(3)}
    jvp = compute(g.build(out), Kind.JVP, feed, directions={"b": np.ones(3)}).jvp[out.name]
    assert float(jvp) == (6.0 if op == "add" else -6.0)  # 2 rows, 3 columns


def test_a_where_branch_alone_moving_and_its_hessian() -> None:
    g = GraphBuilder()
    c, a, b = g.input("c", (2, 3)), g.input("a", (2, 3)), g.input("b", (3,))
    y = g.op("where", c, a - b, b)
    out = g.op("sum", y * y)
    feed = {"c": np.array([[1.0, 0, 1], [0, 1, 0]]), "a": np.full((2, 3), 2.0), "b": np.ones(3)}
    graph = g.build(out)
    # each of b's entries appears in both rows (once as -b, once as b): d2/db2 = 2 * 2 = 4
    blocks = compute(graph, Kind.HESSIAN, feed, wrt=["b"]).blocks
    np.testing.assert_array_equal(blocks[("b", "b")], 4 * np.eye(3))


@pytest.mark.parametrize("base", [5e-324, np.nan])
def test_pow_at_exponent_zero_has_slope_zero_in_the_base(base: float) -> None:
    g = GraphBuilder()
    a, b = g.input("a"), g.input("b")
    out = g.op("pow", a, b)
    jvp = compute(g.build(out), Kind.JVP, {"a": base, "b": 0.0},
                  directions={"a": 1.0}).jvp[out.name]
    assert float(jvp) == 0.0  # as the VJP: d(a**b)/da is 0 where b == 0
