"""The ops real networks need (conv, pools, norms, gather, masks), beyond test_ops' generated
cases: specific layouts (an ONNX N inside X, per-example weights, depthwise, 3-D), every way
gather's operands meet a batch axis, the working-buffer limit, float attributes, dtypes."""

from __future__ import annotations

import tracemalloc
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
from tests.engine import oracles

Arr = Any
RNG = np.random.default_rng(7)


def one_node(op: str, operands: dict[str, Arr], attrs: dict[str, Any] | None = None,
             constants: dict[str, Arr] | None = None, dtype: DType = DType.FLOAT64) -> Graph:
    """A graph of one node applying ``op`` to the inputs ``operands``, then the
    ``constants``, in the order given."""
    inputs = tuple(Input(n, np.shape(v), DType.INT64 if np.asarray(v).dtype == np.int64
                         else dtype) for n, v in operands.items())
    consts = tuple(Constant(n, np.asarray(v)) for n, v in (constants or {}).items())
    names = tuple([*operands, *(constants or {})])
    return Graph(inputs, (Node("y", op, names, attrs or {}),), ("y",), consts)


CONV_CASES: dict[str, tuple[tuple[int, ...], tuple[int, ...], dict[str, Any]]] = {
    # name: (X shape, W shape, attrs)
    "depthwise 2-D": ((4, 6, 6), (4, 1, 3, 3), {"group": 4, "pads": (1, 1, 1, 1)}),
    "depthwise x2 strided": ((3, 7, 5), (6, 1, 3, 2), {"group": 3, "strides": (2, 1)}),
    "asymmetric pads, dilated": ((2, 6, 7), (3, 2, 2, 3),
                                 {"pads": (0, 2, 1, 0), "dilations": (2, 1), "strides": (1, 2)}),
    "1-D with ONNX N": ((2, 3, 9), (4, 3, 3), {"pads": (2, 1), "strides": (2,)}),
    "2-D with ONNX N": ((2, 2, 5, 5), (3, 2, 3, 3), {"pads": (1, 1, 1, 1)}),
    "3-D": ((2, 4, 3, 4), (2, 2, 2, 2, 3), {"pads": (1, 0, 0, 0, 1, 1)}),
    "grouped 3-D": ((4, 3, 3, 3), (4, 2, 1, 2, 2), {"group": 2, "strides": (1, 2, 1)}),
}


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv_layouts_against_the_loop_oracle_and_finite_differences(name: str) -> None:
    xs, ws, attrs = CONV_CASES[name]
    x, w, b = RNG.standard_normal(xs), RNG.standard_normal(ws), RNG.standard_normal(ws[0])
    graph = one_node("conv", {"x": x, "w": w, "b": b}, attrs)
    s = len(ws) - 2
    expected = oracles.conv(x, w, b, attrs.get("strides", (1,) * s),
                            attrs.get("pads", (0,) * 2 * s), attrs.get("dilations", (1,) * s),
                            attrs.get("group", 1))
    out = Plan(graph).run({"x": x, "w": w, "b": b}).outputs["y"]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert gradcheck(graph, {"x": x, "w": w, "b": b}).ok


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv_per_example_weights_batched_equal_looped(name: str) -> None:
    """Weights as inputs: each example of a batched run has its own (their gradients too),
    also where X carries an ONNX N of its own; X may be shared (a constant)."""
    xs, ws, attrs = CONV_CASES[name]
    b = 3
    x = RNG.standard_normal(xs)
    w, bias = RNG.standard_normal((b, *ws)), RNG.standard_normal((b, ws[0]))
    for shared_x in (False, True):
        graph = (one_node("conv", {"w": w[0], "b": bias[0]}, attrs, {"x": x}) if shared_x
                 else one_node("conv", {"x": x, "w": w[0], "b": bias[0]}, attrs))
        if shared_x:  # operands in conv's order: X first
            graph = Graph(graph.inputs, (Node("y", "conv", ("x", "w", "b"), attrs),),
                          ("y",), graph.constants)
        plan = Plan(graph)
        xb = np.stack([x * (1 + k) for k in range(b)])
        feed = {"w": w, "b": bias} if shared_x else {"x": xb, "w": w, "b": bias}
        batch = plan.run(feed, batched=True)
        for k in range(b):
            alone = plan.run({n: v[k] for n, v in feed.items()})
            np.testing.assert_allclose(batch.outputs["y"][k], alone.outputs["y"], rtol=1e-12,
                                       atol=1e-12)
            for n, grad in alone.gradients.items():
                np.testing.assert_allclose(batch.gradients[n][k], grad, rtol=1e-12, atol=1e-12)


