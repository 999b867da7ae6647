"""Random graphs, valid and invalid, sent over real gRPC to a running server.

The decoder, the validator and the engine each guard against bad input; whatever slips between
them would surface as UNKNOWN or INTERNAL, a wrong answer or a hang. So hypothesis draws valid
graphs from the whole op table (values kept inside each op's domain, away from its kinks and
ties, and bounded, so that finite differences are meaningful; a comparison's operands apart and
a logic op's off zero, so no mask flips under them) and mutations of them that cannot stay
valid. A valid request must be answered with the outputs of a local forward run of the
engine (and of a numpy reference written here) and with the gradients central finite
differences of that forward pass give; an invalid one must fail with INVALID_ARGUMENT,
RESOURCE_EXHAUSTED or NOT_FOUND, a short message without a trace, and a BadRequest field
violation naming the field at fault. Each run sends 2,000 valid and 3,000 invalid requests,
derandomized, so CI is reproducible; after them the server must still answer a known request.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gradserve.engine import OP_TABLE, AttrKind, Constant, DType, Graph, Input, Node, Plan
from gradserve.engine.ops import AttrValue
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.tensors import tensor_to_wire
from tests.server.conftest import RPC_TIMEOUT, decode, failure, quadratic, request, scalars

Arr = Any  # numpy arrays and scalars; numpy's stubs type many results loosely
Shape = tuple[int, ...]
Draw = st.DrawFn

VALID_CASES = 2000
INVALID_CASES = 3000
MIN_RUNS_PER_OP = 30  # live nodes of each op across the valid cases (about 40 to 140 each)
MIN_CASES_PER_MUTATION = 30

SHAPES: tuple[Shape, ...] = ((), (3,), (2, 3))
MARGIN = 0.05  # how far values stay from kinks (abs, relu, max ties) and domain edges
BOUND = 100.0  # the largest magnitude a value may take
MAX_SIZE = 64  # the most elements a value may hold
NAME_LIMIT = 256  # ServerConfig.max_name_length, the default
H = 1e-6  # the central-difference step
FD_RTOL = 1e-5
FD_ATOL = 1e-5

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False)


T = TypeVar("T")


def choose(draw: Draw, items: Sequence[T]) -> T:
    """One of ``items`` (cheaper than drawing from a new ``sampled_from`` strategy each time)."""
    return items[draw(st.integers(0, len(items) - 1))]


# --- values and their guards -------------------------------------------------------------------


def positive(x: Arr) -> bool:
    return bool(np.all(x > MARGIN))


def off_zero(x: Arr) -> bool:
    return bool(np.all(np.abs(x) > MARGIN))


def apart(a: Arr, b: Arr) -> bool:
    return off_zero(np.subtract(a, b))


def broadcasts(*shapes: Shape) -> bool:
    try:
        np.broadcast_shapes(*shapes)
    except ValueError:
        return False
    return True


def multipliable(a: Shape, b: Shape) -> bool:
    try:
        np.matmul(np.zeros(a), np.zeros(b))
    except ValueError:
        return False
    return True


def tie_free(x: Arr, axes: tuple[int, ...] | None) -> bool:
    """No two elements reduced together are within MARGIN of each other (max and min kinks)."""
    r = np.ndim(x)
    reduced = tuple(range(r)) if axes is None else tuple(a % r for a in axes)
    if not reduced:
        return True
    moved = np.moveaxis(x, reduced, tuple(range(r - len(reduced), r)))
    rows = np.sort(np.reshape(moved, (-1, math.prod(x.shape[a] for a in reduced))), axis=1)
    return bool(np.all(np.diff(rows, axis=1) > MARGIN))


def logsumexp(x: Arr, axis: int | tuple[int, ...] | None) -> Arr:
    m = np.max(x, axis=axis, keepdims=True)
    return np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m


# The C library's error functions, one element at a time (the engine has its own erf).
erf = np.vectorize(math.erf, otypes=[np.float64])
erfc = np.vectorize(math.erfc, otypes=[np.float64])


def gelu_exact(x: Arr) -> Arr:
    return x * 0.5 * erfc(-x / math.sqrt(2.0))  # x Phi(x)


def gelu_tanh(x: Arr) -> Arr:  # PyTorch's approximate="tanh"
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


@dataclass(frozen=True)
class Windows:
    """Windows over the last ``len(kernel)`` axes as ONNX's attributes give them (pads: all
    begins, then all ends)."""

    kernel: Shape
    strides: Shape
    pads: Shape
    dilations: Shape
    ceil: bool = False

    def out(self, size: Shape) -> Shape:
        """Windows per axis: PyTorch's formula (a ceil_mode window must start inside the input
        or the begin padding)."""
        s, outs = len(size), []
        for a, n in enumerate(size):
            k, st_, d = self.kernel[a], self.strides[a], self.dilations[a]
            begin, end = self.pads[a], self.pads[s + a]
            o = (n + begin + end - d * (k - 1) - 1 + (st_ - 1 if self.ceil else 0)) // st_ + 1
            if self.ceil and (o - 1) * st_ >= n + begin:
                o -= 1
            outs.append(o)
        return tuple(outs)

    def each(self, size: Shape) -> Iterator[tuple[Shape, list[list[int]]]]:
        """Each window: its output position, and the positions it reads per axis (negative or
        past the input where it reads padding)."""
        for o in itertools.product(*(range(n) for n in self.out(size))):
            yield o, [[o[a] * self.strides[a] - self.pads[a] + t * self.dilations[a]
                       for t in range(self.kernel[a])] for a in range(len(size))]


def conv_reference(x: Arr, w: Arr, b: Arr | None, win: Windows, group: int) -> Arr:
    """Cross-correlation window by window: the taps over the input (padding adds nothing),
    contracted with each group's weights."""
    s = len(win.kernel)
    size = x.shape[-s:]
    m, cg = w.shape[:2]
    mg = m // group
    y: Arr = np.zeros((*x.shape[:-1 - s], m, *win.out(size)))
    for o, positions in win.each(size):
        taps = [[(t, p) for t, p in enumerate(ps) if 0 <= p < n]
                for ps, n in zip(positions, size, strict=True)]
        if not all(taps):
            continue  # padding only: zero
        reads: Arr = (..., *np.ix_(*([p for _, p in axis] for axis in taps)))
        patch = x[reads]  # (..., C, *taps)
        kernel: Arr = np.ix_(*([t for t, _ in axis] for axis in taps))
        for g in range(group):
            xg = patch[(..., slice(g * cg, (g + 1) * cg), *(slice(None),) * s)]
            wg = w[(slice(g * mg, (g + 1) * mg), slice(None), *kernel)]  # (M/G, C/G, *taps)
            y[(..., slice(g * mg, (g + 1) * mg), *o)] = np.tensordot(
                xg, wg, axes=(list(range(xg.ndim - 1 - s, xg.ndim)), list(range(1, 2 + s))))
    return y if b is None else y + np.reshape(b, (m,) + (1,) * s)


def pool_reference(x: Arr, win: Windows, how: str) -> Arr | None:
    """Max or mean over each window's input elements (padding never counts, except in the
    divisor for ``how`` "average_pad"); None where a window reads padding only, or (max)
    where its maximum is not clear of the runner-up by more than MARGIN."""
    s = len(win.kernel)
    size = x.shape[-s:]
    y: Arr = np.zeros((*x.shape[:-s], *win.out(size)))
    for o, positions in win.each(size):
        reads = [[p for p in ps if 0 <= p < n] for ps, n in zip(positions, size, strict=True)]
        if not all(reads):
            return None
        window: Arr = (..., *np.ix_(*reads))
        values = np.reshape(x[window], (*x.shape[:-s], -1))
        if how == "max":
            top = np.sort(values, axis=-1)
            if top.shape[-1] > 1 and not np.all(top[..., -1] - top[..., -2] > MARGIN):
                return None
            y[(..., *o)] = top[..., -1]
            continue
        count = values.shape[-1]
        if how == "average_pad":  # the given padding counts; ceil_mode's overhang never
            count = math.prod(sum(-win.pads[a] <= p < n + win.pads[s + a] for p in ps)
                              for a, (ps, n) in enumerate(zip(positions, size, strict=True)))
        y[(..., *o)] = np.sum(values, axis=-1) / count
    return y


def choice_reference(x: Arr, t: Arr, win: Windows) -> Arr | None:
    """t at each window's maximum of x (max_pool_choice); None where a window reads padding
    only, or where its maximum is not clear of the runner-up by more than MARGIN."""
    s = len(win.kernel)
    size = x.shape[-s:]
    y: Arr = np.zeros((*x.shape[:-s], *win.out(size)))
    for o, positions in win.each(size):
        reads = [[p for p in ps if 0 <= p < n] for ps, n in zip(positions, size, strict=True)]
        if not all(reads):
            return None
        window: Arr = (..., *np.ix_(*reads))
        values = np.reshape(x[window], (*x.shape[:-s], -1))
        top = np.sort(values, axis=-1)
        if top.shape[-1] > 1 and not np.all(top[..., -1] - top[..., -2] > MARGIN):
            return None
        picks = np.reshape(t[window], (*t.shape[:-s], -1))
        first = np.argmax(values, axis=-1)[..., None]
        y[(..., *o)] = np.take_along_axis(picks, first, axis=-1)[..., 0]
    return y


# --- drawing valid graphs --------------------------------------------------------------------


