"""Convolution (cross-correlation, as ONNX and PyTorch define it: the kernel is not flipped),
1-D to 3-D, grouped (depthwise included), with bias, on BLAS.

X is ``(*lead, C, *spatial)``: leading axes are batch axes, an ONNX model's N among them when it
stays inside the tensor. W is ``(M, C/group, *kernel)`` and B ``(M,)``; per example, the result
is ``(*lead, M, *out)``. Forward, X is unfolded (im2col, one strided copy per kernel offset,
see ``windows``) into ``(*lead, group, C/group * K, P)`` and multiplied by W as
``(group, M/group, C/group * K)``: one batched matrix product. Backward, dX = col2im(W^T dY)
(one strided add per kernel offset), dW = dY unfold(X)^T with the leading axes W is shared over
folded into the contraction, dB = the sum of dY over positions. The unfolded buffer is the
largest thing a conv holds: its size per example is checked against the element limit when the
graph is validated (``SCRATCH``).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import numpy as np

from gradserve.engine.errors import ErrorKind
from gradserve.engine.ops.base import (
    SCRATCH,
    Array,
    AttrKind,
    Attrs,
    AttrSpec,
    Inferred,
    OpDef,
    Params,
    Types,
    fail,
    int_attr,
    same_float_dtype,
)
from gradserve.engine.ops.tangents import Step, Tangents
from gradserve.engine.ops.windows import (
    DILATIONS,
    PADS,
    STRIDES,
    cropped,
    fold,
    padded,
    unfold,
    window,
)
from gradserve.engine.types import TensorType


def _infer(types: Types, attrs: Attrs) -> Inferred:
    x, w = types[0], types[1]
    dtype = same_float_dtype(types)
    s = w.rank - 2
    if s not in (1, 2, 3):
        raise fail(ErrorKind.SHAPE, f"weights have shape {list(w.shape)}; they need (M, "
                   "C/group, *kernel) with 1 to 3 kernel axes", "inputs[1]")
    if x.rank < 1 + s:
        raise fail(ErrorKind.SHAPE, f"X has shape {list(x.shape)}; a {s}-D conv needs (..., C, "
                   f"{s} spatial axes)", "inputs[0]")
    group = int_attr(attrs, "group")
    c, (m, cg) = x.shape[-1 - s], w.shape[:2]
    if group < 1 or c % group or m % group:
        raise fail(ErrorKind.ATTRIBUTE, f"group {group} must divide the {c} input channels and "
                   f"the {m} output channels", "attrs.group")
    if cg * group != c:
        raise fail(ErrorKind.SHAPE, f"weights have {cg} channels per group; {c} input channels "
                   f"in {group} groups need {c // group}", "inputs[1]")
    if len(types) == 3 and types[2].shape != (m,):
        raise fail(ErrorKind.SHAPE, f"bias has shape {list(types[2].shape)}; it needs [{m}]",
                   "inputs[2]")
    win = window(attrs, x.shape[-s:], w.shape[2:])
    lead = x.shape[: x.rank - 1 - s]
    buffers = c * max(win.offsets * win.positions, prod(win.padded))
    return TensorType((*lead, m, *win.out), dtype), {
        "win": win, "group": group, "c": c, "m": m, SCRATCH: prod(lead) * buffers}


def _pads(types: Sequence[TensorType], out: TensorType) -> tuple[int, ...]:
    """W and B meet X's leading axes (an ONNX model's N) past the batch axis."""
    lead = types[0].rank - (types[1].rank - 1)
    return (0, *(lead,) * (len(types) - 1))


def _matrices(p: Params, w: Array) -> Array:
    """W as ``(*lead, group, M/group, C/group * K)``."""
    s = p["win"].rank
    return np.reshape(w, (*w.shape[:w.ndim - 2 - s], p["group"], p["m"] // p["group"], -1))


def _forward(p: Params, x: Array, w: Array, b: Array | None = None) -> Array:
    win, group = p["win"], p["group"]
    cols = unfold(padded(x, win, 0.0), win)
    lead = cols.shape[: cols.ndim - 1 - 2 * win.rank]
    cols = np.reshape(cols, (*lead, group, -1, win.positions))
    y = np.matmul(_matrices(p, w), cols)
    y = np.reshape(y, (*y.shape[:-3], p["m"], *win.out))
    if b is None:
        return y
    bias = np.reshape(b, b.shape[:-1] + (p["m"],) + (1,) * win.rank)
    if np.broadcast_shapes(y.shape, bias.shape) != y.shape:
        return y + bias
    y += bias  # y is fresh: add in place
    return y


def _grad_matrices(p: Params, g: Array) -> Array:
    """The upstream gradient as ``(*lead, group, M/group, P)``, contiguous (a default upstream
    gradient is a broadcast view, which BLAS cannot read)."""
    win, group = p["win"], p["group"]
    lead = g.shape[: g.ndim - 1 - win.rank]
    return np.reshape(np.ascontiguousarray(g), (*lead, group, p["m"] // group, win.positions))


def _vjp_x(p: Params, g: Array, y: Array, x: Array, w: Array, b: Array | None = None) -> Array:
    win = p["win"]
    dcols = np.matmul(_matrices(p, w).mT, _grad_matrices(p, g))  # (*lead, G, C/G * K, P)
    dcols = np.reshape(dcols, (*dcols.shape[:-3], p["c"], *win.kernel, *win.out))
    return cropped(fold(dcols, win), win)


def _vjp_w(p: Params, g: Array, y: Array, x: Array, w: Array, b: Array | None = None) -> Array:
    win, group, s = p["win"], p["group"], p["win"].rank
    lead = g.shape[: g.ndim - 1 - s]
    lead_w = w.shape[: w.ndim - 2 - s]
    lead_w = (1,) * (len(lead) - len(lead_w)) + lead_w
    # Leading axes W is shared over (an ONNX N, all of them for an unbatched W) are summed:
    # folded into the contraction with the positions, for one matrix product.
    summed = [a for a in range(len(lead)) if lead_w[a] == 1 and lead[a] > 1]
    kept = [a for a in range(len(lead)) if a not in summed]
    g2 = _grad_matrices(p, g)
    n = len(lead)
    g2 = np.transpose(g2, (*kept, n, n + 1, *summed, n + 2))
    g2 = np.reshape(g2, (*g2.shape[:len(kept) + 2], -1))
    shift = len(lead) - (x.ndim - 1 - s)  # X's leading axes align with the last of g's
    cols = unfold(padded(x, win, 0.0), win, moved=[a - shift for a in summed])
    summed_positions = prod(lead[a] for a in summed) * win.positions
    cols = np.reshape(cols, (*cols.shape[: cols.ndim - 1 - 2 * s - len(summed)], group, -1,
                             summed_positions))
    dw = np.matmul(g2, cols.mT)  # (*kept, G, M/G, C/G * K)
    shape = tuple(1 if a in summed else lead[a] for a in range(len(lead)))
    return np.reshape(dw, shape + w.shape[w.ndim - 2 - s:])


def _vjp_b(p: Params, g: Array, y: Array, x: Array, w: Array, b: Array) -> Array:
    return np.sum(g, axis=tuple(range(-p["win"].rank, 0)))


def _jvp(t: Tangents, s: Step) -> str | None:
    """Bilinear in X and W, plus B: conv(dX, W, dB) + conv(X, dW), dB riding with the first
    term there is (dB alone: dB broadcast over the positions and leading axes, no conv)."""
    x, w = s.inputs[:2]
    dx, dw = s.tangents[:2]
    db = s.tangents[2] if len(s.tangents) == 3 else None
    if dx is None and dw is None:
        if db is None:
            return None
        w_type = t.type(w)
        column = t.op("reshape", db, shape=(w_type.shape[0], *(1,) * (w_type.rank - 2)))
        return t.op("broadcast_to", column, shape=t.type(s.output).shape)
    bias = (db,) if db is not None else ()
    first = None if dx is None else t.op("conv", dx, w, *bias, **s.attrs)
    second = None if dw is None else t.op("conv", x, dw, *(bias if dx is None else ()),
                                          **s.attrs)
    return t.add(first, second)


OPS = [
    OpDef(
        name="conv",
        doc="conv(X, W[, B]): cross-correlation (no kernel flip, as ONNX Conv and PyTorch) of "
            "X (..., C, *spatial) with W (M, C/group, *kernel), 1 to 3 spatial axes, plus B "
            "(M,): (..., M, *out). Leading axes of X are batch axes.",
        min_arity=2, max_arity=3, infer=_infer, pads=_pads, forward=_forward,
        vjps=(_vjp_x, _vjp_w, _vjp_b), jvp=_jvp,
        attrs={
            "strides": STRIDES,
            "pads": PADS,
            "dilations": DILATIONS,
            "group": AttrSpec(AttrKind.INT, "channel groups: C and M split into this many, "
                              "each output group seeing one input group (C: depthwise)",
                              default=1),
        },
    ),
]
