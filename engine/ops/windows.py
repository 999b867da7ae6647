"""Sliding windows over the trailing spatial axes, shared by conv and the pools.

An operand is ``(*lead, C, *spatial)``: any leading axes are batch axes (the plan's, or an ONNX
model's N kept inside the tensor), then channels, then S = 1, 2 or 3 spatial axes. A
:class:`Window` holds what a shape rule resolved for one op: kernel, strides, dilations, padding
and the output size. Everything here works by kernel offset, never by window: for each of the
K = prod(kernel) offsets, one strided slice of the padded operand holds that offset's element of
every window at once, so unfolding (im2col), folding back (col2im) and pooling are K numpy
operations over whole tensors, whatever the number of windows.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np

from gradserve.engine.errors import ErrorKind
from gradserve.engine.ops.base import Array, AttrKind, Attrs, AttrSpec, fail, ints_attr

Index = tuple[Any, ...]  # an index into an array: Ellipsis, then slices

STRIDES = AttrSpec(AttrKind.INTS, "step between windows per spatial axis; absent: 1")
PADS = AttrSpec(AttrKind.INTS, "zeros added per spatial axis, ONNX order: all begins, then all "
                "ends; absent: 0")
DILATIONS = AttrSpec(AttrKind.INTS, "step between a window's elements per spatial axis; "
                     "absent: 1")


@dataclass(frozen=True, slots=True)
class Window:
    """Windows over S spatial axes of sizes ``size``: the output has ``out`` windows per axis,
    window ``o`` of axis ``a`` reading positions ``o*strides[a] - begins[a] + t*dilations[a]``
    for ``t < kernel[a]``. ``padded`` is the length per axis of the buffer those positions span
    (the input shifted by ``begins``, padding around it; ceil_mode may reach past the given end
    padding); ``kept`` is how much of the input the windows reach, per axis."""

    size: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begins: tuple[int, ...]
    out: tuple[int, ...]
    padded: tuple[int, ...]
    kept: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.size)

    @property
    def offsets(self) -> int:
        """K: the elements of one window."""
        return prod(self.kernel)

    @property
    def positions(self) -> int:
        """P: the windows over one channel."""
        return prod(self.out)

    @property
    def needs_padding(self) -> bool:
        """Whether the windows read other than the input as it is."""
        return any(self.begins) or self.padded != self.size

    def slices(self) -> Iterator[tuple[tuple[int, ...], Index]]:
        """Each kernel offset (row-major) with the index of the padded buffer's strided slice
        that holds its element of every window."""
        for t in itertools.product(*(range(k) for k in self.kernel)):
            yield t, (Ellipsis, *(
                slice(i * d, i * d + s * (o - 1) + 1, s)
                for i, d, s, o in zip(t, self.dilations, self.strides, self.out, strict=True)))

    def real(self, t: tuple[int, ...]) -> Array | None:
        """Where offset ``t`` of a window reads the input rather than padding (an array of the
        output's spatial shape), or None where it always does."""
        masks = []
        for a, i in enumerate(t):
            pos = (np.arange(self.out[a]) * self.strides[a] - self.begins[a]
                   + i * self.dilations[a])
            masks.append((pos >= 0) & (pos < self.size[a]))
        if all(m.all() for m in masks):
            return None
        return frozen(outer(np.logical_and, masks))

    def covers_input(self) -> bool:
        """Whether every window reads at least one element of the input."""
        for a in range(self.rank):
            pos = (np.arange(self.out[a])[:, None] * self.strides[a] - self.begins[a]
                   + np.arange(self.kernel[a])[None, :] * self.dilations[a])
            if not ((pos >= 0) & (pos < self.size[a])).any(axis=1).all():
                return False
        return True


def frozen(a: Array) -> Array:
    """``a``, read-only: parameters are shared by every run of a plan, on any thread."""
    a.flags.writeable = False
    return a


def outer(op: np.ufunc, per_axis: Sequence[Array]) -> Array:
    """``op`` over one array per spatial axis, each along its own axis: the spatial grid."""
    n = len(per_axis)
    return functools.reduce(op, (np.reshape(a, (1,) * k + (-1,) + (1,) * (n - 1 - k))
                                 for k, a in enumerate(per_axis)))


def spatial_ints(attrs: Attrs, name: str, count: int, default: int, least: int) -> tuple[int, ...]:
    """An INTS attribute of ``count`` values >= ``least`` (absent: ``default`` each)."""
    value = ints_attr(attrs, name)
    if value is None:
        return (default,) * count
    if len(value) != count:
        raise fail(ErrorKind.ATTRIBUTE, f"{name} has {len(value)} values; {count} are needed "
                   f"here", f"attrs.{name}")
    if any(v < least for v in value):
        raise fail(ErrorKind.ATTRIBUTE, f"{name} {list(value)} has a value below {least}",
                   f"attrs.{name}")
    return value


def window(attrs: Attrs, size: Sequence[int], kernel: Sequence[int], ceil: bool = False,
           dilated: bool = True) -> Window:
    """The windows the attributes ``strides``, ``pads`` and (if ``dilated``) ``dilations``
    describe over spatial ``size``; with ``ceil``, ONNX's and PyTorch's ceil_mode (a last,
    partial window, if it starts inside the input or the begin padding)."""
    s = len(size)
    strides = spatial_ints(attrs, "strides", s, 1, 1)
    dilations = spatial_ints(attrs, "dilations", s, 1, 1) if dilated else (1,) * s
    pads = spatial_ints(attrs, "pads", 2 * s, 0, 0)
    out, padded, kept = [], [], []
    for a in range(s):
        n, k, st, d, pb, pe = size[a], kernel[a], strides[a], dilations[a], pads[a], pads[s + a]
        span = n + pb + pe - d * (k - 1) - 1
        o = (-(-span // st) if ceil else span // st) + 1
        if ceil and (o - 1) * st >= n + pb:
            o -= 1
        if span < 0 or o < 1:
            raise fail(ErrorKind.SHAPE, f"spatial axis {a} of size {n} (padded {n + pb + pe}) "
                       f"is smaller than the dilated kernel ({d * (k - 1) + 1})", "inputs[0]")
        reach = (o - 1) * st + d * (k - 1) + 1
        out.append(o)
        padded.append(reach)
        kept.append(min(max(reach - pb, 0), n))
    return Window(tuple(size), tuple(kernel), strides, dilations, pads[:s], tuple(out),
                  tuple(padded), tuple(kept))


def padded(x: Array, w: Window, fill: float) -> Array:
    """``x`` (``(..., *spatial)``) in the buffer its windows read: shifted by the begin
    padding, ``fill`` around it; ``x`` itself when no padding is needed."""
    if not w.needs_padding:
        return x
    if not any(w.begins) and w.padded == w.kept:  # the windows stop short of the end: a view
        return x[(Ellipsis, *(slice(0, k) for k in w.kept))]
    lead = x.shape[: x.ndim - w.rank]
    buf: Array = np.full(lead + w.padded, fill, dtype=x.dtype)
    buf[_inside(w)] = x[(Ellipsis, *(slice(0, k) for k in w.kept))]
    return buf


def cropped(dxp: Array, w: Window) -> Array:
    """The input's part of a gradient taken over the padded buffer (undoes :func:`padded`)."""
    if not w.needs_padding:
        return dxp
    inside = dxp[_inside(w)]
    if w.kept == w.size:
        return inside
    dx: Array = np.zeros(dxp.shape[: dxp.ndim - w.rank] + w.size, dtype=dxp.dtype)
    dx[(Ellipsis, *(slice(0, k) for k in w.kept))] = inside
    return dx


def _inside(w: Window) -> Index:
    return (Ellipsis, *(slice(b, b + k) for b, k in zip(w.begins, w.kept, strict=True)))


def unfold(xp: Array, w: Window, moved: Sequence[int] = ()) -> Array:
    """im2col: the padded operand ``(*lead, C, *padded)`` as ``(*lead, C, *kernel, *out)``,
    one copy per kernel offset. The lead axes listed in ``moved`` are laid out in memory just
    before the output positions instead (the array returned has that layout:
    ``(*other lead, C, *kernel, *moved lead, *out)``), so a contraction over them and the
    positions is one matrix product."""
    s = w.rank
    lead = xp.shape[: xp.ndim - s - 1]
    kept = [a for a in range(len(lead)) if a not in moved]
    layout = [*kept, len(lead), *range(len(lead) + 1, len(lead) + 1 + s), *moved]
    shape = ([lead[a] for a in kept] + [xp.shape[len(lead)], *w.kernel]
             + [lead[a] for a in moved] + list(w.out))
    buf = np.empty(shape, dtype=xp.dtype)
    # The logical view (*lead, C, *kernel, *out) of the buffer, to write through.
    order = [*layout, *range(len(lead) + 1 + s, len(lead) + 1 + 2 * s)]
    view: Array = np.transpose(buf, np.argsort(order))
    for t, src in w.slices():
        view[(Ellipsis, *t, *(slice(None),) * s)] = xp[src]
    return buf


def fold(cols: Array, w: Window) -> Array:
    """col2im, the adjoint of :func:`unfold`: ``(*lead, C, *kernel, *out)`` summed back onto
    the padded buffer ``(*lead, C, *padded)``, one strided add per kernel offset."""
    s = w.rank
    lead = cols.shape[: cols.ndim - 2 * s]
    dxp: Array = np.zeros(lead + w.padded, dtype=cols.dtype)
    for t, dst in w.slices():
        dxp[dst] += cols[(Ellipsis, *t, *(slice(None),) * s)]
    return dxp
