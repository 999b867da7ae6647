"""The run API: feeding, choosing what to differentiate, upstream gradients, batching, results.

Expected values come from closed forms written here (or numpy formulas), never from the engine.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from gradserve.engine import (
    Constant,
    DType,
    EngineError,
    ErrorKind,
    Feed,
    Graph,
    Input,
    Limits,
    Node,
    Plan,
    Result,
    gradcheck,
    structural_key,
)
from gradserve.engine.builder import GraphBuilder, Value


def run_error(plan: Plan, inputs: Mapping[str, Any], **kw: Any) -> EngineError:
    with pytest.raises(EngineError) as info:
        plan.run(inputs, **kw)
    return info.value


def scale_plan(shape: tuple[int, ...] = (3,), dtype: DType = DType.FLOAT64) -> tuple[Plan, str]:
    """y = x * w + z: dy/dx = w, dy/dw = x, dy/dz = 1 (each summed over broadcasting)."""
    b = GraphBuilder()
    y = b.input("x", shape, dtype) * b.input("w", shape, dtype) + b.input("z", (), dtype)
    return Plan(b.build(y)), y.name


X3 = np.array([1.0, -2.0, 0.5])
W3 = np.array([3.0, 4.0, -1.5])
FEED3 = {"x": X3, "w": W3, "z": 0.25}


# --- feeding -----------------------------------------------------------------------------------


def test_missing_input() -> None:
    plan, _ = scale_plan()
    err = run_error(plan, {"x": X3, "w": W3})
    assert err.kind is ErrorKind.FEED
    assert err.node == "z"


def test_unknown_input() -> None:
    plan, out = scale_plan()
    err = run_error(plan, {**FEED3, "q": 1.0})
    assert err.kind is ErrorKind.FEED
    assert err.node == "q"
    # A node's name is not an input either.
    err = run_error(plan, {**FEED3, out: X3})
    assert err.kind is ErrorKind.FEED
    assert err.node == out


@pytest.mark.parametrize("value", [np.ones(4), np.ones((3, 1)), 1.0, [1.0, 2.0]],
                         ids=["too_long", "extra_axis", "scalar", "short_list"])
def test_wrong_shape(value: Any) -> None:
    plan, _ = scale_plan()
    err = run_error(plan, {**FEED3, "x": value})
    assert err.kind is ErrorKind.SHAPE
    assert err.node == "x"
    assert err.field == "shape"


@pytest.mark.parametrize("value", [X3.astype(np.float32), X3.astype(np.int64), X3 > 0],
                         ids=["float32_array", "int64_array", "bool_array"])
def test_numpy_array_of_another_dtype_is_refused(value: Any) -> None:
    plan, _ = scale_plan()
    err = run_error(plan, {**FEED3, "x": value})
    assert err.kind is ErrorKind.DTYPE
    assert err.node == "x"
    assert err.field == "dtype"


def test_python_float_into_int64_input_is_refused() -> None:
    b = GraphBuilder()
    lg = b.input("logits", (3,))
    loss = b.op("softmax_cross_entropy", lg, b.input("label", (), DType.INT64))
    err = run_error(Plan(b.build(loss)), {"logits": [0.0, 0.0, 0.0], "label": 1.5})
    assert err.kind is ErrorKind.DTYPE
    assert err.node == "label"


def test_python_lists_and_floats_are_accepted() -> None:
    plan, out = scale_plan()
    result = plan.run({"x": [1, -2, 0.5], "w": [3.0, 4.0, -1.5], "z": 0.25})
    assert result.outputs[out].dtype == np.float64
    assert result.outputs[out].tolist() == [3.25, -7.75, -0.5]
    assert result.gradients["x"].tolist() == [3.0, 4.0, -1.5]
    assert result.gradients["w"].tolist() == [1.0, -2.0, 0.5]
    assert float(result.gradients["z"]) == 3.0  # broadcast over 3 elements


def test_python_float_into_float32_input() -> None:
    plan, out = scale_plan((), DType.FLOAT32)
    result = plan.run({"x": 1.5, "w": 2.0, "z": 0.5})
    assert result.outputs[out].dtype == np.float32
    assert float(result.outputs[out]) == 3.5


# --- wrt ---------------------------------------------------------------------------------------


def test_wrt_subset() -> None:
    plan, _ = scale_plan()
    result = plan.run(FEED3, wrt=["w"])
    assert set(result.gradients) == {"w"}
    np.testing.assert_array_equal(result.gradients["w"], X3)
    assert plan.run(FEED3, wrt=()).gradients == {}


def test_wrt_naming_a_node_or_unknown_name() -> None:
    plan, out = scale_plan()
    for name in (out, "nope"):
        err = run_error(plan, FEED3, wrt=[name])
        assert err.kind is ErrorKind.FEED
        assert err.node == name
        assert err.field == "wrt"


def test_wrt_int64_input() -> None:
    b = GraphBuilder()
    loss = b.op("softmax_cross_entropy", b.input("logits", (2, 3)),
                b.input("labels", (2,), DType.INT64))
    plan = Plan(b.build(loss))
    feed = {"logits": np.zeros((2, 3)), "labels": np.array([0, 2])}
    err = run_error(plan, feed, wrt=["labels"])
    assert err.kind is ErrorKind.DTYPE
    assert err.node == "labels"
    assert err.field == "wrt"
    # By default the int64 input is not differentiated; uniform logits give softmax 1/3 each.
    grads = plan.run(feed).gradients
    assert set(grads) == {"logits"}
    expected = (np.full((2, 3), 1 / 3) - np.array([[1, 0, 0], [0, 0, 1]])) / 2  # mean over 2 rows
    np.testing.assert_allclose(grads["logits"], expected, rtol=1e-12)


def test_default_wrt_follows_requires_grad() -> None:
    b = GraphBuilder()
    x = b.input("x")
    frozen = b.input("frozen", requires_grad=False)
    y = x * frozen
    plan = Plan(b.build(y))
    result = plan.run({"x": 2.0, "frozen": 5.0})
    assert set(result.gradients) == {"x"}
    assert float(result.gradients["x"]) == 5.0
    # ... but it can still be asked for explicitly.
    assert float(plan.run({"x": 2.0, "frozen": 5.0}, wrt=["frozen"]).gradients["frozen"]) == 2.0


def test_an_input_no_output_depends_on_gets_no_gradient() -> None:
    """An input no output depends on (unused, or used by a dead node only) gets no entry, as
    PyTorch's autograd gives None for it, even when ``wrt`` names it."""
    b = GraphBuilder()
    x = b.input("x")
    b.input("unused", (2, 3))
    b.input("dead").exp()  # a node no output depends on
    y = x * 2.0
    plan = Plan(b.build(y))
    feed = {"x": 1.0, "unused": np.ones((2, 3)), "dead": 0.0}
    result = plan.run(feed)
    assert list(result.gradients) == ["x"]
    assert float(result.gradients["x"]) == 2.0
    assert plan.run(feed, wrt=["unused", "dead"]).gradients == {}
    batched = plan.run({"x": [1.0, 2.0], "unused": np.ones((2, 2, 3)), "dead": [0.0, 1.0]},
                       batched=True)
    assert list(batched.gradients) == ["x"]


