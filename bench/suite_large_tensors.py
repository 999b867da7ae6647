"""The suite's section 5, large tensors: one request carrying a float64 input of ten million
elements through sum(x*x), end to end (the request built, sent, computed, the gradient, as
large again, sent back and decoded) against the floor: serialising that request with protobuf
and copying its bytes once."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from grpc import aio
from servers import free_port, gradserve, process

from gradserve.client.api import CHANNEL_OPTIONS
from gradserve.engine.builder import GraphBuilder
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request
from gradserve.wire.responses import decode_response as decode

LARGE_ELEMENTS, QUICK_LARGE_ELEMENTS = 10_000_000, 1_000_000
LARGE_MESSAGE_BYTES = 256 << 20
# the large-tensor server: messages that large, and freed memory reused rather than re-zeroed
LARGE_SERVER_FLAGS = ("--max-message-bytes", str(LARGE_MESSAGE_BYTES),
                      "--malloc-retain-bytes", str(1 << 30))


@dataclass(frozen=True)
class LargeResult:
    """Best-of-rounds seconds: end to end, and the floor's two parts; the request's size."""

    elements: int
    request_bytes: int
    end_to_end: float
    serialise: float
    copy: float

    @property
    def floor(self) -> float:
        return self.serialise + self.copy

    @property
    def ratio(self) -> float:
        return self.end_to_end / self.floor


def large_channel_options() -> list[tuple[str, Any]]:
    """The client's channel options with the message limits raised to the server's."""
    limits = ("grpc.max_receive_message_length", "grpc.max_send_message_length")
    return [*(o for o in CHANNEL_OPTIONS if o[0] not in limits),
            *((name, LARGE_MESSAGE_BYTES) for name in limits)]


async def large_section(elements: int, rounds: int) -> LargeResult:
    """One float64 input of ``elements`` through sum(x*x): end to end against serialising the
    request and copying its bytes, alternating, best of ``rounds`` each."""
    g = GraphBuilder()
    x = g.input("x", (elements,))
    graph = g.build((x * x).sum())
    values = np.random.default_rng(2).standard_normal(elements)
    port = free_port()
    with process(gradserve(port, *LARGE_SERVER_FLAGS), port) as (target, _):
        async with aio.insecure_channel(target, options=large_channel_options()) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            graph_id = (await stub.RegisterGraph(pb.RegisterGraphRequest(
                graph=graph_to_wire(graph)))).graph_id

            async def end_to_end() -> float:
                begin = time.perf_counter()
                got = decode(await stub.Compute(request(graph_id, None, {"x": values}),
                                                timeout=120))
                took = time.perf_counter() - begin
                assert got.gradients["x"].shape == (elements,)
                return took

            def serialise() -> tuple[bytes, float]:
                begin = time.perf_counter()
                payload = request(graph_id, None, {"x": values}).SerializeToString()
                return payload, time.perf_counter() - begin

            def copy(payload: bytes) -> float:
                begin = time.perf_counter()
                bytearray(payload)
                return time.perf_counter() - begin

            got = decode(await stub.Compute(request(graph_id, None, {"x": values}), timeout=120))
            np.testing.assert_allclose(got.output, values @ values, rtol=1e-9)
            np.testing.assert_allclose(got.gradients["x"], 2 * values, rtol=1e-12)
            del got
            times: dict[str, list[float]] = {"e2e": [], "serialise": [], "copy": []}
            size = 0
            for _ in range(rounds):
                times["e2e"].append(await end_to_end())
                payload, took = serialise()
                times["serialise"].append(took)
                times["copy"].append(copy(payload))
                size = len(payload)
                del payload
    return LargeResult(elements, size, min(times["e2e"]), min(times["serialise"]),
                       min(times["copy"]))