def test_conv_unfolded_buffer_is_refused_before_anything_is_allocated() -> None:
    # X (64, 1, 64, 64), W (8, 1, 7, 7), pads 3: X 262,144 elements, Y 2,097,152, but the
    # unfolded windows 64 * 49 * 4096 = 12,845,056: over a limit the tensors are within.
    graph = Graph((Input("x", (64, 1, 64, 64)), Input("w", (8, 1, 7, 7))),
                  (Node("y", "conv", ("x", "w"), {"pads": (3, 3, 3, 3)}),), ("y",))
    limits = Limits(max_elements=4_000_000)
    tracemalloc.start()
    try:
        with pytest.raises(EngineError) as info:
            Plan(graph, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.kind is ErrorKind.LIMIT and info.value.node == "y"
    assert "12845056" in info.value.message
    assert peak < 1 << 20  # nothing near the buffer's 100 MB was allocated
    Plan(graph, Limits(max_elements=12_845_056))  # at the limit: fine


def test_conv_working_buffer_counts_toward_a_runs_total() -> None:
    graph = Graph((Input("x", (1, 8, 8)), Input("w", (1, 1, 3, 3))),
                  (Node("y", "conv", ("x", "w"), {"pads": (1, 1, 1, 1)}),), ("y",))
    plan = Plan(graph)
    assert plan.total_elements == 64 + 9 + 64 + 9 * 64  # inputs, result, windows
    with pytest.raises(EngineError) as info:
        Plan(graph, Limits(max_total_elements=64 + 9 + 64 + 9 * 64 - 1))
    assert info.value.kind is ErrorKind.LIMIT


@pytest.mark.parametrize(("x", "w", "attrs", "field"), [
    ((3, 5, 5), (2, 3, 3), {}, "inputs[1]"),  # a 1-D kernel cannot take (C, H, W)'s channels
    ((4, 5, 5), (2, 3, 3, 3), {}, "inputs[1]"),  # 3 channels per group, 4 given
    ((4, 5, 5), (2, 2, 3, 3), {"group": 3}, "attrs.group"),
    ((2, 5, 5), (2, 2, 3, 3), {"strides": (1,)}, "attrs.strides"),
    ((2, 5, 5), (2, 2, 3, 3), {"pads": (1, 1)}, "attrs.pads"),
    ((2, 5, 5), (2, 2, 3, 3), {"pads": (-1, 0, 0, 0)}, "attrs.pads"),
    ((2, 5, 5), (2, 2, 3, 3), {"dilations": (0, 1)}, "attrs.dilations"),
    ((2, 2, 2), (2, 2, 3, 3), {}, "inputs[0]"),  # smaller than the kernel
    ((2, 5), (2, 2, 3, 3), {}, "inputs[0]"),
])
def test_conv_refuses_what_does_not_fit(x: tuple[int, ...], w: tuple[int, ...],
                                        attrs: dict[str, Any], field: str) -> None:
    graph = Graph((Input("x", x), Input("w", w)), (Node("y", "conv", ("x", "w"), attrs),), ("y",))
    with pytest.raises(EngineError) as info:
        Plan(graph)
    assert info.value.node == "y" and info.value.field == field


# --- pools: PyTorch's values at the edges (printed by torch 2.13, written down here) -----------

INF, NAN = float("inf"), float("nan")


def pooled(op: str, x: list[float], **attrs: Any) -> tuple[Arr, Arr]:
    arr = np.asarray(x, dtype=np.float64).reshape(1, 1, -1)
    result = Plan(one_node(op, {"x": arr}, attrs)).run({"x": arr})
    return result.outputs["y"].ravel(), result.gradients["x"].ravel()


def test_max_pool_gradient_goes_to_the_first_maximum() -> None:
    y, dx = pooled("max_pool", [2.0, 1.0, 2.0, 0.0], kernel_shape=(4,))
    assert y.tolist() == [2.0]
    assert dx.tolist() == [1.0, 0.0, 0.0, 0.0]  # PyTorch's index: 0


def test_max_pool_overlapping_windows_accumulate() -> None:
    y, dx = pooled("max_pool", [1.0, 3.0, 2.0, 3.0], kernel_shape=(2,))
    assert y.tolist() == [3.0, 3.0, 3.0]
    assert dx.tolist() == [0.0, 2.0, 0.0, 1.0]


def test_max_pool_nan_goes_to_the_last_nan() -> None:
    y, dx = pooled("max_pool", [1.0, NAN, 3.0, NAN, 2.0], kernel_shape=(5,))
    assert np.isnan(y).all()
    assert dx.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]  # PyTorch's index: 3


