"""Elementwise ops: each entry pairs the forward rule with the VJP of every operand.

Binary ops broadcast like numpy; their VJPs may return gradients in the broadcast shape, and the
generated program sums them back (``unbroadcast``). At edge points each op follows PyTorch, as
its ``edges`` text says: ``maximum``/``minimum`` give half the gradient to each side of a tie,
relu'(0) = abs'(0) = 0, and ``pow`` zeroes d(a**b)/db only where a == 0 and b >= 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gradserve.engine.ops.base import (
    NO_PARAMS,
    Array,
    Attrs,
    Inferred,
    OpDef,
    Types,
    broadcast_pads,
    broadcast_shape,
    rule,
    same_float_dtype,
)
from gradserve.engine.types import TensorType


def _elementwise(types: Types, attrs: Attrs) -> Inferred:
    return TensorType(broadcast_shape(types), same_float_dtype(types)), NO_PARAMS


def _where(types: Types, attrs: Attrs) -> Inferred:
    # The condition may have any dtype (nonzero is true) and is never differentiated.
    return TensorType(broadcast_shape(types), same_float_dtype(types, (1, 2))), NO_PARAMS


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
          vjp: Callable[..., Array] | str, edges: str = "") -> OpDef:
    """An elementwise op of one float operand ``x``: its forward rule and its VJP over the
    upstream gradient ``g``, the result ``y`` and ``x`` (formulas, or functions of them)."""
    return OpDef(name=name, doc=doc, min_arity=1, max_arity=1, infer=_elementwise,
                 forward=rule(forward, "x"), vjps=(rule(vjp, "g", "y", "x"),),
                 takes_params=False, edges=edges)


def binary(name: str, doc: str, forward: Callable[..., Array] | str,
           vjp_a: Callable[..., Array] | str, vjp_b: Callable[..., Array] | str,
           edges: str = "") -> OpDef:
    """A broadcasting elementwise op of two float operands ``a`` and ``b``: its forward rule and
    the VJP of each over ``g``, ``y``, ``a`` and ``b`` (formulas, or functions of them)."""
    return OpDef(name=name, doc=doc, min_arity=2, max_arity=2, infer=_elementwise,
                 pads=broadcast_pads, forward=rule(forward, "a", "b"),
                 vjps=(rule(vjp_a, "g", "y", "a", "b"), rule(vjp_b, "g", "y", "a", "b")),
                 takes_params=False, edges=edges)


# Formulas where the rule is one expression (generated programs inline them); functions where
# it needs more, or where numpy's scalar paths want a particular spelling.
OPS = [
    # name, doc, forward, VJP per operand (g: upstream gradient, y: forward result), edges
    unary("neg", "Negation -x.", "-x", "-g"),
    unary("exp", "Exponential e**x.", "np.exp(x)", "g * y",
          "gradient e**x: 0 at -inf, inf at inf (and wherever e**x overflows)."),
    unary("log", "Natural logarithm.", "np.log(x)", "g / x",
          "gradient 1/x: inf at 0 (-inf at -0), 0 at inf; below 0 the value is NaN."),
    unary("sqrt", "Square root.", "np.sqrt(x)", "0.5 * g / y",
          "gradient 0.5/sqrt(x): inf at 0 (-inf at -0), 0 at inf, NaN below 0."),
    unary("abs", "Absolute value.", "abs(x)", "g * np.sign(x)", "abs'(0) = 0."),
    unary("sin", "Sine.", "np.sin(x)", "g * np.cos(x)", "NaN at ±inf."),
    unary("cos", "Cosine.", "np.cos(x)", "-g * np.sin(x)", "NaN at ±inf."),
    unary("tanh", "Hyperbolic tangent.", "np.tanh(x)", "g * (1 - y * y)",
          "gradient 1 - y**2: 0 at ±inf."),
    unary("sigmoid", "Logistic sigmoid 1/(1+e**-x), stable for any x.", _sigmoid,
          "g * y * (1 - y)", "gradient y(1 - y): 0 at ±inf."),
    unary("relu", "max(x, 0).", "np.maximum(x, 0)", "g * (x > 0)", "relu'(0) = 0."),
    binary("add", "Sum a + b (broadcasting).", "a + b", "g", "g"),
    binary("sub", "Difference a - b (broadcasting).", "a - b", "g", "-g"),
    binary("mul", "Product a * b (broadcasting).", "a * b", "g * b", "g * a"),
    binary("div", "Quotient a / b (broadcasting).", "a / b", "g / b", "-g * y / b",
           "at b = 0 both gradients are infinite (d/db is NaN where a = 0 too)."),
    binary("pow", "Power a ** b, b a tensor too (broadcasting).", "a ** b",
           _pow_base, "np.where((a == 0) & (b >= 0), 0, g * y * np.log(a))",
           "d/da = b a**(b-1), taken as 0 where b = 0 (even at a = 0), infinite at a = 0 "
           "for b < 1; d/db = a**b log(a), taken as 0 where a = 0 and b >= 0 (the limit), "
           "-inf where a = 0 and b < 0, NaN where a < 0."),
    binary("maximum", "Elementwise max (broadcasting).", "np.maximum(a, b)",
           lambda g, y, a, b: _share(g, a, b), lambda g, y, a, b: _share(g, b, a),
           "a tie (a = b) gives half the gradient to each side."),
    binary("minimum", "Elementwise min (broadcasting).", "np.minimum(a, b)",
           lambda g, y, a, b: _share(g, b, a), lambda g, y, a, b: _share(g, a, b),
           "a tie (a = b) gives half the gradient to each side."),
    OpDef(
        name="where", doc="where(cond, a, b): a where cond is nonzero, else b (broadcasting).",
        min_arity=3, max_arity=3, infer=_where, pads=broadcast_pads,
        forward=rule("np.where(c, a, b)", "c", "a", "b"), takes_params=False,
        vjps=(None, rule("np.where(c, g, 0)", "g", "y", "c", "a", "b"),
              rule("np.where(c, 0, g)", "g", "y", "c", "a", "b")),
        edges="cond, of any dtype, is not differentiated: an input that reaches the outputs "
              "only through conditions gets no gradient (none in the result), even if it "
              "requires one.",
    ),
]
