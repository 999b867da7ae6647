"""Random graphs, valid and invalid, sent over real gRPC to a running server.

The decoder, the validator and the engine each guard against bad input; whatever slips between
them would surface as UNKNOWN or INTERNAL, a wrong answer or a hang. So hypothesis draws valid
graphs from the whole op table (values kept inside each op's domain, away from its kinks and
ties, and bounded, so that finite differences are meaningful) and mutations of them that cannot
stay valid. A valid request must be answered with the outputs of a local forward run of the
engine (and of a numpy reference written here) and with the gradients central finite
differences of that forward pass give; an invalid one must fail with INVALID_ARGUMENT,
RESOURCE_EXHAUSTED or NOT_FOUND, a short message without a trace, and a BadRequest field
violation naming the field at fault. Each run sends 2,000 valid and 3,000 invalid requests,
derandomized, so CI is reproducible; after them the server must still answer a known request.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gradserve.engine import OP_TABLE, AttrKind, Constant, Graph, Input, Node, Plan
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
MIN_RUNS_PER_OP = 30  # live nodes of each op across the valid cases (about 50 to 150 each)
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


# --- drawing valid graphs --------------------------------------------------------------------


@dataclass(frozen=True)
class Val:
    """A value of a graph being drawn: its name and its value in each example."""

    name: str
    xs: tuple[Arr, ...]
    floating: bool = True

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

    def input(self, shape: Shape) -> Val:
        lo = choose(self.draw, (-2.0, 0.2))  # some inputs positive, for log and sqrt
        val = Val(self.name(), tuple(self.floats(shape, lo) for _ in range(self.examples)))
        self.inputs.append(Input(val.name, shape,
                                 requires_grad=self.draw(st.integers(0, 3)) > 0))
        self.vals.append(val)
        return val

    def constant(self, value: Arr) -> Val:
        val = Val(self.name(), (value,) * self.examples, value.dtype.kind == "f")
        self.constants.append(Constant(val.name, value))
        self.vals.append(val)
        return val

    def pick(self, fits: Pred | None = None) -> Val | None:
        """A float value of the graph that ``fits``, if there is one."""
        found = [v for v in self.vals if v.floating and (fits is None or fits(v))]
        return choose(self.draw, found) if found else None

    def node(self, op: str, operands: Sequence[Val], attrs: dict[str, AttrValue],
             forward: Callable[..., Arr]) -> bool:
        """Add the node if its values are bounded (and not too big) in every example."""
        ys = tuple(np.asarray(forward(*(o.xs[e] for o in operands)), dtype=np.float64)
                   for e in range(self.examples))
        if ys[0].size > MAX_SIZE or not all(np.all(np.abs(y) <= BOUND) for y in ys):
            return False
        val = Val(self.name(), ys)
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
    cond = d.pick(lambda v: broadcasts(out, v.shape) and every(off_zero)(v)) if d.draw(
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
    extra = choose(draw, [v.name for v in d.vals])
    if draw(st.booleans()) and extra not in outputs:
        outputs.insert(draw(st.integers(0, len(outputs))), extra)
    names = [i.name for i in d.inputs]
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
    k = node_index(draw, case, fixed_arity)
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


WIRE_KINDS = {AttrKind.INT: "int_value", AttrKind.BOOL: "bool_value",
              AttrKind.STRING: "string_value", AttrKind.INTS: "ints_value"}


@mutation(focus=has_attributes)
def ill_typed_attribute(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    """An attribute of another kind than its op's schema says, or with no value at all."""
    k = node_index(draw, case, has_attributes)
    specs = OP_TABLE[case.graph.nodes[k].op].attrs
    name = choose(draw, sorted(specs))
    kind = choose(draw, [w for a, w in WIRE_KINDS.items() if a != specs[name].kind
                         and (a, specs[name].kind) != (AttrKind.INT, AttrKind.INTS)]
                                + ["no value"])  # an int stands for a list of one
    value = req.graph.nodes[k].attributes[name]
    value.Clear()
    if kind == "int_value":
        value.int_value = draw(st.integers(-3, 3))
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


def bad_reduction(draw: Draw, shape: Shape) -> dict[str, pb.AttributeValue | None]:
    choices = OP_TABLE["softmax_cross_entropy"].attrs["reduction"].choices
    return {"reduction": pb.AttributeValue(string_value=unknown(draw, frozenset(choices)))}


BREAKERS: dict[str, Breaker] = {
    **dict.fromkeys(("sum", "mean", "max", "min", "logsumexp"), bad_axes),
    **dict.fromkeys(("softmax", "log_softmax", "concat"), bad_axis),
    "transpose": bad_perm,
    "reshape": bad_reshape,
    "broadcast_to": bad_broadcast,
    "slice": bad_slice,
    "softmax_cross_entropy": bad_reduction,
}


def breakable(op: str) -> bool:
    return op in BREAKERS


@mutation(focus=breakable)
def bad_attribute_value(draw: Draw, case: Case, req: pb.ComputeRequest) -> Fields:
    """An attribute of the right kind whose value the operand's shape rules out."""
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
    dtype = choose(draw, ("float32", "int64", "unspecified", "unknown"))
    if dtype in ("float32", "int64"):
        req.inputs[x].CopyFrom(tensor_to_wire(case.inputs[x].astype(dtype), raw=case.raw))
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