def test_a_where_condition_gets_no_gradient() -> None:
    """A float condition, requiring a gradient by default, gets none (PyTorch's conditions are
    bools, which have none); a value that is a condition and a branch gets the branch's."""
    b = GraphBuilder()
    c, x = b.input("c", (3,)), b.input("x", (3,))
    y = b.op("where", c, x * 2.0, x)
    z = b.op("where", x, x, 0.0)  # x is its own condition
    plan = Plan(b.build(y, z))
    feed = {"c": np.array([1.0, 0.0, 2.0]), "x": np.array([1.0, 0.0, 3.0])}
    result = plan.run(feed)
    assert list(result.gradients) == ["x"]
    np.testing.assert_array_equal(result.gradients["x"], [2.0 + 1.0, 1.0 + 0.0, 2.0 + 1.0])
    assert plan.run(feed, wrt=["c"]).gradients == {}
    batched = plan.run({k: np.stack([v, -v]) for k, v in feed.items()}, batched=True)
    assert list(batched.gradients) == ["x"]


# --- upstream gradients (vector-Jacobian products) ---------------------------------------------


def test_upstream_scales_gradients() -> None:
    plan, out = scale_plan()
    u = np.array([2.0, -1.0, 10.0])
    result = plan.run(FEED3, upstream={out: u})
    np.testing.assert_array_equal(result.gradients["x"], u * W3)
    np.testing.assert_array_equal(result.gradients["w"], u * X3)
    assert float(result.gradients["z"]) == 11.0
    # The output itself is unchanged by the upstream gradient.
    np.testing.assert_array_equal(result.outputs[out], X3 * W3 + 0.25)


