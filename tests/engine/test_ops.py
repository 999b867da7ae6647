"""Every op of the table against independent oracles.

For each op, hypothesis draws shapes (broadcasting cases included), attributes and values; the
test compares the engine's forward with a numpy reference written here, and its gradients (a VJP
with a random upstream) with central finite differences of that reference. The same cases run
batched: a stack of examples must give exactly what separate runs give, with some operands as
(unbatched) constants and operands of different ranks broadcasting per example.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gradserve.engine import OP_TABLE, Constant, DType, Graph, Input, Node, Plan
from tests.engine import oracles

Arr = Any  # numpy arrays; numpy's stubs type many results loosely
Draw = Callable[[st.SearchStrategy[Any]], Any]


@dataclass
class Case:
    """An op with a numpy reference and a way to draw its operands and attributes."""

    op: str
    ref: Callable[..., Arr]  # ref(attrs, *operands)
    draw: Callable[[Draw], tuple[list[Arr], dict[str, Any]]]
    nondiff: tuple[int, ...] = ()  # operands never differentiated (labels, conditions)


def values(draw: Draw, shape: Sequence[int], lo: float = -2.0, hi: float = 2.0,
           gap: float = 0.0) -> Arr:
    """Floats in [lo, hi] of ``shape``, kept at least ``gap`` away from 0 (kinks)."""
    x = np.asarray(draw(hnp.arrays(np.float64, tuple(shape),
                                   elements=st.floats(lo, hi, allow_nan=False))))
    return np.where(np.abs(x) < gap, np.copysign(gap, x), x) if gap else x


def distinct(draw: Draw, shape: Sequence[int]) -> Arr:
    """Values with no ties (at least 0.1 apart), for kinked ops like max."""
    n = int(np.prod(shape))
    perm = draw(st.permutations(range(n)))
    return (np.asarray(perm, dtype=np.float64) * 0.1 - 0.05 * n).reshape(shape)


small_shape = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4)
ranked_shape = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)


def pair_shapes(draw: Draw) -> tuple[tuple[int, ...], ...]:
    bs = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3,
                                                min_side=1, max_side=3))
    return tuple(bs.input_shapes)


def unary(op: str, ref: Callable[[Arr], Arr], lo: float = -2, hi: float = 2,
          gap: float = 0.0) -> Case:
    return Case(op, lambda a, x: ref(x),
                lambda d: ([values(d, d(small_shape), lo, hi, gap)], {}))


def binary(op: str, ref: Callable[[Arr, Arr], Arr], lo_b: float = -2, gap_b: float = 0.0,
           lo_a: float = -2, separated: bool = False) -> Case:
    def draw(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
        sa, sb = pair_shapes(d)
        a, b = values(d, sa, lo_a), values(d, sb, lo_b, gap=gap_b)
        if separated:  # keep |a - b| >= 0.1 so FD never straddles the kink
            b = np.asarray(np.where(np.abs(a - b) < 0.1, b + 0.25, b) if a.shape == b.shape
                           else b + 5.0)
        return [a, b], {}

    return Case(op, lambda at, a, b: ref(a, b), draw)


def reduction(op: str, ref: Callable[..., Arr], ties_free: bool = False) -> Case:
    def draw(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
        shape = d(small_shape)
        x = distinct(d, shape) if ties_free else values(d, shape)
        attrs: dict[str, Any] = {"keepdims": d(st.booleans())}
        if shape and d(st.booleans()):
            axes = d(st.lists(st.integers(-len(shape), len(shape) - 1), min_size=1,
                              max_size=len(shape), unique_by=lambda a: a % len(shape)))
            attrs["axis"] = tuple(axes)
        return [x], attrs

    def call(at: dict[str, Any], x: Arr) -> Arr:
        return ref(x, axis=at.get("axis"), keepdims=at["keepdims"])

    return Case(op, call, draw)


def one_axis(op: str, ref: Callable[[Arr, int], Arr]) -> Case:
    def draw(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
        shape = d(ranked_shape)
        return [values(d, shape, -3, 3)], {"axis": d(st.integers(-len(shape), len(shape) - 1))}

    return Case(op, lambda at, x: ref(x, at["axis"]), draw)


def np_logsumexp(x: Arr, axis: Any = None, keepdims: bool = False) -> Arr:
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def np_softmax(x: Arr, axis: int) -> Arr:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def draw_matmul(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    ra, rb = d(st.integers(1, 3)), d(st.integers(1, 3))
    k, n, m = (d(st.integers(1, 3)) for _ in range(3))
    batch = d(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=1,
                                                min_side=1, max_side=2)).input_shapes
    sa = (n,) if ra == 1 else (*batch[0][: ra - 2], k, n)
    sb = (n,) if rb == 1 else (*batch[1][: rb - 2], n, m)
    return [values(d, sa), values(d, sb)], {}


def draw_reshape(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    shape = d(small_shape)
    n = int(np.prod(shape))
    target = d(st.sampled_from([(n,), (1, n), (n, 1), tuple(reversed(shape)) or (1,)]))
    if len(target) > 1 and d(st.booleans()):
        target = (-1, *target[1:])
    return [values(d, shape)], {"shape": tuple(target)}


def draw_transpose(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    shape = d(small_shape)
    attrs = {"perm": tuple(d(st.permutations(range(len(shape)))))} if d(st.booleans()) else {}
    return [values(d, shape)], attrs


def draw_broadcast_to(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    bs = d(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, min_side=1,
                                             max_side=3))
    return [values(d, bs.input_shapes[0])], {"shape": tuple(bs.result_shape)}


def draw_concat(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    shape = d(ranked_shape)
    axis = d(st.integers(-len(shape), len(shape) - 1))
    parts = []
    for _ in range(d(st.integers(1, 3))):
        s = list(shape)
        s[axis] = d(st.integers(1, 3))
        parts.append(values(d, s))
    return parts, {"axis": axis}


def draw_slice(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    shape = d(ranked_shape)
    axes = d(st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True))
    starts, ends, steps = [], [], []
    for a in axes:
        n = shape[a]
        step = d(st.sampled_from([1, 2, -1]))
        start = d(st.integers(0, n - 1))
        if step > 0:
            end = d(st.integers(start + 1, n + 2))
        else:  # down to index `end` (exclusive); below -n means "past the first element"
            end = d(st.integers(-1, start - 1))
            end = -n - 1 if end == -1 else end
        starts.append(start)
        ends.append(end)
        steps.append(step)
    return [values(d, shape)], {"starts": tuple(starts), "ends": tuple(ends), "axes": tuple(axes),
                                "steps": tuple(steps)}


def ref_slice(at: dict[str, Any], x: Arr) -> Arr:
    idx = [slice(None)] * x.ndim
    for a, s, e, k in zip(at["axes"], at["starts"], at["ends"], at["steps"], strict=True):
        idx[a] = slice(s, e, k)
    return x[tuple(idx)]


def draw_xent(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    shape = d(ranked_shape)
    logits = values(d, shape, -3, 3)
    if d(st.booleans()):
        target = np.asarray(d(hnp.arrays(np.int64, shape[:-1],
                                         elements=st.integers(0, shape[-1] - 1))))
    else:
        w = values(d, shape, 0.1, 1.0)
        target = w / w.sum(axis=-1, keepdims=True)
    return [logits, target], {"reduction": d(st.sampled_from(["mean", "sum", "none"]))}


def ref_xent(at: dict[str, Any], logits: Arr, target: Arr) -> Arr:
    logp = logits - np_logsumexp(logits, axis=-1, keepdims=True)
    if target.dtype == np.int64:
        rows = -np.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    else:
        rows = -np.sum(target * logp, axis=-1)
    return {"none": rows, "sum": np.sum(rows), "mean": np.mean(rows)}[at["reduction"]]


def draw_where(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    bs = d(hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3, min_side=1,
                                             max_side=3))
    sc, sa, sb = bs.input_shapes
    cond = np.asarray(d(hnp.arrays(np.float64, sc, elements=st.sampled_from([0.0, 1.0]))))
    return [cond, values(d, sa), values(d, sb)], {}


def sign_safe_sigmoid(x: Arr) -> Arr:
    return 1 / (1 + np.exp(-x))


np_erf = np.vectorize(math.erf, otypes=[np.float64])


def ref_gelu(at: dict[str, Any], x: Arr) -> Arr:
    if at.get("approximate", "none") == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + np_erf(x / math.sqrt(2)))


def draw_gelu(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    at = {} if d(st.booleans()) else {"approximate": d(st.sampled_from(["none", "tanh"]))}
    return [values(d, d(small_shape), -4, 4)], at


def draw_leaky(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    at = {} if d(st.booleans()) else {"alpha": d(st.sampled_from([0.2, -0.5, 1, 0.0]))}
    return [values(d, d(small_shape), gap=0.1)], at


def draw_clip(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    # x on odd quarters, min on whole numbers, max on halves: no two ever tie (no kinks).
    bs = d(hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3, min_side=1,
                                             max_side=3)).input_shapes
    grid = [np.asarray(d(hnp.arrays(np.int64, bs[k], elements=st.integers(-4, 4))), np.float64)
            for k in range(3)]
    operands = [np.asarray(grid[0] * 0.5 + 0.25), grid[1], np.asarray(grid[2] + 0.5)]
    return operands[: d(st.integers(1, 3))], {}


def ref_clip(at: dict[str, Any], x: Arr, *bounds: Arr) -> Arr:
    y = x
    if bounds:
        y = np.maximum(y, bounds[0])
    if len(bounds) == 2:
        y = np.minimum(y, bounds[1])
    return y + 0.0 * sum(bounds)  # the broadcast shape, as the op's


def comparison(op: str, ref: Callable[..., Arr], arity: int = 2) -> Case:
    def draw(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
        shapes = d(hnp.mutually_broadcastable_shapes(num_shapes=arity, min_dims=0, max_dims=3,
                                                     min_side=1, max_side=3)).input_shapes
        dtype = d(st.sampled_from([np.float64, np.int64]))
        return [np.asarray(d(hnp.arrays(dtype, sh, elements=st.integers(-2, 2))))
                for sh in shapes], {}

    def call(at: dict[str, Any], *xs: Arr) -> Arr:
        return np.asarray(ref(*xs)).astype(xs[0].dtype)

    return Case(op, call, draw, nondiff=tuple(range(arity)))


def draw_gather(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    shape = d(ranked_shape)
    axis = d(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    idx_shape = d(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3))
    indices = np.asarray(d(hnp.arrays(np.int64, idx_shape, elements=st.integers(-n, n - 1))))
    return [values(d, shape), indices], ({"axis": axis} if axis or d(st.booleans()) else {})


def spatial(d: Draw, s: int, name: str, lo: int, hi: int, count: int | None = None,
            at: dict[str, Any] | None = None) -> tuple[int, ...]:
    """Per-axis ints of an attribute, put in ``at`` unless they are the default (drawn)."""
    value = tuple(d(st.integers(lo, hi)) for _ in range(count or s))
    if at is not None and (d(st.booleans()) or any(v != lo for v in value)):
        at[name] = value
    return value


def draw_conv(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    s = d(st.integers(1, 2))
    group = d(st.sampled_from([1, 1, 2, 3]))
    cg, mg = d(st.integers(1, 2)), d(st.integers(1, 2))
    kernel = tuple(d(st.integers(1, 3)) for _ in range(s))
    at: dict[str, Any] = {}
    spatial(d, s, "strides", 1, 2, at=at)
    dilations = spatial(d, s, "dilations", 1, 2, at=at)
    pads = spatial(d, s, "pads", 0, 2, 2 * s, at)
    if group > 1 or d(st.booleans()):
        at["group"] = group
    size = tuple(max(dl * (k - 1) + 1 - p0 - p1, 1) + d(st.integers(0, 3)) for k, dl, p0, p1 in
                 zip(kernel, dilations, pads[:s], pads[s:], strict=True))
    lead = d(hnp.array_shapes(min_dims=0, max_dims=1, min_side=1, max_side=2))
    x = values(d, (*lead, group * cg, *size))
    w = values(d, (group * mg, cg, *kernel))
    operands = [x, w] + ([values(d, (group * mg,))] if d(st.booleans()) else [])
    return operands, at


def ref_conv(at: dict[str, Any], x: Arr, w: Arr, b: Arr | None = None) -> Arr:
    s = w.ndim - 2
    return oracles.conv(x, w, b, at.get("strides", (1,) * s), at.get("pads", (0,) * 2 * s),
                        at.get("dilations", (1,) * s), at.get("group", 1))


def draw_pool(d: Draw, how: str) -> tuple[list[Arr], dict[str, Any]]:
    s = d(st.integers(1, 2))
    kernel = tuple(d(st.integers(1, 3)) for _ in range(s))
    at: dict[str, Any] = {"kernel_shape": kernel}
    strides = spatial(d, s, "strides", 1, 3, at=at)
    dilations = spatial(d, s, "dilations", 1, 2, at=at) if how == "max" else (1,) * s
    pads = spatial(d, s, "pads", 0, 2, 2 * s, at)
    ceil = d(st.booleans())
    if ceil or d(st.booleans()):
        at["ceil_mode"] = ceil
    if how == "average" and d(st.booleans()):
        at["count_include_pad"] = d(st.booleans())
    size = tuple(d(st.integers(1, 6)) for _ in range(s))
    assume(oracles.covers_input(size, kernel, strides, pads, dilations, ceil))
    shape = (*d(hnp.array_shapes(min_dims=0, max_dims=1, min_side=1, max_side=2)),
             d(st.integers(1, 2)), *size)
    return [distinct(d, shape) if how == "max" else values(d, shape)], at


def ref_pool(how: str) -> Callable[..., Arr]:
    def call(at: dict[str, Any], x: Arr) -> Arr:
        kernel = at["kernel_shape"]
        s = len(kernel)
        return oracles.pool(x, kernel, at.get("strides", (1,) * s), at.get("pads", (0,) * 2 * s),
                            at.get("dilations", (1,) * s), at.get("ceil_mode", False), how,
                            at.get("count_include_pad", False))

    return call


def draw_choice(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    (x,), at = draw_pool(d, "max")
    return [x, values(d, x.shape)], at


def ref_choice(at: dict[str, Any], x: Arr, t: Arr) -> Arr:
    """t at each window's maximum of x (x is tie-free), window by window."""
    kernel = at["kernel_shape"]
    s = len(kernel)
    out, wins = oracles.windows(x.shape[-s:], kernel, at.get("strides", (1,) * s),
                                at.get("pads", (0,) * 2 * s), at.get("dilations", (1,) * s),
                                at.get("ceil_mode", False))
    y: Arr = np.zeros((*x.shape[:-s], *out))
    for o, reads, _ in wins:
        values = np.stack([x[(Ellipsis, *pos)] for pos in reads], axis=-1)
        picks = np.stack([t[(Ellipsis, *pos)] for pos in reads], axis=-1)
        first = np.argmax(values, axis=-1)[..., None]
        y[(Ellipsis, *o)] = np.take_along_axis(picks, first, axis=-1)[..., 0]
    return y


