"""The plan cache's bounds: plans by count, and their graphs' nodes together."""

from __future__ import annotations

from gradserve.engine import Graph, Limits, structural_key
from gradserve.engine.builder import GraphBuilder
from gradserve.server.plans import PlanCache


def chain(op: str, length: int) -> Graph:
    """x put through ``op`` ``length`` times: ``length`` nodes."""
    g = GraphBuilder()
    v = g.input("x")
    for _ in range(length):
        v = g.op(op, v)
    return g.build(v)


def cached(cache: PlanCache, *graphs: Graph) -> list[bool]:
    return [cache.get(structural_key(g)) is not None for g in graphs]


def test_the_oldest_plans_go_when_the_nodes_pass_the_budget() -> None:
    cache = PlanCache(size=100, limits=Limits(), max_nodes=10)
    a, b, c = chain("neg", 4), chain("sin", 4), chain("cos", 4)
    for g in (a, b):
        cache.compile(g)
    assert cached(cache, a, b) == [True, True] and len(cache) == 2  # 8 nodes
    cache.get(structural_key(a))  # a is now the most recently used
    cache.compile(c)  # 12 nodes: b, the least recently used, goes
    assert cached(cache, a, b, c) == [True, False, True]


def test_a_plan_larger_than_the_budget_is_kept_alone() -> None:
    cache = PlanCache(size=100, limits=Limits(), max_nodes=10)
    small, large = chain("neg", 3), chain("exp", 25)
    cache.compile(small)
    cache.compile(large)
    assert cached(cache, small, large) == [False, True] and len(cache) == 1


def test_the_count_bound_still_holds() -> None:
    cache = PlanCache(size=2, limits=Limits(), max_nodes=1_000)
    graphs = [chain(op, 2) for op in ("neg", "sin", "cos")]
    for g in graphs:
        cache.compile(g)
    assert cached(cache, *graphs) == [False, True, True]
