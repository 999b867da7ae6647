"""What an op is: one declarative entry holding its forward rule, its VJP per input, its shape
rule and its attribute schema, plus the helpers shape rules share.

Conventions every rule follows, so one rule serves single examples and stacked batches alike:

* Forward and VJP rules act on the *trailing* axes of their operands. Any leading axes are batch
  axes (a plan run on stacked examples adds one), so rules address axes with negative indices
  and leave leading axes alone.
* A forward rule is ``forward(p, *xs) -> y``; ``p`` holds the parameters the shape rule resolved
  from the node's attributes (normalised axes, a concrete reshape target, ...). Elementwise ops
  have none, and their rules drop ``p`` (``takes_params=False``): it keeps the hot path short.
* A VJP rule is ``vjp(p, g, y, *xs) -> dx``: given the upstream gradient ``g`` and the forward
  result ``y``, it returns the gradient for one operand. A broadcasting op may return it in the
  broadcast shape: the generated program (``program.py``) sums it back to the operand's shape
  (``unbroadcast``), in one place.
* Where calculus leaves the gradient open (a kink at 0, a tie, an infinity), a rule follows
  PyTorch, and the op's ``edges`` text says what it gives there.
* A rule without parameters may be a :class:`Formula` instead of a function: one Python
  expression over named operands, as PyTorch's ``derivatives.yaml`` writes its formulas
  (``"g * y"`` for exp's VJP). A generated program inlines it rather than calling a function.
* A shape rule is ``infer(types, attrs) -> (out_type, p)`` for per-example types; it raises
  :class:`EngineError` (without a node name: the validator adds it) when the operands don't fit.
  A rule that allocates a working buffer larger than its operands and result (conv's unfolded
  windows) says how many elements it holds per example under ``p[SCRATCH]``: validation holds
  that to the element limit like any tensor, before anything is allocated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from gradserve.engine.errors import EngineError, ErrorKind
from gradserve.engine.types import DType, Shape, TensorType

# What op rules compute on: numpy arrays, or numpy scalars on the single-example path (0-d values
# run as scalars, whose arithmetic is several times faster). numpy's stubs cannot express both.
Array = Any
AttrValue = int | bool | str | float | tuple[int, ...]
Params = Mapping[str, Any]
Attrs = Mapping[str, AttrValue]
Types = Sequence[TensorType]
Inferred = tuple[TensorType, Params]
Infer = Callable[[Types, Attrs], Inferred]
Pads = Callable[[Sequence[TensorType], TensorType], tuple[int, ...]]

NO_PARAMS: Params = {}
SCRATCH = "scratch"  # the parameter giving a rule's largest working buffer, elements per example

_NAME = re.compile(r"(?<![\w.])[A-Za-z_]\w*")  # a name, not an attribute (np.exp's exp)
FORMULA_GLOBALS = frozenset({"np", "abs"})  # what a formula may use besides its variables


@dataclass(frozen=True, slots=True)
class Formula:
    """A rule as one Python expression over its ``variables`` (named in the order a rule
    function takes its arguments), numpy as ``np`` and ``abs``; see the module's doc."""

    source: str
    variables: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = set(_NAME.findall(self.source)) - set(self.variables) - FORMULA_GLOBALS
        if unknown:
            raise ValueError(f"formula {self.source!r} uses unknown names {sorted(unknown)}")

    def bind(self, args: Sequence[str]) -> str:
        """The expression, parenthesised, with its variables renamed to ``args`` in order."""
        names = dict(zip(self.variables, args, strict=True))
        return "(" + _NAME.sub(lambda m: names.get(m[0], m[0]), self.source) + ")"


Forward = Callable[..., Array] | Formula
Vjp = Callable[..., Array] | Formula


def rule(how: Callable[..., Array] | str, *variables: str) -> Callable[..., Array] | Formula:
    """A rule from a function, or from a formula's source over ``variables``."""
    return Formula(how, variables) if isinstance(how, str) else how


class AttrKind(StrEnum):
    """The type of an attribute's value."""

    INT = "int"
    FLOAT = "float"  # finite; an int is taken for a float
    BOOL = "bool"
    STRING = "string"
    INTS = "ints"


@dataclass(frozen=True, slots=True)
class AttrSpec:
    """One attribute an op accepts: its kind, its default (None: optional, no default), its doc."""

    kind: AttrKind
    doc: str
    default: AttrValue | None = None
    required: bool = False
    choices: tuple[str, ...] = ()


def no_pads(types: Sequence[TensorType], out: TensorType) -> tuple[int, ...]:
    """Operands need no alignment on the batch axis (the op does not broadcast)."""
    return (0,) * len(types)


def broadcast_pads(types: Sequence[TensorType], out: TensorType) -> tuple[int, ...]:
    """Per-example broadcasting: a lower-rank operand gets size-1 axes after the batch axis, so
    numpy broadcasts it against the other operand's per-example axes, never the batch axis."""
    return tuple(out.rank - t.rank for t in types)