def test_upstream_as_list() -> None:
    plan, out = scale_plan()
    result = plan.run(FEED3, upstream={out: [1, 0, 0]})
    np.testing.assert_array_equal(result.gradients["x"], [3.0, 0.0, 0.0])


def test_wrong_upstream_shape() -> None:
    plan, out = scale_plan()
    err = run_error(plan, FEED3, upstream={out: np.ones(4)})
    assert err.kind is ErrorKind.SHAPE
    assert err.node == out
    assert err.field == "upstream"


def test_wrong_upstream_dtype() -> None:
    plan, out = scale_plan()
    err = run_error(plan, FEED3, upstream={out: np.ones(3, np.float32)})
    assert err.kind is ErrorKind.DTYPE
    assert err.node == out


def test_upstream_for_a_non_output_is_refused() -> None:
    plan, _ = scale_plan()
    err = run_error(plan, FEED3, upstream={"typo": [5.0, 5.0, 5.0]})
    assert err.kind is ErrorKind.FEED
    assert err.node == "typo"


def test_batched_upstream() -> None:
    plan, out = scale_plan()
    xs = np.stack([X3, 2 * X3])
    ws = np.stack([W3, -W3])
    u = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    result = plan.run({"x": xs, "w": ws, "z": [0.0, 1.0]}, upstream={out: u}, batched=True)
    np.testing.assert_array_equal(result.gradients["x"], u * ws)
    np.testing.assert_array_equal(result.gradients["z"], [6.0, 1.0])


def test_stacked_feeds_give_each_example_its_own_answer() -> None:
    # y = x * w + z; dy/dx = u * w, dy/dw = u * x, dy/dz = sum(u), with u the upstream gradient
    # (ones when not given). One unbatched feed, one batch of two with an upstream gradient.
    plan, out = scale_plan()
    u = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    feeds = [plan.prepare(FEED3),
             plan.prepare({"x": [X3, 2 * X3], "w": [W3, -W3], "z": [0.0, 1.0]},
                          upstream={out: u}, batched=True)]
    stacked = Feed.stack(feeds)
    assert stacked.batch == 3
    result = stacked.run()
    np.testing.assert_array_equal(result.outputs[out],
                                  [X3 * W3 + 0.25, X3 * W3, -2 * X3 * W3 + 1.0])
    np.testing.assert_array_equal(result.gradients["x"], [W3, u[0] * W3, -u[1] * W3])
    np.testing.assert_array_equal(result.gradients["w"], [X3, u[0] * X3, 2 * u[1] * X3])
    np.testing.assert_array_equal(result.gradients["z"], [3.0, 6.0, 1.0])


def test_stacking_past_the_element_limit_is_refused() -> None:
    b = GraphBuilder()
    graph = b.build(b.input("x", (4,)) * 2.0)
    plan = Plan(graph, Limits(max_total_elements=Plan(graph).total_elements * 10))
    feed = plan.prepare({"x": np.ones((6, 4))}, batched=True)  # 6 examples fit, 12 do not
    with pytest.raises(EngineError) as info:
        Feed.stack([feed, feed])
    assert info.value.kind is ErrorKind.LIMIT


# --- graph shapes: outputs that are inputs, shared subgraphs, fan-out, long chains -------------


def test_output_that_is_an_input() -> None:
    graph = Graph((Input("x", (2,)),), (), ("x",))
    x = np.array([1.5, -2.0])
    result = Plan(graph).run({"x": x}, upstream={"x": [3.0, 4.0]})
    np.testing.assert_array_equal(result.outputs["x"], x)
    np.testing.assert_array_equal(result.gradients["x"], [3.0, 4.0])
    assert not np.shares_memory(result.outputs["x"], x)


def test_output_that_is_an_input_and_feeds_another_output() -> None:
    b = GraphBuilder()
    x = b.input("x")
    y = x * x
    result = Plan(b.build(x, y)).run({"x": 3.0})
    assert float(result.outputs["x"]) == 3.0
    assert float(result.outputs[y.name]) == 9.0
    assert float(result.gradients["x"]) == 1.0 + 6.0  # d/dx (x + x^2)


