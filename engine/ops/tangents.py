"""What a forward-mode rule (``OpDef.jvp``) works with: the :class:`Step` it is given and the
:class:`Tangents` writer it adds ops through. ``gradserve.engine.forward`` applies the rules to
a graph (see there); the rules themselves sit in the op table beside each op's forward and VJP.

Rules write the tangent with the table's own ops, so what they write is differentiable in
reverse mode too (second order). Shapes follow from broadcasting: an operand's tangent has the
operand's shape, and ops broadcast as they do for the values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from gradserve.engine.ops.base import AttrValue
from gradserve.engine.types import TensorType


@dataclass(frozen=True, slots=True)
class Step:
    """What a forward-mode rule sees of one node: its operands (by name), their tangents
    (None: zero), its own value's name and its attributes as the node gives them."""

    inputs: tuple[str, ...]
    tangents: tuple[str | None, ...]
    output: str
    attrs: Mapping[str, AttrValue]


class Tangents:
    """The nodes and constants forward-mode rules add to a graph, with fresh names. ``type``
    gives the static (per-example) type of any value of the original graph."""

    def __init__(self, taken: set[str], types: Mapping[str, TensorType]) -> None:
        self._types = types
        self._taken = set(taken)
        self.nodes: list[tuple[str, str, tuple[str, ...], dict[str, AttrValue]]] = []
        self.constants: list[tuple[str, np.ndarray]] = []
        self._scalars: dict[tuple[float, str], str] = {}
        self.context = ""  # the value whose tangent is being written: new names start with it

    def fresh(self, base: str) -> str:
        """A name no value has yet, from ``base``."""
        name, k = base, 0
        while name in self._taken:
            k += 1
            name = f"{base}.{k}"
        self._taken.add(name)
        return name

    def type(self, name: str) -> TensorType:
        """The per-example type of a value of the original graph."""
        return self._types[name]

    def op(self, op: str, *inputs: str, **attrs: AttrValue) -> str:
        """A new node applying ``op``; its value's name."""
        name = self.fresh(f"{self.context}.tangent" if self.context else f"tangent.{op}")
        self.nodes.append((name, op, tuple(inputs), dict(attrs)))
        return name

    def const(self, value: float, like: str) -> str:
        """A scalar constant in the dtype of ``like`` (a value of the original graph)."""
        dtype = self._types[like].dtype
        key = (float(value), dtype.value)
        if key not in self._scalars:
            name = self.fresh(f"const.{value:g}")
            self.constants.append((name, np.asarray(value, dtype=dtype.numpy)))
            self._scalars[key] = name
        return self._scalars[key]

    def array(self, value: np.ndarray, base: str = "const") -> str:
        """A constant array (shared by every example)."""
        name = self.fresh(base)
        self.constants.append((name, value))
        return name

    def zeros_like(self, name: str) -> str:
        """Zeros of ``name``'s shape and dtype, batched as it is (``where`` with a false
        condition: exact zeros, whatever ``name`` holds, infinities and NaN included)."""
        zero = self.const(0.0, name)
        return self.op("where", zero, name, zero)

    # Sums and products of tangents in which None stands for zero.

    def add(self, *terms: str | None) -> str | None:
        """The sum of the terms given (None: zero)."""
        present = [t for t in terms if t is not None]
        if not present:
            return None
        total = present[0]
        for t in present[1:]:
            total = self.op("add", total, t)
        return total

    def mul(self, a: str | None, b: str) -> str | None:
        """``a * b``, None when ``a`` is (zero times anything finite)."""
        return None if a is None else self.op("mul", a, b)

    def neg(self, a: str | None) -> str | None:
        return None if a is None else self.op("neg", a)



# A forward-mode rule: the tangent of the node's value (None: zero), written through Tangents.
Jvp = Callable[[Tangents, Step], str | None]


def linear(t: Tangents, s: Step, op: str) -> str | None:
    """The tangent of an op linear in its one operand: the op applied to the tangent."""
    (dx,) = s.tangents
    return None if dx is None else t.op(op, dx, **s.attrs)
