"""Compiling a checked graph into an executable plan: a flat list of steps over numbered slots.

Each step holds its op's forward and VJP rules with the node's parameters already bound; a run
executes them through a :class:`Program` compiled from the steps once per choice of inputs to
differentiate. A plan is immutable and may be shared by threads; it carries a structural key so
equal graphs can share one cached plan.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from threading import Lock
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from gradserve.engine import feeds
from gradserve.engine.cache import LRU
from gradserve.engine.errors import Cancelled, check_cancelled
from gradserve.engine.feeds import Feed, as_value
from gradserve.engine.graph import Graph, Input
from gradserve.engine.ops import OP_TABLE
from gradserve.engine.ops.base import Array, Formula, Forward, Params, Vjp
from gradserve.engine.program import Program
from gradserve.engine.results import Result
from gradserve.engine.types import TensorType
from gradserve.engine.validate import Limits, check


@dataclass(frozen=True, slots=True)
class Step:
    """One node, ready to run: ``vals[out] = forward(*vals[args])`` and its VJPs per operand.

    For batched runs: ``pads`` says how many size-1 axes each batched operand
    gets after the batch axis, so operands broadcast per example, never against the batch;
    ``lifts`` marks unbatched operands that need the batch axis.
    """

    node: str
    out: int
    args: tuple[int, ...]
    forward: Forward
    vjps: tuple[Vjp | None, ...]
    pads: tuple[int, ...]
    lifts: tuple[bool, ...]


class Edge(NamedTuple):
    """How a step's gradient flows to one of its operands: the operand's index among the
    step's and its slot, the VJP rule, and whether the VJP's result must be fitted to the
    operand (summed back from the broadcast shape, or reshaped from its batch padding)."""

    operand: int
    slot: int
    vjp: Vjp
    fitted: bool


@dataclass(frozen=True, slots=True)
class Backward:
    """The backward pass for one choice of inputs to differentiate: the steps a gradient flows
    through, last first, each with the operands that need one; and which slots get a gradient."""

    steps: tuple[tuple[Step, tuple[Edge, ...]], ...]
    needs: tuple[bool, ...]
    inputs: tuple[int, ...]  # the input slots differentiated, in order


class Plan:
    """An executable, validated graph. Run it with :meth:`run`; it is safe to share between
    threads (its state never changes after compiling, but for a bounded cache of compiled
    passes, one per choice of inputs to differentiate)."""

    PROGRAM_CACHE = 16

    def __init__(self, graph: Graph, limits: Limits | None = None,
                 cancelled: Cancelled | None = None) -> None:
        """Validate and compile ``graph``; a large one takes a while, and stops with a
        CANCELLED error once ``cancelled()`` is true."""
        self.limits = limits or Limits()
        checked = check(graph, self.limits, cancelled)
        self.key = structural_key(graph)
        self.inputs: tuple[Input, ...] = graph.inputs
        self.outputs: tuple[str, ...] = graph.outputs
        self.output_set = frozenset(graph.outputs)
        names = [i.name for i in graph.inputs] + [c.name for c in graph.constants]
        names += [n.name for n in checked.order]
        self.names: tuple[str, ...] = tuple(names)
        self.slot: Mapping[str, int] = MappingProxyType({name: k for k, name in enumerate(names)})
        self.types: tuple[TensorType, ...] = tuple(checked.types[n] for n in names)
        # Constants are copied (read-only): the caller's arrays may change after compiling.
        self.constants: tuple[tuple[int, Array], ...] = tuple(
            (self.slot[c.name], as_value(_frozen(c.value))) for c in graph.constants
        )
        self.output_slots = tuple((name, self.slot[name]) for name in self.outputs)
        self.constant_ids = frozenset(id(value) for _, value in self.constants)
        # Held by a run, per example: every value, and the largest working buffer of a step.
        self.total_elements = sum(t.size for t in self.types) + checked.scratch
        self.default_wrt = frozenset(k for k, i in enumerate(graph.inputs)
                                     if i.requires_grad and i.dtype.is_float)
        # In a batched run, inputs carry the batch axis and constants do not (numpy's scalar
        # fast paths stay available); a node's value is batched when any operand is.
        batched = [k < len(graph.inputs) for k in range(len(names))]
        for node in checked.order:
            batched[self.slot[node.name]] = any(batched[self.slot[i]] for i in node.inputs)
        self.batched: tuple[bool, ...] = tuple(batched)
        self.steps: tuple[Step, ...] = tuple(
            self._step(n.name, n.op, n.inputs, checked.params[n.name], cancelled)
            for n in checked.order
        )
        self._programs: LRU[tuple[frozenset[int], bool], Program] = LRU(self.PROGRAM_CACHE)

    def _step(self, name: str, op_name: str, inputs: tuple[str, ...], params: Params,
              cancelled: Cancelled | None) -> Step:
        check_cancelled(cancelled)
        op = OP_TABLE[op_name]
        args = tuple(self.slot[i] for i in inputs)
        out = self.slot[name]
        batched = [self.batched[a] for a in args]
        pads = tuple(k if b else 0 for k, b in zip(op.pads([self.types[a] for a in args],
                                                            self.types[out]), batched, strict=True))
        lifts = tuple(op.lifts and not b and any(batched) for b in batched)
        bound = partial(_bound, params) if op.takes_params else _as_is
        return Step(
            node=name,
            out=out,
            args=args,
            forward=bound(op.forward),
            vjps=tuple(None if v is None else bound(v)
                       for v in (op.vjp(k) for k in range(len(inputs)))),
            pads=pads,
            lifts=lifts,
        )

    def program(self, wrt: frozenset[int], keep: bool = False,
                cancelled: Cancelled | None = None) -> Program:
        """The compiled passes differentiating the input slots ``wrt``, handing back every
        value and gradient if ``keep`` (cached, least recently used dropped first). Compiling
        takes about as long as a few runs of an unbatched example: call this ahead, off a
        latency-critical thread, for a large graph (it stops with a CANCELLED error once
        ``cancelled()`` is true)."""
        return self._programs.get_or_make((wrt, keep), self._compile, wrt, keep, cancelled)

    def _compile(self, wrt: frozenset[int], keep: bool, cancelled: Cancelled | None) -> Program:
        return Program(self, self._backward(wrt), keep, cancelled)

    def compiled(self, wrt: frozenset[int], keep: bool = False) -> bool:
        """Whether :meth:`program` has these passes compiled (cached) already."""
        return (wrt, keep) in self._programs

    def _backward(self, wrt: frozenset[int]) -> Backward:
        """The backward pass differentiating the input slots ``wrt``."""
        needs = [slot in wrt for slot in range(len(self.names))]
        order: list[tuple[Step, tuple[Edge, ...]]] = []
        for step in self.steps:
            out_shape = self.types[step.out].shape
            edges = tuple(
                Edge(k, a, vjp, self.types[a].shape != out_shape or bool(step.pads[k]))
                for k, (a, vjp) in enumerate(zip(step.args, step.vjps, strict=True))
                if needs[a] and vjp is not None
            )
            if edges:
                needs[step.out] = True
                order.append((step, edges))
        return Backward(tuple(reversed(order)), tuple(needs), tuple(sorted(wrt)))

    def run(self, inputs: Mapping[str, Any], *, wrt: Iterable[str] | None = None,
            upstream: Mapping[str, Any] | None = None, batched: bool = False,
            keep_intermediates: bool = False, time_limit: float | None = None,
            cancelled: Cancelled | None = None) -> Result:
        """Run forward on ``inputs``, then backward: :meth:`prepare`, then :meth:`Feed.run`
        (see both for the arguments)."""
        feed = self.prepare(inputs, wrt=wrt, upstream=upstream, batched=batched)
        return feed.run(keep_intermediates=keep_intermediates, time_limit=time_limit,
                        cancelled=cancelled)

    def prepare(self, inputs: Mapping[str, Any], *, wrt: Iterable[str] | None = None,
                upstream: Mapping[str, Any] | None = None, batched: bool = False) -> Feed:
        """A checked feed of ``inputs`` to :meth:`Feed.run` later: see :func:`feeds.prepare`."""
        return feeds.prepare(self, inputs, wrt=wrt, upstream=upstream, batched=batched)

    def check_names(self, inputs: Iterable[str], upstream: Iterable[str] = ()) -> None:
        """Refuse a name this plan does not know, before any value is decoded: see
        :func:`feeds.check_names`."""
        feeds.check_names(self, inputs, upstream)


def _bound(params: Params, rule: Forward | Vjp) -> Forward | Vjp:
    """A rule of an op that takes parameters, with the node's bound."""
    if isinstance(rule, Formula):
        raise TypeError(f"formula {rule.source!r} cannot take parameters: use a function")
    return partial(rule, params)