def test_max_pool_padding_never_wins_even_against_minus_inf() -> None:
    y, dx = pooled("max_pool", [-INF, -INF, -INF], kernel_shape=(3,), pads=(1, 1))
    assert y.tolist() == [-INF, -INF, -INF]
    assert dx.tolist() == [2.0, 1.0, 0.0]  # PyTorch's indices: 0, 0, 1


@pytest.mark.parametrize(("kernel", "count_include_pad", "expected"), [
    (2, True, [0.5, 2.5, 4.5]),
    (2, False, [1.0, 2.5, 4.5]),
    (3, True, [1.0, 3.0, 3.0]),  # the last window's end padding counts, no overhang past it
])
def test_average_pool_ceil_mode_divisors_follow_pytorch(kernel: int, count_include_pad: bool,
                                                        expected: list[float]) -> None:
    y, _ = pooled("average_pool", [1.0, 2.0, 3.0, 4.0, 5.0], kernel_shape=(kernel,),
                  strides=(2,), pads=(1, 1), ceil_mode=True, count_include_pad=count_include_pad)
    np.testing.assert_allclose(y, expected, rtol=1e-15)


def test_max_pool_ceil_mode_follows_pytorch() -> None:
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert pooled("max_pool", x, kernel_shape=(2,), strides=(2,), pads=(1, 1),
                  ceil_mode=True)[0].tolist() == [1.0, 3.0, 5.0]
    assert pooled("max_pool", x, kernel_shape=(2,), strides=(2,),
                  ceil_mode=True)[0].tolist() == [2.0, 4.0, 5.0]


def test_pool_windows_of_padding_only_are_refused() -> None:
    graph = one_node("max_pool", {"x": np.zeros((1, 3))}, {"kernel_shape": (2,),
                                                            "pads": (2, 0)})
    with pytest.raises(EngineError) as info:
        Plan(graph)
    assert info.value.kind is ErrorKind.ATTRIBUTE and info.value.field == "attrs.pads"


def test_global_average_pool_with_onnx_n_inside_or_as_the_batch_axis() -> None:
    x = RNG.standard_normal((2, 3, 4, 5))
    expected = x.mean(axis=(2, 3), keepdims=True)
    inside = Plan(one_node("global_average_pool", {"x": x}, {"axis": -3})).run({"x": x})
    np.testing.assert_allclose(inside.outputs["y"], expected, rtol=1e-14)
    batched = Plan(one_node("global_average_pool", {"x": x[0]})).run({"x": x}, batched=True)
    np.testing.assert_allclose(batched.outputs["y"], expected, rtol=1e-14)


