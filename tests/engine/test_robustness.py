"""Hostile or careless callers: bad values of every kind give EngineError, never another
exception; limits refuse work before memory is allocated; results never alias anything."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gradserve.engine import (
    Constant,
    DType,
    EngineError,
    ErrorKind,
    Graph,
    Input,
    Limits,
    Node,
    Plan,
    gradcheck,
)
from gradserve.engine.builder import GraphBuilder


def neg_graph(**input_fields: Any) -> Graph:
    return Graph((Input("x", **input_fields),), (Node("y", "neg", ("x",)),), ("y",))


def all_result_arrays(r: Any) -> list[np.ndarray[Any, Any]]:
    return [*r.outputs.values(), *r.gradients.values()]


def test_results_never_share_memory_with_each_other() -> None:
    g = GraphBuilder()
    x = g.input("x", (2, 3))
    h = x.exp()
    r = h.reshape(6)  # a view of h, listed before it
    b = g.input("b", (6,))
    y = (x.reshape(6) + b).exp().sum()
    plan = Plan(g.build(r, h, y))
    result = plan.run({"x": np.ones((2, 3)), "b": np.zeros(6)})
    arrays = all_result_arrays(result)
    for i, a in enumerate(arrays):
        assert a.flags.writeable
        for other in arrays[i + 1:]:
            assert not np.shares_memory(a, other)


def test_constants_are_copied_at_compile_time() -> None:
    values = np.array([1.0, 2.0, 3.0])
    graph = Graph((Input("x", (3,)),), (Node("y", "mul", ("x", "c")),), ("y",),
                  (Constant("c", values),))
    plan = Plan(graph)
    values[:] = 100.0
    np.testing.assert_array_equal(plan.run({"x": np.ones(3)}).outputs["y"], [1.0, 2.0, 3.0])


def test_a_batch_too_large_for_memory_is_refused_before_allocating() -> None:
    g = GraphBuilder()
    x = g.input("x", (1,))
    y = g.op("broadcast_to", x, shape=(1 << 20,)).exp().sum()
    plan = Plan(g.build(y))
    with pytest.raises(EngineError) as info:
        plan.run({"x": np.ones((1 << 10, 1))}, batched=True)
    assert info.value.kind is ErrorKind.LIMIT


def test_a_graph_holding_too_much_in_total_is_refused_at_compile_time() -> None:
    g = GraphBuilder()
    v = g.op("broadcast_to", g.input("x"), shape=(1 << 20,))
    for _ in range(8):
        v = v.exp()
    with pytest.raises(EngineError) as info:
        Plan(g.build(v.sum()), Limits(max_total_elements=1 << 22))
    assert info.value.kind is ErrorKind.LIMIT


@pytest.mark.parametrize(("graph", "kind", "field"), [
    (lambda: neg_graph(shape=(True, 3)), ErrorKind.SHAPE, "shape"),
    (lambda: Graph((), (Node("y", "neg", ("c",)),), ("y",), (Constant("c", 1.0),)),  # type: ignore[arg-type]
     ErrorKind.DTYPE, "value"),
    (lambda: Graph((Input("x"),), (Node("y", ["neg"], ("x",)),), ("y",)),  # type: ignore[arg-type]
     ErrorKind.UNKNOWN_OP, "op"),
    (lambda: Graph((Input("x"),), (Node("y", "neg", ("x",), None),), ("y",)),  # type: ignore[arg-type]
     ErrorKind.ATTRIBUTE, "attrs"),
    (lambda: Graph((Input("x"), Input("y")), (Node("z", "add", "xy"),), ("z",)),  # type: ignore[arg-type]
     ErrorKind.UNKNOWN_NAME, "inputs"),
])
def test_malformed_graphs_raise_engine_errors(graph: Any, kind: ErrorKind, field: str) -> None:
    with pytest.raises(EngineError) as info:
        Plan(graph())
    assert info.value.kind is kind
    assert info.value.field == field


def test_ragged_batched_feed_is_a_feed_error() -> None:
    plan = Plan(neg_graph(shape=(2,)))
    with pytest.raises(EngineError) as info:
        plan.run({"x": [[1.0, 2.0], [3.0]]}, batched=True)
    assert info.value.kind is ErrorKind.FEED


def test_missing_first_input_in_a_batched_run_says_missing() -> None:
    graph = Graph((Input("x"), Input("w")), (Node("y", "mul", ("x", "w")),), ("y",))
    with pytest.raises(EngineError) as info:
        Plan(graph).run({"w": [1.0]}, batched=True)
    assert "missing" in info.value.message and info.value.node == "x"


def test_numpy_scalar_of_the_wrong_dtype_is_refused() -> None:
    plan = Plan(neg_graph(dtype=DType.FLOAT32))
    with pytest.raises(EngineError) as info:
        plan.run({"x": np.float64(1e300)})
    assert info.value.kind is ErrorKind.DTYPE


def test_wrt_given_as_a_string_is_refused() -> None:
    graph = Graph((Input("x"), Input("z")), (Node("y", "mul", ("x", "z")),), ("y",))
    with pytest.raises(EngineError) as info:
        Plan(graph).run({"x": 1.0, "z": 2.0}, wrt="xz")
    assert info.value.field == "wrt"


def test_gradcheck_names_an_unknown_input() -> None:
    with pytest.raises(EngineError) as info:
        gradcheck(neg_graph(), {"x": 1.0, "nope": 2.0})
    assert info.value.kind is ErrorKind.FEED and info.value.node == "nope"


def test_a_run_over_its_time_limit_stops_with_a_limit_error() -> None:
    g = GraphBuilder()
    v = g.input("x", (64, 64))
    for _ in range(200):
        v = (v @ v).tanh()
    plan = Plan(g.build(v.sum()))
    feed = {"x": np.eye(64) / 8}
    with pytest.raises(EngineError) as info:
        plan.run(feed, time_limit=1e-6)
    assert info.value.kind is ErrorKind.LIMIT and info.value.field == "time"
    assert np.isfinite(plan.run(feed, time_limit=600).outputs[plan.outputs[0]])


def test_gradcheck_honours_a_time_limit() -> None:
    g = GraphBuilder()
    x = g.input("x", (8,))
    with pytest.raises(EngineError) as info:
        gradcheck(g.build((x * x).sum()), {"x": np.ones(8)}, time_limit=1e-9)
    assert info.value.kind is ErrorKind.LIMIT
