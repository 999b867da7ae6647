"""Elementwise ops: each entry pairs the forward rule with the VJP of every operand.

Binary ops broadcast like numpy; their VJPs may return gradients in the broadcast shape, and the
generated program sums them back (``unbroadcast``). At edge points each op follows PyTorch, as
its ``edges`` text says: ``maximum``/``minimum`` give half the gradient to each side of a tie,
relu'(0) = abs'(0) = 0, leaky_relu'(0) = alpha, ``clip`` passes the gradient where
min <= x <= max (both ends included), and ``pow`` zeroes d(a**b)/db only where a == 0 and
b >= 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np

from gradserve.engine.ops.base import (
    NO_PARAMS,
    Array,
    AttrKind,
    Attrs,
    AttrSpec,
    Inferred,
    OpDef,
    Params,
    Types,
    broadcast_pads,
    broadcast_shape,
    float_attr,
    rule,
    same_float_dtype,
)
from gradserve.engine.ops.special import TWO_OVER_SQRT_PI, erf, erf_slope
from gradserve.engine.ops.tangents import Jvp, Step, Tangents, linear
from gradserve.engine.types import TensorType


def _elementwise(types: Types, attrs: Attrs) -> Inferred:
    return TensorType(broadcast_shape(types), same_float_dtype(types)), NO_PARAMS


def _where(types: Types, attrs: Attrs) -> Inferred:
    # The condition may have any dtype (nonzero is true) and is never differentiated.
    return TensorType(broadcast_shape(types), same_float_dtype(types, (1, 2))), NO_PARAMS


def _gelu_params(types: Types, attrs: Attrs) -> Inferred:
    out, _ = _elementwise(types, attrs)
    return out, {"tanh": attrs["approximate"] == "tanh"}


def _leaky_params(types: Types, attrs: Attrs) -> Inferred:
    out, _ = _elementwise(types, attrs)
    return out, {"alpha": float_attr(attrs, "alpha")}


SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715  # the tanh form's coefficient, as PyTorch and ONNX write it


def _gelu(p: Params, x: Array) -> Array:
    if p["tanh"]:
        return 0.5 * x * (1 + np.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)))
    return 0.5 * x * (1 + erf(x * SQRT_HALF))


def _gelu_vjp(p: Params, g: Array, y: Array, x: Array) -> Array:
    if p["tanh"]:  # PyTorch's GeluBackward for the tanh form
        x2 = x * x
        t = np.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x2 * x))
        slope = SQRT_2_OVER_PI * (1 + 3 * GELU_CUBIC * x2)
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * slope)
    return g * (0.5 * (1 + erf(x * SQRT_HALF)) + x * INV_SQRT_2PI * np.exp(-0.5 * x * x))


def _clip_fit(types: Types, attrs: Attrs) -> Inferred:
    return TensorType(broadcast_shape(types), same_float_dtype(types)), NO_PARAMS


def _clip(x: Array, *bounds: Array) -> Array:
    """min(max(x, lo), hi), the bounds given (as torch.clamp: hi wins where lo > hi)."""
    if not bounds:
        return x
    y = np.maximum(x, bounds[0])
    return y if len(bounds) == 1 else np.minimum(y, bounds[1])


def _clip_x(g: Array, y: Array, x: Array, *bounds: Array) -> Array:
    # PyTorch's clamp_backward_min_max: x gets g where lo <= x <= hi (both ends included).
    if not bounds:
        return g
    inside = x >= bounds[0]
    if len(bounds) == 2:
        inside = inside & (x <= bounds[1])
    return np.where(inside, g, 0)


def _clip_lo(g: Array, y: Array, x: Array, *bounds: Array) -> Array:
    below = x < bounds[0]
    if len(bounds) == 2:
        below = below & (bounds[0] < bounds[1])  # where lo > hi, hi alone decides
    return np.where(below, g, 0)


def _clip_hi(g: Array, y: Array, x: Array, lo: Array, hi: Array) -> Array:
    return np.where((x > hi) | (hi < lo), g, 0)


def _sigmoid(x: Array) -> Array:
    # 1/(1+e) for x >= 0 and e/(1+e) for x < 0, with e = exp(-|x|) <= 1: nothing overflows and
    # small results keep their relative precision. The numerator is spelt with comparisons
    # rather than where/minimum, which cost far more on the scalars of a single example.
    e = np.exp(-abs(x))
    return ((x < 0) * e + (x >= 0)) / (1 + e)


def _share(g: Array, x: Array, other: Array) -> Array:
    """The part of ``g`` that flows to ``x`` in max(x, other): all where x wins, half on a tie."""
    return np.where(x > other, g, np.where(x == other, 0.5 * g, 0))


def _pow_base(g: Array, y: Array, a: Array, b: Array) -> Array:
    # d(a**b)/da = b * a**(b-1), taken as 0 where b == 0 (a**0 is constant, even at a == 0).
    # The usual exponent is a nonzero constant: then no masking pass is needed.
    d = g * b * a ** (b - 1)
    nonzero = bool(b) if b.ndim == 0 else b.all()
    return d if nonzero else np.where(b == 0, 0, d)


def unary(name: str, doc: str, forward: Callable[..., Array] | str,
          vjp: Callable[..., Array] | str, edges: str = "", jvp: Jvp | None = None) -> OpDef:
    """An elementwise op of one float operand ``x``: its forward rule, its VJP over the
    upstream gradient ``g``, the result ``y`` and ``x`` (formulas, or functions of them), and
    its forward-mode rule."""
    return OpDef(name=name, doc=doc, min_arity=1, max_arity=1, infer=_elementwise,
                 forward=rule(forward, "x"), vjps=(rule(vjp, "g", "y", "x"),),
                 takes_params=False, edges=edges, jvp=jvp)


def binary(name: str, doc: str, forward: Callable[..., Array] | str,
           vjp_a: Callable[..., Array] | str, vjp_b: Callable[..., Array] | str,
           edges: str = "", jvp: Jvp | None = None) -> OpDef:
    """A broadcasting elementwise op of two float operands ``a`` and ``b``: its forward rule,
    the VJP of each over ``g``, ``y``, ``a`` and ``b`` (formulas, or functions of them), and
    its forward-mode rule."""
    return OpDef(name=name, doc=doc, min_arity=2, max_arity=2, infer=_elementwise,
                 pads=broadcast_pads, forward=rule(forward, "a", "b"),
                 vjps=(rule(vjp_a, "g", "y", "a", "b"), rule(vjp_b, "g", "y", "a", "b")),
                 takes_params=False, edges=edges, jvp=jvp)


# --- forward-mode rules: the tangent dy from the operands' tangents (None: zero) -------------


def _scaled(slope: Callable[[Tangents, Step], str]) -> Jvp:
    """The rule dy = dx * slope, for a unary op whose derivative ``slope`` is written with
    table ops."""
    def jvp(t: Tangents, s: Step) -> str | None:
        (dx,) = s.tangents
        return None if dx is None else t.op("mul", dx, slope(t, s))
    return jvp


def _over(denominator: Callable[[Tangents, Step], str]) -> Jvp:
    """The rule dy = dx / denominator, for a unary op whose derivative is 1/denominator (its
    VJP divides by it too)."""
    def jvp(t: Tangents, s: Step) -> str | None:
        (dx,) = s.tangents
        return None if dx is None else t.op("div", dx, denominator(t, s))
    return jvp


def _moving(s: Step, first: int = 0) -> tuple[str, ...]:
    """The operands from index ``first`` on that have a tangent."""
    return tuple(x for x, dx in zip(s.inputs[first:], s.tangents[first:], strict=True)
                 if dx is not None)


def _spread(t: Tangents, s: Step, dy: str | None, *sources: str) -> str | None:
    """``dy``, written from the values ``sources`` by broadcasting, in the output's shape: a
    tangent has its value's shape (a + b along b alone must not keep b's smaller shape, or a
    sum downstream would count it once instead of once per copy)."""
    shape = t.type(s.output).shape
    if dy is None or np.broadcast_shapes(*(t.type(x).shape for x in sources)) == shape:
        return dy
    return t.op("broadcast_to", dy, shape=shape)


def _jvp_add(t: Tangents, s: Step) -> str | None:
    return _spread(t, s, t.add(*s.tangents), *_moving(s))


def _jvp_sub(t: Tangents, s: Step) -> str | None:
    da, db = s.tangents
    return _spread(t, s, t.add(da, t.neg(db)), *_moving(s))


def _jvp_mul(t: Tangents, s: Step) -> str | None:
    (a, b), (da, db) = s.inputs, s.tangents
    return t.add(t.mul(da, b), t.mul(db, a))


def _jvp_div(t: Tangents, s: Step) -> str | None:
    (_, b), (da, db) = s.inputs, s.tangents
    dy_b = None if db is None else t.op("div", t.op("mul", db, s.output), b)
    return t.add(None if da is None else t.op("div", da, b), t.neg(dy_b))


def _jvp_pow(t: Tangents, s: Step) -> str | None:
    # d/da = b a**(b-1), 0 where b == 0 as the VJP takes it. There the formula is already 0
    # except where it is NaN (0 * inf: a = 0, a**-1 overflowing, a NaN): only that is masked,
    # so the formula's own derivative in b (1/a) stays right at b == 0 for second order.
    # d/db = y log(a), 0 where a == 0 and b >= 0 (the limit), as the VJP.
    (a, b), (da, db) = s.inputs, s.tangents
    zero = t.const(0.0, s.output)

    def slope_a() -> str:
        d = t.op("mul", b, t.op("pow", a, t.op("sub", b, t.const(1.0, s.output))))
        nan = t.op("not", t.op("equal", d, d))
        return t.op("where", t.op("and", t.op("equal", b, zero), nan), zero, d)

    def slope_b() -> str:
        limit = t.op("and", t.op("equal", a, zero), t.op("greater_equal", b, zero))
        return t.op("where", limit, zero, t.op("mul", s.output, t.op("log", a)))

    return t.add(None if da is None else t.op("mul", da, slope_a()),
                 None if db is None else t.op("mul", db, slope_b()))


def _share_mask(t: Tangents, x: str, other: str) -> str:
    """1 where x wins max(x, other), 1/2 on a tie, 0 elsewhere (as the VJP's share)."""
    half = t.op("mul", t.op("equal", x, other), t.const(0.5, x))
    return t.op("add", t.op("greater", x, other), half)


def _extremum(maximum: bool) -> Jvp:
    """maximum or minimum: each operand's tangent where it wins, half of each on a tie."""
    def jvp(t: Tangents, s: Step) -> str | None:
        (a, b), (da, db) = s.inputs, s.tangents
        over = (a, b) if maximum else (b, a)  # a wins where over[0] > over[1]
        return t.add(None if da is None else t.op("mul", da, _share_mask(t, *over)),
                     None if db is None else t.op("mul", db, _share_mask(t, *over[::-1])))
    return jvp


def _jvp_where(t: Tangents, s: Step) -> str | None:
    (c, _, _), (_, da, db) = s.inputs, s.tangents
    if da is None and db is None:
        return None
    zero = t.const(0.0, s.output)
    return _spread(t, s, t.op("where", c, da or zero, db or zero), c, *_moving(s, 1))


def _sign(t: Tangents, x: str) -> str:
    zero = t.const(0.0, x)
    return t.op("sub", t.op("greater", x, zero), t.op("less", x, zero))


def _gelu_slope(t: Tangents, s: Step) -> str:
    """d gelu(x)/dx with table ops, as the VJP's rule (its tanh form too)."""
    (x,) = s.inputs
    c = partial(t.const, like=x)
    if s.attrs.get("approximate", "none") == "tanh":
        x2 = t.op("mul", x, x)
        inner = t.op("mul", c(SQRT_2_OVER_PI), t.op("add", x, t.op("mul", c(GELU_CUBIC),
                                                                   t.op("mul", x2, x))))
        th = t.op("tanh", inner)
        slope = t.op("mul", c(SQRT_2_OVER_PI),
                     t.op("add", c(1.0), t.op("mul", c(3 * GELU_CUBIC), x2)))
        left = t.op("mul", c(0.5), t.op("add", c(1.0), th))
        right = t.op("mul", t.op("mul", c(0.5), x), t.op("mul", t.op(
            "sub", c(1.0), t.op("mul", th, th)), slope))
        return t.op("add", left, right)
    cdf = t.op("mul", c(0.5), t.op("add", c(1.0), t.op("erf", t.op("mul", x, c(SQRT_HALF)))))
    pdf = t.op("mul", c(INV_SQRT_2PI), t.op("exp", t.op("mul", c(-0.5), t.op("mul", x, x))))
    return t.op("add", cdf, t.op("mul", x, pdf))


def _alpha(s: Step) -> float:
    """leaky_relu's slope below 0 (validated: a number)."""
    alpha = s.attrs.get("alpha", 0.01)
    return float(alpha) if isinstance(alpha, int | float) else 0.01


def _jvp_clip(t: Tangents, s: Step) -> str | None:
    # The VJP's masks with table ops: x where lo <= x <= hi, lo where x < lo < hi (lo alone:
    # x < lo), hi where x > hi or hi < lo.
    x, bounds = s.inputs[0], s.inputs[1:]
    dx, dbounds = s.tangents[0], s.tangents[1:]
    if not bounds:
        return dx
    inside = t.op("greater_equal", x, bounds[0])
    below = t.op("less", x, bounds[0])
    terms: list[str | None] = []
    if len(bounds) == 2:
        lo, hi = bounds
        inside = t.op("and", inside, t.op("less_equal", x, hi))
        below = t.op("and", below, t.op("less", lo, hi))
        above = t.op("or", t.op("greater", x, hi), t.op("less", hi, lo))
        terms.append(t.mul(dbounds[1], above))
    terms += [t.mul(dx, inside), t.mul(dbounds[0], below)]
    return t.add(*terms)


# Formulas where the rule is one expression (generated programs inline them); functions where
# it needs more, or where numpy's scalar paths want a particular spelling.
OPS = [
    # name, doc, forward, VJP per operand (g: upstream gradient, y: forward result), edges
    unary("neg", "Negation -x.", "-x", "-g", jvp=lambda t, s: linear(t, s, "neg")),
    unary("exp", "Exponential e**x.", "np.exp(x)", "g * y",
          "gradient e**x: 0 at -inf, inf at inf (and wherever e**x overflows).",
          jvp=_scaled(lambda t, s: s.output)),
    unary("log", "Natural logarithm.", "np.log(x)", "g / x",
          "gradient 1/x: inf at 0 (-inf at -0), 0 at inf; below 0 the value is NaN.",
          jvp=_over(lambda t, s: s.inputs[0])),
    unary("sqrt", "Square root.", "np.sqrt(x)", "0.5 * g / y",
          "gradient 0.5/sqrt(x): inf at 0 (-inf at -0), 0 at inf, NaN below 0.",
          jvp=_scaled(lambda t, s: t.op("div", t.const(0.5, s.output), s.output))),
    unary("abs", "Absolute value.", "abs(x)", "g * np.sign(x)", "abs'(0) = 0.",
          jvp=_scaled(lambda t, s: _sign(t, s.inputs[0]))),
    unary("sin", "Sine.", "np.sin(x)", "g * np.cos(x)", "NaN at ±inf.",
          jvp=_scaled(lambda t, s: t.op("cos", s.inputs[0]))),
    unary("cos", "Cosine.", "np.cos(x)", "-g * np.sin(x)", "NaN at ±inf.",
          jvp=_scaled(lambda t, s: t.op("neg", t.op("sin", s.inputs[0])))),
    unary("tanh", "Hyperbolic tangent.", "np.tanh(x)", "g * (1 - y * y)",
          "gradient 1 - y**2: 0 at ±inf.",
          jvp=_scaled(lambda t, s: t.op("sub", t.const(1.0, s.output),
                                        t.op("mul", s.output, s.output)))),
    unary("sigmoid", "Logistic sigmoid 1/(1+e**-x), stable for any x.", _sigmoid,
          "g * y * (1 - y)", "gradient y(1 - y): 0 at ±inf.",
          jvp=_scaled(lambda t, s: t.op("mul", s.output, t.op(
              "sub", t.const(1.0, s.output), s.output)))),
    unary("relu", "max(x, 0).", "np.maximum(x, 0)", "g * (x > 0)", "relu'(0) = 0.",
          jvp=_scaled(lambda t, s: t.op("greater", s.inputs[0], t.const(0.0, s.inputs[0])))),
    binary("add", "Sum a + b (broadcasting).", "a + b", "g", "g", jvp=_jvp_add),
    binary("sub", "Difference a - b (broadcasting).", "a - b", "g", "-g", jvp=_jvp_sub),
    binary("mul", "Product a * b (broadcasting).", "a * b", "g * b", "g * a", jvp=_jvp_mul),
    binary("div", "Quotient a / b (broadcasting).", "a / b", "g / b", "-g * y / b",
           "at b = 0 both gradients are infinite (d/db is NaN where a = 0 too).",
           jvp=_jvp_div),
    binary("pow", "Power a ** b, b a tensor too (broadcasting).", "a ** b",
           _pow_base, "np.where((a == 0) & (b >= 0), 0, g * y * np.log(a))",
           "d/da = b a**(b-1), taken as 0 where b = 0 (even at a = 0), infinite at a = 0 "
           "for b < 1; d/db = a**b log(a), taken as 0 where a = 0 and b >= 0 (the limit), "
           "-inf where a = 0 and b < 0, NaN where a < 0.", jvp=_jvp_pow),
    binary("maximum", "Elementwise max (broadcasting).", "np.maximum(a, b)",
           lambda g, y, a, b: _share(g, a, b), lambda g, y, a, b: _share(g, b, a),
           "a tie (a = b) gives half the gradient to each side.", jvp=_extremum(True)),
    binary("minimum", "Elementwise min (broadcasting).", "np.minimum(a, b)",
           lambda g, y, a, b: _share(g, b, a), lambda g, y, a, b: _share(g, a, b),
           "a tie (a = b) gives half the gradient to each side.", jvp=_extremum(False)),
    OpDef(
        name="where", doc="where(cond, a, b): a where cond is nonzero, else b (broadcasting).",
        min_arity=3, max_arity=3, infer=_where, pads=broadcast_pads,
        forward=rule("np.where(c, a, b)", "c", "a", "b"), takes_params=False,
        vjps=(None, rule("np.where(c, g, 0)", "g", "y", "c", "a", "b"),
              rule("np.where(c, 0, g)", "g", "y", "c", "a", "b")),
        edges="cond, of any dtype, is not differentiated: an input that reaches the outputs "
              "only through conditions gets no gradient (none in the result), even if it "
              "requires one.",
        jvp=_jvp_where,
    ),
    unary("erf", "Error function 2/sqrt(pi) * integral of exp(-t**2) from 0 to x (to about "
          "1e-16 relative in float64).", erf, lambda g, y, x: g * erf_slope(x),
          "erf(±inf) = ±1, with gradient 0.",
          jvp=_scaled(lambda t, s: t.op("mul", t.const(TWO_OVER_SQRT_PI, s.inputs[0]), t.op(
              "exp", t.op("neg", t.op("mul", s.inputs[0], s.inputs[0])))))),
    unary("log1p", "log(1 + x), accurate for small x.", "np.log1p(x)", "g / (1 + x)",
          "gradient 1/(1 + x): inf at -1, 0 at inf; below -1 the value is NaN.",
          jvp=_over(lambda t, s: t.op("add", t.const(1.0, s.inputs[0]), s.inputs[0]))),
    unary("expm1", "e**x - 1, accurate for small x.", "np.expm1(x)", "g * (y + 1)",
          "gradient e**x: 0 at -inf, inf at inf (and wherever e**x overflows).",
          jvp=_scaled(lambda t, s: t.op("add", s.output, t.const(1.0, s.output)))),
    unary("softplus", "log(1 + e**x), computed stably for any x (no threshold).",
          "np.logaddexp(x, 0)", lambda g, y, x: g * _sigmoid(x),
          "gradient sigmoid(x): 0 at -inf, 1 at inf. Exact everywhere: PyTorch's default "
          "threshold returns x itself above 20, a difference below 2.1e-9.",
          jvp=_scaled(lambda t, s: t.op("sigmoid", s.inputs[0]))),
    OpDef(
        name="gelu", doc="Gaussian error linear unit x * Phi(x): exact (via erf) or PyTorch's "
        "tanh approximation.",
        min_arity=1, max_arity=1, infer=_gelu_params,
        attrs={"approximate": AttrSpec(AttrKind.STRING, "none: exact, through erf; tanh: "
                                       "0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3)))",
                                       default="none", choices=("none", "tanh"))},
        forward=_gelu, vjps=(_gelu_vjp,),
        edges="gelu(-inf) is NaN (-inf * 0) and its gradient NaN; gelu(inf) = inf with "
              "gradient NaN; both as PyTorch.",
        jvp=_scaled(_gelu_slope),
    ),
    OpDef(
        name="leaky_relu", doc="x where x > 0, else alpha * x.",
        min_arity=1, max_arity=1, infer=_leaky_params,
        attrs={"alpha": AttrSpec(AttrKind.FLOAT, "the slope below 0", default=0.01)},
        forward=lambda p, x: np.where(x > 0, x, p["alpha"] * x),
        vjps=(lambda p, g, y, x: np.where(x > 0, g, p["alpha"] * g),),
        edges="leaky_relu'(0) = alpha (as PyTorch).",
        jvp=_scaled(lambda t, s: t.op("where", t.op("greater", s.inputs[0], t.const(
            0.0, s.inputs[0])), t.const(1.0, s.inputs[0]), t.const(_alpha(s), s.inputs[0]))),
    ),
    OpDef(
        name="clip", doc="clip(x[, min[, max]]): min(max(x, min), max) (broadcasting); an "
        "omitted bound does not clip. To give max alone, pass min as a -inf constant.",
        min_arity=1, max_arity=3, infer=_clip_fit, pads=broadcast_pads,
        forward=_clip, vjps=(_clip_x, _clip_lo, _clip_hi), takes_params=False,
        edges="as torch.clamp: x gets the gradient where min <= x <= max (both ends "
              "included), min where x < min < max, max where x > max or max < min (where "
              "min > max the result is max); where x < min = max, none gets it. A NaN x gives "
              "NaN with gradient 0.",
        jvp=_jvp_clip,
    ),
]