# --- gather: every way its operands meet the batch axis -----------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("shared", ["data", "indices", "neither"])
def test_gather_batched_equals_looped(axis: int, shared: str) -> None:
    """An embedding table shared by batched token ids, fixed indices into batched data, or
    both batched; gradients accumulate over repeated indices."""
    b, data = 3, RNG.standard_normal((4, 5))
    indices = np.array([[0, -1, 2], [2, 2, -4]])
    datas = np.stack([data * (k + 1) for k in range(b)])
    idxs = np.stack([np.roll(indices, k) for k in range(b)])
    if shared == "data":
        graph = Graph((Input("i", indices.shape, DType.INT64),),
                      (Node("y", "gather", ("d", "i"), {"axis": axis}),), ("y",),
                      (Constant("d", data),))
        feed, alone_of = {"i": idxs}, [{"i": idxs[k]} for k in range(b)]
        expected = [np.take(data, idxs[k], axis=axis) for k in range(b)]
    elif shared == "indices":
        graph = Graph((Input("d", data.shape),), (Node("y", "gather", ("d", "i"),
                                                       {"axis": axis}),), ("y",),
                      (Constant("i", indices),))
        feed, alone_of = {"d": datas}, [{"d": datas[k]} for k in range(b)]
        expected = [np.take(datas[k], indices, axis=axis) for k in range(b)]
    else:
        graph = Graph((Input("d", data.shape), Input("i", indices.shape, DType.INT64)),
                      (Node("y", "gather", ("d", "i"), {"axis": axis}),), ("y",))
        feed = {"d": datas, "i": idxs}
        alone_of = [{"d": datas[k], "i": idxs[k]} for k in range(b)]
        expected = [np.take(datas[k], idxs[k], axis=axis) for k in range(b)]
    plan = Plan(graph)
    ups = np.stack([RNG.standard_normal(e.shape) for e in expected])
    batch = plan.run(feed, batched=True, upstream={"y": ups})
    for k in range(b):
        np.testing.assert_array_equal(batch.outputs["y"][k], expected[k])
        alone = plan.run(alone_of[k], upstream={"y": ups[k]})
        np.testing.assert_array_equal(alone.outputs["y"], expected[k])
        for name, grad in alone.gradients.items():
            np.testing.assert_allclose(batch.gradients[name][k], grad, rtol=1e-14)


def test_gather_repeated_indices_accumulate() -> None:
    table = np.arange(6.0).reshape(3, 2)
    graph = Graph((Input("t", (3, 2)),), (Node("y", "gather", ("t", "i")),), ("y",),
                  (Constant("i", np.array([2, 0, 2, -1])),))
    result = Plan(graph).run({"t": table})
    np.testing.assert_array_equal(result.outputs["y"], table[[2, 0, 2, 2]])
    np.testing.assert_array_equal(result.gradients["t"], [[1, 1], [0, 0], [3, 3]])


@pytest.mark.parametrize("bad", [3, -4, 100])
def test_gather_refuses_an_index_out_of_range_when_run(bad: int) -> None:
    graph = Graph((Input("t", (3, 2)), Input("i", (2,), DType.INT64)),
                  (Node("y", "gather", ("t", "i")),), ("y",))
    plan = Plan(graph)
    with pytest.raises(EngineError) as info:
        plan.run({"t": np.zeros((3, 2)), "i": np.array([0, bad])})
    assert info.value.kind is ErrorKind.VALUE
    assert info.value.field == "inputs[1]" and info.value.node == "y"
    assert str(bad) in info.value.message


def test_gather_takes_int64_indices_only() -> None:
    graph = Graph((Input("t", (3, 2)), Input("i", (2,))), (Node("y", "gather", ("t", "i")),),
                  ("y",))
    with pytest.raises(EngineError) as info:
        Plan(graph)
    assert info.value.kind is ErrorKind.DTYPE and info.value.field == "inputs[1]"


# --- masks, float attributes, dtypes ------------------------------------------------------------


def test_an_input_reaching_outputs_only_through_masks_gets_no_gradient() -> None:
    g = GraphBuilder()
    x, y = g.input("x", (3,)), g.input("y", (3,))
    mask = g.op("greater", x, y)
    out = g.op("mul", g.op("and", mask, g.op("not", g.op("equal", x, 0.0))), y)
    result = Plan(g.build(out)).run({"x": [1.0, 0.0, -1.0], "y": [0.0, -1.0, 2.0]})
    np.testing.assert_array_equal(result.outputs[out.name], [0.0, 0.0, 0.0])
    assert set(result.gradients) == {"y"}
    np.testing.assert_array_equal(result.gradients["y"], [1.0, 0.0, 0.0])


