"""Dynamic batching: concurrent requests for the same plan run as one stacked engine pass.

Requests wait in a bounded queue, grouped by what may share a pass (the plan's structural key,
the inputs to differentiate, which outputs have upstream gradients). A dispatcher thread waits
for a free engine thread, then takes the oldest group's requests, up to ``max_batch_size``
examples (waiting up to ``max_queue_delay`` for more, as Triton's and TF Serving's batchers do),
stacks them on the batch axis, runs the plan once and hands each request its own slice. A
request whose deadline passed or that its client cancelled is dropped before it is computed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gradserve.engine import EngineError, Plan, Result

Arrays = dict[str, NDArray[Any]]


class QueueFullError(Exception):
    """The queue holds ``max_queue_size`` requests: busy, back off."""


class ClosedError(Exception):
    """The batcher is shutting down and takes no new requests."""


class ExpiredError(Exception):
    """The request's deadline passed while it was queued; it was not computed."""


@dataclass(eq=False)
class Job:
    """One request: its plan, fed values and options, and the future its caller waits on.

    ``examples`` is the number of examples on the leading batch axis of every input, or None
    when the request has no batch axis (one example)."""

    plan: Plan
    inputs: Arrays
    upstream: Arrays
    wrt: frozenset[str]
    examples: int | None
    deadline: float | None = None  # time.monotonic() after which the result is useless
    keep_intermediates: bool = False  # such a request runs alone
    arrived: float = field(default_factory=time.monotonic)
    future: Future[Result] = field(default_factory=Future)

    @property
    def key(self) -> Hashable:
        """Requests with equal keys may be stacked into one engine pass."""
        if self.keep_intermediates:
            return id(self)
        return (self.plan.key, self.wrt, frozenset(self.upstream))

    @property
    def size(self) -> int:
        return 1 if self.examples is None else self.examples

    def run(self) -> Result:
        """Compute this request on its own."""
        return self.plan.run(self.inputs, wrt=self.wrt, upstream=self.upstream,
                             batched=self.examples is not None,
                             keep_intermediates=self.keep_intermediates)


BatchHook = Callable[[int, int, float], None]  # (requests, examples, seconds) of each pass


class Batcher:
    """Queues :class:`Job` s and computes them in stacked batches on a pool of threads."""

    def __init__(self, *, max_batch_size: int, max_queue_delay: float, max_queue_size: int,
                 threads: int, on_batch: BatchHook | None = None) -> None:
        self._max_batch = max_batch_size
        self._delay = max_queue_delay
        self._max_queue = max_queue_size
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._pending: OrderedDict[Hashable, deque[Job]] = OrderedDict()
        self._queued = 0
        self._closed = False
        self._free = threading.Semaphore(threads)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="gradserve-engine")
        self._dispatcher = threading.Thread(target=self._dispatch, name="gradserve-batcher",
                                            daemon=True)
        self._dispatcher.start()

    @property
    def queued(self) -> int:
        """Requests waiting for an engine thread."""
        return self._queued

    def submit(self, job: Job) -> Future[Result]:
        """Queue ``job``: QueueFullError when the queue is full, ClosedError once closing."""
        with self._cond:
            if self._closed:
                raise ClosedError
            if self._queued >= self._max_queue:
                raise QueueFullError
            self._pending.setdefault(job.key, deque()).append(job)
            self._queued += 1
            self._cond.notify()
        return job.future

    def close(self) -> None:
        """Take no new requests, finish the queued and running ones, stop the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._dispatcher.join()
        self._pool.shutdown(wait=True)

    def _dispatch(self) -> None:
        while True:
            self._free.acquire()
            batch = self._next_batch()
            if batch is None:
                return
            self._pool.submit(self._run, batch)

    def _next_batch(self) -> list[Job] | None:
        """The oldest group's next batch, waiting for more if a delay is set; None once closed
        and drained."""
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            key, group = next(iter(self._pending.items()))
            until = group[0].arrived + self._delay
            while (not self._closed and sum(j.size for j in group) < self._max_batch
                   and (left := until - time.monotonic()) > 0):
                self._cond.wait(left)
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
        try:
            now = time.monotonic()
            live = []
            for job in batch:
                if not job.future.set_running_or_notify_cancel():
                    continue  # the client cancelled
                if job.deadline is not None and job.deadline <= now:
                    job.future.set_exception(ExpiredError())
                else:
                    live.append(job)
            if live:
                self._compute(live)
        finally:
            self._free.release()

    def _compute(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        try:
            self._run_jobs(jobs)
        finally:
            if self._on_batch is not None:
                self._on_batch(len(jobs), sum(j.size for j in jobs), time.perf_counter() - start)

    def _run_jobs(self, jobs: list[Job]) -> None:
        if len(jobs) > 1:
            try:
                results = _stacked(jobs)
            except EngineError:
                pass  # one request's values are bad (a label out of range): run each alone
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
    def stack(name: str, source: Callable[[Job], Arrays]) -> NDArray[Any]:
        return np.concatenate([source(j)[name] if j.examples is not None else
                               source(j)[name][None] for j in jobs])

    first = jobs[0]
    inputs = {n: stack(n, lambda j: j.inputs) for n in first.inputs}
    upstream = {n: stack(n, lambda j: j.upstream) for n in first.upstream}
    result = first.plan.run(inputs, wrt=first.wrt, upstream=upstream, batched=True)
    parts, start = [], 0
    for job in jobs:
        end = start + job.size
        index: int | slice = start if job.examples is None else slice(start, end)
        parts.append(Result({k: v[index] for k, v in result.outputs.items()},
                            {k: v[index] for k, v in result.gradients.items()},
                            job.examples))
        start = end
    return parts
