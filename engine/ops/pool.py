"""Pooling over 1 to 3 spatial axes: max_pool, average_pool (ONNX's and PyTorch's semantics),
and global_average_pool.

X is ``(*lead, C, *spatial)`` (leading axes are batch axes), the spatial axes being the last
``len(kernel_shape)``. Each op works by kernel offset (see ``windows``): K strided slices of the
padded input, never a loop over windows. Padding never wins a max and never counts in an
average unless ``count_include_pad``; ceil_mode's last partial window reaches past the end
padding, and that overhang never counts at all (as PyTorch). Every window must read at least
one input element.

Max-pool's gradient goes to one element per window, the first maximum in row-major order within
the window, as PyTorch's saved indices do (unlike the ``max`` reduction, whose ties share it);
a window holding NaN gives NaN, and its gradient goes to its last NaN (as PyTorch).
"""

from __future__ import annotations

from collections.abc import Iterator
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
    ints_attr,
    normalize_axes,
    same_float_dtype,
)
from gradserve.engine.ops.tangents import Step, Tangents, linear
from gradserve.engine.ops.windows import (
    DILATIONS,
    PADS,
    STRIDES,
    Index,
    Window,
    cropped,
    frozen,
    outer,
    padded,
    window,
)
from gradserve.engine.types import TensorType

KERNEL = AttrSpec(AttrKind.INTS, "the window's size per spatial axis (1 to 3 axes)",
                  required=True)
CEIL = AttrSpec(AttrKind.BOOL, "output size rounded up: a last, partial window where it starts "
                "inside the input or the begin padding", default=False)


def _pooling(types: Types, attrs: Attrs, dilated: bool) -> tuple[TensorType, Window, int]:
    """The result type, the windows, and the padded buffer's size per example."""
    (x,) = types
    dtype = same_float_dtype(types)
    kernel = ints_attr(attrs, "kernel_shape") or ()
    s = len(kernel)
    if s not in (1, 2, 3) or min(kernel) < 1:
        raise fail(ErrorKind.ATTRIBUTE, f"kernel_shape {list(kernel)} needs 1 to 3 sizes >= 1",
                   "attrs.kernel_shape")
    if x.rank < 1 + s:
        raise fail(ErrorKind.SHAPE, f"X has shape {list(x.shape)}; a {s}-D pool needs (..., C, "
                   f"{s} spatial axes)", "inputs[0]")
    win = window(attrs, x.shape[-s:], kernel, bool(attrs["ceil_mode"]), dilated)
    if not win.covers_input():
        raise fail(ErrorKind.ATTRIBUTE, "the padding is so large that a window would read "
                   "padding only", "attrs.pads")
    lead = x.shape[:-s]
    scratch = prod(lead) * prod(win.padded) if win.needs_padding else 0
    return TensorType((*lead, *win.out), dtype), win, scratch


def _max_infer(types: Types, attrs: Attrs) -> Inferred:
    out, win, scratch = _pooling(types, attrs, dilated=True)
    real = tuple(win.real(t) for t, _ in win.slices())
    return out, {"win": win, "real": real, SCRATCH: scratch}


def _max_forward(p: Params, x: Array) -> Array:
    return _max_over(p["win"], padded(x, p["win"], -np.inf))


def _max_over(win: Window, xp: Array) -> Array:
    """The maximum of each window of the padded input ``xp``."""
    y: Array = None
    for _, src in win.slices():
        v = xp[src]
        y = v.copy() if y is None else np.maximum(y, v, out=y)
    return y