def test_two_outputs_share_a_subgraph() -> None:
    b = GraphBuilder()
    x = b.input("x")
    s = x * x
    y1 = s + 1.0
    y2 = s * 3.0
    result = Plan(b.build(y1, y2)).run({"x": 1.5}, upstream={y1.name: 2.0, y2.name: -1.0})
    assert float(result.outputs[y1.name]) == 3.25
    assert float(result.outputs[y2.name]) == 6.75
    assert float(result.gradients["x"]) == 2.0 * 2 * 1.5 - 1.0 * 6 * 1.5


def test_fan_out_accumulates() -> None:
    b = GraphBuilder()
    a = b.input("a")
    bb = a + a
    c = bb + bb
    result = Plan(b.build(c)).run({"a": 1.7}, keep_intermediates=True)
    assert float(result.outputs[c.name]) == pytest.approx(6.8, rel=1e-15)
    assert float(result.gradients["a"]) == 4.0
    assert result.value_gradients is not None
    assert float(result.value_gradients[bb.name]) == 2.0


def test_same_value_twice_in_one_op() -> None:
    b = GraphBuilder()
    x = b.input("x")
    y = x * x * x
    assert float(Plan(b.build(y)).run({"x": -2.0}).gradients["x"]) == 12.0


def test_hundred_thousand_node_chain() -> None:
    """y_{k+1} = y_k * c + d, 50,000 times (100,000 nodes): y = c^n x + d (c^n - 1)/(c - 1)."""
    n, c, d, x = 50_000, 1.0000001, 0.001, 2.0
    nodes: list[Node] = []
    prev = "x"
    for k in range(n):
        nodes.append(Node(f"m{k}", "mul", (prev, "c")))
        nodes.append(Node(f"a{k}", "add", (f"m{k}", "d")))
        prev = f"a{k}"
    graph = Graph((Input("x"),), tuple(nodes), (prev,), (Constant("c", np.array(c)),
                  Constant("d", np.array(d))))
    result = Plan(graph).run({"x": x})
    cn = c**n
    assert float(result.outputs[prev]) == pytest.approx(cn * x + d * (cn - 1) / (c - 1), rel=1e-9)
    assert float(result.gradients["x"]) == pytest.approx(cn, rel=1e-9)
    assert cn == pytest.approx(math.exp(0.005), rel=1e-6)  # the chain really compounds


# --- dtypes and non-finite values --------------------------------------------------------------


def test_float32_end_to_end() -> None:
    b = GraphBuilder()
    x = b.input("x", (2, 3), DType.FLOAT32)
    w = b.input("w", (3,), DType.FLOAT32)
    y = (x @ w).sigmoid().sum()
    rng = np.random.default_rng(0)
    xv = rng.standard_normal((2, 3)).astype(np.float32)
    wv = rng.standard_normal(3).astype(np.float32)
    result = Plan(b.build(y)).run({"x": xv, "w": wv}, keep_intermediates=True)
    assert result.values is not None
    assert result.value_gradients is not None
    arrays = [*result.outputs.values(), *result.gradients.values(), *result.values.values(),
              *result.value_gradients.values()]
    assert {a.dtype for a in arrays} == {np.dtype(np.float32)}
    x64, w64 = xv.astype(np.float64), wv.astype(np.float64)
    s = 1 / (1 + np.exp(-(x64 @ w64)))
    np.testing.assert_allclose(result.outputs[y.name], s.sum(), rtol=1e-5)
    np.testing.assert_allclose(result.gradients["x"], np.outer(s * (1 - s), w64), rtol=1e-5)
    np.testing.assert_allclose(result.gradients["w"], (s * (1 - s)) @ x64, rtol=1e-5)


@pytest.mark.parametrize("batched", [False, True])
def test_float32_arithmetic_is_done_in_float32(batched: bool) -> None:
    # In float32, 1e-8 + 1 rounds to 1, so (x + 1) - 1 is exactly 0; in float64 it is not.
    b = GraphBuilder()
    x = b.input("x", dtype=DType.FLOAT32)
    y = (x + 1.0) - 1.0
    feed = np.full(2, 1e-8, np.float32) if batched else np.float32(1e-8)
    result = Plan(b.build(y)).run({"x": feed}, batched=batched)
    assert result.outputs[y.name].dtype == np.float32
    assert not result.outputs[y.name].any()