def draw_global_pool(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    shape = d(hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=3))
    axis = d(st.integers(0, len(shape) - 2)) - d(st.sampled_from([0, len(shape)]))
    return [values(d, shape)], ({"axis": axis} if axis or d(st.booleans()) else {})


def ref_global_pool(at: dict[str, Any], x: Arr) -> Arr:
    axis = at.get("axis", 0) % x.ndim
    return np.mean(x, axis=tuple(range(axis + 1, x.ndim)), keepdims=True)


def draw_batch_norm(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    shape = d(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=3))
    axis = d(st.integers(-len(shape), len(shape) - 1))
    c = shape[axis]
    operands = [values(d, shape), values(d, (c,)), values(d, (c,)), values(d, (c,)),
                values(d, (c,), 0.5, 2.0)]
    at: dict[str, Any] = {"axis": axis} if axis or d(st.booleans()) else {}
    if d(st.booleans()):
        at["epsilon"] = d(st.sampled_from([0.0, 1e-3, 0.5, 1]))
    return operands, at


def ref_batch_norm(at: dict[str, Any], x: Arr, scale: Arr, bias: Arr, mean: Arr,
                   var: Arr) -> Arr:
    axis = at.get("axis", 0) % x.ndim
    shape = [1] * x.ndim
    shape[axis] = -1

    def per_channel(a: Arr) -> Arr:
        return a.reshape(shape)

    eps = at.get("epsilon", 1e-5)
    return (per_channel(scale) * (x - per_channel(mean)) / np.sqrt(per_channel(var) + eps)
            + per_channel(bias))


