"""Derivatives beyond one gradient, each a run of a graph derived from the original.

- ``jvp``: the outputs' derivatives along a direction per input (forward mode: the graph of
  ``forward.jvp_graph``, run forward only).
- ``hvp``: the Hessian of (upstream . outputs) times a vector per input, for each
  differentiated input: reverse mode over the forward-mode graph (the gradient of
  upstream . J v is H v), with the first-order gradient beside it.
- ``jacobian``: every output's dense Jacobian with respect to every differentiated input, one
  VJP per output element along the basis directions.
- ``hessian``: the dense Hessian of (upstream . outputs) over the differentiated inputs, one
  Hessian-vector product per input element along the basis directions.

The dense kinds stack their directions on the batch axis (each example of a request becomes as
many examples as there are directions), so one engine pass computes them all, and the server's
batcher, limits and cancellation serve them as any request. Their size is refused up front
(``max_elements``). :class:`Derived` holds the derived graph; :meth:`Derived.feed` turns a
request's values into the derived run's, and :meth:`Derived.answer` its result back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from math import prod
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gradserve.engine.errors import EngineError, ErrorKind
from gradserve.engine.forward import Forward, jvp_graph
from gradserve.engine.graph import Graph
from gradserve.engine.plan import Plan
from gradserve.engine.results import Result
from gradserve.engine.validate import Limits, check

Arrays = dict[str, NDArray[Any]]


class Kind(StrEnum):
    """What a request asks beyond the gradient."""

    JVP = "jvp"
    HVP = "hvp"
    JACOBIAN = "jacobian"
    HESSIAN = "hessian"


@dataclass(frozen=True)
class Run:
    """The derived graph's run for one request: its inputs, the inputs it differentiates, the
    upstream gradients, and its batch (None: one example)."""

    inputs: Mapping[str, Any]
    wrt: tuple[str, ...]
    upstream: Mapping[str, Any]
    batch: int | None


@dataclass
class Answer:
    """What a derivative request gets back: outputs and gradients where the kind gives them,
    and its own results (by output for jvp, by input for hvp, by (row, column) name pairs
    for the dense kinds)."""

    outputs: Arrays = field(default_factory=dict)
    gradients: Arrays = field(default_factory=dict)
    jvp: Arrays = field(default_factory=dict)
    hvp: Arrays = field(default_factory=dict)
    blocks: dict[tuple[str, str], NDArray[Any]] = field(default_factory=dict)

    def nonfinite(self, batch: int | None) -> list[bool]:
        """Whether any value it holds is NaN or infinite: per example when batched."""
        arrays = [*self.outputs.values(), *self.gradients.values(), *self.jvp.values(),
                  *self.hvp.values(), *self.blocks.values()]
        rows = batch or 1
        flags = np.zeros(rows, dtype=bool)
        for a in arrays:
            flags |= ~np.isfinite(np.reshape(a, (rows, -1))).all(axis=1)
        return flags.tolist()


@dataclass(frozen=True)
class Derived:
    """A derivative of ``original`` as a run of ``graph``: for ``kind`` along (jvp, hvp) or
    over (jacobian, hessian) the inputs ``wrt``."""

    kind: Kind
    original: Graph
    graph: Graph
    wrt: tuple[str, ...]
    forward: Forward | None
    shapes: Mapping[str, tuple[int, ...]]  # every value of the original graph, per example
    dtypes: Mapping[str, np.dtype[Any]]

    def feed(self, inputs: Mapping[str, Any], upstream: Mapping[str, Any],
             directions: Mapping[str, Any], batch: int | None, max_elements: int) -> Run:
        """The derived run of a request: its ``inputs``, ``upstream`` gradients by output,
        ``directions`` by input (jvp and hvp), ``batch`` examples (None: one)."""
        if self.kind in (Kind.JVP, Kind.HVP):
            for name in self._forward.tangent_inputs:
                if name not in directions:
                    raise EngineError(ErrorKind.FEED, f"input {name!r} needs a direction (a "
                                      f"{self.kind} takes one per input it is along)",
                                      node=name)
            fed = {**inputs, **{self._forward.tangent_inputs[n]: directions[n]
                                for n in self._forward.tangent_inputs}}
            if self.kind is Kind.JVP:
                return Run(fed, (), {}, batch)
            return Run(fed, self.wrt, self._tangent_upstream(upstream), batch)
        shapes = self.shapes
        rows = list(self.original.outputs) if self.kind is Kind.JACOBIAN else list(self.wrt)
        sizes = [prod(shapes[r]) for r in rows]
        count = sum(sizes)
        examples = (batch or 1) * count
        total = examples * sum(prod(shapes[i.name]) for i in self.original.inputs)
        if total > max_elements:
            raise EngineError(ErrorKind.LIMIT, f"the {self.kind} takes {count} passes per "
                              f"example: {total} input elements; the limit is {max_elements}",
                              field=str(self.kind))
        fed = {k: _repeat(v, count, batch) for k, v in inputs.items()}
        basis = _basis(rows, sizes, shapes, batch or 1, self.dtypes)
        if self.kind is Kind.JACOBIAN:
            return Run(fed, self.wrt, basis, examples)
        fed.update({self._forward.tangent_inputs[n]: basis[n] for n in self.wrt})
        up = {k: _repeat(v, count, batch) for k, v in upstream.items()}
        return Run(fed, self.wrt, self._tangent_upstream(up), examples)

    def answer(self, result: Result, batch: int | None) -> Answer:
        """The request's answer from the derived run's result."""
        if self.kind is Kind.JVP:
            tangents = self._forward.tangent_outputs
            return Answer(outputs={o: result.outputs[o] for o in self.original.outputs},
                          jvp={o: result.outputs[tangents[o]] for o in self.original.outputs})
        if self.kind is Kind.HVP:  # an input the gradient does not depend on: H v is 0 there
            lead = () if batch is None else (batch,)
            return Answer(hvp={n: result.gradients[n] if n in result.gradients else np.zeros(
                (*lead, *self.shapes[n]), dtype=self.dtypes[n]) for n in self.wrt})
        shapes = self.shapes
        b = batch or 1
        rows = list(self.original.outputs) if self.kind is Kind.JACOBIAN else list(self.wrt)
        answer = Answer()
        if self.kind is Kind.JACOBIAN:
            count = sum(prod(shapes[o]) for o in rows)
            answer.outputs = {o: _first(result.outputs[o], count, batch) for o in rows}
        count = sum(prod(shapes[r]) for r in rows)
        for column in self.wrt:
            grad = result.gradients.get(column)
            start = 0
            for row in rows:
                size = prod(shapes[row])
                if grad is None:
                    block = np.zeros((b, *shapes[row], *shapes[column]),
                                     dtype=self.dtypes[column])
                else:
                    g = grad.reshape(b, count, *shapes[column])[:, start:start + size]
                    block = g.reshape(b, *shapes[row], *shapes[column])
                start += size
                answer.blocks[(row, column)] = block if batch is not None else block[0]
        return answer

    @property
    def _forward(self) -> Forward:
        if self.forward is None:
            raise TypeError(f"a {self.kind} has no forward-mode graph")
        return self.forward

    def _tangent_upstream(self, upstream: Mapping[str, Any]) -> dict[str, Any]:
        return {self._forward.tangent_outputs[o]: v for o, v in upstream.items()}


def derive(graph: Graph, kind: Kind, wrt: Sequence[str], limits: Limits | None = None
           ) -> Derived:
    """The graph that computes ``kind`` for ``graph`` along or over the inputs ``wrt``."""
    types = check(graph, limits).types
    shapes = {name: t.shape for name, t in types.items()}
    dtypes = {name: t.dtype.numpy for name, t in types.items()}
    if kind is Kind.JACOBIAN:
        return Derived(kind, graph, graph, tuple(wrt), None, shapes, dtypes)
    forward = jvp_graph(graph, wrt, limits, keep_outputs=kind is Kind.JVP)
    return Derived(kind, graph, forward.graph, tuple(wrt), forward, shapes, dtypes)


def _repeat(value: Any, count: int, batch: int | None) -> NDArray[Any]:
    """``value`` (one example, or ``batch`` stacked) repeated ``count`` times per example,
    stacked: example b's copies are rows b*count to (b+1)*count - 1."""
    a = np.asarray(value)
    if batch is None:
        return np.broadcast_to(a, (count, *a.shape))
    return np.repeat(a, count, axis=0)


