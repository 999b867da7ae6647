"""Dynamic batching: concurrent requests for the same plan run as one stacked engine pass.

Requests wait in a bounded queue, grouped by what may share a pass (the plan's structural key
and the inputs to differentiate). The oldest group's requests are taken, up to
``max_batch_size`` examples, stacked on the batch axis, run through the plan once, and each
request gets its own slice. A group waits for more requests, never longer than
``max_queue_delay``, only while its :class:`~gradserve.server.patience.Patience` says waiting
pays (without one, it waits out the whole delay, as Triton's and TF Serving's batchers do).
A request whose deadline passed or whose client cancelled is dropped before it is computed,
and a pass stops between steps once none of its requests is wanted.

The batcher lives on the server's event loop. A small pass runs right there: handing it to a
thread would cost more than it takes. A larger one runs on one of ``threads`` engine threads,
so the loop goes on serving calls while it computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from gradserve.engine import EngineError, ErrorKind, Feed, Result, Timer
from gradserve.server.metrics import PassReport
from gradserve.server.offload import Caller
from gradserve.server.patience import Patience

log = logging.getLogger("gradserve.server")


class QueueFullError(Exception):
    """The queue holds ``max_queue_size`` requests: busy, back off."""


class ClosedError(Exception):
    """The batcher is shutting down and takes no new requests."""


class ExpiredError(Exception):
    """The request's deadline passed while it was queued; it was not computed."""


def _new_future() -> asyncio.Future[Result]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class Job:
    """One request: its checked feed and options, who asked for it, and the future they await
    (made on the running event loop)."""

    feed: Feed
    caller: Caller = field(default_factory=Caller)
    keep_intermediates: bool = False  # such a request runs alone
    time_limit: float | None = None  # seconds an engine run may take
    arrived: float = field(default_factory=time.monotonic)
    future: asyncio.Future[Result] = field(default_factory=_new_future)

    @property
    def key(self) -> Hashable:
        """Requests with equal keys may be stacked into one engine pass."""
        if self.keep_intermediates:
            return id(self)
        return (self.feed.plan.key, self.feed.wrt)

    @property
    def size(self) -> int:
        """The examples it holds."""
        return 1 if self.feed.batch is None else self.feed.batch

    def abandoned(self) -> bool:
        """Whether the result is no longer wanted: the handler awaiting the future was
        cancelled (by the client, or by gRPC at the deadline or on shutdown), or the caller
        abandoned it. Safe to ask from an engine thread: it only reads."""
        return self.future.done() or self.caller.abandoned()

    def run(self, timer: Timer | None = None) -> Result:
        """Compute this request on its own (stopping early once it is abandoned)."""
        return self.feed.run(keep_intermediates=self.keep_intermediates,
                             time_limit=self.time_limit, cancelled=self.abandoned, timer=timer)


BatchHook = Callable[[PassReport], None]  # told of every pass
Outcome = Result | Exception


