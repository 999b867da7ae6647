"""A small thread-safe LRU cache, for what is costly to make and worth keeping: a plan's
compiled programs, the server's compiled plans."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from threading import Lock
from typing import Generic, TypeVar, TypeVarTuple

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
Args = TypeVarTuple("Args")


class LRU(Generic[K, V]):
    """At most ``size`` values by key, the least recently used dropped first; with ``weight``,
    also at most ``max_weight`` of it together (the newest value is kept whatever its weight:
    a count alone lets a few of the largest values take all the memory). Safe to share between
    threads; a value is made outside the lock, so a slow one holds up no other lookup."""

    def __init__(self, size: int, weight: Callable[[V], int] | None = None,
                 max_weight: int = 0) -> None:
        self._size = size
        self._weight = weight
        self._max_weight = max_weight
        self._total = 0  # the weight of the values held
        self._values: OrderedDict[K, V] = OrderedDict()
        self._lock = Lock()
        self.hits = 0  # lookups that found their value
        self.misses = 0  # values made because a lookup did not find them

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: K) -> bool:
        """Whether ``key``'s value is held (this is no use of it: its place stays)."""
        with self._lock:
            return key in self._values

    def get(self, key: K) -> V | None:
        """``key``'s value, now the most recently used, if held."""
        with self._lock:
            return self._used(key)

    def get_or_make(self, key: K, make: Callable[[*Args], V], *args: *Args) -> V:
        """``key``'s value: the one held, else ``make(*args)``'s, which is then held (unless
        another thread made one meanwhile, which stays), the least recently used going past
        the bounds."""
        with self._lock:
            value = self._used(key)
        if value is not None:
            return value
        value = make(*args)
        with self._lock:
            self.misses += 1
            if key not in self._values:
                self._values[key] = value
                self._total += self._weigh(value)
            while len(self._values) > self._size or (
                    self._total > self._max_weight and len(self._values) > 1):
                _, dropped = self._values.popitem(last=False)
                self._total -= self._weigh(dropped)
        return value

    def _used(self, key: K) -> V | None:
        """``key``'s value, now the most recently used, if held (the caller holds the lock)."""
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
            self.hits += 1
        return value

    def _weigh(self, value: V) -> int:
        return 0 if self._weight is None else self._weight(value)
