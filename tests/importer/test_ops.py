"""Every op the importer converts, at the opsets whose versions differ, against independent
oracles: forward values against onnx's reference evaluator (our own numpy where that one is
known to differ: Softmax below opset 13), gradients against central finite differences.

A case with a symbolic batch axis ("N") is imported batched: a batched run of B examples must
give what the reference gives the model at N = B (these ops treat examples independently), and
a single example what it gives at N = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import pytest

from gradserve.engine import Plan, gradcheck
from gradserve.importer import import_model
from tests.importer.models import LATEST, Arr, Case, In, ints, make, node, reference

X = {"x": In((2, 3))}
XB = {"x": In(("N", 3))}
POSITIVE = {"x": In(("N", 3), low=0.1)}
IMAGE = {"x": In(("N", 2, 5, 6))}


def _softmax_2d(x: Arr, axis: int, log: bool) -> Arr:
    """Softmax below opset 13: over the input flattened to 2-D at ``axis``."""
    rows = x.reshape(int(np.prod(x.shape[:axis])), -1)
    z = rows - rows.max(axis=1, keepdims=True)
    out = z - np.log(np.exp(z).sum(axis=1, keepdims=True)) if log else \
        np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return out.reshape(x.shape)


def _legacy_softmax(op: str, axis: int | None) -> Case:
    attrs: dict[str, Any] = {} if axis is None else {"axis": axis}
    return Case(f"{op}-legacy-axis{axis}", [node(op, ["x"], **attrs)], {"x": In((2, 3, 4))},
                opsets=(11,), oracle=lambda f: [_softmax_2d(f["x"], 1 if axis is None else axis,
                                                            op == "LogSoftmax")])


# The reference evaluator computes erf (and so Gelu, a function of it) in float32: float64
# cases of these take math.erf instead.
_erf = np.vectorize(math.erf)


def _gelu(x: Arr, approximate: str) -> Arr:
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


BN_STATS = {"s": np.array([1.0, 2.0]), "b": np.array([0.1, -0.2]), "m": np.array([0.3, 0.0]),
            "v": np.array([1.5, 0.5])}


def _batch_norm(epsilon: float, stats: Mapping[str, Arr] | None = None
                ) -> Callable[[Mapping[str, Arr]], list[Arr]]:
    def oracle(feeds: Mapping[str, Arr]) -> list[Arr]:
        f = {**feeds, **(stats or {})}
        x = f["x"]
        s, b, m, v = (f[k].reshape((-1,) + (1,) * (x.ndim - 2)) for k in "sbmv")
        return [(x - m) / np.sqrt(v + epsilon) * s + b]

    return oracle


UNARY = [Case(op, [node(op, ["x"])], POSITIVE if op in ("Log", "Sqrt") else XB)
         for op in ("Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Abs", "Neg", "Softplus",
                    "Sin", "Cos", "Identity")]

ELEMENTWISE = [
    *(Case(op, [node(op, ["a", "b"])], {"a": In(("N", 2, 3)), "b": In((3,), low=0.5)})
      for op in ("Add", "Sub", "Mul", "Div")),
    Case("Pow", [node("Pow", ["a", "b"])], {"a": In((2, 3), low=0.5), "b": In((3,))}),
    Case("Pow-int-exponent", [node("Pow", ["x", "e"])], XB, initializers={"e": ints(3)}),
    Case("Max", [node("Max", ["a", "b", "c"])], {k: In(("N", 3)) for k in "abc"}),
    Case("Min", [node("Min", ["a", "b"])], {"a": In(("N", 3)), "b": In((1,))}),
    Case("LeakyRelu", [node("LeakyRelu", ["x"], alpha=0.2)], XB),
    Case("Erf", [node("Erf", ["x"])], XB, oracle=lambda f: [_erf(f["x"])]),
    Case("Gelu", [node("Gelu", ["x"])], XB, opsets=(20, LATEST),
         oracle=lambda f: [_gelu(f["x"], "none")]),
    Case("Gelu-tanh", [node("Gelu", ["x"], approximate="tanh")], XB, opsets=(20, LATEST),
         oracle=lambda f: [_gelu(f["x"], "tanh")]),
    Case("Clip", [node("Clip", ["x", "lo", "hi"])], XB, opsets=(11, 13, LATEST),
         initializers={"lo": np.array(-0.5), "hi": np.array(1.0)}),
    Case("Clip-max-only", [node("Clip", ["x", "", "hi"])], XB, opsets=(11, LATEST),
         initializers={"hi": np.array(0.5)}),
    Case("Clip-min-only", [node("Clip", ["x", "lo"])], XB, initializers={"lo": np.array(0.0)}),
    Case("Where", [node("Where", ["c", "a", "b"])], {"a": In(("N", 3)), "b": In((3,))},
         initializers={"c": np.array([True, False, True])}),
    Case("Where-of-comparisons",
         [node("Less", ["a", "b"], ["lt"]), node("Greater", ["a", "z"], ["gt"]),
          node("Equal", ["lt", "gt"], ["eq"]), node("Not", ["eq"], ["ne"]),
          node("Or", ["ne", "lt"], ["or"]), node("And", ["or", "gt"], ["both"]),
          node("LessOrEqual", ["a", "b"], ["le"]), node("GreaterOrEqual", ["a", "b"], ["ge"]),
          node("Where", ["both", "a", "b"], ["w"]), node("Where", ["le", "w", "a"], ["v"]),
          node("Where", ["ge", "v", "b"])],
         {"a": In(("N", 4)), "b": In(("N", 4))}, initializers={"z": np.array(0.0)},
         opsets=(13, LATEST)),
    Case("Dropout-ratio-attribute", [node("Dropout", ["x"], ratio=0.5)], XB, opsets=(11,)),
    Case("Dropout", [node("Dropout", ["x", "r", "t"], ["y", "mask"]),
                     node("Cast", ["mask"], ["m"], to=11), node("Mul", ["y", "m"], ["z"])],
         XB, outputs=("z",), initializers={"r": np.array(0.3), "t": np.array(False)},
         opsets=(13, LATEST)),
    Case("Cast-to-own-dtype", [node("Cast", ["x"], to=11)], XB),
]

LINEAR = [
    Case("MatMul", [node("MatMul", ["a", "b"])], {"a": In(("N", 2, 3)), "b": In((3, 4))}),
    Case("MatMul-vector", [node("MatMul", ["a", "b"])], {"a": In((3,)), "b": In((3, 4))}),
    Case("Gemm", [node("Gemm", ["a", "b", "c"], alpha=0.5, beta=2.0, transA=1, transB=1)],
         {"a": In((3, 2)), "b": In((4, 3)), "c": In((4,))}, opsets=(11, 13)),
    Case("Gemm-batched", [node("Gemm", ["a", "b", "c"], transB=1)],
         {"a": In(("N", 3))}, initializers={"b": np.arange(12.0).reshape(4, 3) / 10,
                                            "c": np.array(0.25)}),
    Case("Gemm-no-C", [node("Gemm", ["a", "b"], alpha=-1.5)],
         {"a": In((2, 3)), "b": In((3, 4))}),
    Case("Gemm-float32", [node("Gemm", ["a", "b", "c"])],
         {"a": In(("N", 3), np.float32), "b": In((3, 4), np.float32),
          "c": In((1, 4), np.float32)}, rtol=1e-5),
]

CONV = [
    Case("Conv", [node("Conv", ["x", "w", "b"], pads=[1, 0, 2, 1], strides=[2, 1],
                       dilations=[1, 2])],
         {"x": In(("N", 2, 5, 6)), "w": In((3, 2, 2, 2)), "b": In((3,))}),
    Case("Conv-group-1d", [node("Conv", ["x", "w"], group=2)],
         {"x": In(("N", 4, 7)), "w": In((6, 2, 3))}),
    Case("Conv-same-upper", [node("Conv", ["x", "w"], auto_pad="SAME_UPPER", strides=[2, 2])],
         {"x": In(("N", 2, 5, 6)), "w": In((2, 2, 2, 3))}),
    Case("Conv-same-lower", [node("Conv", ["x", "w"], auto_pad="SAME_LOWER",
                                  kernel_shape=[2, 2])],
         {"x": In((1, 2, 5, 6)), "w": In((2, 2, 2, 2))}),
    Case("Conv-fixed-batch", [node("Conv", ["x", "w"], auto_pad="VALID")],
         {"x": In((3, 2, 5, 6)), "w": In((2, 2, 3, 3))}),
    Case("Conv-float32", [node("Conv", ["x", "w", "b"], pads=[1, 1, 1, 1])],
         {"x": In(("N", 2, 5, 6), np.float32), "w": In((3, 2, 3, 3), np.float32),
          "b": In((3,), np.float32)}, rtol=1e-5),
    Case("MaxPool", [node("MaxPool", ["x"], kernel_shape=[2, 3], strides=[2, 2],
                          pads=[1, 0, 0, 1])], IMAGE),
    Case("MaxPool-ceil-dilated", [node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2],
                                       ceil_mode=1, dilations=[1, 2])], IMAGE),
    Case("MaxPool-1d", [node("MaxPool", ["x"], kernel_shape=[3], strides=[2])],
         {"x": In(("N", 2, 7))}),
    # The reference sizes SAME pooling wrongly: the oracle is the model with the pads that
    # SAME_LOWER means here (out = ceil(in / stride); the odd pad goes first).
    Case("MaxPool-same-lower", [node("MaxPool", ["x"], kernel_shape=[2, 3], strides=[2, 2],
                                     auto_pad="SAME_LOWER")], IMAGE,
         oracle=lambda f: reference(make(
             [node("MaxPool", ["x"], kernel_shape=[2, 3], strides=[2, 2], pads=[1, 1, 0, 0])],
             IMAGE, ["y"]), f)),
    Case("AveragePool", [node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
         IMAGE),
    Case("AveragePool-count-pad-ceil", [node("AveragePool", ["x"], kernel_shape=[2, 2],
                                             strides=[2, 2], count_include_pad=1, ceil_mode=1,
                                             pads=[1, 1, 0, 0])], IMAGE),
    Case("GlobalAveragePool", [node("GlobalAveragePool", ["x"])], IMAGE),
    # The reference computes BatchNormalization-9 (opsets 9 to 13) in training mode: the
    # oracle is the inference formula.
    Case("BatchNormalization",
         [node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)],
         {"x": In((2, 2, 3, 4)), "s": In((2,)), "b": In((2,)), "m": In((2,)),
          "v": In((2,), low=0.5)}, opsets=(11, 13, 14, LATEST), oracle=_batch_norm(1e-3)),
    Case("BatchNormalization-momentum",
         [node("BatchNormalization", ["x", "s", "b", "m", "v"], momentum=0.8, training_mode=0)],
         {"x": In(("N", 2, 3)), "s": In((2,)), "b": In((2,)), "m": In((2,)),
          "v": In((2,), low=0.5)}, opsets=(14, LATEST)),
    Case("BatchNormalization-batched",
         [node("BatchNormalization", ["x", "s", "b", "m", "v"])], {"x": In(("N", 2))},
         initializers=BN_STATS, oracle=_batch_norm(1e-5, BN_STATS)),
    Case("LayerNormalization", [node("LayerNormalization", ["x", "s", "b"], epsilon=1e-3)],
         {"x": In(("N", 3, 4)), "s": In((4,)), "b": In((4,))}, opsets=(17, LATEST)),
    Case("LayerNormalization-axis1-no-bias", [node("LayerNormalization", ["x", "s"], axis=1)],
         {"x": In(("N", 3, 4)), "s": In((3, 4))}, opsets=(17, LATEST)),
]

SOFTMAX = [
    *(Case(f"{op}-axis{axis}", [node(op, ["x"], axis=axis)], {"x": In(("N", 3, 4))})
      for op in ("Softmax", "LogSoftmax") for axis in (-1, 1)),
    *(_legacy_softmax(op, axis) for op in ("Softmax", "LogSoftmax") for axis in (None, 2, 0)),
    Case("SoftmaxCrossEntropyLoss", [node("SoftmaxCrossEntropyLoss", ["s", "t"],
                                          ["y", "logp"])],
         {"s": In(("N", 4)), "t": In(("N",), np.int64, 0, 4)}, outputs=("y", "logp"),
         oracle=None),
    *(Case(f"SoftmaxCrossEntropyLoss-{reduction}-kdim",
           [node("SoftmaxCrossEntropyLoss", ["s", "t"], reduction=reduction,
                 ignore_index=-1)],
           {"s": In((2, 4, 3)), "t": In((2, 3), np.int64, 0, 4)}, opsets=(12, LATEST))
      for reduction in ("mean", "sum", "none")),
    *(Case(f"NegativeLogLikelihoodLoss-{reduction}",
           [node("LogSoftmax", ["s"], ["logp"], axis=1),
            node("NegativeLogLikelihoodLoss", ["logp", "t"], reduction=reduction)],
           {"s": In((2, 4, 3)), "t": In((2, 3), np.int64, 0, 4)}, opsets=(13, LATEST))
      for reduction in ("mean", "sum", "none")),
    Case("NegativeLogLikelihoodLoss-batched", [node("NegativeLogLikelihoodLoss", ["x", "t"])],
         {"x": In(("N", 5)), "t": In(("N",), np.int64, 0, 5)}),
]

REDUCE = [
    *(Case(f"{op}-attribute-axes", [node(op, ["x"], axes=[-1], keepdims=0)],
           {"x": In(("N", 3, 4))}, opsets=(11,) if op == "ReduceSum" else (11, 13))
      for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin")),
    *(Case(f"{op}-input-axes", [node(op, ["x", "axes"])], {"x": In(("N", 3, 4))},
           initializers={"axes": ints(1, 2)}, opsets=(13,) if op == "ReduceSum" else (18, LATEST))
      for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin")),
    Case("ReduceSum-all", [node("ReduceSum", ["x"], keepdims=0)], {"x": In((2, 3))}),
    Case("ReduceMean-noop", [node("ReduceMean", ["x"], noop_with_empty_axes=1)], XB,
         opsets=(18, LATEST)),
]

SHAPES = [
    *(Case(f"Flatten-axis{axis}", [node("Flatten", ["x"], axis=axis)], {"x": In((2, 3, 4))})
      for axis in (0, 1, 2, -1)),
    Case("Reshape", [node("Reshape", ["x", "s"])], {"x": In(("N", 3, 4))},
         initializers={"s": ints(0, -1, 2)}),
    Case("Reshape-allowzero", [node("Reshape", ["x", "s"], allowzero=1)], {"x": In((2, 3))},
         initializers={"s": ints(3, 2)}, opsets=(14, LATEST)),
    Case("Transpose", [node("Transpose", ["x"], perm=[0, 2, 1])], {"x": In(("N", 3, 4))}),
    Case("Transpose-default", [node("Transpose", ["x"])], {"x": In((2, 3, 4))}),
    Case("Squeeze-Unsqueeze-attribute", [node("Unsqueeze", ["x"], ["u"], axes=[1, -1]),
                                         node("Squeeze", ["u"], axes=[3])],
         XB, opsets=(11,)),
    Case("Squeeze-Unsqueeze-input", [node("Unsqueeze", ["x", "a"], ["u"]),
                                     node("Squeeze", ["u", "b"])],
         XB, initializers={"a": ints(1, -1), "b": ints(3)}),
    Case("Squeeze-every-unit-axis", [node("Squeeze", ["x"])], {"x": In((2, 1, 3, 1))},
         opsets=(11, 13, LATEST)),
    Case("Concat", [node("Concat", ["a", "b", "c"], axis=-1)],
         {"a": In(("N", 2)), "b": In(("N", 3))}, initializers={"c": np.ones((1, 1))}),
    Case("Slice", [node("Slice", ["x", "st", "en", "ax", "sp"])], {"x": In(("N", 5, 6))},
         initializers={"st": ints(4, 1), "en": ints(-(2 ** 63), 100), "ax": ints(1, 2),
                       "sp": ints(-2, 2)}),
    Case("Slice-default-axes", [node("Slice", ["x", "st", "en"])], {"x": In((5, 6))},
         initializers={"st": ints(1, -3), "en": ints(4, 6)}, opsets=(11, LATEST)),
    Case("Split-attribute", [node("Split", ["x"], ["y", "z"], axis=1, split=[1, 2])],
         {"x": In(("N", 3))}, outputs=("y", "z"), opsets=(11,)),
    Case("Split-input", [node("Split", ["x", "s"], ["y", "z"], axis=1)], {"x": In(("N", 5))},
         outputs=("y", "z"), initializers={"s": ints(3, 2)}, opsets=(13, LATEST)),
    Case("Split-even", [node("Split", ["x"], ["y", "z", "w"], axis=-1, num_outputs=3)],
         {"x": In(("N", 2, 7))}, outputs=("y", "z", "w"), opsets=(18, LATEST)),
    Case("Gather-embedding", [node("Gather", ["e", "t"])],
         {"t": In(("N", 4), np.int64, -5, 5)},
         initializers={"e": np.arange(15.0).reshape(5, 3) / 7}),
    Case("Gather-embedding-weights-as-input", [node("Gather", ["e", "t"])],
         {"e": In((5, 3)), "t": In(("N", 4), np.int64, 0, 5)}),
    Case("Gather-axis1", [node("Gather", ["x", "i"], axis=1)], {"x": In(("N", 4, 3))},
         initializers={"i": ints(3, -1, 0, 3)}),
    Case("Gather-scalar-index", [node("Gather", ["x", "i"], axis=0)], {"x": In((4, 3))},
         initializers={"i": np.array(2)}),
    Case("Expand", [node("Expand", ["x", "s"])], {"x": In(("N", 3, 1))},
         initializers={"s": ints(2, 1, 1, 4)}),
]

SHAPE_ARITHMETIC = [
    # x.view(x.shape[0], -1) as exporters write it: Shape, Gather, Unsqueeze, Concat, Reshape.
    Case("Shape-Gather-Concat-Reshape",
         [node("Shape", ["x"], ["s"]), node("Gather", ["s", "zero"], ["n"], axis=0),
          node("Unsqueeze", ["n", "axes"], ["n1"]), node("Concat", ["n1", "minus1"], ["t"],
                                                          axis=0),
          node("Reshape", ["x", "t"])],
         {"x": In(("N", 3, 4))}, declare={"y": ("N", 12)},  # shape inference cannot tell
         initializers={"zero": np.array(0), "axes": ints(0), "minus1": ints(-1)}),
    # A causal mask: Range, ConstantOfShape, Expand, Equal, Where, Cast, Mod, Size, Slice.
    Case("Range-ConstantOfShape-Expand-Equal-Where",
         [node("Shape", ["x"], ["s"], start=1, end=2), node("Squeeze", ["s"], ["len"]),
          node("Range", ["zero", "len", "one"], ["r"]),
          node("Unsqueeze", ["r", "last"], ["col"]), node("Less", ["r", "col"], ["future"]),
          node("Shape", ["future"], ["s2"]),
          node("ConstantOfShape", ["s2"], ["filler"],
               value=onnx.numpy_helper.from_array(np.array([-1e9]))),
          node("Where", ["future", "filler", "x"], ["masked"]),
          node("Size", ["x"], ["size"]), node("Mod", ["size", "seven"], ["m"]),
          node("Cast", ["m"], ["mf"], to=11), node("Cast", ["mf"], ["mi"], to=7),
          node("CastLike", ["mi", "x"], ["scale"]),
          node("Mul", ["masked", "scale"], ["scaled"]),
          node("Expand", ["one", "s"], ["ones"]), node("Equal", ["ones", "one"], ["eq"]),
          node("Cast", ["eq"], ["eqf"], to=11), node("Mul", ["scaled", "eqf"], ["p"]),
          node("Softmax", ["p"])],
         {"x": In(("N", 4, 4))},
         initializers={"zero": np.array(0), "one": np.array(1), "last": ints(-1),
                       "seven": np.array(7)}, opsets=(15, LATEST)),
    Case("Constant-Floor-Ceil",
         [node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.array([1.5, -1.5]))),
          node("Constant", [], ["f"], value_float=2.0),
          node("Constant", [], ["fs"], value_floats=[1.0, 3.0]),
          node("Constant", [], ["i"], value_int=2),
          node("Constant", [], ["is"], value_ints=[1, 1]),
          node("Floor", ["c"], ["fl"]), node("Ceil", ["c"], ["ce"]),
          node("Add", ["fl", "ce"], ["k"]), node("Cast", ["i"], ["i64"], to=11),
          node("Cast", ["f"], ["f64"], to=11), node("Cast", ["fs"], ["fs64"], to=11),
          node("Mul", ["k", "i64"], ["a"]), node("Mul", ["a", "f64"], ["b"]),
          node("Mul", ["b", "fs64"], ["d"]), node("Mul", ["x", "d"], ["e"]),
          node("ReduceSum", ["is"], ["two"], keepdims=1),
          node("Concat", ["minus1", "two"], ["shape"], axis=0), node("Reshape", ["e", "shape"])],
         {"x": In(("N", 2))}, initializers={"minus1": ints(-1)}, declare={"y": ("N", 2)}),
]

SHAPE_ARITHMETIC += [  # Mod's two sign rules: the divisor's (Python's), the dividend's (C's)
    Case(f"Mod-fmod{fmod}", [node("Mod", ["a", "b"], ["m"], fmod=fmod),
                             node("Cast", ["m"], ["mf"], to=11), node("Add", ["x", "mf"])],
         {"x": In(("N", 2))}, initializers={"a": ints(-3, 3), "b": ints(2, -2)})
    for fmod in (0, 1)]

CASES = [*UNARY, *ELEMENTWISE, *LINEAR, *CONV, *SOFTMAX, *REDUCE, *SHAPES, *SHAPE_ARITHMETIC]


def _example(feeds: Mapping[str, Arr], case: Case, b: int) -> dict[str, Arr]:
    """Example ``b`` of a batched feed, as the model's batch of one."""
    return {k: v[b:b + 1] if case.inputs[k].shape[:1] == ("N",) else v for k, v in feeds.items()}


