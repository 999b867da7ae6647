"""Dynamic batching: concurrent requests for the same plan run as one stacked engine pass.

Requests wait in a bounded queue, grouped by what may share a pass (the plan's structural key,
the inputs to differentiate, which outputs have upstream gradients). When an engine slot is
free, the oldest group's requests are taken, up to ``max_batch_size`` examples (waiting up to
``max_queue_delay`` for more, as Triton's and TF Serving's batchers do), stacked on the batch
axis, run through the plan once, and each request gets its own slice. A request whose deadline
passed or whose client cancelled is dropped before it is computed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

from gradserve.engine import EngineError, ErrorKind, Feed, Result


class QueueFullError(Exception):
    """The queue holds ``max_queue_size`` requests: busy, back off."""


class ClosedError(Exception):
    """The batcher is shutting down and takes no new requests."""


class ExpiredError(Exception):
    """The request's deadline passed while it was queued; it was not computed."""


@dataclass(eq=False)
class Job:
    """One request: its checked feed and options, and the future its caller waits on."""

    feed: Feed
    deadline: float | None = None  # time.monotonic() after which the result is useless
    keep_intermediates: bool = False  # such a request runs alone
    time_limit: float | None = None  # seconds an engine run may take
    arrived: float = field(default_factory=time.monotonic)
    future: Future[Result] = field(default_factory=Future)

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

    def run(self) -> Result:
        """Compute this request on its own."""
        return self.feed.run(keep_intermediates=self.keep_intermediates,
                             time_limit=self.time_limit)


BatchHook = Callable[[int, int, float], None]  # (requests, examples, seconds) of each pass


class Batcher:
    """Queues :class:`Job` s and computes them in stacked batches.

    No thread of its own hands work around: the threads that wait for results do the work.
    A request's handler calls :meth:`work_until` after :meth:`submit`; while an engine slot is
    free and requests are queued, it takes the next batch and computes it (its own request or
    others'), otherwise it sleeps until a batch completes or a slot frees up. Each request thus
    costs no thread hand-off beyond its own gRPC handler's, which on CPython is a large share
    of a small request's cost. ``threads`` engine slots run at once.
    """

    def __init__(self, *, max_batch_size: int, max_queue_delay: float, max_queue_size: int,
                 threads: int, on_batch: BatchHook | None = None) -> None:
        self._max_batch = max_batch_size
        self._delay = max_queue_delay
        self._max_queue = max_queue_size
        self._on_batch = on_batch
        self._slots = threads
        self._free = threads
        self._cond = threading.Condition()
        self._pending: OrderedDict[Hashable, deque[Job]] = OrderedDict()
        self._queued = 0
        self._closed = False

    @property
    def queued(self) -> int:
        """Requests waiting for an engine slot."""
        return self._queued

    def submit(self, job: Job) -> Future[Result]:
        """Queue ``job``: QueueFullError when the queue is full, ClosedError once closing. The
        job is computed by a thread in :meth:`work_until`: the caller's own, typically."""
        with self._cond:
            if self._closed:
                raise ClosedError
            if self._queued >= self._max_queue:
                raise QueueFullError
            self._pending.setdefault(job.key, deque()).append(job)
            self._queued += 1
            if self._delay:  # a leader waiting to fill this very group must see it
                self._cond.notify_all()
            else:  # one sleeping thread with a free slot is enough to take it
                self._cond.notify()
        return job.future

    def work_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Compute queued batches in this thread until ``done()``; False if ``timeout``
        seconds pass first."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not done():
                if self._free and self._pending:
                    self._free -= 1
                    try:
                        batch = self._take()
                        self._cond.release()
                        try:
                            self._run(batch)
                        finally:
                            self._cond.acquire()
                    finally:
                        self._free += 1
                        self._cond.notify_all()  # results are in, and a slot is free
                    continue
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def wake(self) -> None:
        """Wake the threads in :meth:`work_until`: something they wait for may have changed."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Take no new requests; finish the queued and running ones (in this thread if no
        other is at it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()  # leaders waiting for a fuller batch go now
        self.work_until(lambda: not self._pending and self._free == self._slots)

    def _take(self) -> list[Job]:
        """The oldest group's next batch (the lock is held), waiting for more if a delay is
        set. Empty when other threads took every queued request while this one waited."""
        while True:
            key, group = next(iter(self._pending.items()))
            left = group[0].arrived + self._delay - time.monotonic()
            if self._closed or left <= 0 or sum(j.size for j in group) >= self._max_batch:
                break
            self._cond.wait(left)  # others may take this group meanwhile: look again after
            if not self._pending:
                return []
        batch: list[Job] = []
        size = 0
        while group and (not batch or size + group[0].size <= self._max_batch):
            job = group.popleft()
            batch.append(job)
            size += job.size
        if not group:
            del self._pending[key]
        self._queued -= len(batch)
        return batch

    def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # the client cancelled, or its deadline passed while it waited
            if job.deadline is not None and job.deadline <= now:
                job.future.set_exception(ExpiredError())
            else:
                live.append(job)
        if live:
            self._compute(live)

    def _compute(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        try:
            self._run_jobs(jobs)
        except BaseException as e:  # never leave a caller waiting on a future nobody will set
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e if isinstance(e, Exception) else
                                             RuntimeError("the engine run was interrupted"))
            raise
        finally:
            if self._on_batch is not None:
                self._on_batch(len(jobs), sum(j.size for j in jobs), time.perf_counter() - start)

    def _run_jobs(self, jobs: list[Job]) -> None:
        if len(jobs) > 1:
            try:
                results = _stacked(jobs)
            except EngineError as e:
                if e.kind is ErrorKind.LIMIT:  # running them one by one would only take longer
                    for job in jobs:
                        job.future.set_exception(e)
                    return
                # Otherwise one request's values are bad (a label out of range): each alone.
            except Exception:  # a stacking failure: each request alone finds its own error
                pass
            else:
                for job, result in zip(jobs, results, strict=True):
                    job.future.set_result(result)
                return
        for job in jobs:
            try:
                job.future.set_result(job.run())
            except Exception as e:  # the future carries it to the request's handler
                job.future.set_exception(e)


def _stacked(jobs: list[Job]) -> list[Result]:
    """Run ``jobs`` (same key) as one batched pass and split the result per job."""
    result = Feed.stack([j.feed for j in jobs]).run(time_limit=jobs[0].time_limit)
    parts, start = [], 0
    for job in jobs:
        end = start + job.size
        index: int | slice = start if job.feed.batch is None else slice(start, end)
        parts.append(Result({k: v[index] for k, v in result.outputs.items()},
                            {k: v[index] for k, v in result.gradients.items()},
                            job.feed.batch))
        start = end
    return parts
