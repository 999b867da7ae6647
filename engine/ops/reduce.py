"""Reductions over axes: sum, mean, max, min, and the softmax family built on them.

Axes are normalised to negative indices by the shape rule, so the same rule reduces the same
per-example axes whether or not a batch axis leads. Ties in max/min split the gradient evenly
among the tied elements, as ``torch.amax`` and autograd do.
"""

from __future__ import annotations

from math import prod

import numpy as np

from gradserve.engine.errors import ErrorKind
from gradserve.engine.ops.base import (
    Array,
    AttrKind,
    Attrs,
    AttrSpec,
    AttrValue,
    Forward,
    Inferred,
    OpDef,
    Params,
    Types,
    Vjp,
    expand_reduced,
    fail,
    int_attr,
    normalize_axes,
    same_float_dtype,
)
from gradserve.engine.ops.tangents import Jvp, Step, Tangents, linear
from gradserve.engine.types import TensorType

AXES = AttrSpec(AttrKind.INTS, "axes to reduce; absent: all axes")
KEEPDIMS = AttrSpec(AttrKind.BOOL, "keep reduced axes with size 1", default=False)
AXIS = AttrSpec(AttrKind.INT, "the axis to normalise over", default=-1)
TIES = ("tied elements share the gradient evenly (as torch.amax, and torch.max without a dim; "
        "torch.max along a dim gives it all to one, and so does max_pool: to each window's "
        "first maximum).")


def _reduction(types: Types, attrs: Attrs) -> Inferred:
    (x,) = types
    dtype = same_float_dtype(types)
    given = attrs.get("axis")
    axes = normalize_axes(given, x.rank) if isinstance(given, tuple) else tuple(range(-x.rank, 0))
    keep = bool(attrs["keepdims"])
    kept = {x.rank + a for a in axes}
    shape = tuple(1 if i in kept else d for i, d in enumerate(x.shape) if keep or i not in kept)
    count = prod(x.shape[i] for i in kept)
    return TensorType(shape, dtype), {"axes": axes, "keepdims": keep, "count": count}


def _one_axis(types: Types, attrs: Attrs) -> Inferred:
    (x,) = types
    if x.rank == 0:
        raise fail(ErrorKind.SHAPE, "needs an operand of rank >= 1", "inputs[0]")
    (a,) = normalize_axes((int_attr(attrs, "axis"),), x.rank)
    return TensorType(x.shape, same_float_dtype(types)), {"axis": a}


def _extreme_vjp(p: Params, g: Array, y: Array, x: Array) -> Array:
    """max/min: the gradient goes to the elements equal to the result, split evenly among ties."""
    axes, keep = p["axes"], p["keepdims"]
    hit = x == expand_reduced(y, axes, keep)
    ties = np.sum(hit, axis=axes, keepdims=True, dtype=x.dtype)
    return np.where(hit, expand_reduced(g, axes, keep) / ties, 0)


def logsumexp(x: Array, axes: tuple[int, ...]) -> Array:
    """log(sum(exp(x))) over ``axes`` (kept, size 1), shifted by the max so it never overflows."""
    m = np.max(x, axis=axes, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    return np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True)) + m


def _reduce(name: str, doc: str, forward: Forward, vjp: Vjp, edges: str = "",
            jvp: Jvp | None = None) -> OpDef:
    return OpDef(name=name, doc=doc, min_arity=1, max_arity=1, infer=_reduction,
                 attrs={"axis": AXES, "keepdims": KEEPDIMS}, forward=forward, vjps=(vjp,),
                 edges=edges, jvp=jvp or (lambda t, s: linear(t, s, name)))


# --- forward-mode rules -------------------------------------------------------------------------


def _axes(s: Step, keepdims: bool) -> dict[str, AttrValue]:
    """The node's reduction axes (absent: all), with ``keepdims``."""
    attrs: dict[str, AttrValue] = {"keepdims": keepdims}
    if "axis" in s.attrs:
        attrs["axis"] = s.attrs["axis"]
    return attrs


def _jvp_extreme(t: Tangents, s: Step, op: str) -> str | None:
    """max/min: the mean of the tangent over the tied elements (the VJP's even split); 0 where
    none equals the result (a NaN among them), as the VJP gives."""
    (x,), (dx,) = s.inputs, s.tangents
    if dx is None:
        return None
    hit = t.op("equal", x, t.op(op, x, **_axes(s, True)))
    keep = _axes(s, bool(s.attrs.get("keepdims", False)))
    ties = t.op("maximum", t.op("sum", hit, **keep), t.const(1.0, x))
    return t.op("div", t.op("sum", t.op("mul", dx, hit), **keep), ties)


