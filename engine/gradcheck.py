"""Checking analytic gradients against central finite differences, in float64.

The defaults are ``torch.autograd.gradcheck``'s (eps 1e-6, atol 1e-5, rtol 1e-3): an element
passes when |analytic - numeric| <= atol + rtol * |numeric|. The scalar differentiated is the sum
over outputs of <upstream, output> (upstream defaults to ones), so the check covers VJPs too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gradserve.engine.errors import Cancelled
from gradserve.engine.graph import Constant, Graph, Input
from gradserve.engine.plan import Plan
from gradserve.engine.types import DType


@dataclass(frozen=True, slots=True)
class InputCheck:
    """How one input fared: the worst absolute error, and its excess over the tolerance
    (``worst_excess <= 0`` means every element passed)."""

    worst_abs_error: float
    worst_excess: float

    @property
    def ok(self) -> bool:
        return self.worst_excess <= 0


@dataclass(frozen=True, slots=True)
class GradcheckReport:
    """Per-input results of :func:`gradcheck`; ``ok`` when every input passed."""

    inputs: dict[str, InputCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.inputs.values())


def gradcheck(
    graph: Graph,
    inputs: Mapping[str, Any],
    *,
    wrt: Iterable[str] | None = None,
    upstream: Mapping[str, Any] | None = None,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    time_limit: float | None = None,
    cancelled: Cancelled | None = None,
) -> GradcheckReport:
    """Compare the engine's gradients of ``graph`` at ``inputs`` with central differences.

    The graph runs in float64 whatever its declared float dtype, so the differences are taken
    where they are meaningful. ``time_limit`` bounds the whole check (two runs per element):
    past it, a LIMIT error; once ``cancelled()`` is true, a CANCELLED one.
    """
    deadline = None if time_limit is None else time.monotonic() + time_limit

    def left() -> float | None:
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    plan = Plan(as_float64(graph), cancelled=cancelled)
    plan.prepare(inputs, wrt=wrt)  # names and shapes, before any conversion
    floats = {i.name for i in plan.inputs if i.dtype.is_float}
    feed = {name: np.asarray(v, np.float64) if name in floats else v
            for name, v in inputs.items()}
    ups = None if upstream is None else {k: np.asarray(v, np.float64) for k, v in upstream.items()}
    analytic = plan.run(feed, wrt=wrt, upstream=ups, time_limit=left(),
                        cancelled=cancelled).gradients

    def objective(values: Mapping[str, NDArray[Any]]) -> float:
        out = plan.run(values, wrt=(), time_limit=left(), cancelled=cancelled).outputs
        return float(sum(np.sum(o * (1.0 if ups is None or n not in ups else ups[n]))
                         for n, o in out.items()))

    report: dict[str, InputCheck] = {}
    for name, grad in analytic.items():
        x = np.array(feed[name])
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            saved = x[idx]
            x[idx] = saved + eps
            hi = objective({**feed, name: x})
            x[idx] = saved - eps
            lo = objective({**feed, name: x})
            x[idx] = saved
            numeric[idx] = (hi - lo) / (2 * eps)
        err = np.abs(grad - numeric)
        report[name] = InputCheck(float(err.max(initial=0.0)),
                                  float((err - atol - rtol * np.abs(numeric)).max(initial=-np.inf)))
    return GradcheckReport(report)


def as_float64(graph: Graph) -> Graph:
    """The same graph with every float input and constant in float64."""

    def widen(dtype: DType) -> DType:
        return DType.FLOAT64 if dtype.is_float else dtype

    inputs: tuple[Input, ...] = tuple(replace(i, dtype=widen(i.dtype)) for i in graph.inputs)
    constants = tuple(
        Constant(c.name, c.value.astype(np.float64) if c.value.dtype.kind == "f" else c.value)
        for c in graph.constants
    )
    return replace(graph, inputs=inputs, constants=constants)