def draw_layer_norm(d: Draw) -> tuple[list[Arr], dict[str, Any]]:
    shape = d(ranked_shape)
    axis = d(st.integers(-len(shape), len(shape) - 1))
    normalized = shape[axis % len(shape):]
    assume(int(np.prod(normalized)) > 1)  # one element: x - mean is 0, the gradient ~1/sqrt(eps)
    operands = [values(d, shape, -3, 3)]
    for _ in range(d(st.integers(1, 2))):
        k = d(st.integers(0, len(normalized)))
        sub = tuple(n if d(st.booleans()) else 1 for n in normalized[len(normalized) - k:])
        operands.append(values(d, sub))
    at: dict[str, Any] = {"axis": axis} if axis != -1 or d(st.booleans()) else {}
    if d(st.booleans()):
        at["epsilon"] = d(st.sampled_from([1e-3, 0.5]))
    return operands, at


def ref_layer_norm(at: dict[str, Any], x: Arr, scale: Arr, bias: Arr | None = None) -> Arr:
    axes = tuple(range(at.get("axis", -1) % x.ndim, x.ndim))
    mean = np.mean(x, axis=axes, keepdims=True)
    var = np.mean((x - mean) ** 2, axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + at.get("epsilon", 1e-5)) * scale
    return y if bias is None else y + bias


