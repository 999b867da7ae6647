"""Engine speed against hand-written numpy doing the same forward and backward pass.

Run: ``python bench/engine_vs_numpy.py`` (``--quick`` for a short smoke run). Each row times
the engine and a hand-written numpy version of the same function, interleaved in the same run,
and prints their ratio (engine / numpy), since absolute times on a shared machine drift. The
hand-written versions use the same numerically stable formulas as the engine (e.g. the
overflow-free sigmoid), so the ratio measures the engine's own overhead.

Targets: ratio <= 1.2 for both MLPs and the stacked expression; <= 3 us per node for the
expression on one example.

BLAS runs on one thread on both sides (``--blas-threads`` to change): on a 2-core machine,
OpenBLAS threads spinning between calls make both timings swing by tens of percent.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from gradserve.client.workloads import expression
from gradserve.engine import DType, Plan
from gradserve.engine.builder import GraphBuilder

Arr = np.ndarray[Any, Any]


def timed(fn: Callable[[], object], seconds: float) -> float:
    """Median seconds per call over repeats of enough calls to fill ~10 ms each."""
    fn()
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - start > 0.01:
            break
        calls *= 2
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 5:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def compare(engine: Callable[[], object], numpy: Callable[[], object], seconds: float,
            rounds: int = 6) -> tuple[float, float]:
    """Alternate rounds of both, so drift on the machine hits both alike; the best round each."""
    pairs = [(timed(engine, seconds / rounds / 2), timed(numpy, seconds / rounds / 2))
             for _ in range(rounds)]
    return min(e for e, _ in pairs), min(n for _, n in pairs)


# --- MLP: X (B,784) -> relu(X W1 + b1) W2 + b2 -> softmax cross-entropy with int labels -----


def mlp_graph(batch: int) -> Plan:
    g = GraphBuilder()
    x = g.input("X", (batch, 784), requires_grad=False)
    labels = g.input("labels", (batch,), DType.INT64)
    w1, b1 = g.input("W1", (784, 256)), g.input("b1", (256,))
    w2, b2 = g.input("W2", (256, 10)), g.input("b2", (10,))
    hidden = (x @ w1 + b1).relu()
    loss = g.op("softmax_cross_entropy", hidden @ w2 + b2, labels)
    return Plan(g.build(loss))


def mlp_numpy(X: Arr, labels: Arr, W1: Arr, b1: Arr, W2: Arr, b2: Arr) -> tuple[Any, ...]:
    z1 = X @ W1 + b1
    h = np.maximum(z1, 0)
    logits = h @ W2 + b2
    m = logits.max(axis=-1, keepdims=True)
    logp = logits - (np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)) + m)
    rows = np.arange(len(labels))
    loss = -logp[rows, labels].mean()
    dlogits = np.exp(logp)
    dlogits[rows, labels] -= 1
    dlogits /= len(labels)
    dW2, db2 = h.T @ dlogits, dlogits.sum(axis=0)
    dz1 = np.where(z1 > 0, dlogits @ W2.T, 0)
    return loss, X.T @ dz1, dz1.sum(axis=0), dW2, db2


def mlp_model_numpy(x: Arr, label: Arr, W1: Arr, b1: Arr, W2: Arr, b2: Arr
                    ) -> tuple[Arr, Arr]:
    """The served MLP's loss (client/workloads.py's ``mlp-model``: weights constant) and its
    gradient with respect to x, for one example (x of shape (784,), an integer label) or for
    examples stacked on a leading axis (each its own loss)."""
    z1 = x @ W1 + b1
    logits = np.maximum(z1, 0) @ W2 + b2
    m = logits.max(axis=-1, keepdims=True)
    logp = logits - (np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)) + m)
    onehot = np.eye(logits.shape[-1])[label]
    dz1 = np.where(z1 > 0, (np.exp(logp) - onehot) @ W2.T, 0)
    return -(logp * onehot).sum(axis=-1), dz1 @ W1.T


def mlp_inputs(batch: int, rng: np.random.Generator) -> dict[str, Arr]:
    return {
        "X": rng.standard_normal((batch, 784)), "labels": rng.integers(0, 10, batch),
        "W1": rng.standard_normal((784, 256)) * 0.05, "b1": np.zeros(256),
        "W2": rng.standard_normal((256, 10)) * 0.05, "b2": np.zeros(10),
    }


# --- A scalar expression of 21 ops with powers, sigmoid, tanh, relu and fan-out --------------


def sigmoid(x: Any) -> Any:
    e = np.exp(-abs(x))
    return ((x < 0) * e + (x >= 0)) / (1 + e)


def expression_numpy(x: Any, y: Any) -> tuple[Any, Any, Any]:
    """The same expression and its gradient, forward and backward written out by hand."""
    a = x * y
    b = a + x
    c = b**2.0
    d = sigmoid(c)
    e = np.tanh(y)
    f = d * e
    r = x - y
    h = f + np.maximum(r, 0)
    i = h * h
    den = 1.0 + c
    j = i / den
    k = np.tanh(j - a)
    s = k * 3.0 + d
    m = s**3.0
    n = m - 2.0 * b
    o = sigmoid(n)
    out = o + e
    # backward, the upstream gradient being 1
    dn = o * (1 - o)
    dm, db = dn, -2.0 * dn
    ds = dm * 3.0 * s**2.0
    dk, dd = ds * 3.0, ds
    dt = dk * (1 - k * k)
    dj, da = dt, -dt
    di, dden = dj / den, -dj * j / den
    dh = 2.0 * h * di
    df, dr = dh, np.where(r > 0, dh, 0)
    dd = dd + df * e
    de = 1.0 + df * d
    dc = dden + dd * d * (1 - d)
    db = db + dc * 2.0 * b
    da = da + db
    dx = db + da * y + dr
    dy = da * x - dr + de * (1 - e * e)
    return out, dx, dy


def expression_plan() -> tuple[Plan, int]:
    g = GraphBuilder()
    out = expression(g.input("x"), g.input("y"))
    graph = g.build(out)
    return Plan(graph), len(graph.nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per row and side")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--blas-threads", type=int, default=1, help="BLAS threads (default 1)")
    args = parser.parse_args()
    with threadpool_limits(limits=args.blas_threads, user_api="blas"):
        table(0.2 if args.quick else args.seconds)


def table(seconds: float) -> None:
    """Measure every case and print the table."""
    rng = np.random.default_rng(0)
    rows: list[tuple[str, float, float, str]] = []

    for batch in (64, 1024):
        plan, feed = mlp_graph(batch), mlp_inputs(batch, rng)
        check = plan.run(feed)
        ref = mlp_numpy(**feed)
        for got, want in zip([check.outputs[plan.outputs[0]],
                              *(check.gradients[k] for k in ("W1", "b1", "W2", "b2"))], ref,
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        e, n = compare(partial(plan.run, feed), partial(mlp_numpy, **feed), seconds)
        rows.append((f"MLP 784-256-10, batch {batch}", e, n, "<= 1.2x"))

    plan, nodes = expression_plan()
    xs, ys = rng.uniform(-2, 2, 1024), rng.uniform(-2, 2, 1024)
    stacked = {"x": xs, "y": ys}
    check = plan.run(stacked, batched=True)
    want = expression_numpy(xs, ys)
    np.testing.assert_allclose(check.outputs[plan.outputs[0]], want[0], rtol=1e-12)
    np.testing.assert_allclose(check.gradients["x"], want[1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(check.gradients["y"], want[2], rtol=1e-9, atol=1e-12)
    e, n = compare(lambda: plan.run(stacked, batched=True), lambda: expression_numpy(xs, ys),
                   seconds)
    rows.append((f"{nodes}-op expression, 1,024 stacked", e, n, "<= 1.2x"))

    one = {"x": 0.7, "y": -1.3}
    x1, y1 = np.float64(0.7), np.float64(-1.3)
    check = plan.run(one)
    want = expression_numpy(x1, y1)
    np.testing.assert_allclose(check.outputs[plan.outputs[0]], want[0], rtol=1e-12)
    np.testing.assert_allclose([check.gradients["x"], check.gradients["y"]], want[1:], rtol=1e-9)
    e, n = compare(lambda: plan.run(one), lambda: expression_numpy(x1, y1), seconds)
    rows.append((f"{nodes}-op expression, one example", e, n,
                 f"{e / nodes * 1e6:.2f} us/node (<= 3)"))

    print(f"{'case':38s} {'engine':>11s} {'numpy':>11s} {'ratio':>7s}  target")
    for name, e, n, target in rows:
        print(f"{name:38s} {e * 1e6:9.1f}us {n * 1e6:9.1f}us {e / n:6.2f}x  {target}")


if __name__ == "__main__":
    main()