@dataclass(frozen=True)
class Val:
    """A value of a graph being drawn: its name and its value in each example. An ``exact``
    value stays put when finite differences nudge the inputs (a constant, an int, a mask of
    operands kept apart, or a value computed from those alone); a ``hidden`` one is never
    picked as an operand or an output (clip's -inf bound)."""

    name: str
    xs: tuple[Arr, ...]
    floating: bool = True
    exact: bool = False
    hidden: bool = False

    @property
    def shape(self) -> Shape:
        return tuple(np.shape(self.xs[0]))

    @property
    def rank(self) -> int:
        return len(self.shape)


Pred = Callable[[Val], bool]


def every(ok: Callable[[Arr], bool]) -> Pred:
    """A value whose every example passes ``ok``."""
    return lambda v: all(ok(x) for x in v.xs)


def ranked(v: Val) -> bool:
    return v.rank >= 1


def steady(v: Val) -> bool:
    """Whether the finite differences' nudges cannot move ``v`` across zero."""
    return v.exact or every(off_zero)(v)


class Draft:
    """A graph being drawn, with the value of every name in every example (numpy, computed
    here), so each node is drawn only where its op is smooth and its values bounded."""

    def __init__(self, draw: Draw, examples: int) -> None:
        self.draw = draw
        # Values come from a generator seeded by hypothesis: drawing each number through
        # hypothesis would take most of the run's time, and the structure is what it explores.
        self.rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        self.examples = examples
        self.used: set[str] = set()
        self.inputs: list[Input] = []
        self.constants: list[Constant] = []
        self.nodes: list[Node] = []
        self.vals: list[Val] = []
        self.labels: dict[str, tuple[str, int]] = {}  # xent node: its label constant, classes
        self.indices: dict[str, tuple[str, int]] = {}  # gather node: its indices, axis size

    def name(self) -> str:
        """A new name: ASCII, any unicode, or 256 characters of up to 4 bytes each."""
        kind = self.draw(st.integers(0, 15))
        if kind == 0:
            name = choose(self.draw, ("λ", "名", "\U0001f600", "x")) * NAME_LIMIT
        elif kind < 8:
            name = self.draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=6))
        else:
            name = choose(self.draw, ("x", "y", "z", "w", "out", "loss"))
        k = len(self.used)
        while name in self.used:
            name, k = f"_{k}", k + 1
        self.used.add(name)
        return name

    def floats(self, shape: Shape, lo: float = -2.0, hi: float = 2.0) -> Arr:
        return self.rng.uniform(lo, hi, shape)

    def spread(self, shape: Shape) -> Arr:
        """Values in [-2, 2] more than MARGIN apart from one another, however they are grouped
        (max_pool's windows): an evenly spaced grid, shuffled and jittered."""
        n = math.prod(shape)
        step = 4.0 / n  # > MARGIN, since n <= MAX_SIZE
        jitter = 0.45 * (step - MARGIN)
        x = -2.0 + (self.rng.permutation(n) + 0.5) * step + self.rng.uniform(-jitter, jitter, n)
        return np.reshape(x, shape)

    def input(self, shape: Shape, lo: float | None = None, spread: bool = False) -> Val:
        """A new float input; its values from ``lo`` (drawn when None) to 2, or spread."""
        if lo is None and not spread:
            lo = choose(self.draw, (-2.0, 0.2))  # some inputs positive, for log and sqrt
        low = -2.0 if lo is None else lo
        val = Val(self.name(), tuple(self.spread(shape) if spread else self.floats(shape, low)
                                     for _ in range(self.examples)))
        self.inputs.append(Input(val.name, shape,
                                 requires_grad=self.draw(st.integers(0, 3)) > 0))
        self.vals.append(val)
        return val

    def int_input(self, shape: Shape, low: int, high: int) -> Val:
        """A new int64 input (never differentiated), its values in [low, high)."""
        val = Val(self.name(), tuple(self.rng.integers(low, high, shape, dtype=np.int64)
                                     for _ in range(self.examples)), floating=False, exact=True)
        self.inputs.append(Input(val.name, shape, DType.INT64, requires_grad=False))
        self.vals.append(val)
        return val

    def constant(self, value: Arr, hidden: bool = False) -> Val:
        val = Val(self.name(), (value,) * self.examples, value.dtype.kind == "f", exact=True,
                  hidden=hidden)
        self.constants.append(Constant(val.name, value))
        self.vals.append(val)
        return val

    def pick(self, fits: Pred | None = None, floating: bool | None = True) -> Val | None:
        """A value of the graph that ``fits``, if there is one: a float one, an int one
        (``floating`` False) or either (None)."""
        found = [v for v in self.vals if not v.hidden and floating in (None, v.floating)
                 and (fits is None or fits(v))]
        return choose(self.draw, found) if found else None

    def node(self, op: str, operands: Sequence[Val], attrs: dict[str, AttrValue],
             forward: Callable[..., Arr], floating: bool = True,
             exact: bool | None = None) -> bool:
        """Add the node if its values are bounded (and not too big) in every example. It is
        exact if said so (a mask), else if all its operands are."""
        ys = tuple(np.asarray(forward(*(o.xs[e] for o in operands)), dtype=np.float64)
                   for e in range(self.examples))
        if ys[0].size > MAX_SIZE or not all(np.all(np.abs(y) <= BOUND) for y in ys):
            return False
        if exact is None:
            exact = all(o.exact for o in operands)
        val = Val(self.name(), ys, floating, exact)
        self.nodes.append(Node(val.name, op, tuple(o.name for o in operands), attrs))
        self.vals.append(val)
        return True


# A maker draws a node of the op it is given, with operands and attributes for which the op is
# smooth and its values bounded, and adds it; False when it cannot here.
Maker = Callable[[Draft, str], bool]

UNARY: dict[str, tuple[Callable[[Arr], Arr], Callable[[Arr], bool] | None]] = {
    "neg": (np.negative, None),
    "exp": (np.exp, lambda x: bool(np.all(x < 3))),
    "log": (np.log, positive),
    "sqrt": (np.sqrt, positive),
    "abs": (np.abs, off_zero),
    "relu": (lambda x: np.maximum(x, 0.0), off_zero),
    "sin": (np.sin, None),
    "cos": (np.cos, None),
    "tanh": (np.tanh, None),
    "sigmoid": (lambda x: 1 / (1 + np.exp(-x)), None),
    "erf": (erf, None),
    "log1p": (np.log1p, lambda x: bool(np.all(x > MARGIN - 1))),
    "expm1": (np.expm1, lambda x: bool(np.all(x < 3))),
    "softplus": (lambda x: np.log(1 + np.exp(x)), None),
}

BINARY: dict[str, tuple[Callable[[Arr, Arr], Arr], Callable[[Arr], bool] | None,
                        Callable[[Arr, Arr], bool] | None]] = {
    "add": (np.add, None, None),
    "sub": (np.subtract, None, None),
    "mul": (np.multiply, None, None),
    "div": (np.divide, None, lambda a, b: off_zero(b)),
    "pow": (np.power, positive, lambda a, b: bool(np.all(np.abs(b) <= 3))),
    "maximum": (np.maximum, None, apart),
    "minimum": (np.minimum, None, apart),
}


def unary(d: Draft, op: str) -> bool:
    forward, ok = UNARY[op]
    x = d.pick(None if ok is None else every(ok))
    return x is not None and d.node(op, [x], {}, forward)


def binary(d: Draft, op: str) -> bool:
    forward, ok_a, ok_ab = BINARY[op]
    a = d.pick(None if ok_a is None else every(ok_a))
    if a is None:
        return False

    def fits(b: Val) -> bool:
        return broadcasts(a.shape, b.shape) and (
            ok_ab is None or all(ok_ab(x, y) for x, y in zip(a.xs, b.xs, strict=True)))

    b = d.pick(fits) if d.draw(st.booleans()) else None
    if b is None:
        shape = choose(d.draw, [s for s in sorted({*SHAPES, a.shape}) if broadcasts(s, a.shape)])
        b = d.constant(d.floats(shape))
        if not fits(b):
            return False
    return d.node(op, [a, b], {}, forward)


def where(d: Draft, op: str) -> bool:
    a = d.pick()
    assert a is not None
    b = d.pick(lambda v: broadcasts(a.shape, v.shape))
    assert b is not None  # a itself fits
    out = np.broadcast_shapes(a.shape, b.shape)
    cond = d.pick(lambda v: broadcasts(out, v.shape) and steady(v), floating=None) if d.draw(
        st.booleans()) else None
    if cond is None:  # a mask of any dtype; a float condition is never differentiated
        shape = choose(d.draw, ((), out))
        dtype = choose(d.draw, (np.int64, np.float64))
        cond = d.constant(d.rng.integers(0, 2, shape).astype(dtype))
    return d.node(op, [cond, a, b], {}, np.where)


REDUCE: dict[str, Callable[..., Arr]] = {"sum": np.sum, "mean": np.mean, "max": np.max,
                                         "min": np.min}


def reduction(d: Draft, op: str) -> bool:
    x = d.pick()
    assert x is not None
    r = x.rank
    attrs: dict[str, AttrValue] = {}
    axes: tuple[int, ...] | None = None
    if d.draw(st.booleans()):
        axes = tuple(d.draw(st.lists(st.integers(-r, r - 1), max_size=r,
                                     unique_by=lambda a: a % r))) if r else ()
        attrs["axis"] = axes
    keepdims = d.draw(st.booleans())
    if keepdims or d.draw(st.booleans()):
        attrs["keepdims"] = keepdims
    if op in ("max", "min") and not all(tie_free(v, axes) for v in x.xs):
        return False
    if op == "logsumexp":
        def forward(v: Arr) -> Arr:
            y = logsumexp(v, axes)
            return y if keepdims else np.squeeze(y, axes)
    else:
        reduce = REDUCE[op]

        def forward(v: Arr) -> Arr:
            return reduce(v, axis=axes, keepdims=keepdims)

    return d.node(op, [x], attrs, forward)