def test_nonfinite_flag() -> None:
    b = GraphBuilder()
    y = b.input("x").log()
    plan = Plan(b.build(y))
    bad = plan.run({"x": 0.0})
    assert bool(bad.nonfinite) is True
    assert float(bad.outputs[y.name]) == -math.inf
    good = plan.run({"x": math.e})
    assert bool(good.nonfinite) is False
    assert float(good.outputs[y.name]) == pytest.approx(1.0, rel=1e-15)
    assert float(good.gradients["x"]) == pytest.approx(1 / math.e, rel=1e-15)


def test_nonfinite_flag_from_gradient_only() -> None:
    b = GraphBuilder()
    y = b.input("x").sqrt()  # sqrt(0) = 0 is finite; its slope is not
    result = Plan(b.build(y)).run({"x": 0.0})
    assert float(result.outputs[y.name]) == 0.0
    assert bool(result.nonfinite) is True
    assert bool(Plan(b.build(y)).run({"x": 0.0}, wrt=()).nonfinite) is False


def test_nonfinite_flag_per_example() -> None:
    b = GraphBuilder()
    y = b.input("x").log()
    result = Plan(b.build(y)).run({"x": [1.0, 0.0, 2.0, -1.0]}, batched=True)
    assert result.nonfinite.tolist() == [False, True, False, True]
    np.testing.assert_allclose(result.gradients["x"][[0, 2, 3]], [1.0, 0.5, -1.0])


def test_parts_of_a_batched_result_keep_their_own_flags() -> None:
    # log(x): x = 0 gives -inf and x < 0 NaN; d/dx log(x) = 1/x
    b = GraphBuilder()
    y = b.input("x").log()
    result = Plan(b.build(y)).run({"x": [1.0, 0.0, 2.0, -1.0]}, batched=True)
    one = result.part(2)
    assert one.batch is None and bool(one.nonfinite) is False
    assert float(one.outputs[y.name]) == math.log(2.0)
    assert float(one.gradients["x"]) == 0.5
    run = result.part(slice(1, 3))
    assert run.batch == 2 and run.nonfinite.tolist() == [True, False]
    np.testing.assert_array_equal(run.gradients["x"], [np.inf, 0.5])
    assert [bool(r.nonfinite) for r in result.split()] == [False, True, False, True]


def test_nonfinite_flag_counts_kept_intermediates() -> None:
    b = GraphBuilder()
    y = 1.0 / b.input("x").exp()  # exp(1000) overflows; 1/inf = 0 is finite
    plan = Plan(b.build(y))
    assert bool(plan.run({"x": 1000.0}, wrt=()).nonfinite) is False
    assert bool(plan.run({"x": 1000.0}, wrt=(), keep_intermediates=True).nonfinite) is True


def test_label_out_of_range() -> None:
    b = GraphBuilder()
    loss = b.op("softmax_cross_entropy", b.input("logits", (2, 3)),
                b.input("labels", (2,), DType.INT64), name="loss")
    plan = Plan(b.build(loss))
    for labels in ([0, 3], [-1, 0]):
        err = run_error(plan, {"logits": np.zeros((2, 3)), "labels": np.array(labels)})
        assert err.kind is ErrorKind.VALUE
        assert err.node == "loss"
        assert "loss" in str(err)
    err = run_error(plan, {"logits": np.zeros((2, 2, 3)), "labels": np.array([[0, 1], [2, 5]])},
                    batched=True)
    assert err.kind is ErrorKind.VALUE
    assert err.node == "loss"


# --- intermediates and ownership of result arrays ----------------------------------------------


def test_keep_intermediates() -> None:
    b = GraphBuilder()
    x = b.input("x")
    h = b.op("tanh", x, name="h")
    y = b.op("mul", h, h, name="y")
    plan = Plan(b.build(y))
    assert plan.run({"x": 0.5}).values is None
    result = plan.run({"x": 0.5}, keep_intermediates=True)
    assert result.values is not None
    assert result.value_gradients is not None
    t = math.tanh(0.5)
    assert float(result.values["h"]) == pytest.approx(t, rel=1e-15)
    assert float(result.values["y"]) == pytest.approx(t * t, rel=1e-15)
    assert float(result.value_gradients["y"]) == 1.0
    assert float(result.value_gradients["h"]) == pytest.approx(2 * t, rel=1e-15)
    assert float(result.value_gradients["x"]) == pytest.approx(2 * t * (1 - t * t), rel=1e-15)
    batched = plan.run({"x": [0.5, -0.5]}, batched=True, keep_intermediates=True)
    assert batched.values is not None
    np.testing.assert_allclose(batched.values["h"], [t, -t], rtol=1e-15)