class Batcher:
    """Queues :class:`Job` s and computes them in stacked batches, on the running event loop
    (all methods but the constructor are called there).

    A pass of at most ``inline_max_elements`` elements (examples times the plan's elements per
    example) runs inline; a larger one waits for one of ``threads`` engine threads. Groups are
    served in turn, so a graph that always has requests queued cannot starve another.
    """

    def __init__(self, *, max_batch_size: int, max_queue_delay: float, max_queue_size: int,
                 threads: int, inline_max_elements: int, patience: Patience | None = None,
                 on_batch: BatchHook | None = None) -> None:
        self._max_batch = max_batch_size
        self._delay = max_queue_delay
        self._patience = patience
        self._max_queue = max_queue_size
        self._inline_max = inline_max_elements
        self._on_batch = on_batch
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="gradserve-engine")
        self._slots = threads
        self._free = threads
        self._pending: OrderedDict[Hashable, deque[Job]] = OrderedDict()
        self._queued = 0
        self._dispatching: asyncio.Handle | None = None
        self._dispatch_at = 0.0  # loop time the scheduled dispatch runs at
        self._closed = False
        self._idle = asyncio.Event()  # nothing queued and no pass on a thread
        self._idle.set()

    @property
    def queued(self) -> int:
        """Requests waiting for their engine pass."""
        return self._queued

    def submit(self, job: Job) -> asyncio.Future[Result]:
        """Queue ``job``: QueueFullError when the queue is full, ClosedError once closing."""
        if self._closed:
            raise ClosedError
        if self._queued >= self._max_queue:
            raise QueueFullError
        group = self._pending.setdefault(job.key, deque())
        group.append(job)
        self._queued += 1
        self._idle.clear()
        if self._patience is not None:
            self._patience.arrived(job.arrived)
        if not (self._dispatching is not None and self._filling(group) and (
                self._patience is None or not self._patience.enough(len(group)))):
            self._schedule()  # else the dispatch already due comes no later than needed
        return job.future

    def withdraw(self, job: Job) -> None:
        """Drop ``job`` from the queue if it is still there (its caller went away: cancelled,
        or out of time), so it holds no place a new request could have."""
        group = self._pending.get(job.key)
        if group is not None and job in group:
            group.remove(job)
            self._queued -= 1
            if not group:
                del self._pending[job.key]
            self._check_idle()

    def close(self) -> None:
        """Take no new requests, and stop waiting out queue delays: what is queued runs now."""
        self._closed = True
        self._schedule()

    async def join(self) -> None:
        """After :meth:`close`: wait until the queued requests are computed and no pass is
        running, then stop the engine threads."""
        await self._idle.wait()
        self._threads.shutdown(wait=True)

    def abandon(self) -> None:
        """After :meth:`close`, when waiting is over: stop the engine threads without waiting
        for the passes they run (each is bounded by its time limit)."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    @property
    def running(self) -> int:
        """Passes computing on engine threads."""
        return self._slots - self._free

    def fits_inline(self, elements: int) -> bool:
        """Whether work on this many elements is small enough to do on the loop (a pass, or
        decoding and encoding a request's values)."""
        return elements <= self._inline_max

    # --- dispatching ----------------------------------------------------------------------

    def _filling(self, group: deque[Job]) -> bool:
        """Whether the group may wait for more requests: a queue delay is set, the batcher is
        not closing, and the group holds less than a full batch."""
        return (bool(self._delay) and not self._closed and
                sum(j.size for j in group) < self._max_batch)

    def _schedule(self, delay: float = 0.0) -> None:
        """Dispatch once the loop has run what is ready (requests arriving in the same turn
        join the batch), or after ``delay`` seconds; an earlier dispatch replaces a later."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        if self._dispatching is not None:
            if self._dispatch_at <= when:
                return
            self._dispatching.cancel()
        self._dispatch_at = when
        self._dispatching = (loop.call_soon(self._dispatch) if delay <= 0 else
                             loop.call_at(when, self._dispatch))

    def _dispatch(self) -> None:
        """Start passes for the queued groups in turn, one batch per group per round, while
        any may start (a group waiting out its queue delay, or for a free engine thread, lets
        the others go)."""
        self._dispatching = None
        started = True
        while started:
            started = False
            for key in list(self._pending):
                group = self._pending.get(key)
                if group and self._start(key, group):
                    started = True
        self._check_idle()

    def _start(self, key: Hashable, group: deque[Job]) -> bool:
        """Start the group's next pass, if it may start now; whether it did."""
        now = time.monotonic()
        wait = group[0].arrived + self._delay - now
        if self._patience is not None:
            wait = min(wait, self._patience.wait(len(group), now))
        if wait > 0 and self._filling(group):
            self._schedule(wait)
            return False
        plan = group[0].feed.plan
        cap = max(1, min(self._max_batch, plan.limits.max_total_elements // plan.total_elements))
        count, examples = _batch(group, cap)
        inline = self.fits_inline(examples * plan.total_elements)
        if not inline and not self._free:
            return False  # a thread's pass completing dispatches again
        jobs = [group.popleft() for _ in range(count)]
        self._queued -= count
        if group:
            self._pending.move_to_end(key)  # the other groups go first next round
        else:
            del self._pending[key]
        jobs = self._live(jobs)
        if not jobs:
            return True
        if inline:
            self._settle(jobs, self._compute(jobs))
        else:
            self._free -= 1
            done = asyncio.get_running_loop().run_in_executor(self._threads, self._compute, jobs)
            done.add_done_callback(partial(self._thread_done, jobs))
        return True

    def _live(self, batch: list[Job]) -> list[Job]:
        """The requests still wanted: a cancelled one is dropped, an expired one fails."""
        now = time.monotonic()
        live = []
        for job in batch:
            if job.future.done():  # cancelled by its client
                continue
            deadline = job.caller.deadline
            if deadline is not None and deadline <= now:
                job.future.set_exception(ExpiredError())
            else:
                live.append(job)
        return live

    def _thread_done(self, jobs: list[Job], done: asyncio.Future[list[Outcome]]) -> None:
        self._free += 1
        try:
            outcomes = done.result()
        except Exception as e:  # the pass failed outside the engine: its requests fail with it
            outcomes = [e] * len(jobs)
        self._settle(jobs, outcomes)
        self._schedule()

    def _check_idle(self) -> None:
        if not self._pending and self._free == self._slots:
            self._idle.set()

    @staticmethod
    def _settle(jobs: list[Job], outcomes: list[Outcome]) -> None:
        for job, outcome in zip(jobs, outcomes, strict=True):
            if job.future.done():  # its client went away while it ran
                continue
            if isinstance(outcome, EngineError) and outcome.kind is ErrorKind.CANCELLED:
                # The pass stopped as no caller wanted it: one still waiting ran out of time.
                job.future.set_exception(ExpiredError())
            elif isinstance(outcome, Exception):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    # --- computing (on the loop or on an engine thread; no loop objects are touched) ------

    def _compute(self, jobs: list[Job]) -> list[Outcome]:
        started = time.monotonic()
        start = time.perf_counter()
        timer = Timer()
        try:
            outcomes = _outcomes(jobs, timer)
        except Exception as e:  # never leave a caller waiting on a future nobody will set
            outcomes = [e] * len(jobs)
        if self._on_batch is not None:
            report = PassReport(
                requests=len(jobs), examples=sum(j.size for j in jobs),
                seconds=time.perf_counter() - start, forward_seconds=timer.forward,
                backward_seconds=timer.backward,
                waits=tuple(started - j.arrived for j in jobs),
                cancelled=all(isinstance(o, EngineError) and o.kind is ErrorKind.CANCELLED
                              for o in outcomes))
            try:
                self._on_batch(report)
            except Exception:  # the results stand; the hook's failure is the server's bug
                log.exception("the on_batch hook failed")
        return outcomes


def _abandoned(jobs: list[Job]) -> bool:
    """Whether no request of a pass wants its result any more."""
    return all(job.abandoned() for job in jobs)


def _batch(group: deque[Job], cap: int) -> tuple[int, int]:
    """How many of the group's oldest requests the next pass takes, and their examples: as
    many as fit in ``cap`` examples (a request larger than that runs alone)."""
    count = examples = 0
    for job in group:
        if count and examples + job.size > cap:
            break
        count += 1
        examples += job.size
    return count, examples


def _outcomes(jobs: list[Job], timer: Timer) -> list[Outcome]:
    """Each job's result or error: one stacked pass, or each alone if stacking fails."""
    if len(jobs) > 1:
        try:
            return _stacked(jobs, timer)
        except EngineError as e:
            if e.kind in (ErrorKind.LIMIT, ErrorKind.CANCELLED):  # no use running each alone
                return [e] * len(jobs)
            # Otherwise one request's values are bad (a label out of range): each alone.
        except Exception as e:  # a stacking failure: each request alone finds its own error
            log.warning("a pass of %d requests failed (%r): computing each alone", len(jobs), e)
    outcomes: list[Outcome] = []
    for job in jobs:
        try:
            outcomes.append(job.run(timer))
        except Exception as e:  # the future carries it to the request's handler
            outcomes.append(e)
    return outcomes


def _stacked(jobs: list[Job], timer: Timer) -> list[Outcome]:
    """Run ``jobs`` (same key) as one batched pass and split the result per job."""
    result = Feed.stack([j.feed for j in jobs]).run(time_limit=jobs[0].time_limit,
                                                    cancelled=partial(_abandoned, jobs),
                                                    timer=timer)
    parts: list[Outcome] = []
    start = 0
    for job in jobs:
        end = start + job.size
        parts.append(result.part(start if job.feed.batch is None else slice(start, end)))
        start = end
    return parts
