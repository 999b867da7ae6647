"""Matrix product with numpy's ``matmul`` semantics: 1-D operands, broadcast batch dimensions.

The seeds' rule, for D = W @ X: dW = dD @ X.T and dX = W.T @ dD. A 1-D operand is treated as a
row (left) or column (right) matrix and the added axis removed again, on both passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradserve.engine.errors import ErrorKind
from gradserve.engine.ops.base import (
    Array,
    Attrs,
    Inferred,
    OpDef,
    Params,
    Types,
    fail,
    same_float_dtype,
)
from gradserve.engine.ops.tangents import Step, Tangents
from gradserve.engine.types import TensorType


def _matmul(types: Types, attrs: Attrs) -> Inferred:
    a, b = types
    dtype = same_float_dtype(types)
    if a.rank == 0 or b.rank == 0:
        raise fail(ErrorKind.SHAPE, "matmul needs operands of rank >= 1 (use mul for scalars)")
    a2 = (1, *a.shape) if a.rank == 1 else a.shape
    b2 = (*b.shape, 1) if b.rank == 1 else b.shape
    if a2[-1] != b2[-2]:
        raise fail(ErrorKind.SHAPE, f"matmul of {list(a.shape)} and {list(b.shape)}: inner "
                   f"dimensions {a2[-1]} and {b2[-2]} differ")
    try:
        batch = tuple(np.broadcast_shapes(a2[:-2], b2[:-2]))
    except ValueError:
        raise fail(ErrorKind.SHAPE, f"matmul of {list(a.shape)} and {list(b.shape)}: batch "
                   "dimensions do not broadcast") from None
    core = (a2[-2],) * (a.rank > 1) + (b2[-1],) * (b.rank > 1)
    return TensorType(batch + core, dtype), {"a1": a.rank == 1, "b1": b.rank == 1, "core": core,
                                            "mk": (a2[-2], b2[-1])}


def _matmul_pads(types: Sequence[TensorType], out: TensorType) -> tuple[int, ...]:
    """Align the operands' batch dimensions (rank minus the two matrix axes) per example."""
    batch_ranks = [max(t.rank - 2, 0) for t in types]
    return tuple(max(batch_ranks) - r for r in batch_ranks)


def _as_matrices(p: Params, a: Array, b: Array) -> tuple[Array, Array]:
    return (a[..., None, :] if p["a1"] else a), (b[..., None] if p["b1"] else b)


def _forward(p: Params, a: Array, b: Array) -> Array:
    a2, b2 = _as_matrices(p, a, b)
    y = np.matmul(a2, b2)
    return y if not (p["a1"] or p["b1"]) else np.reshape(y, y.shape[:-2] + p["core"])


def _grad_matrix(p: Params, g: Array) -> Array:
    """The upstream gradient with the matrix axes a 1-D operand dropped put back."""
    return np.reshape(g, np.shape(g)[: np.ndim(g) - len(p["core"])] + p["mk"])


def _vjp_a(p: Params, g: Array, y: Array, a: Array, b: Array) -> Array:
    _, b2 = _as_matrices(p, a, b)
    da = np.matmul(_grad_matrix(p, g), b2.mT)
    return da[..., 0, :] if p["a1"] else da


def _vjp_b(p: Params, g: Array, y: Array, a: Array, b: Array) -> Array:
    a2, _ = _as_matrices(p, a, b)
    db = np.matmul(a2.mT, _grad_matrix(p, g))
    return db[..., 0] if p["b1"] else db


def _jvp(t: Tangents, s: Step) -> str | None:
    """Bilinear: da @ b + a @ db."""
    (a, b), (da, db) = s.inputs, s.tangents
    return t.add(None if da is None else t.op("matmul", da, b),
                 None if db is None else t.op("matmul", a, db))


OPS = [
    OpDef(name="matmul", doc="Matrix product a @ b (numpy semantics: 1-D operands, batch dims).",
          min_arity=2, max_arity=2, infer=_matmul, pads=_matmul_pads, forward=_forward,
          vjps=(_vjp_a, _vjp_b), jvp=_jvp),
]
