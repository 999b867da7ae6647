"""Normalisation: batch_norm in inference form (given statistics) and layer_norm.

batch_norm normalises along a channel axis with per-channel statistics it is given (ONNX
BatchNormalization with training_mode 0, PyTorch's BatchNorm in eval mode); its rules move the
channel axis last, where the per-channel operands (C,) broadcast, padded after the batch axis
when they are batched. layer_norm normalises each example over its trailing axes from ``axis``
with statistics it computes (ONNX LayerNormalization, torch.nn.functional.layer_norm).
"""

from __future__ import annotations

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
    float_attr,
    int_attr,
    normalize_axes,
    same_float_dtype,
    unbroadcast,
)
from gradserve.engine.ops.tangents import Step, Tangents
from gradserve.engine.types import TensorType

EPSILON = AttrSpec(AttrKind.FLOAT, "added to the variance before its square root (>= 0)",
                   default=1e-5)


def _epsilon(attrs: Attrs) -> float:
    eps = float_attr(attrs, "epsilon")
    if eps < 0:
        raise fail(ErrorKind.ATTRIBUTE, f"epsilon {eps} is negative", "attrs.epsilon")
    return eps


# --- batch_norm --------------------------------------------------------------------------------

BN_OPERANDS = ("X", "scale", "bias", "mean", "var")


def _bn_infer(types: Types, attrs: Attrs) -> Inferred:
    x = types[0]
    dtype = same_float_dtype(types)
    if x.rank == 0:
        raise fail(ErrorKind.SHAPE, "X needs a channel axis", "inputs[0]")
    (axis,) = normalize_axes((int_attr(attrs, "axis"),), x.rank)
    c = x.shape[axis]
    for i, t in enumerate(types[1:], 1):
        if t.shape != (c,):
            raise fail(ErrorKind.SHAPE, f"{BN_OPERANDS[i]} has shape {list(t.shape)}; X's "
                       f"{c} channels need [{c}]", f"inputs[{i}]")
    return TensorType(x.shape, dtype), {"axis": axis, "eps": _epsilon(attrs)}


def _channels_last(p: Params, a: Array) -> Array:
    return np.moveaxis(a, p["axis"], -1)


def _inv_std(p: Params, var: Array) -> Array:
    return 1.0 / np.sqrt(var + p["eps"])


def _bn_forward(p: Params, x: Array, scale: Array, bias: Array, mean: Array,
                var: Array) -> Array:
    y = (_channels_last(p, x) - mean) * (scale * _inv_std(p, var)) + bias
    return np.moveaxis(y, -1, p["axis"])


def _bn_x(p: Params, g: Array, y: Array, x: Array, scale: Array, bias: Array, mean: Array,
          var: Array) -> Array:
    return np.moveaxis(_channels_last(p, g) * (scale * _inv_std(p, var)), -1, p["axis"])


def _bn_summed(p: Params, g: Array, like: Array, x: Array | None = None,
               mean: Array | None = None) -> Array:
    """sum(g) over what a per-channel operand shaped ``like`` is shared by; with ``x``,
    sum(g * (x - mean)) instead."""
    gt = _channels_last(p, g)
    if x is not None:
        gt = gt * (_channels_last(p, x) - mean)
    return unbroadcast(gt, np.shape(like))


def _bn_scale(p: Params, g: Array, y: Array, x: Array, scale: Array, bias: Array, mean: Array,
              var: Array) -> Array:
    return _bn_summed(p, g, scale, x, mean) * _inv_std(p, var)


def _bn_bias(p: Params, g: Array, y: Array, x: Array, scale: Array, bias: Array, mean: Array,
             var: Array) -> Array:
    return _bn_summed(p, g, bias)


def _bn_mean(p: Params, g: Array, y: Array, x: Array, scale: Array, bias: Array, mean: Array,
             var: Array) -> Array:
    return -_bn_summed(p, g, mean) * (scale * _inv_std(p, var))


