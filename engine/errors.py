"""The engine's one exception type: what went wrong, where, and in which field.

Every problem the engine can report (a malformed graph, a feed that does not match the plan, a
value an op cannot take) is an :class:`EngineError`. Its ``kind`` lets a server map it to a
status code without parsing messages; ``node`` and ``field`` say where the problem is.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

Cancelled = Callable[[], bool]  # whether the work's caller went away: the rest is wasted


class ErrorKind(StrEnum):
    """What class of problem an :class:`EngineError` reports."""

    UNKNOWN_OP = "unknown_op"
    NAME = "name"  # a name too long
    UNKNOWN_NAME = "unknown_name"
    DUPLICATE_NAME = "duplicate_name"
    CYCLE = "cycle"
    ARITY = "arity"
    ATTRIBUTE = "attribute"
    SHAPE = "shape"
    DTYPE = "dtype"
    LIMIT = "limit"
    FEED = "feed"
    VALUE = "value"
    CANCELLED = "cancelled"
    ORDER = "order"  # a derivative an op does not have (beyond the first)


class EngineError(ValueError):
    """A problem with a graph, its inputs, or a value an op cannot take.

    ``node`` names the graph node (or input, constant, output) at fault, when there is one;
    ``field`` names the part of it (``"attrs.axis"``, ``"inputs[1]"``, ``"shape"``).
    """

    def __init__(
        self, kind: ErrorKind, message: str, *, node: str | None = None, field: str | None = None
    ) -> None:
        self.kind = kind
        self.node = node
        self.field = field
        self.message = message
        where = f"{node}: " if node is not None else ""
        super().__init__(f"{where}{message}")


def check_cancelled(cancelled: Cancelled | None) -> None:
    """Raise a CANCELLED error once ``cancelled()`` is true. Long work (a run, a compile, a
    gradient check) calls this between its steps, so work nobody wants any more stops soon."""
    if cancelled is not None and cancelled():
        raise EngineError(ErrorKind.CANCELLED, "the work was cancelled: nobody wants its result")