def _as_is(rule: Forward | Vjp) -> Forward | Vjp:
    """A rule of an op without parameters: as it is."""
    return rule


def _frozen(value: Array) -> Array:
    copy = np.array(value)
    copy.flags.writeable = False
    return copy


def structural_key(graph: Graph) -> str:
    """A digest of everything that determines what a graph computes: equal keys, equal plans.
    Computed once per graph object (a graph never changes): hashing a model's weights takes
    a millisecond, which a client sending the same graph again should not pay each time."""
    with _KEYS_LOCK:
        key = _KEYS.get(graph)
    if key is None:
        key = _digest(graph)
        with _KEYS_LOCK:
            _KEYS[graph] = key
    return key


_KEYS: weakref.WeakKeyDictionary[Graph, str] = weakref.WeakKeyDictionary()
_KEYS_LOCK = Lock()


def _digest(graph: Graph) -> str:
    h = hashlib.sha256()

    def feed(item: object) -> None:
        h.update(repr(item).encode() + b"\0")

    for i in graph.inputs:
        feed(("input", i.name, tuple(i.shape), str(i.dtype), i.requires_grad))
    for c in graph.constants:
        feed(("constant", c.name, c.value.dtype.str, c.value.shape))
        h.update(np.ascontiguousarray(c.value).tobytes())
    for n in graph.nodes:
        feed(("node", n.name, n.op, tuple(n.inputs), sorted(n.attrs.items())))
    feed(("outputs", tuple(graph.outputs)))
    return h.hexdigest()