@dataclass(frozen=True, slots=True)
class OpDef:
    """One op of the table.

    ``vjps`` has one entry per operand (None: not differentiable, e.g. class labels); a variadic
    op (``max_arity`` None) has one entry shared by all operands that takes the operand's index
    first (a function: a formula takes no index). ``pads`` says how batched operands align per
    example when a plan runs batched;
    ``lifts`` that operands shared by all examples (constants) must get the batch axis too,
    for ops that cannot broadcast over it (concat, the class labels of a loss). ``edges`` says
    what the op gives at its edge points (0, ties, infinities), where it has any.
    """

    name: str
    doc: str
    min_arity: int
    max_arity: int | None
    infer: Infer
    forward: Forward
    vjps: tuple[Vjp | None, ...]
    attrs: Mapping[str, AttrSpec] = field(default_factory=dict)
    pads: Pads = no_pads
    lifts: bool = False
    takes_params: bool = True
    edges: str = ""
    jvp: Callable[..., str | None] | None = None  # forward mode: see ops/tangents.py

    def vjp(self, index: int) -> Vjp | None:
        """The VJP rule for operand ``index`` (for a variadic op, with the index bound)."""
        if self.max_arity is None:
            shared = self.vjps[0]
            if isinstance(shared, Formula):
                raise TypeError(f"{self.name}: a variadic op's VJP takes an index: a function")
            return None if shared is None else _bind_index(shared, index)
        return self.vjps[index]

    @property
    def arity_text(self) -> str:
        return arity_text(self.min_arity, self.max_arity)


def arity_text(low: int, high: int | None) -> str:
    """How many operands an op takes, as the docs and ``gradserve ops`` show it: ``2``,
    ``1-2``, ``1+`` (``high`` None: any number from ``low``)."""
    if high == low:
        return str(low)
    return f"{low}+" if high is None else f"{low}-{high}"


def _bind_index(shared: Callable[..., Array], index: int) -> Vjp:
    def bound(p: Params, g: Array, y: Array, *xs: Array) -> Array:
        return shared(index, p, g, y, *xs)

    return bound


def unbroadcast(g: Array, shape: Shape) -> Array:
    """Sum a gradient taken in a broadcast shape back to the operand's ``shape``: over the leading
    axes broadcasting added, and over the axes where the operand had size 1."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(shape) if d == 1 and g.shape[lead + i] != 1
    )
    return np.sum(g, axis=axes).reshape(shape)


# --- helpers for shape rules -------------------------------------------------------------------


def int_attr(attrs: Attrs, name: str) -> int:
    """An INT attribute's value (the validator checked its kind against the schema)."""
    value = attrs[name]
    if not isinstance(value, int):
        raise TypeError(f"attribute {name!r} is not an int: the op's schema is wrong")
    return value


def float_attr(attrs: Attrs, name: str) -> float:
    """A FLOAT attribute's value (the validator checked its kind against the schema)."""
    value = attrs[name]
    if not isinstance(value, float):
        raise TypeError(f"attribute {name!r} is not a float: the op's schema is wrong")
    return value


def ints_attr(attrs: Attrs, name: str) -> tuple[int, ...] | None:
    """An INTS attribute's value, or None when absent (the validator checked its kind)."""
    value = attrs.get(name)
    if value is not None and not isinstance(value, tuple):
        raise TypeError(f"attribute {name!r} is not a tuple of ints: the op's schema is wrong")
    return value


def fail(kind: ErrorKind, message: str, field: str | None = None) -> EngineError:
    """An error for a shape rule to raise; the validator adds the node's name."""
    return EngineError(kind, message, field=field)


def same_float_dtype(types: Sequence[TensorType], positions: Sequence[int] | None = None) -> DType:
    """The common float dtype of the operands at ``positions`` (default: all); anything else is an
    error, since the engine never promotes types silently."""
    idx = range(len(types)) if positions is None else positions
    first = types[idx[0]].dtype
    for i in idx:
        t = types[i].dtype
        if not t.is_float:
            raise fail(ErrorKind.DTYPE, f"operand {i} is {t}; this op takes float32 or float64",
                       f"inputs[{i}]")
        if t is not first:
            raise fail(ErrorKind.DTYPE, f"operand {i} is {t} but operand {idx[0]} is {first}; "
                       "operands must share one dtype", f"inputs[{i}]")
    return first


def same_dtype(types: Sequence[TensorType]) -> DType:
    """The one dtype all operands share, any of the engine's (int64 included); else an error."""
    first = types[0].dtype
    for i, t in enumerate(types):
        if t.dtype is not first:
            raise fail(ErrorKind.DTYPE, f"operand {i} is {t.dtype} but operand 0 is {first}; "
                       "operands must share one dtype", f"inputs[{i}]")
    return first


def broadcast_shape(types: Sequence[TensorType]) -> Shape:
    """numpy's broadcast of the operands' shapes, or a SHAPE error naming them."""
    try:
        return tuple(np.broadcast_shapes(*(t.shape for t in types)))
    except ValueError:
        shapes = ", ".join(str(list(t.shape)) for t in types)
        raise fail(ErrorKind.SHAPE, f"shapes {shapes} do not broadcast") from None


def normalize_axes(axes: Sequence[int], rank: int, name: str = "axis") -> tuple[int, ...]:
    """Axes as negative indices (which mean the same per example and on a batch), checked."""
    out: list[int] = []
    for a in axes:
        if not -rank <= a < rank:
            raise fail(ErrorKind.ATTRIBUTE, f"{name} {a} is out of range for rank {rank}",
                       f"attrs.{name}")
        n = a - rank if a >= 0 else a
        if n in out:
            raise fail(ErrorKind.ATTRIBUTE, f"{name} {a} is repeated", f"attrs.{name}")
        out.append(n)
    return tuple(sorted(out))


def expand_reduced(g: Array, axes: tuple[int, ...], keepdims: bool) -> Array:
    """Put back the axes a reduction removed, so ``g`` broadcasts against its operand."""
    return g if keepdims else np.expand_dims(g, axes)