def test_masks_keep_their_operands_dtype() -> None:
    graph = Graph((Input("a", (3,), DType.INT64), Input("b", (3,), DType.INT64)),
                  (Node("y", "less_equal", ("a", "b")),), ("y",))
    out = Plan(graph).run({"a": np.array([1, 2, 3]), "b": np.array([2, 2, 2])}).outputs["y"]
    assert out.dtype == np.int64 and out.tolist() == [1, 1, 0]


@pytest.mark.parametrize(("value", "ok"), [
    (0.2, True), (1, True), (-3, True), (float("nan"), False), (float("inf"), False),
    (True, False), ("0.2", False), ((1,), False), (2**60, False),
])
def test_float_attributes_are_checked(value: object, ok: bool) -> None:
    graph = one_node("leaky_relu", {"x": np.array([-2.0, 3.0])}, {"alpha": value})
    if ok:
        out = Plan(graph).run({"x": np.array([-2.0, 3.0])}).outputs["y"]
        assert out.tolist() == [-2.0 * float(value), 3.0]  # type: ignore[arg-type]
        return
    with pytest.raises(EngineError) as info:
        Plan(graph)
    assert info.value.kind is ErrorKind.ATTRIBUTE and info.value.field == "attrs.alpha"


def test_negative_epsilon_is_refused() -> None:
    graph = one_node("layer_norm", {"x": np.ones((2, 3)), "s": np.ones(3)}, {"epsilon": -1e-5})
    with pytest.raises(EngineError) as info:
        Plan(graph)
    assert info.value.field == "attrs.epsilon"


FLOAT32_CASES: dict[str, tuple[dict[str, Arr], dict[str, Any]]] = {
    "erf": ({"x": RNG.standard_normal((2, 3))}, {}),
    "gelu": ({"x": RNG.standard_normal((2, 3))}, {"approximate": "tanh"}),
    "softplus": ({"x": RNG.standard_normal((2, 3))}, {}),
    "leaky_relu": ({"x": RNG.standard_normal((2, 3))}, {}),
    "clip": ({"x": RNG.standard_normal((2, 3)), "lo": np.array(-0.5), "hi": np.array(0.5)}, {}),
    "conv": ({"x": RNG.standard_normal((2, 5, 5)), "w": RNG.standard_normal((3, 2, 3, 3)),
              "b": RNG.standard_normal(3)}, {"pads": (1, 1, 1, 1)}),
    "max_pool": ({"x": RNG.standard_normal((2, 5, 5))}, {"kernel_shape": (2, 2),
                                                         "pads": (1, 1, 0, 0)}),
    "average_pool": ({"x": RNG.standard_normal((2, 5, 5))}, {"kernel_shape": (3, 3),
                                                             "pads": (1, 1, 1, 1)}),
    "global_average_pool": ({"x": RNG.standard_normal((2, 5, 5))}, {}),
    "batch_norm": ({"x": RNG.standard_normal((2, 5)), **{n: RNG.random(2) + 0.5 for n in
                                                         ("s", "b", "m", "v")}}, {}),
    "layer_norm": ({"x": RNG.standard_normal((2, 5)), "s": RNG.standard_normal(5)}, {}),
    "gather": ({"x": RNG.standard_normal((4, 3)), "i": np.array([3, 0, -1])}, {}),
}


@pytest.mark.parametrize("op", sorted(FLOAT32_CASES))
def test_float32_stays_float32(op: str) -> None:
    operands, attrs = FLOAT32_CASES[op]
    graph = one_node(op, operands, attrs, dtype=DType.FLOAT32)
    feed = {n: v.astype(np.float32) if v.dtype == np.float64 else v for n, v in operands.items()}
    result = Plan(graph).run(feed)
    assert result.outputs["y"].dtype == np.float32
    assert all(g.dtype == np.float32 for g in result.gradients.values())
    wide = Plan(one_node(op, operands, attrs)).run(operands)
    np.testing.assert_allclose(result.outputs["y"], wide.outputs["y"], rtol=1e-4, atol=1e-5)
