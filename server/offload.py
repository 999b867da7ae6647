"""Work a request starts off the event loop, and how it stops once nobody wants it.

A :class:`Caller` says whether a request's result is still wanted: its client has not gone
(cancelled, or gRPC ended the call at its deadline), its deadline has not passed, and the server
has not halted (its grace period is over). Every long piece of work a request starts (compiling
its graph, decoding large tensors, an engine pass, a gradient check) asks between its steps and
stops once it is not.

:class:`OffLoop` runs such work on threads of its own, so the loop goes on serving meanwhile;
it counts what runs, so a shutdown can halt it all and wait for it within its grace period.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
POLL = 0.01  # seconds between two looks at whether the threads are done, on shutdown


class Caller:
    """Who asked for some work, as the work sees them (thread-safe to ask): ``abandoned()``
    once they left, their ``deadline`` (time.monotonic()) passed, or ``halted`` is set."""

    __slots__ = ("_halted", "_left", "deadline")

    def __init__(self, deadline: float | None = None,
                 halted: threading.Event | None = None) -> None:
        self.deadline = deadline
        self._halted = halted
        self._left = False

    def leave(self) -> None:
        """The caller went away: what it started stops at its next check."""
        self._left = True

    def abandoned(self) -> bool:
        return (self._left or (self.deadline is not None and time.monotonic() > self.deadline)
                or (self._halted is not None and self._halted.is_set()))


class OffLoop:
    """Threads for work too long to do on the event loop (compiles, decodes and encodes of
    large messages, gradient checks): :meth:`run` awaits a function on one of them."""

    def __init__(self, threads: int) -> None:
        self.halted = threading.Event()  # set by halt(): every Caller made here is abandoned
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="gradserve-offloop")
        self._running = 0
        self._lock = threading.Lock()

    def caller(self, deadline: float | None) -> Caller:
        """A caller with ``deadline`` whose work stops when this halts."""
        return Caller(deadline, self.halted)

    async def run(self, caller: Caller, work: Callable[P, T], *args: P.args,
                  **kwargs: P.kwargs) -> T:
        """``work(*args, **kwargs)`` on a thread. If the awaiting task is cancelled (its client
        went away), ``caller`` leaves, so work that checks it stops soon."""
        with self._lock:
            self._running += 1
        try:
            done = self._pool.submit(work, *args, **kwargs)
        except BaseException:
            self._finished()
            raise
        done.add_done_callback(self._finished)  # run, failed, or cancelled before it started
        try:
            return await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            caller.leave()
            raise

    def _finished(self, done: object = None) -> None:
        with self._lock:
            self._running -= 1

    @property
    def running(self) -> int:
        """Pieces of work on the threads now."""
        return self._running

    def halt(self) -> None:
        """Abandon every caller's work, drop what has not started, and take no more."""
        self.halted.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def join(self, timeout: float) -> bool:
        """After :meth:`halt`: wait up to ``timeout`` seconds for the work still running to
        stop; whether it all did."""
        end = time.monotonic() + timeout
        while self._running and time.monotonic() < end:
            await asyncio.sleep(POLL)
        return not self._running
