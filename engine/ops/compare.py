"""Comparisons and logic: elementwise masks, never differentiated.

Each op takes operands of one dtype (float32, float64 or int64, broadcasting like numpy) and
gives a mask of 0 and 1 *in that same dtype*: a float mask multiplies into float arithmetic
without a cast, and any mask serves as ``where``'s condition. The logic ops read nonzero as
true, as ``where`` does. Their VJPs are None: an input that reaches the outputs only through
them gets no gradient (no entry in the result), as with ``where``'s condition.
"""

from __future__ import annotations

from gradserve.engine.ops.base import (
    NO_PARAMS,
    Attrs,
    Inferred,
    OpDef,
    Types,
    broadcast_pads,
    broadcast_shape,
    rule,
    same_dtype,
)
from gradserve.engine.ops.tangents import Step, Tangents
from gradserve.engine.types import TensorType

EDGES = ("not differentiated: an input that reaches the outputs only through masks gets no "
         "gradient (none in the result).")


def _mask(types: Types, attrs: Attrs) -> Inferred:
    return TensorType(broadcast_shape(types), same_dtype(types)), NO_PARAMS


def mask(name: str, doc: str, formula: str, *operands: str) -> OpDef:
    """A mask op over ``operands``: ``formula`` gives a bool, cast to the first one's dtype."""
    return OpDef(name=name, doc=doc + " A 0/1 mask in the operands' dtype.",
                 min_arity=len(operands), max_arity=len(operands), infer=_mask,
                 pads=broadcast_pads, takes_params=False,
                 forward=rule(f"({formula}).astype({operands[0]}.dtype)", *operands),
                 vjps=(None,) * len(operands), edges=EDGES, jvp=_constant)


def _constant(t: Tangents, s: Step) -> None:
    """A mask is piecewise constant: its tangent is zero."""
    return None


OPS = [
    mask("equal", "a == b (broadcasting).", "a == b", "a", "b"),
    mask("less", "a < b (broadcasting).", "a < b", "a", "b"),
    mask("less_equal", "a <= b (broadcasting).", "a <= b", "a", "b"),
    mask("greater", "a > b (broadcasting).", "a > b", "a", "b"),
    mask("greater_equal", "a >= b (broadcasting).", "a >= b", "a", "b"),
    mask("not", "Logical not: 1 where x is 0.", "x == 0", "x"),
    mask("and", "Logical and: 1 where a and b are both nonzero (broadcasting).",
         "(a != 0) & (b != 0)", "a", "b"),
    mask("or", "Logical or: 1 where a or b is nonzero (broadcasting).",
         "(a != 0) | (b != 0)", "a", "b"),
]
