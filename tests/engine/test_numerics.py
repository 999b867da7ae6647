"""Ties at kinks and stability at extreme inputs, against hand-derived values (PyTorch's rules)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from gradserve.engine import DType, Plan
from gradserve.engine.builder import GraphBuilder, Value


def grads_of(build: Callable[..., Value], **inputs: Any) -> tuple[Any, dict[str, Any]]:
    """Build ``build(**inputs as graph inputs)``, run it at ``inputs``: (output, gradients)."""
    g = GraphBuilder()
    values = {n: g.input(n, np.shape(v)) for n, v in inputs.items()}
    out: Value = build(**values)
    result = Plan(g.build(out)).run(inputs)
    return result.outputs[out.name], result.gradients


def test_maximum_tie_splits_evenly() -> None:
    _, grads = grads_of(lambda a, b: a.builder.op("maximum", a, b), a=2.0, b=2.0)
    assert grads["a"] == 0.5
    assert grads["b"] == 0.5


def test_minimum_tie_splits_evenly_and_winner_takes_all() -> None:
    _, grads = grads_of(lambda a, b: a.builder.op("minimum", a, b), a=[1.0, 3.0, 2.0],
                        b=[2.0, 1.0, 2.0])
    np.testing.assert_array_equal(grads["a"], [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(grads["b"], [0.0, 1.0, 0.5])


@pytest.mark.parametrize(("op", "x", "expected"), [
    ("max", [1.0, 3.0, 3.0, 2.0], [0.0, 0.5, 0.5, 0.0]),
    ("min", [1.0, 1.0, 1.0, 2.0], [1 / 3, 1 / 3, 1 / 3, 0.0]),
])
def test_extreme_reduction_ties_share_gradient(op: str, x: list[float],
                                               expected: list[float]) -> None:
    _, grads = grads_of(lambda x: x.builder.op(op, x, keepdims=False), x=x)
    np.testing.assert_allclose(grads["x"], expected)


def test_max_reduction_ties_per_row() -> None:
    x = [[5.0, 5.0], [1.0, 4.0]]
    _, grads = grads_of(lambda x: x.max(axis=1).sum(), x=x)
    np.testing.assert_allclose(grads["x"], [[0.5, 0.5], [0.0, 1.0]])


def test_relu_and_abs_have_zero_slope_at_zero() -> None:
    _, grads = grads_of(lambda x: x.relu() + abs(x), x=[0.0, -1.0, 2.0])
    np.testing.assert_array_equal(grads["x"], [0.0, -1.0, 2.0])


@pytest.mark.parametrize("x", [1000.0, -1000.0, 40.0, -40.0, 0.0])
def test_sigmoid_is_finite_and_accurate_at_extremes(x: float) -> None:
    value, grads = grads_of(lambda x: x.sigmoid(), x=x)
    exact = 1 / (1 + math.exp(-x)) if x > -700 else 0.0
    assert np.isfinite(value) and np.isfinite(grads["x"])
    assert value == pytest.approx(exact, rel=1e-15, abs=0.0) if exact else value == 0.0
    assert grads["x"] == pytest.approx(exact * (1 - exact), rel=1e-12, abs=1e-300)


def test_logsumexp_does_not_overflow() -> None:
    value, grads = grads_of(lambda x: x.builder.op("logsumexp", x), x=[1000.0, 1000.0, -1000.0])
    assert value == pytest.approx(1000 + math.log(2), rel=1e-15)
    np.testing.assert_allclose(grads["x"], [0.5, 0.5, 0.0], atol=1e-300)


def test_softmax_family_at_extremes() -> None:
    x = [1000.0, -1000.0, 0.0]
    value, grads = grads_of(lambda x: x.builder.op("log_softmax", x).sum(), x=x)
    assert np.isfinite(value) and np.all(np.isfinite(grads["x"]))
    # sum_i log_softmax_i = sum x - n * lse; d/dx_j = 1 - n * softmax_j
    assert value == pytest.approx(0.0 - 3 * 1000.0, rel=1e-12)
    np.testing.assert_allclose(grads["x"], [1 - 3.0, 1.0, 1.0])
    value, _ = grads_of(lambda x: x.builder.op("softmax", x).sum(), x=x)
    assert value == pytest.approx(1.0)


def test_cross_entropy_with_huge_logits() -> None:
    g = GraphBuilder()
    logits = g.input("logits", (2, 3))
    labels = g.constant([0, 2], dtype=DType.INT64)
    loss = g.op("softmax_cross_entropy", logits, labels)
    result = Plan(g.build(loss)).run({"logits": [[1000.0, 0.0, -1000.0], [0.0, 0.0, 1000.0]]})
    # Both rows pick their largest logit with certainty: loss 0, gradient 0 to machine precision.
    assert result.outputs[loss.name] == pytest.approx(0.0, abs=1e-300)
    np.testing.assert_allclose(result.gradients["logits"], 0.0, atol=1e-300)
    assert not result.nonfinite


def test_where_ignores_a_nan_value_in_the_untaken_branch() -> None:
    # log(-1) is NaN, but where() picks x there: value and gradient stay exact. (As in PyTorch
    # and JAX, a branch whose *derivative* is infinite, like log at 0, still yields NaN.)
    value, grads = grads_of(lambda x, c: x.builder.op("where", c, x * 3.0, x.log()).sum(),
                            x=[-1.0, 2.0], c=[1.0, 0.0])
    assert value == pytest.approx(-3.0 + math.log(2.0))
    np.testing.assert_array_equal(grads["x"], [3.0, 0.5])


def test_pow_at_zero_base() -> None:
    # d(x**2)/dx at 0 is 0; d(2**y)/dy at y=3 is 8 ln 2; x**0 has slope 0 even at x = 0.
    _, grads = grads_of(lambda x, y: x**2.0 + 2.0**y + x**0.0, x=0.0, y=3.0)
    assert grads["x"] == 0.0
    assert grads["y"] == pytest.approx(8 * math.log(2))


INF = math.inf
# (a, b, d(a**b)/da, d(a**b)/db) by PyTorch's rules (pow_backward_self, pow_backward_exponent),
# written out by hand: d/da = b a**(b-1), zeroed where b == 0; d/db = a**b log(a), zeroed where
# a == 0 and b >= 0 only, so at a = 0 and b < 0 it is inf * -inf = -inf.
POW_EDGES = [
    (0.0, 2.0, 0.0, 0.0),
    (0.0, 1.0, 1.0, 0.0),
    (0.0, 0.5, INF, 0.0),
    (0.0, 0.0, 0.0, 0.0),
    (0.0, -0.5, -INF, -INF),
    (0.0, -1.0, -INF, -INF),
    (0.0, -2.0, -INF, -INF),
    (-0.0, -1.0, -INF, INF),  # (-0)**-1 = -inf, log(-0) = -inf
    (2.0, -1.0, -0.25, 0.5 * math.log(2.0)),
    (-2.0, 2.0, -4.0, math.nan),  # log of a negative base
    (INF, -1.0, -0.0, math.nan),  # inf**-1 log(inf) = 0 * inf
]


@pytest.mark.parametrize(("a", "b", "da", "db"), POW_EDGES)
def test_pow_gradients_at_edge_points_follow_pytorch(a: float, b: float, da: float,
                                                     db: float) -> None:
    _, grads = grads_of(lambda a, b: a**b, a=a, b=b)
    np.testing.assert_array_equal(grads["a"], da)
    np.testing.assert_array_equal(grads["b"], db)


# --- the ops real networks need -----------------------------------------------------------------

NAN = math.nan


def one_op(op: str, **attrs: Any) -> Callable[..., Value]:
    return lambda x: x.builder.op(op, x, **attrs)


def test_erf_matches_the_c_library_to_1e_15() -> None:
    x = np.concatenate([np.linspace(-7, 7, 200_001), np.geomspace(1e-300, 10, 3000),
                        -np.geomspace(1e-300, 10, 3000), [1.0, 6.0, np.nextafter(6.0, 0)]])
    value, _ = grads_of(one_op("erf"), x=x)
    exact = np.array([math.erf(v) for v in x])
    np.testing.assert_allclose(value, exact, rtol=1e-15, atol=0)


def test_erf_in_float32_is_within_3_ulp_of_the_c_library() -> None:
    """float32 takes a shorter series and fit (about half the work); each value stays within
    3 units in the last place of erf computed in float64 by the C library and rounded."""
    x = np.concatenate([np.linspace(-6, 6, 200_001), np.geomspace(1e-38, 10, 3000),
                        -np.geomspace(1e-38, 10, 3000), [1.0, 4.0, np.nextafter(4.0, 0)]]
                       ).astype(np.float32)
    g = GraphBuilder()
    out = g.op("erf", g.input("x", x.shape, DType.FLOAT32))
    value = Plan(g.build(out)).run({"x": x}).outputs[out.name]
    exact = np.array([math.erf(float(v)) for v in x])
    assert value.dtype == np.float32
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(value - exact) / ulp) <= 3.0


@pytest.mark.parametrize(("op", "attrs", "x", "value", "grad"), [
    # Values and gradients PyTorch 2.13 gives at these points (float64), written down.
    ("erf", {}, [-INF, 0.0, INF, 30.0, NAN], [-1.0, 0.0, 1.0, 1.0, NAN],
     [0.0, 2 / math.sqrt(math.pi), 0.0, 0.0, NAN]),
    ("gelu", {}, [-INF, -40.0, 0.0, 40.0, INF, NAN], [NAN, -0.0, 0.0, 40.0, INF, NAN],
     [NAN, 0.0, 0.5, 1.0, NAN, NAN]),
    ("gelu", {"approximate": "tanh"}, [-INF, -40.0, 0.0, 40.0, INF],
     [NAN, -0.0, 0.0, 40.0, INF], [NAN, 0.0, 0.5, 1.0, NAN]),
    ("leaky_relu", {}, [-INF, -1.0, 0.0, 1.0, INF], [-INF, -0.01, 0.0, 1.0, INF],
     [0.01, 0.01, 0.01, 1.0, 1.0]),
    ("softplus", {}, [-INF, -800.0, 0.0, 800.0, INF], [0.0, 0.0, math.log(2), 800.0, INF],
     [0.0, 0.0, 0.5, 1.0, 1.0]),
    ("log1p", {}, [-1.0, -0.5, INF, 1e-300], [-INF, math.log(0.5), INF, 1e-300],
     [INF, 2.0, 0.0, 1.0]),
    ("expm1", {}, [-INF, 0.0, 800.0, INF, 1e-300], [-1.0, 0.0, INF, INF, 1e-300],
     [0.0, 1.0, INF, INF, 1.0]),
])
def test_elementwise_edges_follow_pytorch(op: str, attrs: dict[str, Any], x: list[float],
                                          value: list[float], grad: list[float]) -> None:
    got, grads = grads_of(one_op(op, **attrs), x=x)
    np.testing.assert_array_equal(got, value)
    np.testing.assert_array_equal(grads["x"], grad)


def test_small_values_keep_their_relative_precision() -> None:
    x = np.array([1e-300, 1e-20, -30.0])
    value, _ = grads_of(one_op("erf"), x=x[:2])
    np.testing.assert_allclose(value, 2 / math.sqrt(math.pi) * x[:2], rtol=1e-15)
    value, grads = grads_of(one_op("softplus"), x=x[2:])
    np.testing.assert_allclose(value, math.log1p(math.exp(-30.0)), rtol=1e-15)
    np.testing.assert_allclose(grads["x"], 1 / (1 + math.exp(30.0)), rtol=1e-15)


# (x, min, max, dx, dmin, dmax) as torch.clamp's backward gives them (written down from 2.13).
CLAMP_EDGES = [
    ([0.0, 1.0, 2.0, 3.0, -1.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0, 5.0], [2.0, 2, 2, 2, 2, 5],
     [0.0, 1, 1, 0, 0, 1], [1.0, 0, 0, 0, 1, 0], [0.0, 0, 0, 1, 0, 0]),
    ([0.0, 1.5, 3.0], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0], [0.0, 0, 0], [0.0, 0, 0], [1.0, 1, 1]),
    ([0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1, 0], [0.0, 0, 0], [0.0, 0, 1]),
]


@pytest.mark.parametrize(("x", "lo", "hi", "dx", "dlo", "dhi"), CLAMP_EDGES)
def test_clip_boundaries_follow_torch_clamp(x: list[float], lo: list[float], hi: list[float],
                                            dx: list[float], dlo: list[float],
                                            dhi: list[float]) -> None:
    value, grads = grads_of(lambda x, lo, hi: x.builder.op("clip", x, lo, hi), x=x, lo=lo, hi=hi)
    np.testing.assert_array_equal(value, np.minimum(np.maximum(x, lo), hi))
    np.testing.assert_array_equal(grads["x"], dx)
    np.testing.assert_array_equal(grads["lo"], dlo)
    np.testing.assert_array_equal(grads["hi"], dhi)


def test_clip_with_nan_and_one_bound() -> None:
    value, grads = grads_of(lambda x, lo: x.builder.op("clip", x, lo), x=[NAN, -INF, INF, 0.0],
                            lo=0.0)
    np.testing.assert_array_equal(value, [NAN, 0.0, INF, 0.0])
    np.testing.assert_array_equal(grads["x"], [0.0, 0.0, 1.0, 1.0])
    assert grads["lo"] == 1.0  # from -inf only: NaN < 0 is false


def test_layer_norm_is_scale_invariant_over_a_huge_range() -> None:
    x = np.array([[1.0, 2.0, 4.0, 8.0]])
    base, base_grads = grads_of(lambda x, s: x.builder.op("layer_norm", x, s, epsilon=0.0),
                                x=x, s=np.ones(4))
    for scale in (1e-100, 1e100):
        value, grads = grads_of(lambda x, s: x.builder.op("layer_norm", x, s, epsilon=0.0),
                                x=x * scale, s=np.ones(4))
        np.testing.assert_allclose(value, base, rtol=1e-13)
        np.testing.assert_allclose(grads["x"] * scale, base_grads["x"], atol=1e-13)


def test_layer_norm_of_a_constant_row_is_zero_with_finite_gradients() -> None:
    value, grads = grads_of(lambda x, s: x.builder.op("layer_norm", x, s), x=[[3.0, 3.0, 3.0]],
                            s=[1.0, 2.0, 3.0])
    np.testing.assert_array_equal(value, [[0.0, 0.0, 0.0]])
    assert np.all(np.isfinite(grads["x"])) and np.all(np.isfinite(grads["s"]))


def test_batch_norm_with_zero_variance_and_epsilon() -> None:
    def bn(x: Value, s: Value, b: Value, m: Value, v: Value) -> Value:
        return x.builder.op("batch_norm", x, s, b, m, v, epsilon=0.0)

    value, grads = grads_of(bn, x=[[1.0, 2.0], [2.0, 2.0]], s=[1.0, 1.0], b=[0.0, 0.0],
                            m=[2.0, 2.0], v=[1.0, 0.0])
    np.testing.assert_array_equal(value, [[-1.0, 0.0], [NAN, NAN]])  # inf * 0 where x = mean
    np.testing.assert_array_equal(grads["x"], [[1.0, 1.0], [INF, INF]])
