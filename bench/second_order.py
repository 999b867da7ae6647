"""Beyond the gradient, timed: Hessian-vector products against one gradient, JVPs against one
forward pass, and both against torch.func, side by side in one run.

Run: ``python bench/second_order.py`` (``--quick`` for a short smoke run). One thread each
(torch and BLAS), float32 for the models, float64 for the 21-op expression:

- the 21-op scalar expression, 1,024 examples stacked (HVP and JVP with respect to x and y);
- an MLP 784-256-10 with softmax cross-entropy (mean) over 64 rows, with respect to every
  weight;
- the LeNet CNN of client/networks.py at batch 64 (the sum of its logits), with respect to
  every weight.

Each row's figures are checked before timing: the engine's HVP and JVP against torch.func's
(``jvp``, and ``jvp`` of ``grad`` for the HVP). Targets: HVP at most 3x one gradient and JVP
at most 2x one forward pass (the engine against itself), and at most 1.5x torch.func's time
on the MLP and the CNN. Each side's best round of alternating rounds counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from gradserve.client import networks
from gradserve.client.workloads import WORKLOADS
from gradserve.engine import DType, Graph, Plan
from gradserve.engine.builder import GraphBuilder
from gradserve.engine.derivatives import Kind, derive
from gradserve.importer import import_model

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from models import fixed_batch
from torch_models import initializers, lenet, weight_names

Arrays = dict[str, Any]
RTOL = 1e-3  # float32 second derivatives through two passes


@dataclass
class Case:
    """One model: its graph, its feed, the inputs differentiated, and the same function in
    torch (a scalar of the differentiated inputs, or None where torch is not raced)."""

    name: str
    graph: Graph
    feed: Arrays
    wrt: list[str]
    batch: int | None
    torch_fn: Callable[..., Any] | None


def expression_case() -> Case:
    workload = WORKLOADS["expr21"]()
    feed = workload.inputs(np.random.default_rng(0), 1024)
    return Case("21-op expression, 1,024 stacked", workload.graph, feed, ["x", "y"], 1024, None)


def mlp_case(torch: Any) -> Case:
    rng = np.random.default_rng(1)
    g = GraphBuilder()
    x = g.constant(rng.standard_normal((64, 784)).astype(np.float32), DType.FLOAT32, "X")
    labels = g.constant(rng.integers(0, 10, 64), DType.INT64, "labels")
    w1, b1 = g.input("W1", (784, 256), DType.FLOAT32), g.input("b1", (256,), DType.FLOAT32)
    w2, b2 = g.input("W2", (256, 10), DType.FLOAT32), g.input("b2", (10,), DType.FLOAT32)
    loss = g.op("softmax_cross_entropy", (x @ w1 + b1).relu() @ w2 + b2, labels)
    feed = {"W1": (rng.standard_normal((784, 256)) * 0.05).astype(np.float32),
            "b1": np.zeros(256, np.float32),
            "W2": (rng.standard_normal((256, 10)) * 0.05).astype(np.float32),
            "b2": np.zeros(10, np.float32)}
    graph = g.build(loss)
    consts = {c.name: c.value for c in graph.constants}
    tx, tl = torch.tensor(consts["X"]), torch.tensor(consts["labels"])

    def fn(w1: Any, b1: Any, w2: Any, b2: Any) -> Any:
        f = torch.nn.functional
        return f.cross_entropy(f.relu(tx @ w1 + b1) @ w2 + b2, tl)

    return Case("MLP 784-256-10, 64 rows, float32", graph, feed, list(feed), None, fn)


def cnn_case(torch: Any) -> Case:
    model = networks.cnn()
    names = weight_names(model)
    graph = import_model(fixed_batch(model, 64).SerializeToString(), inputs=names).graph
    weights = initializers(model)
    x = np.random.default_rng(2).standard_normal((64, 1, 28, 28)).astype(np.float32)
    feed = {"x": x, **{n: weights[n] for n in names}}
    tx = torch.tensor(x)

    def fn(*ws: Any) -> Any:
        return lenet(torch, dict(zip(names, ws, strict=True)), tx).sum()

    return Case("LeNet CNN, batch 64, float32", graph, feed, names, None, fn)


def best(fn: Callable[[], object], seconds: float) -> float:
    """Seconds per call: the best of calls repeated for about ``seconds``."""
    fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@dataclass
class Row:
    name: str
    forward: float
    gradient: float
    jvp: float
    hvp: float
    torch_jvp: float | None
    torch_hvp: float | None


def measure(case: Case, torch: Any, seconds: float) -> Row:
    rng = np.random.default_rng(3)
    batched = case.batch is not None
    plan = Plan(case.graph)
    out = case.graph.outputs[0]
    v = {n: rng.standard_normal(np.shape(case.feed[n])).astype(case.feed[n].dtype)
         for n in case.wrt}
    jvp_d, hvp_d = (derive(case.graph, kind, case.wrt) for kind in (Kind.JVP, Kind.HVP))
    jvp_plan, hvp_plan = Plan(jvp_d.graph), Plan(hvp_d.graph)
    jvp_run = jvp_d.feed(case.feed, {}, v, case.batch, 1 << 30)
    hvp_run = hvp_d.feed(case.feed, {}, v, case.batch, 1 << 30)

    def forward() -> Any:
        return plan.run(case.feed, wrt=[], batched=batched)

    def gradient() -> Any:
        return plan.run(case.feed, wrt=case.wrt, batched=batched)

    def jvp() -> Any:
        return jvp_plan.run(jvp_run.inputs, wrt=[], batched=batched)

    def hvp() -> Any:
        return hvp_plan.run(hvp_run.inputs, wrt=hvp_run.wrt, upstream=hvp_run.upstream,
                            batched=batched)

    torch_jvp = torch_hvp = None
    if case.torch_fn is not None:
        func = torch.func
        primals = tuple(torch.tensor(case.feed[n]) for n in case.wrt)
        tangents = tuple(torch.tensor(v[n]) for n in case.wrt)
        argnums = tuple(range(len(primals)))
        fn = case.torch_fn

        def t_jvp() -> Any:
            return func.jvp(fn, primals, tangents)

        def t_hvp() -> Any:
            return func.jvp(func.grad(fn, argnums=argnums), primals, tangents)[1]

        ours_j = jvp_d.answer(jvp(), case.batch).jvp[out]  # the CNN's per logit: summed
        np.testing.assert_allclose(np.sum(ours_j), t_jvp()[1].numpy(), rtol=RTOL, atol=1e-3)
        ours_h = hvp_d.answer(hvp(), case.batch).hvp
        for n, theirs in zip(case.wrt, t_hvp(), strict=True):
            np.testing.assert_allclose(ours_h[n], theirs.numpy(), rtol=RTOL, atol=1e-4,
                                       err_msg=n)
        torch_jvp, torch_hvp = best(t_jvp, seconds), best(t_hvp, seconds)
    return Row(case.name, best(forward, seconds), best(gradient, seconds), best(jvp, seconds),
               best(hvp, seconds), torch_jvp, torch_hvp)


def verdict(value: float, bound: float) -> str:
    return "met" if value <= bound else f"missed by {value / bound - 1:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    seconds = 0.2 if args.quick else 1.5
    import torch

    torch.set_num_threads(1)
    with threadpool_limits(1):
        cases = [expression_case(), mlp_case(torch), cnn_case(torch)]
        rows = [measure(case, torch, seconds) for case in cases]
    print(f"bench/second_order.py{' --quick' if args.quick else ''}: best of about "
          f"{seconds} s per figure; one thread (torch and BLAS)")
    print(f"  {'case':36s} {'forward':>9s} {'gradient':>9s} {'jvp':>9s} {'hvp':>9s} "
          f"{'jvp/fwd':>8s} {'hvp/grad':>8s} {'jvp/torch':>9s} {'hvp/torch':>9s}")
    targets = []
    for r in rows:
        jt = "-" if r.torch_jvp is None else f"{r.jvp / r.torch_jvp:.2f}x"
        ht = "-" if r.torch_hvp is None else f"{r.hvp / r.torch_hvp:.2f}x"
        print(f"  {r.name:36s} {r.forward * 1e3:7.2f}ms {r.gradient * 1e3:7.2f}ms "
              f"{r.jvp * 1e3:7.2f}ms {r.hvp * 1e3:7.2f}ms {r.jvp / r.forward:7.2f}x "
              f"{r.hvp / r.gradient:7.2f}x {jt:>9s} {ht:>9s}")
        targets.append((f"JVP / forward, {r.name}", r.jvp / r.forward, 2.0))
        targets.append((f"HVP / gradient, {r.name}", r.hvp / r.gradient, 3.0))
        if r.torch_jvp is not None and r.torch_hvp is not None:
            targets.append((f"JVP / torch.func, {r.name}", r.jvp / r.torch_jvp, 1.5))
            targets.append((f"HVP / torch.func, {r.name}", r.hvp / r.torch_hvp, 1.5))
    print("targets")
    for name, value, bound in targets:
        print(f"  {name:60s} {value:6.2f}x  <= {bound:.1f}x  {verdict(value, bound)}")


if __name__ == "__main__":
    main()