def _jvp_logsumexp(t: Tangents, s: Step) -> str | None:
    (x,), (dx,) = s.inputs, s.tangents
    if dx is None:
        return None
    weights = t.op("exp", t.op("sub", x, t.op("logsumexp", x, **_axes(s, True))))
    return t.op("sum", t.op("mul", dx, weights),
                **_axes(s, bool(s.attrs.get("keepdims", False))))


def _one(s: Step) -> AttrValue:
    return s.attrs.get("axis", -1)


def _jvp_softmax(t: Tangents, s: Step) -> str | None:
    (dx,), y = s.tangents, s.output
    if dx is None:
        return None
    mean = t.op("sum", t.op("mul", y, dx), axis=_one(s), keepdims=True)
    return t.op("mul", y, t.op("sub", dx, mean))


def _jvp_log_softmax(t: Tangents, s: Step) -> str | None:
    (dx,), y = s.tangents, s.output
    if dx is None:
        return None
    return t.op("sub", dx, t.op("sum", t.op("mul", t.op("exp", y), dx), axis=_one(s),
                                keepdims=True))


def _sum_vjp(p: Params, g: Array, y: Array, x: Array) -> Array:
    return np.broadcast_to(expand_reduced(g, p["axes"], p["keepdims"]), x.shape)


OPS = [
    _reduce("sum", "Sum over axes.",
            lambda p, x: np.sum(x, axis=p["axes"], keepdims=p["keepdims"]), _sum_vjp),
    _reduce("mean", "Mean over axes.",
            lambda p, x: np.mean(x, axis=p["axes"], keepdims=p["keepdims"]),
            lambda p, g, y, x: _sum_vjp(p, g, y, x) / p["count"]),
    _reduce("max", "Maximum over axes.",
            lambda p, x: np.max(x, axis=p["axes"], keepdims=p["keepdims"]), _extreme_vjp,
            TIES, jvp=lambda t, s: _jvp_extreme(t, s, "max")),
    _reduce("min", "Minimum over axes.",
            lambda p, x: np.min(x, axis=p["axes"], keepdims=p["keepdims"]), _extreme_vjp,
            TIES, jvp=lambda t, s: _jvp_extreme(t, s, "min")),
    _reduce("logsumexp", "log(sum(exp(x))) over axes, computed stably.",
            lambda p, x: (logsumexp(x, p["axes"]) if p["keepdims"]
                          else np.squeeze(logsumexp(x, p["axes"]), p["axes"])),
            lambda p, g, y, x: expand_reduced(g, p["axes"], p["keepdims"])
            * np.exp(x - expand_reduced(y, p["axes"], p["keepdims"])),
            "gradient exp(x - y): NaN where an element and the result are both infinite (an "
            "element is inf, or all are -inf).", jvp=_jvp_logsumexp),
    OpDef(
        name="softmax", doc="exp(x) / sum(exp(x)) along one axis, computed stably.",
        min_arity=1, max_arity=1, infer=_one_axis, attrs={"axis": AXIS},
        forward=lambda p, x: np.exp(x - logsumexp(x, (p["axis"],))),
        vjps=(lambda p, g, y, x: y * (g - np.sum(g * y, axis=p["axis"], keepdims=True)),),
        edges="a -inf element gives 0, with gradient 0; an inf element makes its own value "
              "and every gradient NaN; all -inf gives NaN.",
        jvp=_jvp_softmax,
    ),
    OpDef(
        name="log_softmax", doc="x - logsumexp(x) along one axis.",
        min_arity=1, max_arity=1, infer=_one_axis, attrs={"axis": AXIS},
        forward=lambda p, x: x - logsumexp(x, (p["axis"],)),
        vjps=(lambda p, g, y, x: g - np.exp(y) * np.sum(g, axis=p["axis"], keepdims=True),),
        edges="a -inf element gives -inf, with gradient g; an inf element makes its own "
              "value and gradient NaN (the others -inf); all -inf gives NaN.",
        jvp=_jvp_log_softmax,
    ),
]