def _chosen(p: Params, xp: Array, y: Array) -> Iterator[tuple[Index, Array]]:
    """The element of each window max-pool's gradient goes to, by kernel offset: each
    offset's slice of the padded input ``xp`` with where it holds its windows' chosen element
    (``y`` the max-pool of the input): the first maximum, else (a window holding NaN) the last
    NaN. Every window gets exactly one."""
    win: Window = p["win"]
    taken = np.zeros(np.shape(y), dtype=bool)
    for (_, src), real in zip(win.slices(), p["real"], strict=True):
        hit = (xp[src] == y) & ~taken
        if real is not None:
            hit &= real  # an input of -inf ties with the -inf padding, which must not win
        taken |= hit
        yield src, hit
    if not taken.all():  # windows holding NaN (NaN equals nothing): their last NaN
        for _, src in reversed(list(win.slices())):
            hit = np.isnan(xp[src]) & ~taken
            taken |= hit
            yield src, hit


def _max_vjp(p: Params, g: Array, y: Array, x: Array) -> Array:
    """Each window's gradient to its first maximum (its last NaN, where it holds one)."""
    win: Window = p["win"]
    xp = padded(x, win, -np.inf)
    dxp: Array = np.zeros(xp.shape, dtype=g.dtype)
    for src, hit in _chosen(p, xp, y):
        dxp[src] += np.where(hit, g, 0)
    return cropped(dxp, win)


def _choice_infer(types: Types, attrs: Attrs) -> Inferred:
    x, dx = types
    if dx.shape != x.shape:
        raise fail(ErrorKind.SHAPE, f"the tangent has shape {list(dx.shape)}; X has "
                   f"{list(x.shape)}", "inputs[1]")
    return _max_infer((x,), attrs)


def _choice_forward(p: Params, x: Array, dx: Array) -> Array:
    """dx at each window's first maximum of x (its last NaN, where it holds one): the
    element max_pool's gradient goes to."""
    win: Window = p["win"]
    xp, dxp = padded(x, win, -np.inf), padded(dx, win, 0.0)
    y = _max_over(win, xp)
    out: Array = np.zeros(np.shape(y), dtype=dx.dtype)
    for src, hit in _chosen(p, xp, y):
        np.copyto(out, dxp[src], where=hit)
    return out


def _choice_vjp(p: Params, g: Array, y: Array, x: Array, dx: Array) -> Array:
    """To T: max_pool's gradient, each window's to its chosen element."""
    return _max_vjp(p, g, _max_forward(p, x), x)


def _jvp_max(t: Tangents, s: Step) -> str | None:
    (dx,) = s.tangents
    return None if dx is None else t.op("max_pool_choice", s.inputs[0], dx, **s.attrs)


def _jvp_choice(t: Tangents, s: Step) -> str | None:
    # Linear in dx; the choice of elements is piecewise constant in x.
    ddx = s.tangents[1]
    return None if ddx is None else t.op("max_pool_choice", s.inputs[0], ddx, **s.attrs)


def _average_infer(types: Types, attrs: Attrs) -> Inferred:
    out, win, scratch = _pooling(types, attrs, dilated=False)
    ends = (ints_attr(attrs, "pads") or (0,) * (2 * win.rank))[win.rank:]
    counts = []
    for a in range(win.rank):
        start = np.arange(win.out[a]) * win.strides[a] - win.begins[a]
        if attrs["count_include_pad"]:  # the given padding counts, ceil_mode's overhang not
            stop = np.minimum(start + win.kernel[a], win.size[a] + ends[a])
        else:
            stop = np.minimum(start + win.kernel[a], win.size[a])
            start = np.maximum(start, 0)
        counts.append(stop - start)
    inverse = 1.0 / outer(np.multiply, counts).astype(np.float64)
    return out, {"win": win, "inverse": {np.dtype(np.float64): frozen(inverse),
                                         np.dtype(np.float32): frozen(inverse.astype(np.float32))},
                 SCRATCH: scratch}


def _average_forward(p: Params, x: Array) -> Array:
    win: Window = p["win"]
    xp = padded(x, win, 0.0)
    total: Array = None
    for _, src in win.slices():
        v = xp[src]
        total = v.copy() if total is None else np.add(total, v, out=total)
    total *= p["inverse"][total.dtype]
    return total


