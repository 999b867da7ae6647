"""The converters: one function per ONNX op type (or family), and the table that maps op types
to them (:data:`CONVERTERS`), as the engine's op table maps op names to rules.

A converter takes the :class:`Emitter` and the node (:class:`NodeView`) and returns one value
per node output. It writes engine ops through the emitter, which folds them with numpy where
every operand is known; ops that only make sense on known values (``Shape``, ``Range``,
``ConstantOfShape``, ``Cast`` between integer types ...) compute with numpy directly and refuse
inputs that depend on the model's inputs.

Shapes here are the model's, per example: in a batched import the batch axis is there with
size 1, so ONNX axes need no translation. Converters written for squeezed values (the engine
holding a batched value without that unit axis) read inputs with ``raw``; the rest with
``value``, which restores the axis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from itertools import pairwise
from math import ceil, prod
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

from gradserve.engine.ops import AttrValue
from gradserve.engine.types import Shape
from gradserve.importer.emitter import (
    Emitter,
    Known,
    Missing,
    Sym,
    Tensor,
    Value,
    engine_shape,
    shape_of,
)
from gradserve.importer.node import NodeView

Converter = Callable[[Emitter, NodeView], Sequence[Value]]


def _np_dtype(t: Tensor) -> np.dtype[Any]:
    return t.array.dtype if isinstance(t, Known) else t.dtype.numpy


def _scalar(value: float, like: Tensor) -> Known:
    """A known scalar of ``like``'s dtype."""
    return Known(np.asarray(value, _np_dtype(like)))


def _like(t: Tensor, like: Tensor) -> Tensor:
    """A known ``t`` in ``like``'s dtype (an ONNX op may take, say, an int64 exponent)."""
    if isinstance(t, Known) and t.array.dtype != _np_dtype(like):
        return Known(t.array.astype(_np_dtype(like)))
    return t


def _limit(ctx: Emitter, n: NodeView, shape: Sequence[int]) -> None:
    """Refuse to make an array of ``shape`` at import if it is over the element limit."""
    if prod(shape) > ctx.limits.max_elements:
        raise n.error(f"it would make {prod(shape)} elements; the limit is "
                      f"{ctx.limits.max_elements}", "limits", limit=True)


# --- elementwise --------------------------------------------------------------------------------


def _elementwise(ctx: Emitter, op: str, operands: Sequence[Tensor],
                 attrs: Mapping[str, AttrValue] | None = None) -> Tensor:
    """Apply a broadcasting op. Squeezed operands stay squeezed when the others cannot reach
    the leading axis of the result (lower rank): the engine then broadcasts the rest alike."""
    rank = max(len(shape_of(t)) for t in operands)
    squeezed = [isinstance(t, Sym) and t.squeezed for t in operands]
    keep = any(squeezed) and all(s or len(shape_of(t)) < rank
                                 for s, t in zip(squeezed, operands, strict=True))
    if not keep:
        operands = [ctx.full(t) for t in operands]
    return ctx.op(op, operands, attrs, squeezed=keep)


def unary(op: str, ctx: Emitter, n: NodeView) -> list[Value]:
    """An elementwise op of one operand (relu, exp, ...)."""
    return [_elementwise(ctx, op, [n.raw(0)])]


def binary(op: str, ctx: Emitter, n: NodeView) -> list[Value]:
    """A broadcasting op of two operands of one dtype."""
    return [_elementwise(ctx, op, [n.raw(0), n.raw(1)])]


def variadic(op: str, ctx: Emitter, n: NodeView) -> list[Value]:
    """Max and Min of any number of operands: a chain of the binary op."""
    result = n.raw(0)
    for k in range(1, n.count):
        result = _elementwise(ctx, op, [result, n.raw(k)])
    return [result]


def power(ctx: Emitter, n: NodeView) -> list[Value]:
    """Pow; a known exponent of another type (an int 2) takes the base's dtype."""
    base = n.raw(0)
    return [_elementwise(ctx, "pow", [base, _like(n.raw(1), base)])]


def where(ctx: Emitter, n: NodeView) -> list[Value]:
    return [_elementwise(ctx, "where", [n.raw(0), n.raw(1), n.raw(2)])]