def _bn_var(p: Params, g: Array, y: Array, x: Array, scale: Array, bias: Array, mean: Array,
            var: Array) -> Array:
    inv = _inv_std(p, var)
    return _bn_summed(p, g, var, x, mean) * (-0.5 * scale * inv * inv * inv)


# --- layer_norm --------------------------------------------------------------------------------


def _ln_infer(types: Types, attrs: Attrs) -> Inferred:
    x = types[0]
    dtype = same_float_dtype(types)
    if x.rank == 0:
        raise fail(ErrorKind.SHAPE, "X needs an axis to normalise over", "inputs[0]")
    (axis,) = normalize_axes((int_attr(attrs, "axis"),), x.rank)
    normalized = x.shape[axis:]
    for i, t in enumerate(types[1:], 1):
        fits = t.rank <= len(normalized) and all(
            d in (1, n) for d, n in zip(reversed(t.shape), reversed(normalized), strict=False))
        if not fits:
            raise fail(ErrorKind.SHAPE, f"{('scale', 'bias')[i - 1]} has shape "
                       f"{list(t.shape)}, which does not broadcast to the normalised shape "
                       f"{list(normalized)}", f"inputs[{i}]")
    return TensorType(x.shape, dtype), {"axes": tuple(range(axis, 0)), "eps": _epsilon(attrs)}


def _normalized(p: Params, x: Array) -> tuple[Array, Array]:
    """(x - mean) / sqrt(var + eps) over the normalised axes, and 1 / sqrt(var + eps)."""
    xc = x - np.mean(x, axis=p["axes"], keepdims=True)
    inv = 1.0 / np.sqrt(np.mean(xc * xc, axis=p["axes"], keepdims=True) + p["eps"])
    return xc * inv, inv


def _ln_forward(p: Params, x: Array, scale: Array, bias: Array | None = None) -> Array:
    y = _normalized(p, x)[0] * scale
    return y if bias is None else y + bias


def _ln_x(p: Params, g: Array, y: Array, x: Array, scale: Array,
          bias: Array | None = None) -> Array:
    xhat, inv = _normalized(p, x)
    dxhat = g * scale
    axes = p["axes"]
    return inv * (dxhat - np.mean(dxhat, axis=axes, keepdims=True)
                  - xhat * np.mean(dxhat * xhat, axis=axes, keepdims=True))


def _ln_scale(p: Params, g: Array, y: Array, x: Array, scale: Array,
              bias: Array | None = None) -> Array:
    return g * _normalized(p, x)[0]


# --- forward-mode rules -------------------------------------------------------------------------


def _epsilon_of(s: Step) -> float:
    eps = s.attrs.get("epsilon", EPSILON.default)
    return float(eps) if isinstance(eps, int | float) else 1e-5


def _jvp_bn(t: Tangents, s: Step) -> str | None:
    """Each operand's term written with batch_norm itself: linear in X - mean, in scale and
    in bias; var's through the scale -0.5 scale dvar / (var + epsilon). dbias spreads over X's
    shape as batch_norm(0, 0, dbias, 0, 1): exact, whatever var is."""
    x, scale, _, mean, var = s.inputs
    dx, dscale, dbias, dmean, dvar = s.tangents
    numpy_dtype = t.type(x).dtype.numpy
    zeros = t.array(np.zeros(t.type(scale).shape, dtype=numpy_dtype), "zeros")

    def bn(*operands: str) -> str:
        return t.op("batch_norm", *operands, **s.attrs)

    blank = t.zeros_like(x) if dbias is not None or dmean is not None else x
    terms = [
        None if dx is None else bn(dx, scale, zeros, zeros, var),
        None if dscale is None else bn(x, dscale, zeros, mean, var),
        None if dbias is None else bn(blank, zeros, dbias, zeros, t.array(
            np.ones(t.type(var).shape, dtype=numpy_dtype), "ones")),
        None if dmean is None else bn(blank, scale, zeros, dmean, var),
    ]
    if dvar is not None:
        slope = t.op("div", t.op("mul", t.op("mul", scale, t.const(-0.5, x)), dvar),
                     t.op("add", var, t.const(_epsilon_of(s), x)))
        terms.append(bn(x, slope, zeros, mean, var))
    return t.add(*terms)


