"""The suite's section 1: gradserve's engine against the same forward and backward pass written
by hand in numpy and, when PyTorch is installed, torch.autograd on CPU, on the seed
expressions, the 21-op expression (on one and on 1,024 stacked examples) and an MLP's loss (at
two batch sizes, in float64 and float32). Every result is checked against numpy before it is
timed; the two sides of each pairing alternate in rounds, each keeping its best
(``compare`` of bench/engine_vs_numpy.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from engine_vs_numpy import compare, expression_numpy, mlp_inputs, mlp_numpy, sigmoid

from gradserve.client.workloads import WORKLOADS, expression, mlp
from gradserve.engine import DType, Graph, Plan

# Rounds per engine pairing: more than bench/engine_vs_numpy.py's 6, as one slow spell of this
# shared machine can cover several short rounds, and each side keeps its best.
ENGINE_ROUNDS = 10


def duration(seconds: float) -> str:
    """A time in the unit that suits it (us, ms or s)."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def quadratic_numpy(x: Any) -> tuple[Any, Any]:
    """f(x) = 2x^2 - 3x + 4 and df/dx, by hand."""
    return 2 * x * x - 3 * x + 4, 4 * x - 3


def loss_l_numpy(a: Any, b: Any, c: Any, f: Any) -> tuple[Any, ...]:
    """L = (a*b + c) * f and its gradient, by hand."""
    e = a * b + c
    return e * f, b * f, a * f, f, e


def staged_numpy(x: Any, y: Any) -> tuple[Any, Any, Any]:
    """(x + sigmoid(y)) / (sigmoid(x) + (x + y)^2) and its gradient, by hand, with
    bench/engine_vs_numpy.py's overflow-free sigmoid (the engine's formula)."""
    sx, sy, s = sigmoid(x), sigmoid(y), x + y
    num, den = x + sy, sx + s * s
    dnum, dden = 1 / den, -num / (den * den)
    dx = dnum + dden * (sx * (1 - sx) + 2 * s)
    dy = dnum * sy * (1 - sy) + dden * 2 * s
    return num / den, dx, dy


def torch_forwards(torch: Any) -> dict[str, Callable[..., Any]]:
    """The workloads' forward passes on torch tensors, by workload name. The 21-op expression
    is the very function the engine's graph is built from (torch tensors have the same methods
    as the builder's values); the seeds are written as the workloads write them."""
    def mlp(X: Any, labels: Any, W1: Any, b1: Any, W2: Any, b2: Any) -> Any:
        return torch.nn.functional.cross_entropy((X @ W1 + b1).relu() @ W2 + b2, labels)

    return {
        "quadratic": lambda x: 2 * x**2 - 3 * x + 4,
        "loss-l": lambda a, b, c, f: (a * b + c) * f,
        "staged": lambda x, y: (x + y.sigmoid()) / (x.sigmoid() + (x + y) ** 2),
        "expr21": expression,
        "mlp": mlp,
    }


def torch_call(torch: Any, forward: Callable[..., Any], feed: Mapping[str, Any],
               wrt: Sequence[str]) -> Callable[[], tuple[Any, ...]]:
    """One forward and backward pass of ``forward`` with torch.autograd: the output and the
    gradients of the ``wrt`` inputs (leaf tensors made once, as a training loop holds them)."""
    leaves = {k: torch.tensor(v, requires_grad=k in wrt) for k, v in feed.items()}
    args, targets = list(leaves.values()), [leaves[k] for k in wrt]
    ones = torch.ones_like(forward(*args).detach())

    def run() -> tuple[Any, ...]:
        out = forward(*args)
        return (out, *torch.autograd.grad(out, targets, ones))

    return run


def as_float32(graph: Graph) -> Graph:
    """The graph with its float inputs declared float32: the engine then computes in float32
    end to end."""
    return dataclasses.replace(graph, inputs=tuple(
        dataclasses.replace(i, dtype=DType.FLOAT32) if i.dtype.is_float else i
        for i in graph.inputs))