def normalize(d: Draft, op: str) -> bool:
    x = d.pick(ranked)
    if x is None:
        return False
    axis = d.draw(st.integers(-x.rank, x.rank - 1))
    attrs: dict[str, AttrValue] = {} if axis == -1 and d.draw(st.booleans()) else {"axis": axis}
    if op == "softmax":
        def forward(v: Arr) -> Arr:
            return np.exp(v - logsumexp(v, axis))
    else:
        def forward(v: Arr) -> Arr:
            return v - logsumexp(v, axis)
    return d.node(op, [x], attrs, forward)


def reshape(d: Draft, op: str) -> bool:
    x = d.pick()
    assert x is not None
    n = math.prod(x.shape)
    targets = {(n,), x.shape[::-1], (1, *x.shape), (*x.shape, 1)} | ({()} if n == 1 else set())
    target = list(choose(d.draw, sorted(targets)))
    if len(target) > 0 and d.draw(st.booleans()):
        target[d.draw(st.integers(0, len(target) - 1))] = -1
    return d.node(op, [x], {"shape": tuple(target)}, lambda v: np.reshape(v, target))


def transpose(d: Draft, op: str) -> bool:
    x = d.pick()
    assert x is not None
    if d.draw(st.booleans()):
        return d.node(op, [x], {}, np.transpose)
    perm = tuple(d.draw(st.permutations(range(x.rank))))
    return d.node(op, [x], {"perm": perm}, lambda v: np.transpose(v, perm))


def broadcast_to(d: Draft, op: str) -> bool:
    x = d.pick()
    assert x is not None
    lead = choose(d.draw, ((), (2,)))
    target = (*lead, *(d.draw(st.integers(1, 3)) if n == 1 else n for n in x.shape))
    return d.node(op, [x], {"shape": target}, lambda v: np.broadcast_to(v, target))


def concat(d: Draft, op: str) -> bool:
    first = d.pick(ranked)
    if first is None:
        return False
    axis = d.draw(st.integers(-first.rank, first.rank - 1))
    a = axis % first.rank

    def fits(v: Val) -> bool:
        return v.rank == first.rank and all(
            m == n for k, (m, n) in enumerate(zip(v.shape, first.shape, strict=True)) if k != a)

    operands = [first]
    for _ in range(d.draw(st.integers(0, 2))):
        other = d.pick(fits) if d.draw(st.booleans()) else None
        if other is None:
            shape = list(first.shape)
            shape[a] = d.draw(st.integers(1, 3))
            other = d.constant(d.floats(tuple(shape)))
        operands.append(other)
    attrs: dict[str, AttrValue] = {} if axis == 0 and d.draw(st.booleans()) else {"axis": axis}
    return d.node(op, operands, attrs, lambda *vs: np.concatenate(vs, axis))


def slice_(d: Draft, op: str) -> bool:
    x = d.pick(ranked)
    if x is None:
        return False
    r = x.rank
    axes = d.draw(st.lists(st.integers(-r, r - 1), max_size=r, unique_by=lambda a: a % r))
    index: list[slice] = [slice(None)] * r
    starts, ends, steps = [], [], []
    for axis in axes:
        n = x.shape[axis]
        start, end = d.draw(st.integers(-n - 1, n + 1)), d.draw(st.integers(-n - 1, n + 1))
        step = choose(d.draw, (1, 1, 2, -1))
        if not range(n)[start:end:step]:
            return False
        index[axis % r] = slice(start, end, step)
        starts.append(start)
        ends.append(end)
        steps.append(step)
    attrs: dict[str, AttrValue] = {"starts": tuple(starts), "ends": tuple(ends)}
    if axes != list(range(len(axes))) or d.draw(st.booleans()):
        attrs["axes"] = tuple(axes)
    if any(step != 1 for step in steps) or d.draw(st.booleans()):
        attrs["steps"] = tuple(steps)
    return d.node(op, [x], attrs, lambda v: v[tuple(index)])


def matmul(d: Draft, op: str) -> bool:
    a = d.pick(ranked)
    if a is None:
        return False
    b = d.pick(lambda v: multipliable(a.shape, v.shape)) if d.draw(st.booleans()) else None
    if b is None:
        k = a.shape[-1]
        b = d.constant(d.floats(choose(d.draw, ((k,), (k, 2), (k, 1)))))
    return d.node(op, [a, b], {}, np.matmul)


def cross_entropy(d: Draft, op: str) -> bool:
    logits = d.pick(ranked)
    if logits is None:
        return False
    rows, classes = logits.shape[:-1], logits.shape[-1]
    labels = d.draw(st.integers(0, 3)) > 0
    if labels:
        target = d.constant(d.rng.integers(0, classes, rows, dtype=np.int64))
    else:
        found = d.pick(lambda v: v.shape == logits.shape) if d.draw(st.booleans()) else None
        target = found or d.constant(d.floats(logits.shape, 0.0, 1.0))
    reduction = choose(d.draw, ("mean", "sum", "none"))
    attrs: dict[str, AttrValue] = {} if reduction == "mean" and d.draw(st.booleans()) else {
        "reduction": reduction}

    def forward(z: Arr, t: Arr) -> Arr:
        logp = z - logsumexp(z, -1)
        losses = (-np.take_along_axis(logp, t[..., None], -1)[..., 0] if labels
                  else -np.sum(t * logp, axis=-1))
        return {"none": losses, "sum": np.sum(losses), "mean": np.mean(losses)}[reduction]

    added = d.node(op, [logits, target], attrs, forward)
    if added and labels:
        d.labels[d.nodes[-1].name] = (target.name, classes)
    return added


def gelu(d: Draft, op: str) -> bool:
    x = d.pick()
    assert x is not None
    approximate = choose(d.draw, (None, "none", "tanh"))
    attrs: dict[str, AttrValue] = {} if approximate is None else {"approximate": approximate}
    return d.node(op, [x], attrs, gelu_tanh if approximate == "tanh" else gelu_exact)


def leaky_relu(d: Draft, op: str) -> bool:
    x = d.pick(every(off_zero))
    if x is None:
        return False
    alpha: float | None = choose(d.draw, (None, 0.01, 0.2, -0.5, 0.0, 1.5, 1, 3))  # ints too
    attrs: dict[str, AttrValue] = {} if alpha is None else {"alpha": alpha}
    slope = 0.01 if alpha is None else alpha
    return d.node(op, [x], attrs, lambda v: np.where(v > 0, v, slope * v))


def clip(d: Draft, op: str) -> bool:
    """x and up to two bounds, all apart (x off the kinks, the bounds off the swap where
    min > max); sometimes min is -inf, to give max alone."""
    x = d.pick()
    assert x is not None
    operands = [x]
    bounds = choose(d.draw, (0, 1, 2, 2))
    for k in range(bounds):
        shape = np.broadcast_shapes(*(o.shape for o in operands))
        if k == 0 and bounds == 2 and d.draw(st.integers(0, 3)) == 0:
            operands.append(d.constant(np.full(choose(d.draw, ((), (1,))), -np.inf), True))
            continue

        def fits(b: Val, shape: Shape = shape) -> bool:
            return broadcasts(shape, b.shape) and all(
                apart(u, v) for o in operands for u, v in zip(o.xs, b.xs, strict=True))

        b = d.pick(fits) if d.draw(st.booleans()) else None
        if b is None:
            b = d.constant(d.floats(choose(d.draw, [s for s in sorted({*SHAPES, shape})
                                                    if broadcasts(s, shape)])))
            if not fits(b):
                return False
        operands.append(b)

    def forward(v: Arr, lo: Arr | None = None, hi: Arr | None = None) -> Arr:
        y = v if lo is None else np.where(v < lo, lo, v)
        return y if hi is None else np.where(y > hi, hi, y)

    return d.node(op, operands, {}, forward)


COMPARE: dict[str, Callable[[Arr, Arr], Arr]] = {
    "equal": np.equal, "less": np.less, "less_equal": np.less_equal, "greater": np.greater,
    "greater_equal": np.greater_equal}
LOGIC: dict[str, Callable[..., Arr]] = {
    "not": np.logical_not, "and": np.logical_and, "or": np.logical_or}


def compare(d: Draft, op: str) -> bool:
    """Floats or ints; the operands one value, both exact, or apart, so the mask stays put."""
    a = d.pick(floating=d.draw(st.integers(0, 3)) > 0)
    if a is None:
        a = d.constant(d.rng.integers(-2, 3, choose(d.draw, SHAPES)))

    def fits(b: Val) -> bool:
        return broadcasts(a.shape, b.shape) and (b is a or (a.exact and b.exact) or all(
            apart(x, y) for x, y in zip(a.xs, b.xs, strict=True)))

    b = d.pick(fits, floating=a.floating) if d.draw(st.booleans()) else None
    if b is None:
        shape = choose(d.draw, [s for s in sorted({*SHAPES, a.shape}) if broadcasts(s, a.shape)])
        b = d.constant(d.floats(shape) if a.floating else d.rng.integers(-2, 3, shape))
        if not fits(b):
            return False
    return d.node(op, [a, b], {}, COMPARE[op], floating=a.floating, exact=True)


