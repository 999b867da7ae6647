"""When the batcher waits for more requests: only while waiting is measured to pay.

A fixed queue delay (Triton's ``max_queue_delay_microseconds``, TF Serving's
``batch_timeout_micros``, Ray Serve's ``batch_wait_timeout_s``) costs a lone caller that delay
on every call, and pays only when requests come faster than the server answers them one by
one: then a request that waits would have queued anyway, and one pass for many saves each the
cost of a pass. So the batcher waits for more requests only while both of these hold:

- the server is busy: over the last window its process spent at least BUSY of the time
  working (CPU time of all its threads, from the kernel: the loop decoding and answering, the
  engine threads computing), and it stops counting as busy below IDLE (the gap keeps the
  decision from flapping as waiting itself lowers the load). That is the utilization queueing
  theory speaks of: arrival rate times the CPU each request costs. Half a core is enough: the
  loop's own share undercounts where the engine runs on other threads or other processes
  share the cores, and a server that waits only when saturated never leaves the state in
  which it answers one request per pass (measured: 1.0 requests per pass at 65% load, where
  waiting gave 5 to 8 and up to 2x the requests per second);
- other callers are about: lately (the last two windows) more requests were open at the server
  at once than the group now holds, so more are coming.

It never waits past the ``--max-queue-delay-us`` bound, and stops waiting once arrivals pause
(no request for twice the usual gap between two).
"""

from __future__ import annotations

import time
from collections.abc import Callable

WINDOW = 0.05  # seconds over which the server's load and the open requests are measured
BUSY = 0.5  # share of the window the server works: from here on, waiting pays
IDLE = 0.35  # ... and below this, it no longer does
GAP_WEIGHT = 0.1  # the weight of each new gap between arrivals in their running mean
PAUSE = 2.0  # gaps (in mean gaps) that count as arrivals having paused


class Patience:
    """Measures the server's load and the open requests, and says whether a group should
    wait. Called on the event loop only."""

    def __init__(self, open_requests: Callable[[], int],
                 cpu: Callable[[], float] = time.process_time) -> None:
        self._open = open_requests
        self._cpu = cpu  # the CPU seconds the server's process has used
        self._busy = False
        self._window_end = 0.0
        self._window_cpu = 0.0
        self._peak = 0  # the most requests open at once, this window
        self._last_peak = 0  # ... and the window before
        self._gap = 0.0  # running mean of the time between two arrivals, seconds
        self._last_arrival = 0.0

    def arrived(self, now: float) -> None:
        """A request arrived at ``now`` (time.monotonic())."""
        if self._last_arrival:
            gap = now - self._last_arrival
            self._gap += GAP_WEIGHT * (gap - self._gap)
        self._last_arrival = now
        self._peak = max(self._peak, self._open())
        if now >= self._window_end:
            self._next_window(now)

    def enough(self, queued: int) -> bool:
        """Whether a group of ``queued`` requests has no reason to wait for more."""
        return not self._busy or queued >= max(self._peak, self._last_peak)

    def wait(self, queued: int, now: float) -> float:
        """How much longer (seconds) a group of ``queued`` requests should wait for more, at
        ``now``: 0 when it should go now."""
        if now >= self._window_end:
            self._next_window(now)
        if self.enough(queued):
            return 0.0
        return max(0.0, self._last_arrival + PAUSE * self._gap - now)

    def _next_window(self, now: float) -> None:
        cpu = self._cpu()
        if self._window_end:
            load = (cpu - self._window_cpu) / (now - self._window_end + WINDOW)
            self._busy = load >= (IDLE if self._busy else BUSY)
        self._window_end, self._window_cpu = now + WINDOW, cpu
        self._last_peak, self._peak = self._peak, self._open()
