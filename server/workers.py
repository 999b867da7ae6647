"""``--workers N``: N server processes on one port, as gRPC's multiprocessing example does.

The parent forks the workers before it makes any gRPC object (gRPC's threads and polling do
not survive a fork); each worker binds the same port with SO_REUSEPORT, so the kernel spreads
connections across them, and runs a whole server of its own: its event loop, its batcher and
its metrics on ``--metrics-port`` plus its index. The parent only supervises: it holds the
port (so that ``--port 0`` picks one port for all), passes SIGTERM and SIGINT on to every
worker, which then drain gracefully, and exits once they have. A worker that dies on its own
stops the rest, and the parent exits non-zero: restarting is the process manager's job.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.process import BaseProcess
from types import FrameType

from gradserve.server.config import ServerConfig

log = logging.getLogger("gradserve.server")
EXIT_WAIT = 5.0  # seconds beyond its grace a worker may take to exit before it is killed


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT (port 0: a free one), not listening:
    it keeps the port for the workers, which bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def worker_config(config: ServerConfig, index: int, port: int) -> ServerConfig:
    """Worker ``index``'s settings: the shared port, and a metrics port of its own."""
    metrics = config.metrics_port
    return replace(config, port=port, workers=1, reuse_port=True,
                   metrics_port=metrics + index if metrics > 0 else metrics)


def run_workers(config: ServerConfig, serve_one: Callable[[ServerConfig], None]) -> int:
    """Run ``config.workers`` processes of ``serve_one`` on one port until a signal (or a
    worker's death) ends them; the exit status: 0 when every worker stopped cleanly."""
    with reserve_port(config.host, config.port) as held:
        port = held.getsockname()[1]
        fork = multiprocessing.get_context("fork")
        workers: list[BaseProcess] = [
            fork.Process(target=serve_one, args=(worker_config(config, k, port),),
                         name=f"gradserve-worker-{k}") for k in range(config.workers)]
        for worker in workers:
            worker.start()
        log.info("%d workers serving on %s:%d", len(workers), config.host, port)
        stopping = threading.Event()

        def stop(signum: int, frame: FrameType | None) -> None:
            stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        while not stopping.wait(0.2):
            if any(not w.is_alive() for w in workers):
                log.error("a worker exited on its own: stopping the others")
                break
        for worker in workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: a graceful drain
        for worker in workers:
            worker.join(config.grace_seconds + EXIT_WAIT)
            if worker.is_alive():
                log.error("%s did not stop within its grace: killing it", worker.name)
                worker.kill()
                worker.join()
    clean = stopping.is_set() and all(w.exitcode == 0 for w in workers)
    return 0 if clean else 1