def _jvp_ln(t: Tangents, s: Step) -> str | None:
    """dy = dxhat scale + xhat dscale + dbias, with dxhat = inv (dx - mean(dx) - xhat
    mean(xhat dx)) over the normalised axes; in X's shape, whatever the bias's."""
    x, scale = s.inputs[:2]
    dx, dscale = s.tangents[:2]
    dbias = s.tangents[2] if len(s.tangents) == 3 else None
    xt = t.type(x)
    first = s.attrs.get("axis", -1)
    start = (first if isinstance(first, int) else -1) % xt.rank
    axes = tuple(range(start - xt.rank, 0))
    if dx is None and dscale is None:
        # dbias alone, in the output's shape: a bias of fewer elements is shared by the rows
        # it broadcasts over, and a sum downstream must count it once per row.
        if dbias is None or t.type(s.inputs[2]).shape == xt.shape:
            return dbias
        return t.op("broadcast_to", dbias, shape=xt.shape)
    ones = t.array(np.ones(xt.shape[start:], dtype=xt.dtype.numpy), "ones")
    xhat = t.op("layer_norm", x, ones, **s.attrs)
    terms: list[str | None] = [None if dscale is None else t.op("mul", xhat, dscale), dbias]
    if dx is not None:
        centred = t.op("sub", x, t.op("mean", x, axis=axes, keepdims=True))
        var = t.op("mean", t.op("mul", centred, centred), axis=axes, keepdims=True)
        inv = t.op("div", t.const(1.0, x), t.op("sqrt", t.op("add", var, t.const(
            _epsilon_of(s), x))))
        spread = t.op("mul", xhat, t.op("mean", t.op("mul", xhat, dx), axis=axes,
                                        keepdims=True))
        dxhat = t.op("mul", inv, t.op("sub", t.op("sub", dx, t.op("mean", dx, axis=axes,
                                                                   keepdims=True)), spread))
        terms.append(t.op("mul", dxhat, scale))
    return t.add(*terms)


OPS = [
    OpDef(
        name="batch_norm",
        doc="batch_norm(X, scale, bias, mean, var): scale * (X - mean) / sqrt(var + epsilon) "
            "+ bias with per-channel operands (C,), in inference form (the statistics are "
            "given), as ONNX BatchNormalization and PyTorch's BatchNorm in eval mode.",
        min_arity=5, max_arity=5, infer=_bn_infer, pads=broadcast_pads, forward=_bn_forward,
        vjps=(_bn_x, _bn_scale, _bn_bias, _bn_mean, _bn_var),
        attrs={"epsilon": EPSILON,
               "axis": AttrSpec(AttrKind.INT, "the channel axis (per example; 0: X is (C, "
                                "...), as an ONNX (N, C, ...) whose N is the batch axis). For "
                                "an ONNX X of rank R, 1 - R serves whether N is the batch axis "
                                "or kept in X", default=0)},
        edges="var + epsilon = 0 gives an infinite scale (NaN where X = mean).",
        jvp=_jvp_bn,
    ),
    OpDef(
        name="layer_norm",
        doc="layer_norm(X, scale[, bias]): (X - mean) / sqrt(var + epsilon) * scale + bias, "
            "the statistics over each example's axes from axis on; scale and bias broadcast "
            "to those axes' shape.",
        min_arity=2, max_arity=3, infer=_ln_infer, pads=broadcast_pads, forward=_ln_forward,
        vjps=(_ln_x, _ln_scale, lambda p, g, y, x, scale, bias: g),
        attrs={"epsilon": EPSILON,
               "axis": AttrSpec(AttrKind.INT, "the first normalised axis, of the per-example "
                                "axes: 0 is the first of them, -1 the last (an ONNX model's "
                                "negative axis means the same)", default=-1)},
        edges="a constant row with epsilon 0 gives NaN (0/0).",
        jvp=_jvp_ln,
    ),
]
