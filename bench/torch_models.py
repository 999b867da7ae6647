"""client/networks.py's two ONNX models written again with torch.nn.functional, op for op as
the ONNX graphs compute them, taking their weights from the models' own initializers: what
bench/models.py races the engine against, and what bench/torch_server.py's CNN backend computes
per request. Checked against the engine (to float32 rounding) by bench/models.py before it
times anything."""

from __future__ import annotations

from typing import Any

import onnx
from numpy.typing import NDArray

Arr = NDArray[Any]


def initializers(model: onnx.ModelProto) -> dict[str, Arr]:
    """A model's initializers as numpy arrays, by name, in the model's order."""
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def weight_names(model: onnx.ModelProto) -> list[str]:
    """The initializers that are weights (float tensors of rank >= 1: not the scalar constants
    or the integer shapes a model also keeps as initializers), in the model's order."""
    return [name for name, value in initializers(model).items()
            if value.dtype.kind == "f" and value.ndim >= 1]


def lenet(torch: Any, w: dict[str, Any], x: Any) -> Any:
    """networks.cnn(): x (N, 1, 28, 28) -> logits (N, 10). Two 5x5 convolutions (the first
    padded by 2) with ReLU and 2x2 max-pooling, flattened, then three dense layers (Gemm with
    transB: x W^T + b, ReLU between)."""
    f = torch.nn.functional
    h = f.max_pool2d(f.relu(f.conv2d(x, w["conv1.weight"], w["conv1.bias"], padding=2)), 2, 2)
    h = f.max_pool2d(f.relu(f.conv2d(h, w["conv2.weight"], w["conv2.bias"])), 2, 2)
    h = torch.flatten(h, 1)
    h = f.relu(f.linear(h, w["fc1.weight"], w["fc1.bias"]))
    h = f.relu(f.linear(h, w["fc2.weight"], w["fc2.bias"]))
    return f.linear(h, w["fc3.weight"], w["fc3.bias"])


def encoder_block(torch: Any, w: dict[str, Any], x: Any, heads: int = 4) -> Any:
    """networks.transformer(): x (N, seq, width) -> y, a pre-norm encoder block as the ONNX
    graph writes it: y = h + FFN(LN(h)), h = x + MHA(LN(x)), dense layers as MatMul then Add,
    attention as MatMul, Mul by the scale, Softmax, MatMul, and GELU in its erf form with the
    model's own constants."""
    f = torch.nn.functional
    n, seq, width = x.shape
    size = width // heads

    def norm(h: Any, name: str) -> Any:
        return f.layer_norm(h, (width,), w[f"{name}.weight"], w[f"{name}.bias"], 1e-5)

    def dense(h: Any, name: str) -> Any:
        return h @ w[f"{name}.weight"] + w[f"{name}.bias"]

    n1 = norm(x, "ln1")
    q = dense(n1, "q").reshape(n, seq, heads, size).permute(0, 2, 1, 3)
    k = dense(n1, "k").reshape(n, seq, heads, size).permute(0, 2, 3, 1)
    v = dense(n1, "v").reshape(n, seq, heads, size).permute(0, 2, 1, 3)
    scores = (q @ k) * w["scale"]
    mixed = (torch.softmax(scores, -1) @ v).permute(0, 2, 1, 3).reshape(n, seq, width)
    h = x + dense(mixed, "out")
    up = dense(norm(h, "ln2"), "ffn.up")
    gelu = (up * w["half"]) * (torch.erf(up * w["rsqrt2"]) + w["one"])
    return h + dense(gelu, "ffn.down")


def tensors(torch: Any, arrays: dict[str, Arr], grad: frozenset[str] = frozenset()
            ) -> dict[str, Any]:
    """Torch tensors of ``arrays`` (copied), those named in ``grad`` as leaves that require
    a gradient. Integer arrays (a model's shape constants) are left out."""
    return {k: torch.tensor(v, requires_grad=k in grad) for k, v in arrays.items()
            if v.dtype.kind == "f"}

