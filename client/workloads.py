"""The built-in workloads: graphs with inputs to feed them, for load tests and benchmarks.

The seed examples (the quadratic, L = (a*b + c) * f, the staged sigmoid expression), a 21-op
scalar expression with powers, sigmoid, tanh, relu and fan-out, an MLP's softmax
cross-entropy loss at a chosen size (its weights fed, or constants of a served model), and two
ONNX models (``client/networks.py``: a LeNet CNN
and a transformer encoder block), registered as models with their weights, each request one
example and its gradient with respect to the input. Each draws its inputs from a random
generator, for one example or for a batch stacked on a leading axis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

from gradserve.client import networks
from gradserve.engine import DType, Graph
from gradserve.engine.builder import GraphBuilder, Value
from gradserve.importer import import_model

Arrays = dict[str, NDArray[Any]]


@dataclass(frozen=True)
class Workload:
    """A graph and how to draw inputs for it: ``inputs(rng, batch)`` gives one example's
    values (``batch`` None) or ``batch`` examples stacked on a leading axis."""

    name: str
    doc: str
    graph: Graph
    inputs: Callable[[np.random.Generator, int | None], Arrays]
    model: bytes | None = None  # an ONNX model's bytes: registered as the model, not the graph


def expression(x: Value, y: Value) -> Value:
    """A scalar expression of 21 ops: powers, sigmoid, tanh, relu, and fan-out."""
    a = x * y
    b = a + x
    c = b**2.0
    d = c.sigmoid()
    e = y.tanh()
    f = d * e
    h = f + (x - y).relu()
    i = h * h
    j = i / (1.0 + c)
    k = (j - a).tanh()
    m = (k * 3.0 + d) ** 3.0
    n = m - 2.0 * b
    return n.sigmoid() + e


def _uniform(*names: str, low: float = -2.0, high: float = 2.0
             ) -> Callable[[np.random.Generator, int | None], Arrays]:
    def draw(rng: np.random.Generator, batch: int | None) -> Arrays:
        return {n: np.asarray(rng.uniform(low, high, batch)) for n in names}
    return draw


def _scalar(name: str, doc: str, inputs: str, build: Callable[..., Value]) -> Workload:
    g = GraphBuilder()
    out = build(*(g.input(n) for n in inputs))
    return Workload(name, doc, g.build(out), _uniform(*inputs))


def mlp(batch: int = 64, hidden: int = 256, features: int = 784, classes: int = 10) -> Workload:
    """relu(X W1 + b1) W2 + b2 into softmax cross-entropy with integer labels: one example is a
    whole minibatch of ``batch`` rows, its gradients those of every weight."""
    g = GraphBuilder()
    x = g.input("X", (batch, features), requires_grad=False)
    labels = g.input("labels", (batch,), DType.INT64)
    w1, b1 = g.input("W1", (features, hidden)), g.input("b1", (hidden,))
    w2, b2 = g.input("W2", (hidden, classes)), g.input("b2", (classes,))
    loss = g.op("softmax_cross_entropy", (x @ w1 + b1).relu() @ w2 + b2, labels)

    def draw(rng: np.random.Generator, examples: int | None) -> Arrays:
        lead = () if examples is None else (examples,)
        return {"X": rng.standard_normal((*lead, batch, features)),
                "labels": rng.integers(0, classes, (*lead, batch)),
                "W1": rng.standard_normal((*lead, features, hidden)) * 0.05,
                "b1": np.zeros((*lead, hidden)),
                "W2": rng.standard_normal((*lead, hidden, classes)) * 0.05,
                "b2": np.zeros((*lead, classes))}

    return Workload(f"mlp{batch}x{features}-{hidden}-{classes}",
                    f"an MLP {features}-{hidden}-{classes}'s loss on {batch} rows",
                    g.build(loss), draw)


def mlp_model(hidden: int = 256, features: int = 784, classes: int = 10) -> Workload:
    """A trained MLP as a served model: its weights are constants, registered once with the
    graph; each request is one example (x and its label) and asks for the loss's gradient with
    respect to x (saliency, adversarial examples)."""
    rng = np.random.default_rng(0)
    g = GraphBuilder()
    x = g.input("x", (features,))
    label = g.input("label", (), DType.INT64)
    w1 = g.constant(rng.standard_normal((features, hidden)) * 0.05, name="W1")
    w2 = g.constant(rng.standard_normal((hidden, classes)) * 0.05, name="W2")
    b1, b2 = g.constant(np.zeros(hidden), name="b1"), g.constant(np.zeros(classes), name="b2")
    loss = g.op("softmax_cross_entropy", (x @ w1 + b1).relu() @ w2 + b2, label)

    def draw(rng: np.random.Generator, examples: int | None) -> Arrays:
        lead = () if examples is None else (examples,)
        return {"x": rng.standard_normal((*lead, features)),
                "label": np.asarray(rng.integers(0, classes, lead))}

    return Workload(f"mlp-model{features}-{hidden}-{classes}",
                    f"a served MLP {features}-{hidden}-{classes} (weights constant): one "
                    "example per request, the loss's gradient with respect to x",
                    g.build(loss), draw)


def from_graph(graph: Graph, name: str = "graph", doc: str | None = None,
               model: bytes | None = None) -> Workload:
    """Any graph as a workload: floats drawn uniformly from [-1, 1], integers 0."""
    def draw(rng: np.random.Generator, batch: int | None) -> Arrays:
        lead = () if batch is None else (batch,)
        return {i.name: rng.uniform(-1, 1, (*lead, *i.shape)).astype(i.dtype.numpy)
                if i.dtype.is_float else np.zeros((*lead, *i.shape), i.dtype.numpy)
                for i in graph.inputs}

    return Workload(name, doc or f"{len(graph.nodes)} nodes", graph, draw, model)


def from_model(model: onnx.ModelProto, name: str, doc: str) -> Workload:
    """An ONNX model as a workload: registered as the model (weights as constants), each
    example one of its batch, the gradient with respect to its inputs."""
    data = model.SerializeToString()
    return from_graph(import_model(data).graph, name, doc, data)


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "quadratic": lambda: _scalar("quadratic", "f(x) = 2x^2 - 3x + 4", "x",
                                 lambda x: 2 * x**2 - 3 * x + 4),
    "loss-l": lambda: _scalar("loss-l", "L = (a*b + c) * f", "abcf",
                              lambda a, b, c, f: (a * b + c) * f),
    "staged": lambda: _scalar("staged", "(x + sigmoid(y)) / (sigmoid(x) + (x + y)^2)", "xy",
                              lambda x, y: (x + y.sigmoid()) / (x.sigmoid() + (x + y) ** 2)),
    "expr21": lambda: _scalar("expr21", "a 21-op scalar expression", "xy", expression),
    "mlp": mlp,
    "mlp-model": mlp_model,
    "cnn": lambda: from_model(networks.cnn(), "cnn", "LeNet-5 on a 28x28 image (float32)"),
    "transformer": lambda: from_model(networks.transformer(), "transformer",
                                      "a transformer encoder block, 32 tokens of width 64 "
                                      "(float32)"),
}
