"""gather: elements picked along an axis by int64 indices (ONNX Gather; an embedding lookup).

Per example, ``gather(data, indices)`` along ``axis`` is
``data.shape[:axis] + indices.shape + data.shape[axis+1:]``. In a batched run either operand may
be shared by all examples (a constant: an embedding table with batched token ids, or fixed
indices into batched data) or both batched; the rules tell which from the operands' ranks
against their per-example ranks, and index accordingly, so no operand is ever copied out per
example. The VJP scatter-adds into zeros of data's shape: repeated indices accumulate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradserve.engine.errors import EngineError, ErrorKind
from gradserve.engine.ops.base import (
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
    normalize_axes,
)
from gradserve.engine.types import DType, TensorType


def _infer(types: Types, attrs: Attrs) -> Inferred:
    data, indices = types
    if indices.dtype is not DType.INT64:
        raise fail(ErrorKind.DTYPE, f"indices are {indices.dtype}; gather takes int64 indices",
                   "inputs[1]")
    if data.rank == 0:
        raise fail(ErrorKind.SHAPE, "data needs rank >= 1", "inputs[0]")
    (axis,) = normalize_axes((int_attr(attrs, "axis"),), data.rank)
    before = data.rank + axis  # per-example axes of data before the gathered one
    shape = (*data.shape[:before], *indices.shape, *data.shape[before + 1:])
    return TensorType(shape, data.dtype), {
        "axis": axis, "before": before, "size": data.shape[axis], "data_rank": data.rank,
        "index_rank": indices.rank}


def _index(p: Params, data: Array, indices: Array) -> tuple[tuple[Any, ...], Array | None]:
    """The index into ``data`` that gathers, with the indices checked and made nonnegative;
    and the permutation that brings what it picks into the result's axis order (None: in
    order already)."""
    indices = np.asarray(indices)
    size = p["size"]
    low, high = (indices.min(), indices.max()) if indices.size else (0, 0)
    if low < -size or high >= size:
        bad = indices[(indices < -size) | (indices >= size)].flat[0]
        raise EngineError(ErrorKind.VALUE, f"index {bad} is outside [-{size}, {size}) for an "
                          f"axis of size {size}", field="inputs[1]")
    if low < 0:
        indices = np.where(indices < 0, indices + size, indices)
    lead_d = np.ndim(data) - p["data_rank"]
    lead_i = indices.ndim - p["index_rank"]
    before, rank_i = p["before"], p["index_rank"]
    if lead_i == 0:  # indices shared by every example: they land in place
        return (*(slice(None),) * (lead_d + before), indices), None
    if lead_d == 0:  # batched indices into shared data: (*before, *lead, *idx, *after)
        order = [*range(before, before + lead_i), *range(before), *range(before + lead_i,
                                                                          indices.ndim + before)]
        return (*(slice(None),) * before, indices), _tail_order(order, np.ndim(data) - 1 - before)
    # Both batched: the examples' own rows, (*lead, *idx, *before, *after) when before > 0.
    examples = tuple(np.arange(n).reshape((n,) + (1,) * (lead_i - 1 - k + rank_i))
                     for k, n in enumerate(indices.shape[:lead_i]))
    index = (*examples, *(slice(None),) * before, indices)
    if before == 0:
        return index, None
    idx_end = indices.ndim
    order = [*range(lead_i), *range(idx_end, idx_end + before), *range(lead_i, idx_end)]
    return index, _tail_order(order, np.ndim(data) - lead_d - 1 - before)


def _tail_order(order: list[int], after: int) -> Array:
    """``order`` followed by the ``after`` axes past it, in place."""
    return np.array([*order, *range(len(order), len(order) + after)])


def _forward(p: Params, data: Array, indices: Array) -> Array:
    index, order = _index(p, data, indices)
    picked: Array = np.asarray(data)
    picked = picked[index]
    return picked if order is None else np.transpose(picked, order)


def _vjp_data(p: Params, g: Array, y: Array, data: Array, indices: Array) -> Array:
    index, order = _index(p, data, indices)
    if order is not None:
        g = np.transpose(g, np.argsort(order))  # into the order the index picks in
    d: Array = np.zeros(np.shape(data), dtype=g.dtype)
    np.add.at(d, index, g)
    return d


OPS = [
    OpDef(
        name="gather",
        doc="gather(data, indices): data's slices at int64 indices along axis, as ONNX "
            "Gather: per example data.shape[:axis] + indices.shape + data.shape[axis+1:].",
        min_arity=2, max_arity=2, infer=_infer, forward=_forward, vjps=(_vjp_data, None),
        jvp=lambda t, s: None if s.tangents[0] is None else t.op(
            "gather", s.tangents[0], s.inputs[1], **s.attrs),
        attrs={"axis": AttrSpec(AttrKind.INT, "the axis of data (per example) to pick along",
                                default=0)},
        edges="indices may be negative (-size counts from the end); one outside [-size, size) "
              "is refused when run (a VALUE error naming inputs[1]). Repeated indices add "
              "their gradients (an embedding's rows); indices get none.",
    ),
]