def logic(d: Draft, op: str) -> bool:
    """Masks, ints, constants, or floats off zero: nonzero is true."""
    a = d.pick(steady, floating=d.draw(st.integers(0, 3)) > 0) if d.draw(st.booleans()) else None
    if a is None:
        dtype = choose(d.draw, (np.int64, np.float64))
        a = d.constant(d.rng.integers(-1, 3, choose(d.draw, SHAPES)).astype(dtype))
    operands = [a]
    if op != "not":
        b = d.pick(lambda v: steady(v) and broadcasts(a.shape, v.shape),
                   floating=a.floating) if d.draw(st.booleans()) else None
        if b is None:
            shape = choose(d.draw, [s for s in sorted({*SHAPES, a.shape})
                                    if broadcasts(s, a.shape)])
            b = d.constant(d.rng.integers(-1, 3, shape).astype(
                np.float64 if a.floating else np.int64))  # (int masks are held as floats here)
        operands.append(b)
    return d.node(op, operands, {}, LOGIC[op], floating=a.floating, exact=True)


def gather(d: Draft, op: str) -> bool:
    """Indices a constant or fed per example, some negative; their axis size is kept for the
    mutation that puts one out of range."""
    data = d.pick(ranked)
    if data is None:
        return False
    r = data.rank
    axis = d.draw(st.integers(-r, r - 1))
    attrs: dict[str, AttrValue] = {} if axis == 0 and d.draw(st.booleans()) else {"axis": axis}
    n = data.shape[axis]
    shape = choose(d.draw, ((), (1,), (2,), (3,), (2, 2)))
    indices = (d.int_input(shape, -n, n) if d.draw(st.integers(0, 2)) == 0
               else d.constant(d.rng.integers(-n, n, shape)))
    added = d.node(op, [data, indices], attrs, lambda v, i: np.take(v, i, axis=axis))
    if added:
        d.indices[d.nodes[-1].name] = (indices.name, n)
    return added


def operand(d: Draft, shape: Shape, ok: Callable[[Arr], bool] | None = None,
            lo: float = -2.0) -> Val:
    """A value of the graph of ``shape`` (every example passing ``ok``), or a new input or
    constant of values from ``lo`` to 2."""
    found = d.pick(lambda v: v.shape == shape and (ok is None or every(ok)(v))) if d.draw(
        st.booleans()) else None
    if found is not None:
        return found
    return d.input(shape, lo) if d.draw(st.booleans()) else d.constant(d.floats(shape, lo))


def epsilon(d: Draft, attrs: dict[str, AttrValue]) -> float:
    """An epsilon drawn into ``attrs`` (an int for some, absent for some), and its value."""
    eps: float | None = choose(d.draw, (None, 1e-5, 0.1, 0.0, 1))
    if eps is not None:
        attrs["epsilon"] = eps
    return 1e-5 if eps is None else float(eps)


def batch_norm(d: Draft, op: str) -> bool:
    x = d.pick(ranked)
    if x is None:
        return False
    r = x.rank
    axis = d.draw(st.integers(-r, r - 1))
    attrs: dict[str, AttrValue] = {} if axis == 0 and d.draw(st.booleans()) else {"axis": axis}
    eps = epsilon(d, attrs)
    c = x.shape[axis]
    stats = [operand(d, (c,)) for _ in range(3)]  # scale, bias, mean
    stats.append(operand(d, (c,), positive, 0.2))  # var
    per_channel = tuple(c if k == axis % r else 1 for k in range(r))

    def forward(v: Arr, scale: Arr, bias: Arr, mean: Arr, var: Arr) -> Arr:
        def each(a: Arr) -> Arr:
            return np.reshape(a, per_channel)

        return each(scale) * (v - each(mean)) / np.sqrt(each(var) + eps) + each(bias)

    return d.node(op, [x, *stats], attrs, forward)


def layer_norm(d: Draft, op: str) -> bool:
    """Over groups whose variance is more than MARGIN; scale and bias of the normalised
    shape's trailing axes, some of size 1."""
    x = d.pick(ranked)
    if x is None:
        return False
    r = x.rank
    axis = d.draw(st.integers(-r, r - 1))
    attrs: dict[str, AttrValue] = {} if axis == -1 and d.draw(st.booleans()) else {"axis": axis}
    eps = epsilon(d, attrs)
    axes = tuple(range(axis % r, r))
    if not all(np.all(np.var(v, axis=axes) > MARGIN) for v in x.xs):
        return False
    normalized = x.shape[axis % r:]
    operands = [x]
    for _ in range(d.draw(st.integers(1, 2))):
        tail = normalized[d.draw(st.integers(0, len(normalized))):]
        operands.append(operand(d, tuple(n if d.draw(st.integers(0, 3)) else 1 for n in tail)))

    def forward(v: Arr, scale: Arr, bias: Arr = 0.0) -> Arr:
        centred = v - np.mean(v, axis=axes, keepdims=True)
        spread = np.mean(centred**2, axis=axes, keepdims=True)
        return centred / np.sqrt(spread + eps) * scale + bias

    return d.node(op, operands, attrs, forward)


def image(d: Draft, s: int, spread: bool = False) -> Val:
    """A new input (..., C, *spatial) with s spatial axes, of at most MAX_SIZE elements."""
    c = d.draw(st.integers(1, 3 if s < 3 else 2))
    spatial = tuple(d.draw(st.integers(1, (6, 4, 3)[s - 1])) for _ in range(s))
    lead = (2,) if d.draw(st.integers(0, 3)) == 0 and 2 * c * math.prod(spatial) <= MAX_SIZE \
        else ()
    return d.input((*lead, c, *spatial), spread=spread)