def leaky_relu(ctx: Emitter, n: NodeView) -> list[Value]:
    return [_elementwise(ctx, "leaky_relu", [n.raw(0)], {"alpha": n.float_("alpha", 0.01)})]


def gelu(ctx: Emitter, n: NodeView) -> list[Value]:
    approximate = n.string("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise n.error(f"approximate must be 'none' or 'tanh', not {approximate!r}",
                      "attribute.approximate")
    return [_elementwise(ctx, "gelu", [n.raw(0)], {"approximate": approximate})]


def clip(ctx: Emitter, n: NodeView) -> list[Value]:
    """Clip with optional bounds (inputs since opset 11); a missing lower bound is -inf."""
    x = n.raw(0)
    low, high = n.optional(1), n.optional(2)
    if high is not None:
        low = _scalar(-np.inf, x) if low is None else low
        return [_elementwise(ctx, "clip", [x, _like(low, x), _like(high, x)])]
    if low is not None:
        return [_elementwise(ctx, "clip", [x, _like(low, x)])]
    return [x]


def identity(ctx: Emitter, n: NodeView) -> list[Value]:
    return [n.raw(0)]


def dropout(ctx: Emitter, n: NodeView) -> list[Value]:
    """Dropout at inference: the identity, and a mask of ones. Training mode is refused."""
    n.ignore("seed", "ratio")  # inference drops nothing, at any ratio
    training = n.optional_known(2)
    if training is not None and bool(training):
        raise n.error("dropout in training mode is random: import the model for inference",
                      "input[2]")
    x = n.raw(0)
    return [x, Known(np.ones(shape_of(x), np.bool_))]


# --- linear algebra and the convolution family ---------------------------------------------------


def matmul(ctx: Emitter, n: NodeView) -> list[Value]:
    return [ctx.op("matmul", [n.value(0), n.value(1)])]


def gemm(ctx: Emitter, n: NodeView) -> list[Value]:
    """Y = alpha * A' B' + beta * C, C broadcast to (M, N)."""
    a, b, c = n.value(0), n.value(1), n.optional(2)
    for k, t in enumerate((a, b)):
        if len(shape_of(t)) != 2:
            raise n.error(f"Gemm takes matrices; input {k} has shape {list(shape_of(t))}",
                          f"input[{k}]")
    if n.int_("transA", 0):
        a = ctx.op("transpose", [a], {"perm": (1, 0)})
    if n.int_("transB", 0):
        b = ctx.op("transpose", [b], {"perm": (1, 0)})
    y = ctx.op("matmul", [a, b])
    alpha, beta = n.float_("alpha", 1.0), n.float_("beta", 1.0)
    if alpha != 1.0:
        y = ctx.op("mul", [y, _scalar(alpha, y)])
    if c is not None and beta != 0.0:
        if beta != 1.0:
            c = ctx.op("mul", [c, _scalar(beta, c)])
        y = ctx.op("add", [y, c])
    return [y]


