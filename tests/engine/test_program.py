"""Generated programs: nothing a client writes becomes source, huge graphs compile in parts that
compute what one function would, errors name their node, and a cancelled run stops between
steps and lets go of its memory at once."""

from __future__ import annotations

import math
import re
import tracemalloc
from typing import Any

import numpy as np
import pytest

from gradserve.engine import (
    Constant,
    DType,
    EngineError,
    ErrorKind,
    Graph,
    Input,
    Node,
    Plan,
    gradcheck,
)
from gradserve.engine import program as program_module
from gradserve.engine.builder import GraphBuilder

HOSTILE = [
    "__import__('os').system('true')",
    'a"b\'c',
    "x\ny\r\n# comment",
    "π·ü∑\u202e",
    ")); import os; ((",
    "\\",
    "r3",  # a register's name
    "check",
    "R[0]",
]
CLEAN = ["x", "y", "k", "h", "z", "t", "s", "u", "out"]


def mixed(names: list[str], axis: int, shift: float) -> Graph:
    """A graph with a step of every kind: formulas and functions, an op with an attribute, a
    constant, fan-out, and broadcasting that pads an operand in batched runs."""
    x, y, k, h, z, t, s, u, out = names
    return Graph(
        (Input(x, (3,)), Input(y, (3, 3))),
        (Node(h, "mul", (x, y)),  # x broadcasts against y's rows
         Node(z, "sigmoid", (h,)),  # a function
         Node(t, "tanh", (z,)),  # a formula
         Node(s, "sum", (t,), {"axis": (axis,)}),  # an attribute
         Node(u, "add", (s, s)),  # fan-out
         Node(out, "sub", (u, k))),  # a constant
        (out,),
        (Constant(k, np.array(shift)),),
    )


def source(graph: Graph) -> tuple[str, ...]:
    plan = Plan(graph)
    return plan.program(plan.default_wrt).source


def test_hostile_names_attributes_and_constants_give_byte_identical_source() -> None:
    clean = source(mixed(CLEAN, 0, 1.0))
    assert source(mixed(HOSTILE, 1, -1e300)) == clean
    # and the source is what the templates make: registers, numbered rules, numpy, the checks
    words = set(re.findall(r"[^\W\d]\w*", "".join(clean)))
    allowed = re.compile(r"(r|f|d|a)\d+(_\d+)?|R|B|def|chunk|check|clock|fit|np|tanh")
    assert {w for w in words if not allowed.fullmatch(w)} == set()
    assert not set("".join(clean)) - set("abcdefghijklmnopqrstuvwxyzRB0123456789_ ()[]=+-*/.,:\n")


def test_a_hostile_named_graph_computes_what_finite_differences_say() -> None:
    graph = mixed(HOSTILE, 1, 0.5)
    rng = np.random.default_rng(1)
    inputs = {HOSTILE[0]: rng.normal(size=3), HOSTILE[1]: rng.normal(size=(3, 3))}
    report = gradcheck(graph, inputs)
    assert report.ok, report
    out = Plan(graph).run(inputs).outputs[HOSTILE[-1]]
    t = np.tanh(1 / (1 + np.exp(-(inputs[HOSTILE[0]] * inputs[HOSTILE[1]]))))
    np.testing.assert_allclose(out, 2 * t.sum(axis=1) - 0.5, rtol=1e-12)


@pytest.mark.parametrize("lines", [program_module.CHUNK_LINES, 3])  # one part, or many
def test_a_listing_names_each_lines_node_beside_the_source_that_runs(
        monkeypatch: pytest.MonkeyPatch, lines: int) -> None:
    monkeypatch.setattr(program_module, "CHUNK_LINES", lines)
    plan = Plan(mixed(HOSTILE, 1, 0.5))
    program = plan.program(plan.default_wrt)
    text = "".join(program.source).splitlines()
    listing = program.listing().splitlines()
    assert len(listing) == len(text)  # a name's line breaks are quoted, not written
    code, _, names = zip(*(line.partition("  # ") for line in listing), strict=True)
    assert [line.rstrip() for line in code] == text
    nodes = HOSTILE[3:]  # h, z, t, s, u, out: every node has lines
    assert set(names) - {""} == {repr(name) for name in nodes}
    tanh = [line for line in listing if line.endswith(f"# {HOSTILE[5]!r}")]
    assert "np.tanh(" in tanh[0]  # its forward line, then its gradient's
    assert program.source == source(mixed(CLEAN, 1, 0.5))  # what runs names no node