def _first(value: NDArray[Any], count: int, batch: int | None) -> NDArray[Any]:
    """Each example's first copy (undoes :func:`_repeat` on identical copies)."""
    firsts = value[::count]
    return firsts if batch is not None else firsts[0]


def _basis(rows: Sequence[str], sizes: Sequence[int], shapes: Mapping[str, tuple[int, ...]],
           batch: int, dtypes: Mapping[str, np.dtype[Any]]) -> Arrays:
    """The basis directions over ``rows`` (all their elements in turn), as one array per row
    stacked over ``batch`` examples times the directions: direction k is 1 at element k of
    the row it falls in and 0 elsewhere."""
    count = sum(sizes)
    out: Arrays = {}
    start = 0
    for row, size in zip(rows, sizes, strict=True):
        eye = np.zeros((count, size), dtype=dtypes[row])
        eye[start:start + size] = np.eye(size, dtype=dtypes[row])
        out[row] = np.tile(eye.reshape(count, *shapes[row]), (batch,) + (1,) * len(shapes[row]))
        start += size
    return out


def compute(graph: Graph, kind: Kind, inputs: Mapping[str, Any], *,
            directions: Mapping[str, Any] | None = None,
            upstream: Mapping[str, Any] | None = None, wrt: Sequence[str] | None = None,
            batch: int | None = None, limits: Limits | None = None) -> Answer:
    """``kind`` for ``graph`` at ``inputs``, in-process (``batch``: examples stacked on a
    leading axis). ``directions`` are the tangents (jvp, whose inputs they name) or the
    vectors (hvp); ``wrt`` the differentiated inputs (default: those with requires_grad;
    float)."""
    limits = limits or Limits()
    given = dict(directions or {})
    if kind is Kind.JVP:
        names: Sequence[str] = list(given)
    else:
        names = list(wrt) if wrt is not None else [
            i.name for i in graph.inputs if i.requires_grad and i.dtype.is_float]
    derived = derive(graph, kind, names, limits)
    run = derived.feed(inputs, upstream or {}, given, batch, limits.max_total_elements)
    result = Plan(derived.graph, limits).run(run.inputs, wrt=run.wrt, upstream=run.upstream,
                                             batched=run.batch is not None)
    return derived.answer(result, batch)
