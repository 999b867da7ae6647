"""A run longer than --max-compute-seconds stops with RESOURCE_EXHAUSTED; the server goes on."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from gradserve.client.api import GradientClient, GradserveError
from gradserve.engine.builder import GraphBuilder
from tests.conftest import StartServer


def test_compute_time_limit(start_server: StartServer) -> None:
    server = start_server(max_compute_seconds=1e-6)
    g = GraphBuilder()
    v = g.input("x", (64, 64))
    for _ in range(50):
        v = (v @ v).tanh()
    slow = v.sum()
    with GradientClient(server.target) as client:
        with pytest.raises(GradserveError) as info:
            client.compute(slow, {"x": np.eye(64) / 8})
        assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "time limit" in info.value.message
        assert info.value.field_violations[0][0] == "graph"