CASES = [
    unary("neg", np.negative),
    unary("exp", np.exp),
    unary("log", np.log, 0.2, 3),
    unary("sqrt", np.sqrt, 0.2, 3),
    unary("abs", np.abs, gap=0.1),
    unary("sin", np.sin),
    unary("cos", np.cos),
    unary("tanh", np.tanh),
    unary("sigmoid", sign_safe_sigmoid, -6, 6),
    unary("relu", lambda x: np.maximum(x, 0), gap=0.1),
    binary("add", np.add),
    binary("sub", np.subtract),
    binary("mul", np.multiply),
    binary("div", np.divide, gap_b=0.3),
    binary("pow", np.power, lo_a=0.2),
    binary("maximum", np.maximum, separated=True),
    binary("minimum", np.minimum, separated=True),
    Case("where", lambda at, c, a, b: np.where(c, a, b), draw_where, nondiff=(0,)),
    Case("matmul", lambda at, a, b: np.matmul(a, b), draw_matmul),
    reduction("sum", np.sum),
    reduction("mean", np.mean),
    reduction("max", np.max, ties_free=True),
    reduction("min", np.min, ties_free=True),
    reduction("logsumexp", np_logsumexp),
    one_axis("softmax", np_softmax),
    one_axis("log_softmax", lambda x, axis: np.log(np_softmax(x, axis))),
    Case("reshape", lambda at, x: x.reshape(at["shape"]), draw_reshape),
    Case("transpose", lambda at, x: np.transpose(x, at.get("perm")), draw_transpose),
    Case("broadcast_to", lambda at, x: np.broadcast_to(x, at["shape"]), draw_broadcast_to),
    Case("concat", lambda at, *xs: np.concatenate(xs, axis=at["axis"]), draw_concat),
    Case("slice", ref_slice, draw_slice),
    Case("softmax_cross_entropy", ref_xent, draw_xent),
    unary("erf", np_erf, -4, 4),
    unary("log1p", np.log1p, -0.5, 3),
    unary("expm1", np.expm1),
    unary("softplus", lambda x: np.log1p(np.exp(x)), -10, 10),
    Case("gelu", ref_gelu, draw_gelu),
    Case("leaky_relu", lambda at, x: np.where(x > 0, x, at.get("alpha", 0.01) * x), draw_leaky),
    Case("clip", ref_clip, draw_clip),
    comparison("equal", np.equal),
    comparison("less", np.less),
    comparison("less_equal", np.less_equal),
    comparison("greater", np.greater),
    comparison("greater_equal", np.greater_equal),
    comparison("not", lambda x: x == 0, arity=1),
    comparison("and", lambda a, b: (a != 0) & (b != 0)),
    comparison("or", lambda a, b: (a != 0) | (b != 0)),
    Case("gather", lambda at, data, idx: np.take(data, idx, axis=at.get("axis", 0)),
         draw_gather),
    Case("conv", ref_conv, draw_conv),
    Case("max_pool", ref_pool("max"), lambda d: draw_pool(d, "max")),
    Case("max_pool_choice", ref_choice, draw_choice, nondiff=(0,)),
    Case("average_pool", ref_pool("average"), lambda d: draw_pool(d, "average")),
    Case("global_average_pool", ref_global_pool, draw_global_pool),
    Case("batch_norm", ref_batch_norm, draw_batch_norm),
    Case("layer_norm", ref_layer_norm, draw_layer_norm),
]
# pow's exponent must stay clear of the base's sign issues: the base is drawn positive above.
BY_NAME = {c.op: c for c in CASES}


