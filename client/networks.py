"""Small real networks as ONNX models, written with ``onnx.helper``: a LeNet-style CNN and a
transformer encoder block, with weights drawn at random from a seed. They are what the model
workloads load-test and the benchmarks race, and a model to try the service with
(``gradserve inspect``, ``gradserve grad --onnx``) without PyTorch at hand.

Both take a dynamic leading batch dimension ``N``, as ``torch.onnx.export`` writes with
``dynamic_axes``/``dynamic_shapes``, and are written in opset 18 the way PyTorch's exporter
writes these layers (GELU as its erf form, attention as MatMul/Softmax).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 18


class _Model:
    """A model being written: its nodes, its initializers, and a random generator."""

    def __init__(self, seed: int, dtype: type[np.floating[Any]]) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, shape: Sequence[int], fan_in: int | None = None) -> str:
        """A weight drawn uniformly within 1/sqrt(fan_in) (PyTorch's default init)."""
        bound = 1 / math.sqrt(fan_in if fan_in is not None else shape[-1])
        value = self.rng.uniform(-bound, bound, shape).astype(self.dtype)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def constant(self, name: str, value: Any, dtype: Any = None) -> str:
        self.initializers.append(numpy_helper.from_array(
            np.asarray(value, dtype=dtype or self.dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=output,
                                           **attrs))
        return output

    def finish(self, name: str, inputs: dict[str, Sequence[int | str]],
               outputs: dict[str, Sequence[int | str]]) -> onnx.ModelProto:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(k, elem, list(v)) for k, v in inputs.items()],
            [helper.make_tensor_value_info(k, elem, list(v)) for k, v in outputs.items()],
            self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="gradserve")
        onnx.checker.check_model(model, full_check=True)
        return model


def cnn(seed: int = 0, dtype: type[np.floating[Any]] = np.float32) -> onnx.ModelProto:
    """LeNet-5 for 28x28 images: x (N, 1, 28, 28) -> logits (N, 10). Two 5x5 convolutions
    (6 and 16 channels, the first padded) with ReLU and 2x2 max-pooling, then three dense
    layers (400-120-84-10): 61,706 weights."""
    m = _Model(seed, dtype)
    h = "x"
    for k, (cin, cout, pad) in enumerate(((1, 6, 2), (6, 16, 0)), 1):
        conv = m.op("Conv", [h, m.weight(f"conv{k}.weight", (cout, cin, 5, 5), cin * 25),
                             m.weight(f"conv{k}.bias", (cout,), cin * 25)],
                    f"conv{k}", kernel_shape=[5, 5], pads=[pad] * 4)
        h = m.op("MaxPool", [m.op("Relu", [conv], f"relu{k}")], f"pool{k}",
                 kernel_shape=[2, 2], strides=[2, 2])
    h = m.op("Flatten", [h], "flatten", axis=1)
    for k, (fin, fout) in enumerate(((400, 120), (120, 84), (84, 10)), 1):
        h = m.op("Gemm", [h, m.weight(f"fc{k}.weight", (fout, fin)),
                          m.weight(f"fc{k}.bias", (fout,), fin)],
                 "logits" if k == 3 else f"fc{k}", transB=1)
        if k < 3:
            h = m.op("Relu", [h], f"fc{k}.relu")
    return m.finish("lenet", {"x": ("N", 1, 28, 28)}, {"logits": ("N", 10)})


def transformer(seed: int = 0, dtype: type[np.floating[Any]] = np.float32, seq: int = 32,
                width: int = 64, heads: int = 4, hidden: int = 128) -> onnx.ModelProto:
    """A pre-norm transformer encoder block: x (N, seq, width) -> y (N, seq, width), as
    y = h + FFN(LN(h)) with h = x + MHA(LN(x)); multi-head self-attention with ``heads``
    heads and a GELU feed-forward layer of ``hidden`` units."""
    m = _Model(seed, dtype)
    size = width // heads

    def norm(x: str, name: str) -> str:
        return m.op("LayerNormalization", [x, m.constant(f"{name}.weight", np.ones(width)),
                                           m.constant(f"{name}.bias", np.zeros(width))],
                    name, axis=-1, epsilon=1e-5)

    def dense(x: str, name: str, fin: int, fout: int) -> str:
        y = m.op("MatMul", [x, m.weight(f"{name}.weight", (fin, fout), fin)], f"{name}.mm")
        return m.op("Add", [y, m.weight(f"{name}.bias", (fout,), fin)], name)

    split = m.constant("heads.shape", [0, 0, heads, size], np.int64)
    joined = m.constant("width.shape", [0, 0, width], np.int64)
    n1 = norm("x", "ln1")
    q, k, v = (m.op("Transpose", [m.op("Reshape", [dense(n1, p, width, width), split],
                                       f"{p}.heads")], f"{p}.t", perm=perm)
               for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])))
    scores = m.op("Mul", [m.op("MatMul", [q, k], "scores.raw"),
                          m.constant("scale", 1 / math.sqrt(size))], "scores")
    attn = m.op("MatMul", [m.op("Softmax", [scores], "attention", axis=-1), v], "mixed")
    attn = m.op("Reshape", [m.op("Transpose", [attn], "mixed.t", perm=[0, 2, 1, 3]), joined],
                "mixed.joined")
    h = m.op("Add", ["x", dense(attn, "out", width, width)], "h")
    up = dense(norm(h, "ln2"), "ffn.up", width, hidden)
    erf = m.op("Erf", [m.op("Mul", [up, m.constant("rsqrt2", 1 / math.sqrt(2))], "gelu.in")],
               "gelu.erf")
    gelu = m.op("Mul", [m.op("Mul", [up, m.constant("half", 0.5)], "gelu.half"),
                        m.op("Add", [erf, m.constant("one", 1.0)], "gelu.cdf")], "gelu")
    m.op("Add", [h, dense(gelu, "ffn.down", hidden, width)], "y")
    return m.finish("encoder_block", {"x": ("N", seq, width)}, {"y": ("N", seq, width)})