def result_arrays(r: Result) -> list[np.ndarray]:
    out = [*r.outputs.values(), *r.gradients.values()]
    for d in (r.values, r.value_gradients):
        out += list((d or {}).values())
    return out


def assert_owned(r: Result, caller: Iterable[np.ndarray]) -> None:
    """Every result array is writeable and shares memory with no other one nor a caller's."""
    arrays = result_arrays(r)
    for a in arrays:
        assert a.flags.writeable
    for i, a in enumerate(arrays):
        for other in [*arrays[i + 1:], *caller]:
            assert not np.shares_memory(a, other)


def test_results_are_owned() -> None:
    plan, out = scale_plan()
    feed = {"x": X3.copy(), "w": W3.copy(), "z": np.array(0.25)}
    up = np.array([1.0, 1.0, 1.0])
    first = plan.run(feed, upstream={out: up}, keep_intermediates=True)
    assert_owned(first, [*feed.values(), up])
    for a in result_arrays(first):
        a[...] = 123.0
    # Neither the caller's arrays nor the plan were touched.
    np.testing.assert_array_equal(feed["x"], X3)
    np.testing.assert_array_equal(feed["w"], W3)
    np.testing.assert_array_equal(up, 1.0)
    second = plan.run(feed, upstream={out: up})
    np.testing.assert_array_equal(second.outputs[out], X3 * W3 + 0.25)
    np.testing.assert_array_equal(second.gradients["x"], W3)
    np.testing.assert_array_equal(second.gradients["w"], X3)
    assert float(second.gradients["z"]) == 3.0


Builder = Callable[[GraphBuilder], tuple[Value, ...]]


def _transpose_of_input(b: GraphBuilder) -> tuple[Value, ...]:
    return (b.input("x", (2, 2)).T,)


def _slice_of_input(b: GraphBuilder) -> tuple[Value, ...]:
    return (b.op("slice", b.input("x", (2, 2)), starts=(0,), ends=(1,)),)


def _reshape_of_node(b: GraphBuilder) -> tuple[Value, ...]:
    t = b.input("x", (2, 2)) * 2.0
    return t, t.reshape(4)


def _reshape_of_constant(b: GraphBuilder) -> tuple[Value, ...]:
    return b.input("x", (2, 2)) * 2.0, b.constant(np.arange(4.0)).reshape(2, 2)


@pytest.mark.parametrize("build", [
    pytest.param(_transpose_of_input, id="transpose_of_input"),
    pytest.param(_slice_of_input, id="slice_of_input"),
    pytest.param(_reshape_of_node, id="reshape_of_another_output"),
    pytest.param(_reshape_of_constant, id="reshape_of_constant"),
])
def test_view_results_are_owned(build: Builder) -> None:
    b = GraphBuilder()
    outs = build(b)
    plan = Plan(b.build(*outs))
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    ups = {o.name: np.ones(plan.types[plan.slot[o.name]].shape) for o in outs}
    first = plan.run({"x": x}, upstream=ups)
    assert_owned(first, [x, *ups.values()])
    before = {k: v.copy() for k, v in first.outputs.items()}
    for a in result_arrays(first):
        a[...] = -7.0
    second = plan.run({"x": x}, upstream=ups)
    for k, v in before.items():
        np.testing.assert_array_equal(second.outputs[k], v)


def test_gradient_does_not_alias_upstream_through_add() -> None:
    b = GraphBuilder()
    y = b.input("x", (3,)) + b.input("v", (3,))
    up = np.array([1.0, 2.0, 3.0])
    r = Plan(b.build(y)).run({"x": X3, "v": W3}, upstream={y.name: up})
    assert_owned(r, [X3, W3, up])
    np.testing.assert_array_equal(r.gradients["x"], up)
    np.testing.assert_array_equal(r.gradients["v"], up)


def test_gradient_does_not_alias_upstream_through_reshape() -> None:
    b = GraphBuilder()
    y = b.input("x", (4,)).reshape(2, 2)
    up = np.array([[1.0, 2.0], [3.0, 4.0]])
    r = Plan(b.build(y)).run({"x": np.zeros(4)}, upstream={y.name: up})
    np.testing.assert_array_equal(r.gradients["x"], [1.0, 2.0, 3.0, 4.0])
    assert not np.shares_memory(r.gradients["x"], up)


