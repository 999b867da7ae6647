"""The fused softmax cross-entropy loss over the last axis of ``logits``.

Targets are either int64 class labels (shape of logits without its last axis) or probabilities
(the shape of logits). Fusing keeps it stable and gives the well-known gradient
softmax(logits) * sum(target) - target, without forming log(softmax) twice in the user's graph.
"""

from __future__ import annotations

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
    same_float_dtype,
)
from gradserve.engine.ops.reduce import logsumexp
from gradserve.engine.ops.tangents import Step, Tangents
from gradserve.engine.types import DType, TensorType


def _infer(types: Types, attrs: Attrs) -> Inferred:
    logits, target = types
    if logits.rank == 0:
        raise fail(ErrorKind.SHAPE, "logits need rank >= 1 (classes on the last axis)", "inputs[0]")
    if target.dtype is DType.INT64:
        dtype = same_float_dtype(types[:1])
        if target.shape != logits.shape[:-1]:
            raise fail(ErrorKind.SHAPE, f"class labels have shape {list(target.shape)}; logits "
                       f"{list(logits.shape)} need labels of shape {list(logits.shape[:-1])}",
                       "inputs[1]")
    else:
        dtype = same_float_dtype(types)
        if target.shape != logits.shape:
            raise fail(ErrorKind.SHAPE, f"probability targets have shape {list(target.shape)}; "
                       f"they need the logits' shape {list(logits.shape)}", "inputs[1]")
    reduction = attrs["reduction"]
    examples = tuple(range(-(logits.rank - 1), 0))  # per-example axes of the per-row losses
    rows = int(np.prod(logits.shape[:-1]))
    shape = logits.shape[:-1] if reduction == "none" else ()
    return TensorType(shape, dtype), {
        "labels": target.dtype is DType.INT64, "classes": logits.shape[-1], "reduction": reduction,
        "axes": examples, "scale": 1.0 / rows if reduction == "mean" else 1.0,
    }


def _log_probs(logits: Array) -> Array:
    return logits - logsumexp(logits, (-1,))


def _forward(p: Params, logits: Array, target: Array) -> Array:
    logp = _log_probs(logits)
    if p["labels"]:
        if target.min() < 0 or target.max() >= p["classes"]:
            bad = target[(target < 0) | (target >= p["classes"])].flat[0]
            raise EngineError(ErrorKind.VALUE, f"class label {bad} is outside [0, {p['classes']})",
                              field="inputs[1]")
        losses = -np.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    else:
        losses = -np.sum(target * logp, axis=-1)
    if p["reduction"] == "none":
        return losses
    return np.sum(losses, axis=p["axes"]) * p["scale"]


def _row_grad(p: Params, g: Array) -> Array:
    """The upstream gradient per row of logits, with a trailing class axis to broadcast on."""
    rows = g if p["reduction"] == "none" else np.expand_dims(g * p["scale"], p["axes"])
    return rows[..., None]


def _vjp_logits(p: Params, g: Array, y: Array, logits: Array, target: Array) -> Array:
    probs = np.exp(_log_probs(logits))
    if p["labels"]:
        local = probs - (target[..., None] == np.arange(p["classes"]))  # minus one-hot labels
    else:
        local = probs * np.sum(target, axis=-1, keepdims=True) - target
    return _row_grad(p, g) * local


def _vjp_target(p: Params, g: Array, y: Array, logits: Array, target: Array) -> Array:
    # Only probability targets get here: int64 labels are never differentiated.
    return -_row_grad(p, g) * _log_probs(logits)


def _jvp(t: Tangents, s: Step) -> str | None:
    """Per row: sum(dz * (softmax(z) sum(target) - target)) - sum(dtarget * log_softmax(z))
    (labels as one-hot rows), then reduced as the loss is."""
    (z, target), (dz, dtarget) = s.inputs, s.tangents
    zt = t.type(z)
    terms: list[str | None] = []
    if dz is not None:
        probs = t.op("softmax", z, axis=-1)
        if t.type(target).dtype is DType.INT64:
            eye = t.array(np.eye(zt.shape[-1], dtype=zt.dtype.numpy), "one_hot")
            local = t.op("sub", probs, t.op("gather", eye, target, axis=0))  # one-hot rows
        else:
            mass = t.op("sum", target, axis=-1, keepdims=True)
            local = t.op("sub", t.op("mul", probs, mass), target)
        terms.append(t.op("sum", t.op("mul", dz, local), axis=-1))
    if dtarget is not None:
        terms.append(t.op("neg", t.op("sum", t.op("mul", dtarget, t.op("log_softmax", z,
                                                                        axis=-1)), axis=-1)))
    rows = t.add(*terms)
    reduction = s.attrs.get("reduction", "mean")
    if rows is None or reduction == "none":
        return rows
    total = t.op("sum", rows)
    if reduction == "sum":
        return total
    count = 1
    for d in zt.shape[:-1]:
        count *= d
    return t.op("mul", total, t.const(1.0 / count, z))


OPS = [
    OpDef(
        name="softmax_cross_entropy",
        doc="Cross-entropy of softmax(logits) over the last axis against labels or probabilities.",
        min_arity=2, max_arity=2, infer=_infer, lifts=True,
        attrs={"reduction": AttrSpec(AttrKind.STRING, "how per-row losses combine",
                                     default="mean", choices=("mean", "sum", "none"))},
        forward=_forward, vjps=(_vjp_logits, _vjp_target), jvp=_jvp,
        edges="class labels outside [0, classes) are refused (a VALUE error) and get no "
              "gradient; a -inf logit has probability 0 (the loss is inf if it is the "
              "label's); an inf logit's gradient is NaN.",
    ),
]