def test_every_op_has_a_case() -> None:
    assert set(BY_NAME) == set(OP_TABLE)


def graph_for(case: Case, operands: Sequence[Arr], attrs: dict[str, Any],
              constant: Sequence[bool] = ()) -> Graph:
    """One node applying the op; operand k is an input, or a constant where constant[k]."""
    inputs, consts, names = [], [], []
    for k, x in enumerate(operands):
        name = f"x{k}"
        names.append(name)
        if k < len(constant) and constant[k]:
            consts.append(Constant(name, x))
        else:
            dtype = DType.INT64 if x.dtype == np.int64 else DType.FLOAT64
            inputs.append(Input(name, x.shape, dtype, requires_grad=k not in case.nondiff
                                and dtype is DType.FLOAT64))
    node = Node("y", case.op, tuple(names), attrs)
    return Graph(tuple(inputs), (node,), ("y",), tuple(consts))


def upstream_for(expected: Arr, w: Arr) -> dict[str, Arr] | None:
    """An upstream gradient ``w`` for a float output; none for a mask of int64."""
    return {"y": w} if expected.dtype.kind == "f" else None


def numeric_vjp(f: Callable[..., Arr], operands: list[Arr], k: int, w: Arr,
                eps: float = 1e-6) -> Arr:
    """Central differences of sum(f(...) * w) with respect to operand k."""
    x = operands[k].copy()
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        saved = x[idx]
        parts = []
        for h in (eps, -eps):
            x[idx] = saved + h
            args = [*operands[:k], x, *operands[k + 1:]]
            parts.append(np.sum(f(*args) * w))
        x[idx] = saved
        grad[idx] = (parts[0] - parts[1]) / (2 * eps)
    return grad