def _average_vjp(p: Params, g: Array, y: Array, x: Array) -> Array:
    win: Window = p["win"]
    share = g * p["inverse"][g.dtype]
    dxp: Array = np.zeros(x.shape[: x.ndim - win.rank] + win.padded, dtype=g.dtype)
    for _, src in win.slices():
        dxp[src] += share
    return cropped(dxp, win)


def _global_infer(types: Types, attrs: Attrs) -> Inferred:
    (x,) = types
    dtype = same_float_dtype(types)
    if x.rank < 2:
        raise fail(ErrorKind.SHAPE, f"X has shape {list(x.shape)}; it needs (C, spatial...)",
                   "inputs[0]")
    (channel,) = normalize_axes((int_attr(attrs, "axis"),), x.rank)
    axes = tuple(range(channel + 1, 0))
    if not axes:
        raise fail(ErrorKind.ATTRIBUTE, "the channel axis is the last axis: no spatial axes "
                   "follow it", "attrs.axis")
    shape = tuple(1 if i - x.rank in axes else d for i, d in enumerate(x.shape))
    return TensorType(shape, dtype), {"axes": axes, "count": prod(x.shape[channel + 1:])}


POOL_ATTRS = {"kernel_shape": KERNEL, "strides": STRIDES, "pads": PADS}

OPS = [
    OpDef(
        name="max_pool", doc="Maximum over windows of X (..., C, *spatial), as ONNX MaxPool "
        "and PyTorch; padding never wins.",
        min_arity=1, max_arity=1, infer=_max_infer, forward=_max_forward, vjps=(_max_vjp,),
        attrs={**POOL_ATTRS, "dilations": DILATIONS, "ceil_mode": CEIL},
        edges="the gradient goes to one element per window, its first maximum in row-major "
              "order (PyTorch's saved indices), unlike max's even split of ties; a window "
              "holding NaN gives NaN, its gradient to its last NaN (as PyTorch).",
        jvp=_jvp_max,
    ),
    OpDef(
        name="max_pool_choice", doc="max_pool_choice(X, T): T at the element of each window "
        "max_pool(X) takes (its first maximum): max_pool's tangent, written by its "
        "forward-mode rule.",
        min_arity=2, max_arity=2, infer=_choice_infer, forward=_choice_forward,
        vjps=(None, _choice_vjp), lifts=True,
        attrs={**POOL_ATTRS, "dilations": DILATIONS, "ceil_mode": CEIL},
        edges="X only chooses the elements: it gets no gradient.", jvp=_jvp_choice,
    ),
    OpDef(
        name="average_pool", doc="Mean over windows of X (..., C, *spatial), as ONNX "
        "AveragePool and PyTorch.",
        min_arity=1, max_arity=1, infer=_average_infer, forward=_average_forward,
        vjps=(_average_vjp,),
        attrs={**POOL_ATTRS, "ceil_mode": CEIL,
               "count_include_pad": AttrSpec(AttrKind.BOOL, "divide by the window's size "
                                             "within the padded input rather than by its "
                                             "input elements", default=False)},
        edges="ceil_mode's overhang past the end padding never counts, even with "
              "count_include_pad (as PyTorch).",
        jvp=lambda t, s: linear(t, s, "average_pool"),
    ),
    OpDef(
        name="global_average_pool", doc="Mean over every axis after the channel axis, kept "
        "with size 1: X (C, *spatial) to (C, 1, ...), as ONNX GlobalAveragePool.",
        min_arity=1, max_arity=1, infer=_global_infer,
        attrs={"axis": AttrSpec(AttrKind.INT, "the channel axis (per example); the axes after "
                                "it are averaged. For an ONNX X (N, C, ...), -(spatial axes + "
                                "1) serves whether N is the batch axis or kept in X",
                                default=0)},
        forward=lambda p, x: np.mean(x, axis=p["axes"], keepdims=True),
        vjps=(lambda p, g, y, x: np.broadcast_to(g * (1.0 / p["count"]), np.shape(x)),),
        jvp=lambda t, s: linear(t, s, "global_average_pool"),
    ),
]