def _window(n: NodeView, spatial: Shape, kernel: Shape) -> dict[str, tuple[int, ...]]:
    """Strides, dilations and explicit pads (begins, then ends) of a convolution or pooling,
    ``auto_pad`` resolved as ONNX defines it."""
    k = len(kernel)
    strides = n.ints("strides") or (1,) * k
    dilations = n.ints("dilations") or (1,) * k
    pads = n.ints("pads") or (0,) * (2 * k)
    auto_pad = n.string("auto_pad", "NOTSET")
    if len(strides) != k or len(dilations) != k or len(pads) != 2 * k:
        raise n.error(f"strides, dilations and pads must have {k}, {k} and {2 * k} values for "
                      f"a {k}-D kernel", "attribute")
    if auto_pad == "VALID":
        pads = (0,) * (2 * k)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((ceil(size / s) - 1) * s + (kk - 1) * d + 1 - size, 0)
                 for size, s, kk, d in zip(spatial, strides, kernel, dilations, strict=True)]
        small = [t // 2 for t in total]
        large = [t - h for t, h in zip(total, small, strict=True)]
        pads = tuple(small + large) if auto_pad == "SAME_UPPER" else tuple(large + small)
    elif auto_pad != "NOTSET":
        raise n.error(f"auto_pad {auto_pad!r} is not one of NOTSET, SAME_UPPER, SAME_LOWER, "
                      "VALID", "attribute.auto_pad")
    return {"strides": strides, "dilations": dilations, "pads": pads}


def _squeezed(t: Tensor) -> bool:
    return isinstance(t, Sym) and t.squeezed


def conv(ctx: Emitter, n: NodeView) -> list[Value]:
    """Conv: X (N, C, spatial...), W (M, C/group, kernel...). The engine's conv takes any
    leading axes, so X may be held squeezed (a batched model's per-example (C, spatial...))
    or not (a fixed N), and the result is held alike."""
    x, w, b = n.raw(0), n.value(1), n.optional(2)
    kernel, given = shape_of(w)[2:], n.ints("kernel_shape")
    if given not in (None, kernel):
        raise n.error(f"kernel_shape {given} does not match the weights' {list(kernel)}",
                      "attribute.kernel_shape")
    attrs: dict[str, AttrValue] = {**_window(n, shape_of(x)[2:], kernel),
                                   "group": n.int_("group", 1)}
    return [ctx.op("conv", [x, w] if b is None else [x, w, b], attrs, squeezed=_squeezed(x))]


def _pool_kernel(n: NodeView, x: Tensor) -> Shape:
    kernel = n.ints("kernel_shape")
    if kernel is None:
        raise n.error("kernel_shape is required", "attribute.kernel_shape")
    if len(kernel) != len(shape_of(x)) - 2:
        raise n.error(f"a {len(kernel)}-D kernel for an input of shape {list(shape_of(x))}",
                      "attribute.kernel_shape")
    return kernel


def max_pool(ctx: Emitter, n: NodeView) -> list[Value]:
    """MaxPool; its Indices output is not computed."""
    raw = n.raw(0)
    kernel = _pool_kernel(n, raw)
    n.ignore("storage_order")  # the layout of Indices only
    attrs: dict[str, AttrValue] = {**_window(n, shape_of(raw)[2:], kernel),
                                   "kernel_shape": kernel,
                                   "ceil_mode": bool(n.int_("ceil_mode", 0))}
    y = ctx.op("max_pool", [raw], attrs, squeezed=_squeezed(raw))
    return [y, Missing("MaxPool's Indices output is not supported")]


def average_pool(ctx: Emitter, n: NodeView) -> list[Value]:
    raw = n.raw(0)
    kernel = _pool_kernel(n, raw)
    window = _window(n, shape_of(raw)[2:], kernel)
    if any(d != 1 for d in window.pop("dilations")):
        raise n.error("AveragePool with dilations is not supported", "attribute.dilations")
    attrs: dict[str, AttrValue] = {**window, "kernel_shape": kernel,
                                   "ceil_mode": bool(n.int_("ceil_mode", 0)),
                                   "count_include_pad": bool(n.int_("count_include_pad", 0))}
    return [ctx.op("average_pool", [raw], attrs, squeezed=_squeezed(raw))]


def _channels(x: Tensor) -> dict[str, AttrValue]:
    """The channel axis of an (N, C, ...) tensor counted from the end, which is the same
    whether the engine holds it squeezed or not."""
    return {"axis": 1 - len(shape_of(x))}


def global_average_pool(ctx: Emitter, n: NodeView) -> list[Value]:
    x = n.raw(0)
    return [ctx.op("global_average_pool", [x], _channels(x), squeezed=_squeezed(x))]


def batch_norm(ctx: Emitter, n: NodeView) -> list[Value]:
    """BatchNormalization in inference form, with the given mean and variance."""
    n.ignore("momentum")  # running averages are updated in training only
    if n.int_("training_mode", 0):
        raise n.error("batch normalization in training mode is not supported: export the "
                      "model in eval mode", "attribute.training_mode")
    x = n.raw(0)
    stats = [n.value(k) for k in range(1, 5)]
    y = ctx.op("batch_norm", [x, *stats], {**_channels(x), "epsilon": n.float_("epsilon", 1e-5)},
               squeezed=_squeezed(x))
    return [y, *(Missing("running statistics are outputs in training mode only"),) * 2]


def layer_norm(ctx: Emitter, n: NodeView) -> list[Value]:
    """LayerNormalization over the axes from ``axis`` on; its Mean and InvStdDev outputs are
    not computed. It computes in the input's dtype (stash_type asks for float32: the same for
    float32 models, and float64 computes at least as precisely)."""
    n.ignore("stash_type")
    x = n.value(0)
    rank = len(shape_of(x))
    axis = n.axis(n.int_("axis", -1), rank, "attribute.axis") - rank
    bias = n.optional(2)
    operands = [x, n.value(1)] if bias is None else [x, n.value(1), bias]
    y = ctx.op("layer_norm", operands, {"axis": axis, "epsilon": n.float_("epsilon", 1e-5)})
    missing = Missing("LayerNormalization's Mean and InvStdDev outputs are not supported")
    return [y, missing, missing]


# --- softmax and losses --------------------------------------------------------------------------


def softmax(op: str, ctx: Emitter, n: NodeView) -> list[Value]:
    """Softmax and LogSoftmax. From opset 13 along one axis (default -1); before, over the
    input flattened to 2-D at ``axis`` (default 1), which is what this computes then: flatten,
    normalise each row, restore the shape."""
    x = n.value(0)
    shape = shape_of(x)
    legacy = n.version < 13
    axis = n.axis(n.int_("axis", 1 if legacy else -1), max(len(shape), 1), "attribute.axis")
    if not legacy or axis == len(shape) - 1:
        return [ctx.op(op, [x], {"axis": axis - len(shape)})]
    rows = ctx.reshape(x, (prod(shape[:axis]), prod(shape[axis:])))
    return [ctx.reshape(ctx.op(op, [rows], {"axis": -1}), shape)]


def _loss_options(n: NodeView, classes: int) -> str:
    """A loss's reduction, refusing class weights and an ignore_index that names a class (an
    index outside the classes never matches a valid label; the engine refuses such labels)."""
    if n.optional(2) is not None:
        raise n.error("class weights are not supported", "input[2]")
    ignore = n.int_("ignore_index", -1)
    if 0 <= ignore < classes:
        raise n.error(f"ignore_index {ignore} names a class; ignoring labels is not supported",
                      "attribute.ignore_index")
    reduction = n.string("reduction", "mean")
    if reduction not in ("mean", "sum", "none"):
        raise n.error(f"reduction {reduction!r} is not mean, sum or none", "attribute.reduction")
    return reduction


def _classes_last(ctx: Emitter, scores: Tensor, lead: int) -> Tensor:
    """Scores with classes on axis ``lead`` moved to the last axis."""
    rank = len(engine_shape(scores))
    if rank == lead + 1:
        return scores
    perm = (*range(lead), *range(lead + 1, rank), lead)
    return ctx.op("transpose", [scores], {"perm": perm})


def cross_entropy(ctx: Emitter, n: NodeView) -> list[Value]:
    """SoftmaxCrossEntropyLoss: scores (N, C, d...) and int labels (N, d...), as the engine's
    softmax_cross_entropy with classes moved last. Batched labels arrive squeezed; the scores
    are squeezed to match, and each example's loss is its own."""
    labels = n.raw(1)
    shape = shape_of(n.raw(0))
    if len(shape) < 2:
        raise n.error(f"scores need shape (N, C, ...), not {list(shape)}", "input[0]")
    reduction = _loss_options(n, shape[1])
    batched = _squeezed(labels)
    scores = ctx.squeezed(n.raw(0)) if batched else n.value(0)
    loss = ctx.op("softmax_cross_entropy", [_classes_last(ctx, scores, 0 if batched else 1),
                                            labels], {"reduction": reduction},
                  squeezed=batched and reduction == "none")
    outputs: list[Value] = [loss]
    if len(n.outputs) > 1:
        outputs.append(ctx.op("log_softmax", [n.value(0)], {"axis": 1 - len(shape)}))
    return outputs


def nll_loss(ctx: Emitter, n: NodeView) -> list[Value]:
    """NegativeLogLikelihoodLoss: -input[n, target[n], d...], reduced. The engine picks each
    label's entry with a mask: classes moved to the front, compared with the labels."""
    target = n.raw(1)
    shape = shape_of(n.raw(0))
    if len(shape) < 2:
        raise n.error(f"input needs shape (N, C, ...), not {list(shape)}", "input[0]")
    reduction = _loss_options(n, shape[1])
    batched = _squeezed(target)
    if batched:
        logp = ctx.squeezed(n.raw(0))  # (C, d...) per example
    else:
        x = n.value(0)
        logp = ctx.op("transpose", [x], {"perm": (1, 0, *range(2, len(shape)))})
    classes = Known(np.arange(shape[1]).reshape((-1,) + (1,) * (len(shape) - 2 + (not batched))))
    mask = ctx.op("equal", [classes, target])  # (C, d...) or (C, N, d...): no int reshape
    picked = ctx.op("where", [mask, logp, _scalar(0.0, logp)])
    losses = ctx.op("neg", [ctx.op("sum", [picked], {"axis": (0,)})],
                    squeezed=batched)
    if reduction == "none":
        return [losses]
    op = "mean" if reduction == "mean" else "sum"
    return [ctx.op(op, [losses])]


# --- reductions ----------------------------------------------------------------------------------


def reduce(op: str, axes_input_since: int, ctx: Emitter, n: NodeView) -> list[Value]:
    """ReduceSum/Mean/Max/Min: axes as an attribute, or as an input from ``axes_input_since``."""
    x = n.value(0)
    rank = len(shape_of(x))
    given = n.optional_ints(1) if n.version >= axes_input_since else n.ints("axes")
    keep = bool(n.int_("keepdims", 1))
    noop = n.int_("noop_with_empty_axes", 0)
    if not given:
        if noop:
            return [x]
        given = tuple(range(rank))
    axes = n.axes(given, rank, "attribute.axes" if n.version < axes_input_since else "input[1]")
    return [ctx.op(op, [x], {"axis": tuple(a - rank for a in axes), "keepdims": keep})]


# --- moving elements -----------------------------------------------------------------------------


def reshape(ctx: Emitter, n: NodeView) -> list[Value]:
    """Reshape: 0 copies the input's dimension (unless allowzero), one -1 is inferred."""
    x = n.value(0)
    target = n.known_ints(1)
    allowzero = n.int_("allowzero", 0)
    shape = shape_of(x)
    dims = tuple(shape[i] if d == 0 and not allowzero and i < len(shape) else d
                 for i, d in enumerate(target))
    if 0 in dims:
        raise n.error(f"shape {list(target)} makes an empty tensor", "input[1]")
    if dims.count(-1) > 1 or any(d < -1 for d in dims):
        raise n.error(f"shape {list(target)} is not a valid target", "input[1]")
    known = prod(d for d in dims if d != -1)
    if known < 1 or prod(shape) % known or (-1 not in dims and known != prod(shape)):
        raise n.error(f"cannot reshape {list(shape)} into {list(target)}", "input[1]")
    return [ctx.reshape(x, tuple(prod(shape) // known if d == -1 else d for d in dims))]


def flatten(ctx: Emitter, n: NodeView) -> list[Value]:
    x = n.value(0)
    shape = shape_of(x)
    axis = n.int_("axis", 1)
    if not -len(shape) <= axis <= len(shape):
        raise n.error(f"axis {axis} is out of range for rank {len(shape)}", "attribute.axis")
    axis += len(shape) if axis < 0 else 0
    return [ctx.reshape(x, (prod(shape[:axis]), prod(shape[axis:])))]


def _axes_of(n: NodeView) -> tuple[tuple[int, ...] | None, str]:
    """Squeeze's and Unsqueeze's axes: an attribute before opset 13, input 1 from it; and
    the field that holds them."""
    if n.version >= 13:
        return n.optional_ints(1), "input[1]"
    return n.ints("axes"), "attribute.axes"


def squeeze(ctx: Emitter, n: NodeView) -> list[Value]:
    x = n.value(0)
    shape = shape_of(x)
    given, field = _axes_of(n)
    if given is None:
        axes = {a for a, d in enumerate(shape) if d == 1}
    else:
        axes = set(n.axes(given, len(shape), field))
    if any(shape[a] != 1 for a in axes):
        raise n.error(f"cannot squeeze axes of size other than 1 from {list(shape)}", field)
    return [ctx.reshape(x, tuple(d for i, d in enumerate(shape) if i not in axes))]


def unsqueeze(ctx: Emitter, n: NodeView) -> list[Value]:
    x = n.value(0)
    shape = list(shape_of(x))
    given, field = _axes_of(n)
    if not given:
        raise n.error("Unsqueeze needs axes", field)
    for a in n.axes(given, len(shape) + len(given), field):
        shape.insert(a, 1)
    return [ctx.reshape(x, tuple(shape))]


def transpose(ctx: Emitter, n: NodeView) -> list[Value]:
    x = n.value(0)
    rank = len(shape_of(x))
    perm = n.ints("perm") or tuple(reversed(range(rank)))
    if sorted(perm) != list(range(rank)):
        raise n.error(f"perm {list(perm)} is not a permutation of the {rank} axes",
                      "attribute.perm")
    return [ctx.op("transpose", [x], {"perm": perm})]


def concat(ctx: Emitter, n: NodeView) -> list[Value]:
    parts = [n.value(k) for k in range(n.count)]
    rank = len(shape_of(parts[0]))
    axis = n.axis(n.int_("axis", 0), max(rank, 1), "attribute.axis")
    if any(isinstance(p, Sym) for p in parts):  # the engine takes no empty piece: it adds none
        parts = [p for p in parts if isinstance(p, Sym) or p.array.size]
    return [ctx.op("concat", parts, {"axis": axis - rank})]


def _slice_attrs(n: NodeView, shape: Shape, starts: Sequence[int], ends: Sequence[int],
                 axes: Sequence[int] | None, steps: Sequence[int] | None) -> dict[str, AttrValue]:
    axes = tuple(range(len(starts))) if axes is None else axes
    steps = (1,) * len(starts) if steps is None else tuple(steps)
    if not len(starts) == len(ends) == len(axes) == len(steps) or 0 in steps:
        raise n.error("starts, ends, axes and steps must match in length, steps nonzero",
                      "input[1]")
    return {"starts": tuple(starts), "ends": tuple(ends), "steps": steps,
            "axes": tuple(n.axis(a, len(shape), "input[3]") for a in axes)}


def slice_(ctx: Emitter, n: NodeView) -> list[Value]:
    """Slice (bounds as inputs, since opset 10); out-of-range bounds clamp."""
    x = n.value(0)
    attrs = _slice_attrs(n, shape_of(x), n.known_ints(1), n.known_ints(2),
                         n.optional_ints(3), n.optional_ints(4))
    return [ctx.op("slice", [x], attrs)]


def split(ctx: Emitter, n: NodeView) -> list[Value]:
    """Split into sizes given (an attribute before opset 13, an input from it), else evenly
    (the last part smaller, from opset 18's num_outputs)."""
    x = n.value(0)
    shape = shape_of(x)
    axis = n.axis(n.int_("axis", 0), len(shape), "attribute.axis")
    sizes = n.optional_ints(1) if n.version >= 13 else n.ints("split")
    parts = len(n.outputs)
    n.ignore("num_outputs")  # the outputs say how many
    if sizes is None:
        size = -(-shape[axis] // parts)
        sizes = tuple(min(size, shape[axis] - k * size) for k in range(parts))
    if len(sizes) != parts or sum(sizes) != shape[axis] or min(sizes) < 1:
        raise n.error(f"cannot split {shape[axis]} into {list(sizes)} for {parts} outputs",
                      "input[1]" if n.version >= 13 else "attribute.split")
    edges = np.cumsum((0, *sizes)).tolist()
    return [ctx.op("slice", [x], {"starts": (lo,), "ends": (hi,), "axes": (axis - len(shape),)})
            for lo, hi in pairwise(edges)]


def gather(ctx: Emitter, n: NodeView) -> list[Value]:
    """Gather along an axis. Batched indices (an embedding's token ids) stay squeezed along
    axis 0 and the result is squeezed too; known indices gather from a squeezed tensor's
    later axes alike."""
    data, indices = n.raw(0), n.raw(1)
    rank = len(shape_of(data))
    axis = n.axis(n.int_("axis", 0), rank, "attribute.axis")
    if isinstance(indices, Known):
        bound = shape_of(data)[axis]
        if indices.array.size and not (-bound <= indices.array.min()
                                       and indices.array.max() < bound):
            raise n.error(f"indices outside [{-bound}, {bound})", "input[1]")
        indices = Known(indices.array.astype(np.int64), indices.name)
    data_squeezed = _squeezed(data)
    if axis == 0 and isinstance(indices, Sym) and indices.squeezed:
        return [ctx.op("gather", [ctx.full(data), indices], {"axis": 0}, squeezed=True)]
    if axis > 0 and data_squeezed and isinstance(indices, Known):
        return [ctx.op("gather", [data, indices], {"axis": axis - rank}, squeezed=True)]
    return [ctx.op("gather", [ctx.full(data), ctx.full(indices)], {"axis": axis - rank})]


def expand(ctx: Emitter, n: NodeView) -> list[Value]:
    x = n.value(0)
    target = n.known_ints(1)
    try:
        shape = np.broadcast_shapes(shape_of(x), target)
    except ValueError:
        raise n.error(f"cannot expand {list(shape_of(x))} to {list(target)}",
                      "input[1]") from None
    _limit(ctx, n, shape)
    return [ctx.op("broadcast_to", [x], {"shape": tuple(shape)})]


# --- known at import -----------------------------------------------------------------------------


def shape(ctx: Emitter, n: NodeView) -> list[Value]:
    """Shape: known at import, whatever the input (its batch axis counts 1)."""
    dims = shape_of(n.raw(0))
    return [Known(np.array(dims[n.int_("start", 0):n.int_("end", len(dims))], np.int64))]


def size(ctx: Emitter, n: NodeView) -> list[Value]:
    return [Known(np.array(prod(shape_of(n.raw(0))), np.int64))]


def _numpy_type(n: NodeView, elem_type: int, field: str) -> np.dtype[Any]:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        raise n.error(f"unknown data type {elem_type}", field) from None


def _cast_to(n: NodeView, x: Tensor, dtype: np.dtype[Any]) -> Value:
    n.ignore("saturate", "round_mode")  # for float8 targets, which the engine lacks
    if isinstance(x, Known):
        return Known(x.array.astype(dtype))
    if x.dtype.numpy == dtype:
        return x
    raise n.error(f"casting the computed {x.dtype} value {x.name!r} to {dtype} is not "
                  "supported: the engine does not convert dtypes", "attribute.to")


def cast(ctx: Emitter, n: NodeView) -> list[Value]:
    """Cast: computed with numpy on known values; on computed ones only to their own dtype."""
    return [_cast_to(n, n.raw(0), _numpy_type(n, n.int_("to", 0), "attribute.to"))]


def cast_like(ctx: Emitter, n: NodeView) -> list[Value]:
    return [_cast_to(n, n.raw(0), _np_dtype(n.raw(1)))]


def constant(ctx: Emitter, n: NodeView) -> list[Value]:
    """Constant, from whichever attribute holds its value."""
    tensor = n.tensor("value")
    if tensor is not None:
        return [Known(tensor_array(n, tensor, "attribute.value"))]
    for name, dtype in _CONSTANT_ATTRIBUTES:
        if n.has(name):
            return [Known(np.array(n.attr(name), dtype))]
    raise n.error("only tensor, float and int constants are supported", "attribute")


_CONSTANT_ATTRIBUTES = (("value_float", np.float32), ("value_floats", np.float32),
                        ("value_int", np.int64), ("value_ints", np.int64))


def tensor_array(n: NodeView, tensor: onnx.TensorProto, field: str) -> NDArray[Any]:
    """The array a tensor in the model holds, or a :class:`ModelError` if its data does not
    match its type and shape."""
    try:
        return onnx.numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError) as e:
        raise n.error(f"the tensor's data does not fit its type and shape: {e}", field) from None


def constant_of_shape(ctx: Emitter, n: NodeView) -> list[Value]:
    dims = n.known_ints(0)
    if any(d < 0 for d in dims):
        raise n.error(f"shape {list(dims)} has a negative dimension", "input[0]")
    _limit(ctx, n, dims)
    tensor = n.tensor("value")
    value = np.zeros(1, np.float32) if tensor is None else tensor_array(n, tensor, "attribute")
    return [Known(np.full(dims, value.reshape(-1)[0], value.dtype))]


def range_(ctx: Emitter, n: NodeView) -> list[Value]:
    dtype = n.known(0).dtype
    start, limit, delta = (n.known(k).reshape(()).item() for k in range(3))
    if delta == 0:
        raise n.error("delta is 0", "input[2]")
    _limit(ctx, n, (max(ceil((limit - start) / delta), 0),))
    return [Known(np.arange(start, limit, delta).astype(dtype))]


def numpy_only(fn: Callable[..., Any], ctx: Emitter, n: NodeView) -> list[Value]:
    """An op that only shape arithmetic uses (Mod, Floor, Ceil): numpy, on known inputs."""
    return [Known(np.asarray(fn(*(n.known(k) for k in range(n.count)))))]


def mod(ctx: Emitter, n: NodeView) -> list[Value]:
    """Mod: the divisor's sign (Python's) by default, the dividend's (C's fmod) with fmod=1."""
    fn = np.fmod if n.int_("fmod", 0) else np.mod
    return numpy_only(fn, ctx, n)


CONVERTERS: Mapping[str, Converter] = MappingProxyType({
    # elementwise
    **{name: partial(unary, op) for name, op in (
        ("Relu", "relu"), ("Sigmoid", "sigmoid"), ("Tanh", "tanh"), ("Erf", "erf"),
        ("Exp", "exp"), ("Log", "log"), ("Sqrt", "sqrt"), ("Abs", "abs"), ("Neg", "neg"),
        ("Sin", "sin"), ("Cos", "cos"), ("Softplus", "softplus"))},
    **{name: partial(binary, op) for name, op in (
        ("Add", "add"), ("Sub", "sub"), ("Mul", "mul"), ("Div", "div"), ("Equal", "equal"),
        ("Less", "less"), ("LessOrEqual", "less_equal"), ("Greater", "greater"),
        ("GreaterOrEqual", "greater_equal"), ("And", "and"), ("Or", "or"))},
    "Not": partial(unary, "not"),
    "Max": partial(variadic, "maximum"),
    "Min": partial(variadic, "minimum"),
    "Pow": power,
    "Where": where,
    "LeakyRelu": leaky_relu,
    "Gelu": gelu,
    "Clip": clip,
    "Identity": identity,
    "Dropout": dropout,
    # linear algebra, convolution, normalisation
    "MatMul": matmul,
    "Gemm": gemm,
    "Conv": conv,
    "MaxPool": max_pool,
    "AveragePool": average_pool,
    "GlobalAveragePool": global_average_pool,
    "BatchNormalization": batch_norm,
    "LayerNormalization": layer_norm,
    # softmax, losses, reductions
    "Softmax": partial(softmax, "softmax"),
    "LogSoftmax": partial(softmax, "log_softmax"),
    "SoftmaxCrossEntropyLoss": cross_entropy,
    "NegativeLogLikelihoodLoss": nll_loss,
    "ReduceSum": partial(reduce, "sum", 13),
    "ReduceMean": partial(reduce, "mean", 18),
    "ReduceMax": partial(reduce, "max", 18),
    "ReduceMin": partial(reduce, "min", 18),
    # moving elements
    "Reshape": reshape,
    "Flatten": flatten,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Transpose": transpose,
    "Concat": concat,
    "Slice": slice_,
    "Split": split,
    "Gather": gather,
    "Expand": expand,
    # known at import: shape arithmetic and constants
    "Shape": shape,
    "Size": size,
    "Cast": cast,
    "CastLike": cast_like,
    "Constant": constant,
    "ConstantOfShape": constant_of_shape,
    "Range": range_,
    "Mod": mod,
    "Floor": partial(numpy_only, np.floor),
    "Ceil": partial(numpy_only, np.ceil),
})