def draw_windows(d: Draft, size: Shape, dilated: bool, ceil: bool = False) -> Windows:
    """Windows that fit the padded axes (a pool's must also read the input; its maker
    checks)."""
    s = len(size)
    dilations = tuple(d.draw(st.integers(1, 2)) if dilated else 1 for _ in size)
    pads = tuple(d.draw(st.integers(0, 1)) for _ in range(2 * s)) if d.draw(
        st.booleans()) else (0,) * (2 * s)
    kernel = tuple(d.draw(st.integers(1, min(3 if s == 1 else 2,
                                             (n + pads[a] + pads[s + a] - 1) // dilations[a] + 1)))
                   for a, n in enumerate(size))
    strides = tuple(d.draw(st.integers(1, 2)) for _ in size)
    return Windows(kernel, strides, pads, dilations, ceil)


def window_attrs(d: Draft, win: Windows, dilated: bool) -> dict[str, AttrValue]:
    """The windows' attributes, each left out for some where it is the default."""
    attrs: dict[str, AttrValue] = {}
    given = [("strides", win.strides, 1), ("pads", win.pads, 0)]
    if dilated:
        given.append(("dilations", win.dilations, 1))
    for name, value, default in given:
        if any(v != default for v in value) or d.draw(st.booleans()):
            attrs[name] = value
    return attrs


def conv(d: Draft, op: str) -> bool:
    """1 to 3 spatial axes, grouped for some, weights fed per example or constant, a bias for
    some."""
    s = choose(d.draw, (1, 1, 2, 2, 3))
    x = d.pick(lambda v: v.rank > s) if d.draw(st.booleans()) else None
    if x is None:
        x = image(d, s)
    c, size = x.shape[-1 - s], x.shape[-s:]
    group = choose(d.draw, [g for g in (1, 1, 2, 3) if c % g == 0])
    m = group * d.draw(st.integers(1, 2))
    win = draw_windows(d, size, dilated=True)
    w_shape = (m, c // group, *win.kernel)
    if max(math.prod(w_shape), math.prod((*x.shape[:-1 - s], m, *win.out(size)))) > MAX_SIZE:
        return False
    operands = [x, d.input(w_shape) if d.draw(st.booleans()) else d.constant(d.floats(w_shape))]
    if d.draw(st.booleans()):
        operands.append(operand(d, (m,)))
    attrs = window_attrs(d, win, dilated=True)
    if group != 1 or d.draw(st.booleans()):
        attrs["group"] = group
    return d.node(op, operands, attrs,
                  lambda v, w, b=None: conv_reference(v, w, b, win, group))


def pool(d: Draft, op: str) -> bool:
    """1 to 3 spatial axes, ceil_mode for some; max_pool's inputs tie-free in every window."""
    s = choose(d.draw, (1, 1, 2, 2, 3))
    peak = op == "max_pool"
    x = d.pick(lambda v: v.rank > s) if d.draw(st.booleans()) else None
    if x is None:
        x = image(d, s, spread=peak)
    win = draw_windows(d, x.shape[-s:], dilated=peak, ceil=d.draw(st.booleans()))
    attrs: dict[str, AttrValue] = {"kernel_shape": win.kernel, **window_attrs(d, win, peak)}
    if win.ceil or d.draw(st.booleans()):
        attrs["ceil_mode"] = win.ceil
    how = "max"
    if not peak:
        include = d.draw(st.booleans())
        if include or d.draw(st.booleans()):
            attrs["count_include_pad"] = include
        how = "average_pad" if include else "average"
    if any(pool_reference(v, win, how) is None for v in x.xs):
        return False
    return d.node(op, [x], attrs, lambda v: pool_reference(v, win, how))


def pool_choice(d: Draft, op: str) -> bool:
    """max_pool_choice(x, t): windows as max_pool's over a tie-free x, t of x's shape."""
    s = choose(d.draw, (1, 1, 2, 2, 3))
    x = image(d, s, spread=True)
    t = d.pick(lambda v: v.shape == x.shape and v is not x) if d.draw(st.booleans()) else None
    if t is None:
        t = d.input(x.shape)
    win = draw_windows(d, x.shape[-s:], dilated=True, ceil=d.draw(st.booleans()))
    attrs: dict[str, AttrValue] = {"kernel_shape": win.kernel, **window_attrs(d, win, True)}
    if win.ceil or d.draw(st.booleans()):
        attrs["ceil_mode"] = win.ceil
    if any(choice_reference(a, b, win) is None for a, b in zip(x.xs, t.xs, strict=True)):
        return False
    return d.node(op, [x, t], attrs, lambda a, b: choice_reference(a, b, win))


def global_average_pool(d: Draft, op: str) -> bool:
    x = d.pick(lambda v: v.rank >= 2) if d.draw(st.booleans()) else None
    if x is None:
        x = image(d, choose(d.draw, (1, 2)))
    r = x.rank
    axis = choose(d.draw, [a for a in range(-r, r) if a % r < r - 1])
    attrs: dict[str, AttrValue] = {} if axis == 0 and d.draw(st.booleans()) else {"axis": axis}
    axes = tuple(range(axis % r + 1, r))
    count = math.prod(x.shape[a] for a in axes)
    return d.node(op, [x], attrs, lambda v: np.sum(v, axis=axes, keepdims=True) / count)


MAKERS: dict[str, Maker] = {
    **dict.fromkeys(UNARY, unary),
    **dict.fromkeys(BINARY, binary),
    "where": where,
    **dict.fromkeys(("sum", "mean", "max", "min", "logsumexp"), reduction),
    "softmax": normalize,
    "log_softmax": normalize,
    "reshape": reshape,
    "transpose": transpose,
    "broadcast_to": broadcast_to,
    "concat": concat,
    "slice": slice_,
    "matmul": matmul,
    "softmax_cross_entropy": cross_entropy,
    "gelu": gelu,
    "leaky_relu": leaky_relu,
    "clip": clip,
    **dict.fromkeys(COMPARE, compare),
    **dict.fromkeys(LOGIC, logic),
    "gather": gather,
    "batch_norm": batch_norm,
    "layer_norm": layer_norm,
    "conv": conv,
    "max_pool": pool,
    "max_pool_choice": pool_choice,
    "average_pool": pool,
    "global_average_pool": global_average_pool,
}


@dataclass(frozen=True)
class Case:
    """A valid request: the graph, what is fed (stacked on a batch axis when ``batch_size``),
    and the numpy reference's outputs."""

    graph: Graph
    inputs: dict[str, Arr]
    upstream: dict[str, Arr]
    wrt: tuple[str, ...]
    batch_size: int
    raw: bool
    expected: dict[str, Arr] = field(repr=False)
    shapes: dict[str, Shape] = field(repr=False)  # per example, of every value
    floating: frozenset[str] = field(repr=False)  # the float values' names
    labels: dict[str, tuple[str, int]] = field(repr=False)
    indices: dict[str, tuple[str, int]] = field(repr=False)

    @property
    def message(self) -> pb.ComputeRequest:
        return request(self.graph, self.inputs, raw=self.raw, batch_size=self.batch_size,
                       upstream=self.upstream, wrt=self.wrt)

    @property
    def differentiated(self) -> set[str]:
        return set(self.wrt) if self.wrt else {i.name for i in self.graph.inputs
                                               if i.requires_grad}

    @property
    def names(self) -> set[str]:
        return set(self.shapes)

    @property
    def live(self) -> set[str]:
        """The values the outputs depend on (the nodes that run)."""
        producers = {n.name: n for n in self.graph.nodes}
        live: set[str] = set()
        todo = list(self.graph.outputs)
        while todo:
            name = todo.pop()
            if name not in live:
                live.add(name)
                todo.extend(producers[name].inputs if name in producers else ())
        return live

    @property
    def reached(self) -> set[str]:
        """The differentiated inputs that get a gradient: those a float output depends on
        through operands that are differentiated (not a where's condition, not labels)."""
        producers = {n.name: n for n in self.graph.nodes}
        seen: set[str] = set()
        todo = [o for o in self.graph.outputs if o in self.floating]
        while todo:
            name = todo.pop()
            if name not in seen and name in producers:
                op = OP_TABLE[producers[name].op]
                todo.extend(i for k, i in enumerate(producers[name].inputs)
                            if op.vjp(k) is not None)
            seen.add(name)
        return self.differentiated & seen


def stack(xs: tuple[Arr, ...], batch_size: int) -> Arr:
    """A value as sent or answered: one example, or the examples stacked."""
    return np.stack(xs) if batch_size else xs[0]


@st.composite
def valid_cases(draw: Draw, focus: Sequence[str] = ()) -> Case:
    """A valid request; its graph's first node applies one of the ``focus`` ops, if given."""
    batch_size = choose(draw, (0, 0, 0, 1, 2, 3))
    d = Draft(draw, max(batch_size, 1))
    for _ in range(draw(st.integers(1, 3))):
        d.input(choose(draw, SHAPES))
    if draw(st.booleans()):
        d.constant(d.floats(choose(draw, SHAPES)))
    for k in range(draw(st.integers(1, 6))):
        op = choose(draw, focus if focus and k == 0 else sorted(MAKERS))
        if not MAKERS[op](d, op):
            event(f"valid: {op} not drawable here, tanh instead")
            x = d.pick()
            assert x is not None
            assert d.node("tanh", [x], {}, np.tanh)
    # Mostly every node's result flows to an output; sometimes some nodes are left dead (they
    # are checked but not run). Any value may be an output too, an input or a constant.
    used = {operand for n in d.nodes for operand in n.inputs}
    outputs = ([n.name for n in d.nodes if n.name not in used] if draw(st.integers(0, 3))
               else [d.nodes[-1].name])
    extra = choose(draw, [v.name for v in d.vals if not v.hidden])
    if draw(st.booleans()) and extra not in outputs:
        outputs.insert(draw(st.integers(0, len(outputs))), extra)
    names = [i.name for i in d.inputs if i.dtype is DType.FLOAT64]
    wrt = () if draw(st.booleans()) else tuple(  # repeated names are fine
        choose(draw, names) for _ in range(draw(st.integers(1, 4))))
    vals = {v.name: v for v in d.vals}
    upstream = {o: stack(tuple(d.floats(vals[o].shape) for _ in range(d.examples)), batch_size)
                for o in outputs if vals[o].floating and draw(st.integers(0, 2)) == 0}
    order = draw(st.permutations(range(len(d.nodes))))  # nodes may come in any order
    return Case(
        graph=Graph(tuple(d.inputs), tuple(d.nodes[k] for k in order), tuple(outputs),
                    tuple(d.constants)),
        inputs={i.name: stack(vals[i.name].xs, batch_size) for i in d.inputs},
        upstream=upstream,
        wrt=wrt,
        batch_size=batch_size,
        raw=draw(st.booleans()),
        expected={o: stack(vals[o].xs, batch_size) for o in outputs},
        shapes={v.name: v.shape for v in d.vals},
        floating=frozenset(v.name for v in d.vals if v.floating),
        labels=d.labels,
        indices=d.indices,
    )


# --- the oracle for valid requests -------------------------------------------------------------


def finite_differences(plan: Plan, case: Case) -> dict[str, Arr]:
    """Central differences of the sum over float outputs of <upstream, output> (upstream
    defaults to ones, as on the server) for each differentiated input: the local engine's
    forward pass only, run once per input on all its perturbed feeds stacked on a batch axis."""
    examples = max(case.batch_size, 1)
    feed = {k: v if case.batch_size else v[None] for k, v in case.inputs.items()}
    seeds = {}
    for o in case.graph.outputs:
        if o in case.floating:
            given = case.upstream.get(o)
            seeds[o] = (np.ones((examples, *case.shapes[o])) if given is None
                        else given if case.batch_size else given[None])
    gradients = {}
    for name in sorted(case.reached):
        base = feed[name]
        n = base.size
        moved = np.repeat(base[None], 2 * n, axis=0).reshape(2 * n, n)
        moved[np.arange(n), np.arange(n)] += H
        moved[n + np.arange(n), np.arange(n)] -= H
        runs = {k: np.broadcast_to(v, (2 * n, *v.shape)).reshape(-1, *v.shape[1:])
                for k, v in feed.items()}
        runs[name] = moved.reshape(-1, *base.shape[1:])
        outputs = plan.run(runs, wrt=(), batched=True).outputs
        totals = np.zeros(2 * n)
        for o, seed in seeds.items():
            totals += np.sum((outputs[o].reshape(2 * n, *seed.shape) * seed).reshape(2 * n, -1),
                             axis=1)
        gradient = ((totals[:n] - totals[n:]) / (2 * H)).reshape(base.shape)
        gradients[name] = gradient if case.batch_size else gradient[0]
    return gradients


def check_valid(stub: pb_grpc.GradientServiceStub, case: Case) -> None:
    try:
        response = stub.Compute(case.message, timeout=RPC_TIMEOUT)
    except grpc.RpcError as e:
        call = cast(grpc.Call, e)  # gRPC's failed calls are both
        pytest.fail(f"a valid request failed: {call.code().name}: {call.details()}")
    plan = Plan(case.graph)
    local = plan.run(case.inputs, wrt=(), batched=case.batch_size > 0)
    outputs = decode(response.outputs)
    assert set(outputs) == set(case.graph.outputs)
    for name, want in local.outputs.items():
        got = outputs[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(got, case.expected[name], rtol=1e-9, atol=1e-12,
                                   err_msg=f"{name} (numpy reference)")
    assert list(response.nonfinite) == [False] * max(case.batch_size, 1)
    gradients = decode(response.gradients)
    assert set(gradients) == case.reached
    for name, want in finite_differences(plan, case).items():
        got = gradients[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        np.testing.assert_allclose(got, want, rtol=FD_RTOL, atol=FD_ATOL,
                                   err_msg=f"d/d{name} (central differences)")


def test_valid_graphs_are_answered_correctly(stub: pb_grpc.GradientServiceStub) -> None:
    runs: Counter[str] = Counter()

    @settings(FUZZ, max_examples=VALID_CASES)
    @given(case=valid_cases())
    def fuzz(case: Case) -> None:
        check_valid(stub, case)
        runs["cases"] += 1
        live = case.live
        runs.update(n.op for n in case.graph.nodes if n.name in live)

    fuzz()
    assert runs.pop("cases") >= VALID_CASES
    rare = {op: runs[op] for op in OP_TABLE if runs[op] < MIN_RUNS_PER_OP}
    assert not rare, f"ops the fuzz ran too rarely: {rare}"


# --- mutations that make a valid request invalid -----------------------------------------------


Fields = tuple[str, ...]  # the refusal's field violation starts with one of these
Mutate = Callable[[Draw, Case, pb.ComputeRequest], Fields]


@dataclass(frozen=True)
class Mutation:
    applies: Callable[[Case], bool]
    mutate: Mutate
    code: grpc.StatusCode
    focus: tuple[str, ...]  # the ops it needs a node of: drawn into its case's graph


MUTATIONS: dict[str, Mutation] = {}


def mutation(applies: Callable[[Case], bool] = lambda case: True,
             code: grpc.StatusCode = INVALID,
             focus: Callable[[str], bool] | None = None) -> Callable[[Mutate], Mutate]:
    """Register a mutation, which applies to the cases ``applies`` accepts (those with a
    node of an op ``focus`` accepts, if given), changes the request so that it cannot stay
    valid, and says which field the refusal must name."""
    ops = () if focus is None else tuple(filter(focus, sorted(OP_TABLE)))

    def applies_here(case: Case) -> bool:
        return applies(case) and (focus is None or any(focus(n.op) for n in case.graph.nodes))

    def register(mutate: Mutate) -> Mutate:
        MUTATIONS[mutate.__name__] = Mutation(applies_here, mutate, code, ops)
        return mutate

    return register


def unknown(draw: Draw, taken: set[str] | frozenset[str], long: bool = True) -> str:
    """A word not in ``taken``: unicode, empty for some, overlong (> 256 characters) for some
    when ``long``."""
    if long and draw(st.integers(0, 7)) == 0:
        return overlong(draw)
    word = draw(st.text(st.characters(codec="utf-8"), max_size=8))
    while word in taken:
        word += "\u2020"
    return word


def overlong(draw: Draw) -> str:
    return choose(draw, ("x", "λ", "\U0001f600")) * draw(
        st.integers(NAME_LIMIT + 1, 2 * NAME_LIMIT))


def fresh(draw: Draw, case: Case, long: bool = True) -> str:
    """A name no value of the case has, non-empty."""
    return unknown(draw, case.names | {""}, long)


def other_or_fresh(draw: Draw, case: Case, others: set[str]) -> str:
    """One of ``others`` (names of the graph), or a name the graph does not have."""
    if len(others) > 0 and draw(st.booleans()):
        return choose(draw, sorted(others))
    return fresh(draw, case)


def node_index(draw: Draw, case: Case, fits: Callable[[str], bool] = lambda op: True) -> int:
    """The index of a node of the case's graph whose op ``fits``."""
    return choose(draw, [k for k, n in enumerate(case.graph.nodes) if fits(n.op)])


def named(draw: Draw, req: pb.ComputeRequest) -> tuple[str, pb.Input | pb.Node]:
    """An input or a node of the request's graph, and its path (``graph.nodes[2]``)."""
    items: list[tuple[str, pb.Input | pb.Node]] = [
        *((f"graph.inputs[{k}]", i) for k, i in enumerate(req.graph.inputs)),
        *((f"graph.nodes[{k}]", n) for k, n in enumerate(req.graph.nodes))]
    return items[draw(st.integers(0, len(items) - 1))]


def ints(*values: int) -> pb.AttributeValue:
    return pb.AttributeValue(ints_value=pb.IntList(values=list(values)))


def feed_value(case: Case, shape: Shape, dtype: type[np.generic] = np.float64) -> pb.Tensor:
    """A tensor of ones of per-example ``shape``, stacked when the case is batched."""
    lead = (case.batch_size,) if case.batch_size else ()
    return tensor_to_wire(np.ones((*lead, *shape), dtype=dtype), raw=case.raw)


@mutation()
def unknown_op(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    k = node_index(draw, case)
    req.graph.nodes[k].op = unknown(draw, frozenset(OP_TABLE))
    return (f"graph.nodes[{k}].op",)


@mutation()
def unknown_operand(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    k = node_index(draw, case)
    j = draw(st.integers(0, len(case.graph.nodes[k].inputs) - 1))
    req.graph.nodes[k].inputs[j] = fresh(draw, case)
    return (f"graph.nodes[{k}].inputs[{j}]",)


@mutation()
def duplicate_name(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    _, item = named(draw, req)
    item.name = choose(draw, sorted(case.names - {item.name}))
    return ("graph.",)


@mutation()
def cycle(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    """An operand of a node becomes the node itself or a node depending on it."""
    users: dict[str, list[str]] = {}
    for n in case.graph.nodes:
        for operand in n.inputs:
            users.setdefault(operand, []).append(n.name)
    k = node_index(draw, case)
    after, todo = set(), [case.graph.nodes[k].name]
    while todo:
        name = todo.pop()
        if name not in after:
            after.add(name)
            todo.extend(users.get(name, ()))
    j = draw(st.integers(0, len(case.graph.nodes[k].inputs) - 1))
    req.graph.nodes[k].inputs[j] = choose(draw, sorted(after))
    return ("graph.nodes[",)


@mutation()
def no_operands(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    k = node_index(draw, case)
    del req.graph.nodes[k].inputs[:]
    return (f"graph.nodes[{k}].inputs",)


def fixed_arity(op: str) -> bool:
    return OP_TABLE[op].max_arity is not None


@mutation(focus=fixed_arity)
def extra_operand(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    """Operands up to one more than the op takes at most (one more than a node has could be
    a conv's bias or a clip's bound)."""
    k = node_index(draw, case, fixed_arity)
    most = OP_TABLE[case.graph.nodes[k].op].max_arity
    assert most is not None
    for _ in range(most + 1 - len(case.graph.nodes[k].inputs)):
        req.graph.nodes[k].inputs.append(choose(draw, [i.name for i in case.graph.inputs]))
    return (f"graph.nodes[{k}].inputs",)


@mutation()
def unknown_attribute(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    k = node_index(draw, case)
    name = unknown(draw, frozenset(OP_TABLE[case.graph.nodes[k].op].attrs), long=False)
    req.graph.nodes[k].attributes[name].int_value = draw(st.integers(-(1 << 63), (1 << 63) - 1))
    return (f"graph.nodes[{k}].attributes.{name}",)


def has_attributes(op: str) -> bool:
    return bool(OP_TABLE[op].attrs)


WIRE_KINDS = {AttrKind.INT: "int_value", AttrKind.FLOAT: "float_value",
              AttrKind.BOOL: "bool_value", AttrKind.STRING: "string_value",
              AttrKind.INTS: "ints_value"}
STANDS_FOR = {(AttrKind.INT, AttrKind.INTS), (AttrKind.INT, AttrKind.FLOAT)}  # taken as such


@mutation(focus=has_attributes)
def ill_typed_attribute(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    """An attribute of another kind than its op's schema says, or with no value at all."""
    k = node_index(draw, case, has_attributes)
    specs = OP_TABLE[case.graph.nodes[k].op].attrs
    name = choose(draw, sorted(specs))
    kind = choose(draw, [w for a, w in WIRE_KINDS.items() if a != specs[name].kind
                         and (a, specs[name].kind) not in STANDS_FOR] + ["no value"])
    value = req.graph.nodes[k].attributes[name]
    value.Clear()
    if kind == "int_value":
        value.int_value = draw(st.integers(-3, 3))
    elif kind == "float_value":  # 2.0 is no int
        value.float_value = choose(draw, (0.5, -1.5, 2.0, 0.0))
    elif kind == "bool_value":
        value.bool_value = draw(st.booleans())
    elif kind == "string_value":
        value.string_value = draw(st.text(max_size=4))
    elif kind == "ints_value":
        value.ints_value.SetInParent()
        value.ints_value.values.extend(draw(st.lists(st.integers(-3, 3), max_size=3)))
    return (f"graph.nodes[{k}].attributes.{name}",)


Breaker = Callable[[Draw, Shape], dict[str, pb.AttributeValue | None]]  # None: remove it


def bad_axes(draw: Draw, shape: Shape) -> dict[str, pb.AttributeValue | None]:
    r, a = len(shape), draw(st.integers(0, 3))
    return {"axis": choose(draw, [ints(r + a), ints(-r - 1 - a)]
                                         + ([ints(0, -r)] if r else []))}  # out of range, twice


def bad_axis(draw: Draw, shape: Shape) -> dict[str, pb.AttributeValue | None]:
    r, a = len(shape), draw(st.integers(0, 3))
    return {"axis": pb.AttributeValue(int_value=choose(draw, (r + a, -r - 1 - a)))}


def bad_perm(draw: Draw, shape: Shape) -> dict[str, pb.AttributeValue | None]:
    r = len(shape)
    return {"perm": choose(draw, [ints(*range(r + 1))]
                                         + ([ints(*[0] * r)] if r >= 2 else []))}


def bad_reshape(draw: Draw, shape: Shape) -> dict[str, pb.AttributeValue | None]:
    n = math.prod(shape)
    return {"shape": choose(draw, (ints(n + 1), ints(0), ints(-1, -1), ints(-2, n)))}


def bad_broadcast(draw: Draw, shape: Shape) -> dict[str, pb.AttributeValue | None]:
    targets = [ints(*shape, 0)]
    if shape:
        targets.append(ints())  # fewer axes than the operand
    if shape and shape[-1] != 1:
        targets.append(ints(*shape[:-1], shape[-1] + 1))
    return {"shape": choose(draw, targets)}


def bad_slice(draw: Draw, shape: Shape) -> dict[str, pb.AttributeValue | None]:
    return choose(draw, (
        {"starts": ints(0), "ends": ints(1), "axes": ints(0), "steps": ints(0)},
        {"starts": ints(0), "ends": ints(1, 1), "axes": None, "steps": None},
        {"starts": ints(0), "ends": ints(1), "axes": ints(len(shape)), "steps": None},
        {"starts": ints(0), "ends": ints(0), "axes": ints(0), "steps": None},  # empty
    ))


def bad_choice(op: str, name: str) -> Breaker:
    """A string attribute's breaker: a word not among its choices."""
    choices = frozenset(OP_TABLE[op].attrs[name].choices)

    def breaker(draw: Draw, shape: Shape) -> dict[str, pb.AttributeValue | None]:
        return {name: pb.AttributeValue(string_value=unknown(draw, choices))}

    return breaker


def bad_float(name: str, negative: bool = False) -> Breaker:
    """A float attribute's breaker: not finite, an int no float holds exactly, or (where
    ``negative`` ones are wrong) below 0, as a float or an int."""

    def breaker(draw: Draw, shape: Shape) -> dict[str, pb.AttributeValue | None]:
        values = [pb.AttributeValue(float_value=choose(draw, (math.inf, -math.inf, math.nan))),
                  pb.AttributeValue(int_value=choose(draw, (1, -1)) * (
                      2**53 + draw(st.integers(1, 1 << 20))))]
        if negative:
            values += [pb.AttributeValue(float_value=-choose(draw, (1e-300, 1e-5, 2.5))),
                       pb.AttributeValue(int_value=-draw(st.integers(1, 3)))]
        return {name: choose(draw, values)}

    return breaker


def either(*breakers: Breaker) -> Breaker:
    def breaker(draw: Draw, shape: Shape) -> dict[str, pb.AttributeValue | None]:
        return choose(draw, breakers)(draw, shape)

    return breaker


def bad_channel_axis(draw: Draw, shape: Shape) -> dict[str, pb.AttributeValue | None]:
    """Out of range, or the last axis (no spatial axes after it)."""
    r, a = len(shape), draw(st.integers(0, 3))
    return {"axis": pb.AttributeValue(int_value=choose(draw, (r + a, -r - 1 - a, r - 1, -1)))}


def bad_conv(draw: Draw, shape: Shape) -> dict[str, pb.AttributeValue | None]:
    """A group below 1 or dividing no channel count, a value below its least, or a count of
    values no conv has (it has 1 to 3 spatial axes: one pads value, or four strides)."""
    return choose(draw, (
        {"group": pb.AttributeValue(int_value=choose(draw, (0, -1, 1000)))},
        {"strides": ints(0)},
        {"strides": ints(1, 1, 1, 1)},
        {"dilations": ints(*[0] * draw(st.integers(1, 3)))},
        {"pads": ints(-1)},
        {"pads": ints(-1, -1)},
    ))


def bad_pool(draw: Draw, shape: Shape) -> dict[str, pb.AttributeValue | None]:
    """A kernel of no axes, of four, of a 0, or longer than the last axis with no padding;
    zero strides; or padding so large the first window reads padding only."""
    plain: dict[str, pb.AttributeValue | None] = dict.fromkeys(
        ("strides", "pads", "dilations", "ceil_mode"))
    return choose(draw, (
        {"kernel_shape": ints()},
        {"kernel_shape": ints(1, 1, 1, 1)},
        {"kernel_shape": ints(0)},
        {**plain, "kernel_shape": ints(shape[-1] + 1)},
        {**plain, "kernel_shape": ints(1), "strides": ints(0)},
        {**plain, "kernel_shape": ints(1), "pads": ints(1, 0)},
    ))


BREAKERS: dict[str, Breaker] = {
    **dict.fromkeys(("sum", "mean", "max", "min", "logsumexp"), bad_axes),
    **dict.fromkeys(("softmax", "log_softmax", "concat", "gather"), bad_axis),
    "transpose": bad_perm,
    "reshape": bad_reshape,
    "broadcast_to": bad_broadcast,
    "slice": bad_slice,
    "softmax_cross_entropy": bad_choice("softmax_cross_entropy", "reduction"),
    "gelu": bad_choice("gelu", "approximate"),
    "leaky_relu": bad_float("alpha"),
    **dict.fromkeys(("batch_norm", "layer_norm"), either(bad_axis, bad_float("epsilon", True))),
    "global_average_pool": bad_channel_axis,
    "conv": bad_conv,
    **dict.fromkeys(("max_pool", "average_pool", "max_pool_choice"), bad_pool),
}


def breakable(op: str) -> bool:
    return op in BREAKERS


@mutation(focus=breakable)
def bad_attribute_value(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    """An attribute of the right kind whose value the op or the operand's shape rules out."""
    k = node_index(draw, case, breakable)
    node = case.graph.nodes[k]
    attributes = req.graph.nodes[k].attributes
    for name, value in BREAKERS[node.op](draw, case.shapes[node.inputs[0]]).items():
        if value is None:
            attributes.pop(name, None)
        else:
            attributes[name].CopyFrom(value)
    return (f"graph.nodes[{k}]",)


def has_required(op: str) -> bool:
    return any(spec.required for spec in OP_TABLE[op].attrs.values())


@mutation(focus=has_required)
def missing_attribute(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    k = node_index(draw, case, has_required)
    specs = OP_TABLE[case.graph.nodes[k].op].attrs
    name = choose(draw, sorted(a for a, spec in specs.items() if spec.required))
    del req.graph.nodes[k].attributes[name]
    return (f"graph.nodes[{k}].attributes.{name}",)


@mutation()
def shape_mismatch(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    """A new node combining a value with a new input of a shape it cannot combine with."""
    v = choose(draw, sorted(case.floating))
    shape = case.shapes[v]
    clashing = [s for s in ((5,), (4, 5), (7,)) if not broadcasts(s, shape)]
    if len(clashing) > 0 and draw(st.booleans()):
        op, other = choose(draw, sorted(BINARY)), choose(draw, clashing)
    else:
        op, other = "matmul", (shape[-1] + 1,) if shape else (2,)
    q = fresh(draw, case, long=False)
    req.graph.inputs.append(pb.Input(name=q, dtype=pb.DATA_TYPE_FLOAT64, shape=other))
    req.inputs[q].CopyFrom(feed_value(case, other))
    name = unknown(draw, case.names | {"", q}, long=False)
    req.graph.nodes.append(pb.Node(name=name, op=op, inputs=[v, q]))
    return (f"graph.nodes[{len(case.graph.nodes)}]",)


@mutation(code=EXHAUSTED)
def over_limit(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    """A broadcast_to of more elements than a tensor may hold (refused before allocating)."""
    c = fresh(draw, case, long=False)
    req.graph.constants.append(pb.Constant(name=c, value=tensor_to_wire(np.float64(1.0))))
    rows = draw(st.integers(1 << 10, 1 << 14))
    cols = (1 << 24) // rows + draw(st.integers(1, 1 << 10))
    name = unknown(draw, case.names | {"", c}, long=False)
    req.graph.nodes.append(pb.Node(name=name, op="broadcast_to", inputs=[c],
                                   attributes={"shape": ints(rows, cols)}))
    return (f"graph.nodes[{len(case.graph.nodes)}]",)


def fed(draw: Draw, case: Case) -> str:
    return choose(draw, sorted(case.inputs))


@mutation()
def feed_dtype(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    x = fed(draw, case)
    declared = np.asarray(case.inputs[x]).dtype.name
    others = [t for t in ("float32", "int64", "float64") if t != declared]
    dtype = choose(draw, [*others[:2], "unspecified", "unknown"])
    if dtype not in ("unspecified", "unknown"):
        req.inputs[x].CopyFrom(tensor_to_wire(np.asarray(case.inputs[x]).astype(dtype),
                                              raw=case.raw))
    else:
        req.inputs[x].dtype = pb.DATA_TYPE_UNSPECIFIED if dtype == "unspecified" else 9  # type: ignore[assignment]
    return (f"inputs.{x}",)


@mutation()
def feed_missing(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    x = fed(draw, case)
    del req.inputs[x]
    return (f"inputs.{x}",)


@mutation()
def feed_extra(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    name = other_or_fresh(draw, case, case.names - set(case.inputs))
    req.inputs[name].CopyFrom(feed_value(case, ()))
    return ("inputs",)


@mutation()
def feed_shape(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    x = fed(draw, case)
    shape = case.shapes[x]
    shapes = [(*shape, 2)] + ([shape[:-1], (*shape[:-1], shape[-1] + 1)] if shape else [])
    req.inputs[x].CopyFrom(feed_value(case, choose(draw, shapes)))
    return (f"inputs.{x}",)


@mutation()
def feed_corrupt(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    """Data that does not match the tensor's shape, or two kinds of data."""
    x = fed(draw, case)
    t = req.inputs[x]
    if draw(st.booleans()):  # both raw_data and double_data
        t.double_data.append(1.0) if case.raw else t.MergeFrom(pb.Tensor(raw_data=bytes(8)))
    elif case.raw:
        t.raw_data = t.raw_data[:-1] if draw(st.booleans()) else t.raw_data + bytes(8)
    else:
        t.double_data.append(1.0)
    return (f"inputs.{x}",)


@mutation()
def wrt_not_an_input(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    name = other_or_fresh(draw, case, case.names - set(case.inputs))
    req.wrt.insert(draw(st.integers(0, len(req.wrt))), name)
    return ("wrt",)


@mutation()
def negative_batch_size(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    req.batch_size = -draw(st.integers(1, 1 << 62))
    return ("batch_size",)


@mutation()
def wrong_batch_size(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    req.batch_size = case.batch_size + draw(st.integers(1, 3))
    return ("batch_size", "inputs.")


@mutation()
def upstream_not_an_output(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    name = other_or_fresh(draw, case, case.names - set(case.graph.outputs))
    req.upstream[name].CopyFrom(feed_value(case, ()))
    return ("upstream",)


@mutation()
def upstream_mismatch(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    o = choose(draw, case.graph.outputs)
    shape = case.shapes[o]
    if o in case.floating and draw(st.booleans()):
        req.upstream[o].CopyFrom(feed_value(case, shape, np.float32))
    else:
        req.upstream[o].CopyFrom(feed_value(case, (*shape, 2)))
    return (f"upstream.{o}",)


@mutation()
def overlong_name(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    name = overlong(draw)
    k = node_index(draw, case)
    node = req.graph.nodes[k]
    where = choose(draw, ("input", "node", "operand", "output", "op", "attribute"))
    if where == "input":
        i = draw(st.integers(0, len(req.graph.inputs) - 1))
        req.graph.inputs[i].name = name
        return (f"graph.inputs[{i}].name",)
    if where == "node":
        node.name = name
        return (f"graph.nodes[{k}].name",)
    if where == "operand":
        j = draw(st.integers(0, len(node.inputs) - 1))
        node.inputs[j] = name
        return (f"graph.nodes[{k}].inputs[{j}]",)
    if where == "output":
        j = draw(st.integers(0, len(req.graph.outputs) - 1))
        req.graph.outputs[j] = name
        return (f"graph.outputs[{j}]",)
    if where == "op":
        node.op = name
        return (f"graph.nodes[{k}].op",)
    node.attributes[name].int_value = 1
    return (f"graph.nodes[{k}].attributes",)


@mutation()
def empty_name(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    path, item = named(draw, req)
    item.name = ""
    return (f"{path}.name",)


@mutation()
def bad_outputs(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    """No outputs, an output naming nothing, or one listed twice."""
    how = choose(draw, ("none", "unknown", "twice"))
    if how == "none":
        del req.graph.outputs[:]
    else:
        req.graph.outputs.append(fresh(draw, case) if how == "unknown"
                                 else choose(draw, case.graph.outputs))
    return ("graph.outputs",)


@mutation()
def bad_input_declaration(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    """A dimension below 1, an unknown dtype, or a dtype the feed does not have."""
    i = draw(st.integers(0, len(req.graph.inputs) - 1))
    declared = req.graph.inputs[i]
    how = choose(draw, ("dimension", "unspecified", "unknown", "float32"))
    if how == "dimension":
        declared.shape.insert(draw(st.integers(0, len(declared.shape))),
                              draw(st.integers(-(1 << 62), 0)))
    elif how == "float32":
        declared.dtype = pb.DATA_TYPE_FLOAT32
        return ("graph", f"inputs.{declared.name}")
    else:
        declared.dtype = pb.DATA_TYPE_UNSPECIFIED if how == "unspecified" else 9  # type: ignore[assignment]
    return (f"graph.inputs[{i}]",)


@mutation(code=NOT_FOUND)
def unknown_graph_id(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    req.graph_id = unknown(draw, frozenset())
    return ("graph_id",)


@mutation()
def no_graph(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    req.ClearField("graph")
    return ("graph_source",)


@mutation(lambda case: bool(case.graph.constants))
def corrupt_constant(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    i = draw(st.integers(0, len(req.graph.constants) - 1))
    t = req.graph.constants[i].value
    how = choose(draw, ("dimension", "dtype", "data"))
    if how == "dimension":
        t.shape.append(0)
    elif how == "dtype":
        t.dtype = pb.DATA_TYPE_UNSPECIFIED
    elif t.raw_data:
        t.raw_data = t.raw_data[:-1]
    else:
        (t.int64_data or t.double_data).append(0)
    return (f"graph.constants[{i}]",)


def live_labels(case: Case) -> list[str]:
    live = case.live
    return sorted(name for name in case.labels if name in live)


@mutation(lambda case: bool(live_labels(case)),
          focus=lambda op: op == "softmax_cross_entropy")
def label_out_of_range(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    """A class label outside [0, classes) for a cross-entropy that runs: refused as it runs."""
    name = choose(draw, live_labels(case))
    constant, classes = case.labels[name]
    i = next(i for i, c in enumerate(case.graph.constants) if c.name == constant)
    labels = np.array(case.graph.constants[i].value)
    wrong = -1 - draw(st.integers(0, 5)) if draw(st.booleans()) else classes + draw(
        st.integers(0, 5))
    labels.flat[draw(st.integers(0, labels.size - 1))] = wrong
    req.graph.constants[i].value.CopyFrom(tensor_to_wire(labels, raw=case.raw))
    k = next(k for k, n in enumerate(case.graph.nodes) if n.name == name)
    return (f"graph.nodes[{k}]",)


def live_indices(case: Case) -> list[str]:
    live = case.live
    return sorted(name for name in case.indices if name in live)


@mutation(lambda case: bool(live_indices(case)), focus=lambda op: op == "gather")
def index_out_of_range(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    """An index outside [-size, size) for a gather that runs, in a constant or in the feed:
    refused as it runs, naming the feed or the node."""
    name = choose(draw, live_indices(case))
    source, size = case.indices[name]
    wrong = -size - 1 - draw(st.integers(0, 5)) if draw(st.booleans()) else size + draw(
        st.integers(0, 5))
    if source in case.inputs:
        feed = np.array(case.inputs[source])
        feed.flat[draw(st.integers(0, feed.size - 1))] = wrong
        req.inputs[source].CopyFrom(tensor_to_wire(feed, raw=case.raw))
        return (f"inputs.{source}",)
    i = next(i for i, c in enumerate(case.graph.constants) if c.name == source)
    indices = np.array(case.graph.constants[i].value)
    indices.flat[draw(st.integers(0, indices.size - 1))] = wrong
    req.graph.constants[i].value.CopyFrom(tensor_to_wire(indices, raw=case.raw))
    k = next(k for k, n in enumerate(case.graph.nodes) if n.name == name)
    return (f"graph.nodes[{k}]",)


@dataclass(frozen=True)
class Bad:
    """An invalid request, the mutation that made it, and what its refusal must carry."""

    kind: str
    request: pb.ComputeRequest
    fields: Fields
    code: grpc.StatusCode


@st.composite
def invalid_requests(draw: Draw) -> Bad:
    kind = choose(draw, sorted(MUTATIONS))
    case = draw(valid_cases(MUTATIONS[kind].focus))
    if not MUTATIONS[kind].applies(case):
        kind = choose(draw, sorted(k for k, m in MUTATIONS.items() if m.applies(case)))
    req = case.message
    fields = MUTATIONS[kind].mutate(draw, case, req)
    return Bad(kind, req, fields, MUTATIONS[kind].code)


def names_field(field: str, expected: tuple[str, ...]) -> bool:
    """Whether a reported field path is one of the expected ones, or starts one, cut short with
    an ellipsis because it quotes a long name."""
    if field.startswith(expected):
        return True
    head = field.removesuffix("\u2026")
    return head != field and any(e.startswith(head) for e in expected)


def check_invalid(stub: pb_grpc.GradientServiceStub, bad: Bad) -> None:
    try:
        stub.Compute(bad.request, timeout=RPC_TIMEOUT)
    except grpc.RpcError as e:
        call = cast(grpc.Call, e)  # gRPC's failed calls are both
        assert call.code() is bad.code, f"{bad.kind}: {call.code().name}: {call.details()}"
        fail = failure(e)
    else:
        pytest.fail(f"{bad.kind}: the invalid request was answered OK")
    assert len(fail.message.encode()) <= 512, "the message echoes too much of the request"
    assert "Traceback" not in fail.message
    assert fail.violations, f"{bad.kind}: no field violation: {fail.message}"
    assert any(names_field(f, bad.fields) for f in fail.fields), (bad.kind, fail.fields)
    assert fail.fields[0] in fail.message


def test_invalid_graphs_are_refused(stub: pb_grpc.GradientServiceStub) -> None:
    kinds: Counter[str] = Counter()

    @settings(FUZZ, max_examples=INVALID_CASES)
    @given(bad=invalid_requests())
    def fuzz(bad: Bad) -> None:
        event(f"invalid: {bad.kind}")
        check_invalid(stub, bad)
        kinds[bad.kind] += 1

    fuzz()
    assert kinds.total() >= INVALID_CASES
    rare = {kind: kinds[kind] for kind in MUTATIONS if kinds[kind] < MIN_CASES_PER_MUTATION}
    assert not rare, f"mutations the fuzz made too rarely: {rare}"


def test_the_server_still_answers_after_the_fuzz(stub: pb_grpc.GradientServiceStub) -> None:
    q = quadratic()  # f(x) = 2x^2 - 3x + 4: f(2) = 6, f'(2) = 5
    response = stub.Compute(request(q.graph, {"x": 2.0}), timeout=RPC_TIMEOUT)
    assert scalars(response.outputs) == {q.out: 6.0}
    assert scalars(response.gradients) == {"x": 5.0}