def _per_example(feeds: Mapping[str, Arr], case: Case) -> dict[str, Arr]:
    """The engine's feed of one example: batched inputs without their batch axis."""
    return {k: v[0] if case.inputs[k].shape[:1] == ("N",) else v for k, v in feeds.items()}


@pytest.mark.parametrize(("case", "opset"), [pytest.param(c, o, id=f"{c.id}-opset{o}")
                                             for c in CASES for o in c.opsets])
def test_an_op_computes_what_onnx_defines_and_its_gradients(case: Case, opset: int) -> None:
    """Each example alone, and a batch of three in one run, give what the oracle gives the
    model run on that example as a batch of one; the gradients of one example match finite
    differences."""
    rng = np.random.default_rng(sum(map(ord, case.id)) + opset)
    model = case.model(opset)
    imported = import_model(model)
    batched = any(spec.shape[:1] == ("N",) for spec in case.inputs.values())
    assert imported.batched is batched
    plan = Plan(imported.graph)
    feeds = {name: spec.draw(rng, 3) for name, spec in case.inputs.items()}
    examples = [_example(feeds, case, b) for b in range(3 if batched else 1)]
    wanted: list[dict[str, Arr]] = []
    for example in examples:
        want = dict(zip(case.outputs, map(np.asarray, case.expected(model, example)),
                        strict=True))
        for info in imported.outputs:  # the batch axis is the engine's, not the example's
            if None in info.shape:
                want[info.name] = np.squeeze(want[info.name], info.shape.index(None))
        _close(plan.run(_per_example(example, case)).outputs, want, case.rtol)
        wanted.append(want)
    if batched:  # every input is per example then: those without N too
        stacked = {name: np.stack([w[name] for w in wanted]) for name in case.outputs}
        engine_feed = {k: v if case.inputs[k].shape[:1] == ("N",) else np.stack([v] * 3)
                       for k, v in feeds.items()}
        _close(plan.run(engine_feed, batched=True).outputs, stacked, case.rtol)
    one = {k: v.astype(np.float64) if v.dtype.kind == "f" else v
           for k, v in _per_example(examples[0], case).items()}
    report = gradcheck(imported.graph, one)
    assert report.ok, report


def _close(got: Mapping[str, Arr], want: Mapping[str, Arr], rtol: float) -> None:
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=rtol, atol=rtol * 1e-2, err_msg=name)
        assert got[name].dtype == value.dtype, name
