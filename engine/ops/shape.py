"""Ops that move elements without arithmetic: reshape, transpose, broadcast_to, concat, slice.

Their rules address per-example axes from the end (or skip the leading batch axes explicitly),
so a reshape target or a permutation keeps its per-example meaning on a stacked batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from math import prod

import numpy as np

from gradserve.engine.errors import ErrorKind
from gradserve.engine.ops.base import (
    Array,
    AttrKind,
    Attrs,
    AttrSpec,
    Inferred,
    OpDef,
    Params,
    Types,
    broadcast_pads,
    fail,
    int_attr,
    ints_attr,
    normalize_axes,
    same_float_dtype,
)
from gradserve.engine.ops.tangents import linear
from gradserve.engine.types import Shape, TensorType


def _positive(shape: Sequence[int], name: str) -> Shape:
    if any(d < 1 for d in shape):
        raise fail(ErrorKind.ATTRIBUTE, f"{name} {list(shape)} has a dimension below 1",
                   f"attrs.{name}")
    return tuple(shape)


def _reshape(types: Types, attrs: Attrs) -> Inferred:
    (x,) = types
    target = list(ints_attr(attrs, "shape") or ())
    if target.count(-1) > 1:
        raise fail(ErrorKind.ATTRIBUTE, "shape may hold at most one -1", "attrs.shape")
    if -1 in target:
        known = prod(d for d in target if d != -1)
        if known < 1 or x.size % known:
            raise fail(ErrorKind.SHAPE, f"cannot reshape {list(x.shape)} into {target}")
        target[target.index(-1)] = x.size // known
    shape = _positive(target, "shape")
    if prod(shape) != x.size:
        raise fail(ErrorKind.SHAPE, f"cannot reshape {list(x.shape)} ({x.size} elements) into "
                   f"{list(shape)} ({prod(shape)} elements)")
    return TensorType(shape, same_float_dtype(types)), {"shape": shape, "rank": x.rank}


def _reshape_forward(p: Params, x: Array) -> Array:
    return np.reshape(x, np.shape(x)[: np.ndim(x) - p["rank"]] + p["shape"])


def _transpose(types: Types, attrs: Attrs) -> Inferred:
    (x,) = types
    perm = ints_attr(attrs, "perm")
    order = tuple(reversed(range(x.rank))) if perm is None else perm
    if sorted(order) != list(range(x.rank)):
        raise fail(ErrorKind.ATTRIBUTE, f"perm {list(order)} is not a permutation of "
                   f"{list(range(x.rank))}", "attrs.perm")
    inverse = tuple(int(i) for i in np.argsort(order))
    shape = tuple(x.shape[i] for i in order)
    return TensorType(shape, same_float_dtype(types)), {"perm": order, "inverse": inverse}


def _permute(x: Array, perm: tuple[int, ...]) -> Array:
    """Permute the trailing ``len(perm)`` axes of ``x``, leaving leading batch axes in place."""
    lead = np.ndim(x) - len(perm)
    return np.transpose(x, tuple(range(lead)) + tuple(lead + i for i in perm))


def _broadcast_to(types: Types, attrs: Attrs) -> Inferred:
    (x,) = types
    shape = _positive(ints_attr(attrs, "shape") or (), "shape")
    fits = len(shape) >= x.rank and all(d in (1, t) for d, t in zip(reversed(x.shape),
                                                                    reversed(shape), strict=False))
    if not fits:
        raise fail(ErrorKind.SHAPE, f"cannot broadcast {list(x.shape)} to {list(shape)}")
    return TensorType(shape, same_float_dtype(types)), {"shape": shape}


def _broadcast_to_forward(p: Params, x: Array) -> Array:
    # Unbatched, x has at most the target's rank; batched, it was padded to the target's rank
    # after its batch axis, which is the one axis to keep in front.
    lead = max(np.ndim(x) - len(p["shape"]), 0)
    return np.broadcast_to(x, np.shape(x)[:lead] + p["shape"])


def _concat(types: Types, attrs: Attrs) -> Inferred:
    dtype = same_float_dtype(types)
    first = types[0]
    if first.rank == 0:
        raise fail(ErrorKind.SHAPE, "cannot concatenate rank-0 tensors", "inputs[0]")
    axis = int_attr(attrs, "axis")
    (a,) = normalize_axes((axis,), first.rank)
    edges = [0]
    for i, t in enumerate(types):
        if t.rank != first.rank or any(
            d != e for j, (d, e) in enumerate(zip(t.shape, first.shape, strict=True))
            if j != first.rank + a
        ):
            raise fail(ErrorKind.SHAPE, f"operand {i} has shape {list(t.shape)}, which does not "
                       f"match {list(first.shape)} outside axis {axis}", f"inputs[{i}]")
        edges.append(edges[-1] + t.shape[a])
    tail = (slice(None),) * (-a - 1)
    pieces = [(Ellipsis, slice(lo, hi), *tail) for lo, hi in pairwise(edges)]
    shape = list(first.shape)
    shape[a] = edges[-1]
    return TensorType(tuple(shape), dtype), {"axis": a, "pieces": pieces}


def _slice(types: Types, attrs: Attrs) -> Inferred:
    (x,) = types
    starts, ends = ints_attr(attrs, "starts") or (), ints_attr(attrs, "ends") or ()
    axes = ints_attr(attrs, "axes") or tuple(range(len(starts)))
    steps = ints_attr(attrs, "steps") or (1,) * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise fail(ErrorKind.ATTRIBUTE, "starts, ends, axes and steps must have equal lengths",
                   "attrs.ends")
    if 0 in steps:
        raise fail(ErrorKind.ATTRIBUTE, "steps must not be 0", "attrs.steps")
    index: list[slice] = [slice(None)] * x.rank
    shape = list(x.shape)
    normalize_axes(axes, x.rank, "axes")  # range and repetition checks
    for axis, start, end, step in zip((a % x.rank for a in axes), starts, ends, steps,
                                      strict=True):
        # Python's slice semantics clamp out-of-range bounds, as ONNX Slice does.
        index[axis] = slice(start, end, step)
        shape[axis] = len(range(x.shape[axis])[index[axis]])
        if shape[axis] == 0:
            raise fail(ErrorKind.SHAPE, f"slice {start}:{end}:{step} of axis {axis} (size "
                       f"{x.shape[axis]}) is empty")
    return TensorType(tuple(shape), same_float_dtype(types)), {"index": (Ellipsis, *index)}


def _slice_vjp(p: Params, g: Array, y: Array, x: Array) -> Array:
    dx = np.zeros(np.shape(x), dtype=g.dtype)
    dx[p["index"]] = g
    return dx


SHAPE = AttrSpec(AttrKind.INTS, "the target shape (per example)", required=True)

OPS = [
    OpDef(
        name="reshape", doc="The same elements in a new shape (one -1 dimension is inferred).",
        min_arity=1, max_arity=1, infer=_reshape, attrs={"shape": SHAPE},
        forward=_reshape_forward,
        vjps=(lambda p, g, y, x: np.reshape(g, np.shape(x)),),
        jvp=lambda t, s: linear(t, s, "reshape"),
    ),
    OpDef(
        name="transpose", doc="Permute axes (default: reverse them).",
        min_arity=1, max_arity=1, infer=_transpose,
        attrs={"perm": AttrSpec(AttrKind.INTS, "the new order of the axes; absent: reversed")},
        forward=lambda p, x: _permute(x, p["perm"]),
        vjps=(lambda p, g, y, x: _permute(g, p["inverse"]),),
        jvp=lambda t, s: linear(t, s, "transpose"),
    ),
    OpDef(
        name="broadcast_to", doc="Repeat size-1 and missing leading axes to reach a shape.",
        min_arity=1, max_arity=1, infer=_broadcast_to, attrs={"shape": SHAPE}, pads=broadcast_pads,
        forward=_broadcast_to_forward,
        vjps=(lambda p, g, y, x: g,),
        jvp=lambda t, s: linear(t, s, "broadcast_to"),
    ),
    OpDef(
        name="concat", doc="Join tensors along an axis.",
        min_arity=1, max_arity=None, infer=_concat, lifts=True,
        attrs={"axis": AttrSpec(AttrKind.INT, "the axis to join along", default=0)},
        forward=lambda p, *xs: np.concatenate(xs, axis=p["axis"]),
        vjps=(lambda i, p, g, y, *xs: g[p["pieces"][i]],),
        jvp=lambda t, s: t.op("concat", *(dx or t.zeros_like(x)
                                          for x, dx in zip(s.inputs, s.tangents, strict=True)),
                              **s.attrs),
    ),
    OpDef(
        name="slice", doc="A strided window, as ONNX Slice (out-of-range bounds are clamped).",
        min_arity=1, max_arity=1, infer=_slice,
        attrs={
            "starts": AttrSpec(AttrKind.INTS, "first index per sliced axis", required=True),
            "ends": AttrSpec(AttrKind.INTS, "end index (exclusive) per sliced axis",
                             required=True),
            "axes": AttrSpec(AttrKind.INTS, "the sliced axes; absent: 0, 1, ..."),
            "steps": AttrSpec(AttrKind.INTS, "stride per sliced axis (nonzero); absent: 1"),
        },
        forward=lambda p, x: x[p["index"]],
        vjps=(_slice_vjp,),
        jvp=lambda t, s: linear(t, s, "slice"),
    ),
]
