"""The plan cache: compiled plans by structural key, least recently used dropped first.

Registered graphs live here too: a graph's id is its structural key, so registering the same
graph twice gives the same id, and a request carrying a whole graph reuses the registered plan.
"""

from __future__ import annotations

from gradserve.engine import Cancelled, Graph, Limits, Plan, structural_key
from gradserve.engine.cache import LRU


class PlanCache:
    """A thread-safe LRU of compiled plans, bounded in plans and in their graphs' nodes
    together: a plan's memory grows with its nodes (about 2 KB each), so a count alone would
    let a few hundred of the largest graphs take gigabytes."""

    def __init__(self, size: int, limits: Limits, max_nodes: int) -> None:
        self._limits = limits
        self._plans: LRU[str, tuple[Plan, Graph]] = LRU(
            size, weight=lambda entry: len(entry[1].nodes), max_weight=max_nodes)

    @property
    def hits(self) -> int:
        """Lookups that found the plan compiled."""
        return self._plans.hits

    @property
    def misses(self) -> int:
        """Plans compiled because they were not here."""
        return self._plans.misses

    def __len__(self) -> int:
        return len(self._plans)

    def compile(self, graph: Graph, cancelled: Cancelled | None = None) -> Plan:
        """The plan for ``graph``, compiled now unless cached (raises EngineError; a CANCELLED
        one once ``cancelled()`` is true)."""
        plan, _ = self._plans.get_or_make(
            structural_key(graph), lambda: (Plan(graph, self._limits, cancelled), graph))
        return plan

    def get(self, key: str) -> tuple[Plan, Graph] | None:
        """The cached plan with this key (a registered graph's id) and its graph, if here."""
        return self._plans.get(key)