@dataclass(frozen=True)
class EngineCase:
    """One engine row: a graph, its inputs, and the hand-written numpy function computing the
    same output and gradients (in the order of the differentiated inputs) from those inputs."""

    name: str
    workload: str  # the key of WORKLOADS (and of torch_forwards)
    graph: Graph
    feed: dict[str, Any]
    numpy: Callable[..., tuple[Any, ...]]
    batched: bool = False
    rtol: float = 1e-9
    atol: float = 1e-12
    goal: str = ""  # "numpy": engine/numpy <= 1.2; "node": us per node and torch speed-up

    @property
    def wrt(self) -> list[str]:
        return [i.name for i in self.graph.inputs if i.requires_grad and i.dtype.is_float]


@dataclass(frozen=True)
class EngineRow:
    """Seconds per call: the engine and numpy (best rounds, paired), and torch with the
    engine's time in that pairing (None without torch)."""

    case: EngineCase
    nodes: int
    engine: float
    numpy: float
    torch: tuple[float, float] | None  # (engine, torch)


def engine_cases(rng: np.random.Generator) -> list[EngineCase]:
    """The engine rows: the seeds and the 21-op expression on one example, the expression on
    1,024 stacked examples, the MLP at two batch sizes in float64 and float32."""
    def one(name: str) -> dict[str, Any]:
        return {k: np.float64(v) for k, v in WORKLOADS[name]().inputs(rng, None).items()}

    expr = WORKLOADS["expr21"]().graph
    cases = [
        EngineCase("quadratic 2x^2 - 3x + 4, one example", "quadratic",
                   WORKLOADS["quadratic"]().graph, one("quadratic"), quadratic_numpy),
        EngineCase("L = (a*b + c) * f, one example", "loss-l", WORKLOADS["loss-l"]().graph,
                   one("loss-l"), loss_l_numpy),
        EngineCase("staged sigmoid expression, one example", "staged",
                   WORKLOADS["staged"]().graph, one("staged"), staged_numpy),
        EngineCase("21-op expression, one example", "expr21", expr, one("expr21"),
                   expression_numpy, goal="node"),
        EngineCase("21-op expression, 1,024 stacked", "expr21", expr,
                   WORKLOADS["expr21"]().inputs(rng, 1024), expression_numpy, batched=True,
                   goal="numpy"),
    ]
    for batch in (64, 1024):
        graph, feed = mlp(batch).graph, mlp_inputs(batch, rng)
        cases.append(EngineCase(f"MLP 784-256-10, batch {batch}, float64", "mlp", graph, feed,
                                mlp_numpy, goal="numpy"))
        single = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in feed.items()}
        cases.append(EngineCase(f"MLP 784-256-10, batch {batch}, float32", "mlp",
                                as_float32(graph), single, mlp_numpy, rtol=2e-4, atol=1e-6,
                                goal="numpy"))
    return cases


def check(name: str, got: Sequence[Any], want: Sequence[Any], rtol: float, atol: float) -> None:
    """Fail loudly if a result differs from the numpy reference."""
    assert len(got) == len(want), (name, len(got), len(want))
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                                   err_msg=f"{name}: result {k}")


def engine_section(seconds: float, torch: Any) -> list[EngineRow]:
    """Every engine row, each checked against numpy (and torch against numpy) before timing."""
    rows = []
    forwards = torch_forwards(torch) if torch is not None else {}
    for case in engine_cases(np.random.default_rng(0)):
        plan = Plan(case.graph)
        run_engine = partial(plan.run, case.feed, batched=case.batched)
        run_numpy = partial(case.numpy, *case.feed.values())
        result = run_engine()
        want = run_numpy()
        check(f"engine, {case.name}", [result.outputs[plan.outputs[0]],
                                       *(result.gradients[k] for k in case.wrt)],
              want, case.rtol, case.atol)
        e, n = compare(run_engine, run_numpy, seconds, ENGINE_ROUNDS)
        paired = None
        if torch is not None:
            run_torch = torch_call(torch, forwards[case.workload], case.feed, case.wrt)
            check(f"torch, {case.name}", [t.detach().numpy() for t in run_torch()], want,
                  case.rtol, case.atol)
            paired = compare(run_engine, run_torch, seconds, ENGINE_ROUNDS)
        row = EngineRow(case, len(case.graph.nodes), e, n, paired)
        rows.append(row)
        print(f"  {case.name:42s} engine {duration(e):>10s}  numpy {duration(n):>10s}  "
              f"{e / n:6.2f}x" + (f"  torch {duration(paired[1]):>10s}" if paired else ""),
              flush=True)
    return rows

