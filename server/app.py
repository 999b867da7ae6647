"""The running server: gRPC with the GradientService, health and reflection, and its lifecycle.

``python -m gradserve.server`` (or ``gradserve serve``) starts it. On SIGTERM or SIGINT it
shuts down gracefully: health turns NOT_SERVING, new calls are refused, calls in flight finish
within the grace period; then what is still running is abandoned (it stops at its next check),
and the process exits within the grace period whatever is left.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import platform
import signal
import sys
import threading
from collections.abc import Coroutine, Sequence
from types import FrameType
from typing import Any, TypeVar

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradserve.server.batcher import Batcher
from gradserve.server.config import ConfigError, ServerConfig
from gradserve.server.handlers import WireBytes, add_service
from gradserve.server.metrics import Live, Metrics
from gradserve.server.offload import OffLoop
from gradserve.server.patience import Patience
from gradserve.server.security import BearerAuth, server_credentials, tokens
from gradserve.server.service import GradientService
from gradserve.server.workers import run_workers
from gradserve.v1 import gradserve_pb2 as pb

if sys.platform == "win32":  # uvloop is not built for Windows
    new_event_loop = asyncio.new_event_loop
else:  # libuv's event loop: the same asyncio, with less overhead per call (measured)
    import uvloop

    new_event_loop = uvloop.new_event_loop

log = logging.getLogger("gradserve.server")
T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["GradientService"].full_name
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt options
OFFLOOP_THREADS = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default executor's rule
# Seconds abandoned work gets to notice it is abandoned, even past a short grace period.
STOP_MARGIN = 0.25


class GradServer:
    """A configured server: ``start()``, then ``stop()`` (or ``wait()`` for a signal).

    gRPC's asyncio server runs on an event loop in a thread of its own, so the methods here
    are plain blocking calls, usable from any thread (a signal handler's, a test's)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gradserve-loop",
                                        daemon=True)
        self._thread.start()
        self._stopping = threading.Lock()
        self._stopped = threading.Event()  # set once stop() has finished
        self.unfinished = False  # work still ran when stop() gave up waiting for it
        try:
            self._on_loop(self._build())
        except BaseException:
            self._end_loop()
            raise

    async def _build(self) -> None:
        """Make the server's parts on its loop (gRPC binds them to the running loop)."""
        config = self.config
        service: GradientService  # made below, on the batcher; its patience reads its calls
        self.batcher = Batcher(max_batch_size=config.max_batch_size,
                               max_queue_delay=config.max_queue_delay_us / 1e6,
                               max_queue_size=config.max_queue_size,
                               threads=config.batch_threads,
                               inline_max_elements=config.inline_max_elements,
                               patience=Patience(lambda: service.in_flight)
                               if config.batch_wait == "adaptive" else None,
                               on_batch=self.metrics.observe_pass)
        self.offloop = OffLoop(OFFLOOP_THREADS)
        service = GradientService(config, self.batcher, self.offloop, self.metrics)
        accepted = tokens(config)
        if accepted:
            log.info("every call but health checks needs one of %d bearer tokens",
                     len(accepted))
        self._server = aio.server(interceptors=[BearerAuth(accepted)] if accepted else [],
                                  options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", int(config.reuse_port)),
        ])
        wire = WireBytes()
        add_service(service, self._server, wire)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        address, tls = f"{config.host}:{config.port}", server_credentials(config)
        try:  # gRPC says it could not bind by raising, or (older versions) by port 0
            self.port = (self._server.add_insecure_port(address) if tls is None else
                         self._server.add_secure_port(address, tls))
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port} (in use? move it with "
                          "--port)")
        plans = service.plans
        self.metrics.track(Live(
            queue_depth=lambda: self.batcher.queued, in_flight=lambda: service.in_flight,
            stream_buffered=lambda: service.stream_buffered,
            cache_hits=lambda: plans.hits, cache_misses=lambda: plans.misses,
            cache_entries=lambda: len(plans), received_bytes=lambda: wire.received,
            sent_bytes=lambda: wire.sent))

    def _on_loop(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def target(self) -> str:
        """host:port a client can dial."""
        return f"{self.config.host}:{self.port}"

    def start(self) -> None:
        """Serve metrics and gRPC (an OSError naming the address and the flag that moves it,
        when one cannot be had)."""
        host, port = self.config.host, self.config.metrics_port
        try:
            if port >= 0:
                try:
                    self.metrics_port = self.metrics.serve(host, port)
                except OSError as e:
                    raise OSError(e.errno, f"cannot serve metrics on {host}:{port}: {e.strerror} "
                                  "(move it with --metrics-port, or turn it off with "
                                  "--metrics-port -1)") from None
            self._on_loop(self._start())
        except BaseException:
            self._end_loop()
            self.metrics.close()
            raise
        log.info("serving on %s (metrics: %s)", self.target,
                 "off" if self.metrics_port is None else
                 f"http://{self.config.host}:{self.metrics_port}/metrics")

    async def _start(self) -> None:
        await self._server.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, let calls in flight finish within
        the grace period (seconds; the configured one by default). Idempotent: a second call
        returns when the first has finished."""
        with self._stopping:
            if self._stopped.is_set():
                return
            grace = self.config.grace_seconds if grace is None else grace
            log.info("shutting down (grace %.1fs)", grace)
            try:
                self._on_loop(self._stop(grace))
            finally:
                self._end_loop()
                self.metrics.close()
                self._stopped.set()
            log.info("stopped")

    async def _stop(self, grace: float) -> None:
        end = self._loop.time() + grace
        await self.health.enter_graceful_shutdown()
        self.batcher.close()  # new requests are refused; the queued ones run now
        await self._server.stop(grace)  # calls still running after the grace are cancelled
        # Nobody waits for what is still running: it stops at its next check.
        self.offloop.halt()
        left = max(STOP_MARGIN, end - self._loop.time())
        try:
            await asyncio.wait_for(self.batcher.join(), left)
        except TimeoutError:
            self.batcher.abandon()
            self.unfinished = True
        if not await self.offloop.join(max(STOP_MARGIN, end - self._loop.time())):
            self.unfinished = True
        if self.unfinished:  # one numpy call can run for seconds between two checks
            log.warning("engine work still running after the grace period: not waiting for it")

    def wait(self) -> None:
        """Block until stopped (by :meth:`stop` from a signal handler or another thread)."""
        self._stopped.wait()


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(json_lines: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (with ``--workers`` N, in N
    processes on one port)."""
    configure_logging(config.log_json)
    try:
        check(config)
    except (ConfigError, OSError) as e:  # a file it names cannot be read, say
        log.critical("not starting: %s", e)
        raise SystemExit(2) from None
    if config.workers > 1:
        raise SystemExit(run_workers(config, serve_one))
    serve_one(config)


def check(config: ServerConfig) -> None:
    """Refuse, with a ConfigError saying why, settings the server cannot start with (before
    any worker process is forked, so one message covers them all)."""
    config.check_choices()
    if config.workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {config.workers}")
    if not 0 <= config.malloc_retain_bytes < 1 << 31:
        raise ConfigError("--malloc-retain-bytes must be from 0 to 2147483647, not "
                          f"{config.malloc_retain_bytes}")
    server_credentials(config)
    tokens(config)


def retain_freed_memory(limit: int) -> None:
    """Tune glibc's malloc as ``--malloc-retain-bytes`` says (nothing for 0, or another C
    library): allocations up to ``limit`` bytes come from the heap, which keeps up to
    ``limit`` bytes freed for reuse, one heap for all threads (another thread's heap could not
    hold a large tensor)."""
    if limit == 0:
        return
    if platform.libc_ver()[0] != "glibc":
        log.warning("--malloc-retain-bytes applies to glibc only: ignored")
        return
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for option, value in ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, limit),
                          (M_TRIM_THRESHOLD, limit)):
        if not mallopt(option, value):
            log.warning("mallopt(%d, %d) failed: --malloc-retain-bytes partly applied",
                        option, value)


def serve_one(config: ServerConfig) -> None:
    """Run one server process until SIGTERM or SIGINT, then shut down gracefully."""
    retain_freed_memory(config.malloc_retain_bytes)
    try:
        server = GradServer(config)
        server.start()
    except OSError as e:  # an address in use, say: one line saying so, not a traceback
        log.critical("not starting: %s", e.strerror or e)
        raise SystemExit(2) from None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.stop, name="gradserve-shutdown").start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    server.wait()
    if server.unfinished:  # the interpreter would wait for those threads at exit: do not
        logging.shutdown()
        os._exit(0)


def main(argv: Sequence[str] | None = None) -> None:
    serve(ServerConfig.parse(argv))