# --- plans are reusable and thread-safe --------------------------------------------------------


def test_plan_runs_twice_and_from_threads() -> None:
    b = GraphBuilder()
    x = b.input("x", (3,))
    y = (x * x).sum() + b.op("sin", x).sum()
    plan = Plan(b.build(y))

    def work(seed: int) -> list[tuple[np.ndarray, float, np.ndarray]]:
        rng = np.random.default_rng(seed)
        runs = []
        for _ in range(50):
            xv = rng.standard_normal(3)
            r = plan.run({"x": xv})
            runs.append((xv, float(r.outputs[y.name]), r.gradients["x"]))
        return runs

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [run for runs in pool.map(work, range(4)) for run in runs]
    assert len(results) == 200
    for xv, value, grad in results:
        assert value == pytest.approx(float(np.sum(xv * xv) + np.sum(np.sin(xv))), rel=1e-12)
        np.testing.assert_allclose(grad, 2 * xv + np.cos(xv), rtol=1e-12)


# --- structural keys ---------------------------------------------------------------------------


def keyed_graph(const: float = 2.0, shape: tuple[int, ...] = (3,)) -> Graph:
    b = GraphBuilder()
    x = b.input("x", shape)
    return b.build((x * const).sum(axis=0, keepdims=True))


def test_structural_key() -> None:
    key = structural_key(keyed_graph())
    assert key == structural_key(keyed_graph())
    assert Plan(keyed_graph()).key == key
    assert structural_key(keyed_graph(const=3.0)) != key
    assert structural_key(keyed_graph(shape=(4,))) != key
    assert structural_key(keyed_graph(shape=(3, 1))) != key


# --- gradcheck ---------------------------------------------------------------------------------


def staged_graph() -> Graph:
    b = GraphBuilder()
    x, y = b.input("x", (2,)), b.input("y", (2,))
    return b.build((x + y.sigmoid()) / (x.sigmoid() + (x + y) ** 2))


STAGED_FEED = {"x": [3.0, 0.5], "y": [-4.0, 1.5]}


def test_gradcheck_passes_on_a_correct_graph() -> None:
    graph = staged_graph()
    report = gradcheck(graph, STAGED_FEED, upstream={graph.outputs[0]: [1.0, -2.0]})
    assert report.ok
    assert set(report.inputs) == {"x", "y"}
    for check in report.inputs.values():
        assert check.ok
        assert check.worst_excess <= 0
        assert check.worst_abs_error < 1e-7


def test_gradcheck_runs_float32_graphs_in_float64() -> None:
    b = GraphBuilder()
    x = b.input("x", (3,), DType.FLOAT32)
    report = gradcheck(b.build((x * x).exp().sum()), {"x": [0.1, -0.2, 0.3]})
    assert report.ok


class DoublingPlan(Plan):
    """A plan whose gradients are twice the truth: gradcheck must notice."""

    def run(self, inputs: Mapping[str, Any], **kw: Any) -> Result:
        r = super().run(inputs, **kw)
        return dataclasses.replace(r, gradients={k: 2 * v for k, v in r.gradients.items()})


def test_gradcheck_reports_wrong_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    # The package re-exports the function under the module's name; patch the module itself.
    module = importlib.import_module("gradserve.engine.gradcheck")
    monkeypatch.setattr(module, "Plan", DoublingPlan)
    report = gradcheck(staged_graph(), STAGED_FEED)
    assert report.ok is False
    for check in report.inputs.values():
        assert check.ok is False
        assert check.worst_excess > 0
        assert check.worst_abs_error > 1e-3


def test_gradients_that_are_the_default_upstream_are_the_callers_own() -> None:
    # out = x + y passes the upstream gradient (ones, shared between runs) to both inputs
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    plan = Plan(g.build(x + y))
    first = plan.run({"x": np.zeros(4), "y": np.zeros(4)}, batched=True)
    gx, gy = first.gradients["x"], first.gradients["y"]
    assert gx is not gy and gx.flags.writeable and gy.flags.writeable
    gx[:] = 7.0  # the caller's to change
    second = plan.run({"x": np.zeros(4), "y": np.zeros(4)}, batched=True)
    assert second.gradients["x"].tolist() == [1.0] * 4 == second.gradients["y"].tolist()