@pytest.mark.parametrize("op", sorted(BY_NAME))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_forward_and_gradients_match_reference(op: str, data: st.DataObject) -> None:
    case = BY_NAME[op]
    operands, attrs = case.draw(data.draw)
    expected = np.asarray(case.ref(attrs, *operands))
    w = np.asarray(data.draw(hnp.arrays(np.float64, expected.shape,
                                        elements=st.floats(-1, 1, allow_nan=False))))
    result = Plan(graph_for(case, operands, attrs)).run(
        {f"x{k}": x for k, x in enumerate(operands)}, upstream=upstream_for(expected, w))
    np.testing.assert_allclose(result.outputs["y"], expected, rtol=1e-12, atol=1e-12)
    assert result.outputs["y"].shape == expected.shape
    for k, x in enumerate(operands):
        if k in case.nondiff or x.dtype != np.float64:
            assert f"x{k}" not in result.gradients
            continue
        numeric = numeric_vjp(lambda *xs: np.asarray(case.ref(attrs, *xs)), operands, k, w)
        got = result.gradients[f"x{k}"]
        assert got.shape == x.shape, "gradient must have the operand's shape, not the broadcast's"
        np.testing.assert_allclose(got, numeric, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("op", sorted(BY_NAME))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_batched_equals_looped(op: str, data: st.DataObject) -> None:
    case = BY_NAME[op]
    operands, attrs = case.draw(data.draw)
    # Some float operands become constants (shared by every example); at least one stays an input.
    constant = [data.draw(st.booleans()) and k > 0 for k in range(len(operands))]
    graph = graph_for(case, operands, attrs, constant)
    plan = Plan(graph)
    examples = [operands]
    for _ in range(2):  # more examples of the same shapes: float operands rescaled (sign kept)
        examples.append([
            x if c or x.dtype != np.float64 else x * np.asarray(data.draw(
                hnp.arrays(np.float64, x.shape, elements=st.floats(0.5, 1.5))))
            for x, c in zip(operands, constant, strict=True)
        ])
    fed = [i.name for i in graph.inputs]
    stacked = {n: np.stack([ex[int(n[1:])] for ex in examples]) for n in fed}
    refs = [np.asarray(case.ref(attrs, *ex)) for ex in examples]
    ups = np.stack([np.full(r.shape, 0.5 + j, dtype=r.dtype) for j, r in enumerate(refs)])
    batch = plan.run(stacked, batched=True, upstream=upstream_for(ups, ups))
    for j, ex in enumerate(examples):
        alone = plan.run({n: ex[int(n[1:])] for n in fed}, upstream=upstream_for(ups, ups[j]))
        np.testing.assert_allclose(batch.outputs["y"][j], alone.outputs["y"], rtol=1e-12,
                                   atol=1e-12)
        for name, g in alone.gradients.items():
            np.testing.assert_allclose(batch.gradients[name][j], g, rtol=1e-12, atol=1e-12)
