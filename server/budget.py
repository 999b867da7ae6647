"""A stream's budget of bytes: what its answers may hold, being computed or not yet sent.

A ComputeStream's client may send requests faster than it reads the answers, or stop reading.
Each answer's size is known before it is computed (the plan gives its arrays' shapes), so each
request gets a :class:`Ticket` that takes that many bytes from its stream's
:class:`ByteBudget` before the request is computed (it is *admitted*), and gives them back once
the answer is sent. While the budget is spent, nothing more is admitted; and the stream reads
its next request only once the last one read is settled (admitted, or refused), so requests do
not pile up waiting either. An answer larger than the whole budget still runs, alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class ByteBudget:
    """Bytes held against a limit, on one event loop. ``held`` changes are also reported to
    ``changed`` (a gauge of every stream's bytes together)."""

    def __init__(self, limit: int, changed: Callable[[int], None]) -> None:
        self.limit = limit
        self.held = 0
        self._changed = changed
        self._freed = asyncio.Event()

    def ticket(self) -> Ticket:
        """A new request's place in this budget."""
        return Ticket(self)

    async def take(self, size: int) -> None:
        """Hold ``size`` bytes, once they fit (at once when nothing is held)."""
        while self.held and self.held + size > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self._add(size)

    def give(self, size: int) -> None:
        """Give back ``size`` bytes taken before."""
        self._add(-size)
        self._freed.set()

    def close(self) -> None:
        """The stream ended: what it still held is let go."""
        self._add(-self.held)

    def _add(self, size: int) -> None:
        self.held += size
        self._changed(size)


class Ticket:
    """One request's bytes in its stream's budget: taken when it is admitted, given back
    when its answer is sent (or it fails)."""

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self._size = 0
        self.settled = asyncio.Event()  # admitted, or refused before it was

    async def take(self, size: int) -> None:
        """Admit the request, holding ``size`` bytes (waiting for room)."""
        await self._budget.take(size)
        self._size = size
        self.settled.set()

    def give(self) -> None:
        """Give back what this holds."""
        self._budget.give(self._size)
        self._size = 0