def chain(n: int) -> tuple[Graph, str]:
    """y_{k+1} = tanh(y_k) * c + x: n steps of three nodes over a batch-padded x."""
    g = GraphBuilder()
    x = g.input("x", (2,))
    c = g.input("c", ())
    y = x
    for _ in range(n):
        y = y.tanh() * c + x
    out = y.sum()
    return g.build(out), out.name


def chain_oracle(x: np.ndarray[Any, Any], c: float, n: int) -> tuple[float, Any, float]:
    """The chain's value and gradients, forward mode by hand: dy/dx and dy/dc carried along."""
    y, dx, dc = x.copy(), np.ones_like(x), np.zeros_like(x)
    for _ in range(n):
        d = 1 - np.tanh(y) ** 2
        y, dx, dc = np.tanh(y) * c + x, d * dx * c + 1, d * dc * c + np.tanh(y)
    return float(y.sum()), dx, float(dc.sum())


@pytest.mark.parametrize("lines", [3, 7, 64])
def test_a_program_split_into_parts_computes_what_the_hand_derivation_says(
        monkeypatch: pytest.MonkeyPatch, lines: int) -> None:
    monkeypatch.setattr(program_module, "CHUNK_LINES", lines)
    graph, out = chain(40)
    plan = Plan(graph)
    assert len(plan.program(plan.default_wrt).source) > 1
    x, c = np.array([0.3, -0.8]), 0.9
    result = plan.run({"x": x, "c": c})
    value, dx, dc = chain_oracle(x, c, 40)
    assert float(result.outputs[out]) == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(result.gradients["x"], dx, rtol=1e-10)
    assert float(result.gradients["c"]) == pytest.approx(dc, rel=1e-10)
    # batched, the same parts run every example as if alone
    xs, cs = np.array([[0.3, -0.8], [1.5, 0.1]]), np.array([0.9, -0.4])
    batched = plan.run({"x": xs, "c": cs}, batched=True)
    for k in range(2):
        value, dx, dc = chain_oracle(xs[k], float(cs[k]), 40)
        assert float(batched.outputs[out][k]) == pytest.approx(value, rel=1e-12)
        np.testing.assert_allclose(batched.gradients["x"][k], dx, rtol=1e-10)
        assert float(batched.gradients["c"][k]) == pytest.approx(dc, rel=1e-10)


