"""Fixtures shared by the suite: real gradserve servers on loopback ephemeral ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gradserve.server.app import GradServer
from gradserve.server.config import ServerConfig

StartServer = Callable[..., GradServer]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """Start servers with config overrides (127.0.0.1, ephemeral ports); all stopped at
    teardown."""
    servers: list[GradServer] = []

    def start(**overrides: Any) -> GradServer:
        settings = {"host": "127.0.0.1", "port": 0, "metrics_port": -1, **overrides}
        server = GradServer(ServerConfig(**settings))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=1.0)


@pytest.fixture
def server(start_server: StartServer) -> GradServer:
    """One server with the default settings."""
    return start_server()
