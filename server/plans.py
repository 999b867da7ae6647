"""The plan cache: compiled plans by structural key, least recently used dropped first.

Registered graphs live here too: a graph's id is its structural key, so registering the same
graph twice gives the same id, and a request carrying a whole graph reuses the registered plan.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from gradserve.engine import Cancelled, Graph, Limits, Plan, structural_key


class PlanCache:
    """A thread-safe LRU of compiled plans, bounded in plans and in their graphs' nodes
    together: a plan's memory grows with its nodes (about 2 KB each), so a count alone would
    let a few hundred of the largest graphs take gigabytes."""

    def __init__(self, size: int, limits: Limits, max_nodes: int) -> None:
        self._size = size
        self._max_nodes = max_nodes
        self._nodes = 0  # in the cached graphs, together
        self._limits = limits
        self._plans: OrderedDict[str, tuple[Plan, Graph]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # lookups that found the plan compiled
        self.misses = 0  # plans compiled because they were not here

    def __len__(self) -> int:
        return len(self._plans)

    def compile(self, graph: Graph, cancelled: Cancelled | None = None) -> Plan:
        """The plan for ``graph``, compiled now unless cached (raises EngineError; a CANCELLED
        one once ``cancelled()`` is true)."""
        key = structural_key(graph)
        entry = self.get(key)
        if entry is not None:
            return entry[0]
        plan = Plan(graph, self._limits, cancelled)  # outside the lock: may take a while
        with self._lock:
            self.misses += 1
            if key not in self._plans:  # another thread may have compiled it meanwhile
                self._plans[key] = (plan, graph)
                self._nodes += len(graph.nodes)
            while len(self._plans) > self._size or (
                    self._nodes > self._max_nodes and len(self._plans) > 1):
                _, (_, dropped) = self._plans.popitem(last=False)
                self._nodes -= len(dropped.nodes)
        return plan

    def get(self, key: str) -> tuple[Plan, Graph] | None:
        """The cached plan with this key (a registered graph's id) and its graph, if here."""
        with self._lock:
            entry = self._plans.get(key)
            if entry is not None:
                self._plans.move_to_end(key)
                self.hits += 1
            return entry