def test_an_op_refusing_a_value_in_a_later_part_names_its_node(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(program_module, "CHUNK_LINES", 4)
    g = GraphBuilder()
    logits = g.input("logits", (3,))
    label = g.input("label", (), DType.INT64)
    y = logits
    for _ in range(10):
        y = y.tanh()
    loss = g.op("softmax_cross_entropy", y, label, name="the_loss")
    plan = Plan(g.build(loss))
    assert len(plan.program(plan.default_wrt).source) > 2
    with pytest.raises(EngineError) as caught:
        plan.run({"logits": np.zeros(3), "label": 7})
    assert caught.value.kind is ErrorKind.VALUE
    assert caught.value.node == "the_loss"
    assert caught.value.__context__ is None and caught.value.__cause__ is None


# --- cancellation and time limits ------------------------------------------------------------

STEPS = 64  # tanh steps over WIDTH elements: a check after every step
WIDTH = 100_000  # 800 kB a value


def wide_chain_graph() -> Graph:
    g = GraphBuilder()
    y = g.input("x", (WIDTH,))
    for _ in range(STEPS):
        y = y.tanh()
    return g.build(y.sum())


def wide_chain() -> Plan:
    return Plan(wide_chain_graph())


@pytest.mark.parametrize("lines", [program_module.CHUNK_LINES, 10])  # one part, or many
def test_a_cancelled_run_stops_at_the_next_check_and_frees_its_memory(
        monkeypatch: pytest.MonkeyPatch, lines: int) -> None:
    monkeypatch.setattr(program_module, "CHUNK_LINES", lines)
    plan = wide_chain()
    feed = plan.prepare({"x": np.linspace(-1, 1, WIDTH)})
    plan.program(feed.wrt)  # compiled before memory is measured
    asked: list[int] = []

    def cancelled() -> bool:
        asked.append(tracemalloc.get_traced_memory()[0])
        return len(asked) == 10  # the caller goes away while the forward pass is under way

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with pytest.raises(EngineError) as caught:
            feed.run(cancelled=cancelled)
        held = tracemalloc.get_traced_memory()[0] - before  # the error is still alive here
    finally:
        tracemalloc.stop()
    assert caught.value.kind is ErrorKind.CANCELLED
    assert len(asked) == 10, "the run went on asking after it was cancelled"
    assert asked[-1] - before > 5 * 8 * WIDTH  # it held several values when it stopped
    assert held < 8 * WIDTH, f"{held} bytes still held after the run stopped"
    # and the same feed, not cancelled, runs to the end
    x = np.linspace(-1, 1, WIDTH)
    slopes = feed.run(cancelled=lambda: False).gradients["x"]
    for i in (0, WIDTH // 3, WIDTH - 1):
        assert slopes[i] == pytest.approx(chain_slope(float(x[i])), rel=1e-12)


def chain_slope(x: float) -> float:
    """d/dx tanh(tanh(...tanh(x))), STEPS deep, by the chain rule."""
    slope = 1.0
    for _ in range(STEPS):
        slope *= 1 - math.tanh(x) ** 2
        x = math.tanh(x)
    return slope


def test_a_check_follows_every_large_step_and_every_few_small_ones() -> None:
    calls: list[None] = []

    def count() -> bool:
        calls.append(None)
        return False

    plan = wide_chain()
    plan.program(plan.default_wrt)  # compiled first: compiling checks too, once a step
    plan.run({"x": np.zeros(WIDTH)}, cancelled=count)
    # one before the first step, one after each of the 64 forward and 64 backward steps
    # (the sum's two are over the element count too)
    assert len(calls) == 1 + 2 * (STEPS + 1)
    calls.clear()
    graph, _ = chain(16)  # 49 small steps forward, 49 back: a check every 16
    small = Plan(graph)
    small.program(small.default_wrt)
    small.run({"x": np.zeros(2), "c": 1.0}, cancelled=count)
    assert len(calls) == 1 + (49 + 49) // 16


def cancelled_after(calls: int) -> tuple[list[None], Any]:
    """A ``cancelled`` that turns true at its ``calls``-th call, and the list of its calls."""
    asked: list[None] = []

    def cancelled() -> bool:
        asked.append(None)
        return len(asked) >= calls

    return asked, cancelled


@pytest.mark.parametrize("calls", [1, 50, 150])  # validating, building the steps, compiling
def test_a_cancelled_compile_stops_at_its_next_check(calls: int) -> None:
    graph = wide_chain_graph()
    asked, cancelled = cancelled_after(calls)
    with pytest.raises(EngineError) as caught:
        Plan(graph, cancelled=cancelled).program(frozenset({0}), cancelled=cancelled)
    assert caught.value.kind is ErrorKind.CANCELLED
    assert len(asked) == calls, "the compile went on asking after it was cancelled"


def test_a_cancelled_gradient_check_stops_at_its_next_check() -> None:
    g = GraphBuilder()
    x = g.input("x", (50,))
    asked, cancelled = cancelled_after(100)  # the compile's checks, then some of its runs
    with pytest.raises(EngineError) as caught:
        gradcheck(g.build((x * x).sum()), {"x": np.ones(50)}, cancelled=cancelled)
    assert caught.value.kind is ErrorKind.CANCELLED
    assert len(asked) == 100
