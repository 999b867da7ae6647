"""Servers on 127.0.0.1:0 started and stopped by fixtures, raw stubs, and the helpers the server
tests share: reading rich error statuses, the seed graphs, a slow graph, and the in-process oracle.

Expected answers come from hand derivations or from the engine run alone in this process
(``Plan(graph).run``), never from the server under test.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from numpy.typing import NDArray

from gradserve.engine import DType, Graph, Plan, Result
from gradserve.engine.builder import GraphBuilder
from gradserve.server import app
from gradserve.server.app import GradServer
from gradserve.server.batcher import Batcher
from gradserve.server.config import ServerConfig
from gradserve.server.metrics import PassReport
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.tensors import tensor_from_wire, tensors_to_wire

HOST = "127.0.0.1"  # the only address any test listens on or dials
RPC_TIMEOUT = 15.0  # seconds; every RPC a test makes carries a deadline
WAIT = 10.0  # seconds; the bound on any wait for an event
STOP_WAIT = 3.0  # seconds beyond the grace a server with nothing in flight may take to stop

Arrays = dict[str, NDArray[Any]]


# --- servers ---------------------------------------------------------------------------------


class BatchLog:
    """The engine passes a server's batcher made, as (requests, examples), recorded by its
    ``on_batch`` hook, which the thread computing a pass calls at its end, holding the pass's
    engine slot.

    It can also hold the engine: after :meth:`hold`, the next pass's hook blocks, keeping its
    engine slot taken, until :meth:`release` (at most ``WAIT`` seconds), and sets ``holding``
    while it does. With one slot, that occupies the engine deterministically, with no timing
    assumptions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: list[tuple[int, int]] = []
        self._cancelled = 0
        self._gate: threading.Event | None = None
        self.holding = threading.Event()

    def __call__(self, report: PassReport) -> None:
        with self._lock:
            self._batches.append((report.requests, report.examples))
            self._cancelled += report.cancelled
            gate = self._gate
        if gate is not None and not gate.is_set():
            self.holding.set()
            gate.wait(WAIT)

    def hold(self) -> None:
        with self._lock:
            self._gate = threading.Event()
            self.holding.clear()

    def release(self) -> None:
        with self._lock:
            gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    @property
    def batches(self) -> list[tuple[int, int]]:
        with self._lock:
            return list(self._batches)

    @property
    def cancelled(self) -> int:
        """The passes stopped early because none of their requests was still wanted."""
        with self._lock:
            return self._cancelled


@dataclass(frozen=True)
class Served:
    """A running server, a channel to it and the raw stub on that channel."""

    server: GradServer
    channel: grpc.Channel
    stub: pb_grpc.GradientServiceStub
    batches: BatchLog

    def stop(self, grace: float = 1.0, timeout: float = WAIT) -> bool:
        """Stop the server (idempotent), waiting at most ``timeout`` seconds beyond the grace:
        whether it stopped in time. A stop that hangs is left behind on a daemon thread."""
        stopper = threading.Thread(target=self.server.stop, kwargs={"grace": grace},
                                   name="test-server-stop", daemon=True)
        stopper.start()
        stopper.join(timeout=grace + timeout)
        return not stopper.is_alive()

    def close(self) -> None:
        self.batches.release()
        self.channel.close()
        if not self.stop(timeout=STOP_WAIT):
            warnings.warn(f"the server on {self.server.target} did not stop within "
                          f"{STOP_WAIT} s of its grace", pytest.PytestWarning, stacklevel=1)


def logging_batcher(log: BatchLog) -> Callable[..., Batcher]:
    """The server's Batcher class with ``log`` added to the ``on_batch`` hook it is given."""

    def make(*args: Any, on_batch: Callable[..., None] | None = None, **kwargs: Any) -> Batcher:
        def hook(*details: Any) -> None:
            try:
                if on_batch is not None:
                    on_batch(*details)
            finally:
                log(*details)

        return Batcher(*args, on_batch=hook, **kwargs)

    return make


SETTINGS = {f.name for f in fields(ServerConfig)}


def launch_server(**settings: Any) -> Served:
    """A started server on 127.0.0.1 with an ephemeral port and ``settings`` over the defaults
    (any metrics endpoint on an ephemeral port too).

    Its batcher records every engine pass in a :class:`BatchLog`, through the batcher's public
    ``on_batch`` hook: the server module's Batcher is swapped for a factory adding the log to
    the hook while the server is constructed, and nothing else changes."""
    if "metrics_port" in SETTINGS:
        settings.setdefault("metrics_port", 0)
    config = ServerConfig(host=HOST, port=0, **settings)
    log = BatchLog()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app, "Batcher", logging_batcher(log))
        server = GradServer(config)
    try:
        server.start()
        channel = grpc.insecure_channel(server.target)
    except BaseException:
        server.stop(grace=0)
        raise
    return Served(server, channel, pb_grpc.GradientServiceStub(channel), log)


ServerFactory = Callable[..., Served]


@pytest.fixture
def make_server() -> Iterator[ServerFactory]:
    """Start servers with custom settings; all are stopped at teardown, pass or fail."""
    started: list[Served] = []

    def make(**settings: Any) -> Served:
        served = launch_server(**settings)
        started.append(served)
        return served

    try:
        yield make
    finally:
        for served in started:
            served.close()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """A default server shared by one module's tests."""
    s = launch_server()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def stub(served: Served) -> pb_grpc.GradientServiceStub:
    return served.stub


# --- errors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """A failed call's status code, message and google.rpc.BadRequest field violations."""

    code: grpc.StatusCode
    message: str
    violations: tuple[tuple[str, str], ...]

    @property
    def fields(self) -> list[str]:
        return [f for f, _ in self.violations]


def failure(err: grpc.RpcError) -> Failure:
    """Read a failed call's rich status (BadRequest details, when it has them)."""
    call = cast(grpc.Call, err)  # gRPC's failed calls are both
    status = rpc_status.from_call(call)
    violations: tuple[tuple[str, str], ...] = ()
    if status is not None and status.details:
        bad = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad), "the status detail is not a BadRequest"
        violations = tuple((v.field, v.description) for v in bad.field_violations)
    return Failure(call.code(), call.details() or "", violations)


def compute_failure(stub: pb_grpc.GradientServiceStub, request: pb.ComputeRequest,
                    timeout: float = RPC_TIMEOUT) -> Failure:
    """The failure of a Compute call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(request, timeout=timeout)
    return failure(info.value)


# --- health ----------------------------------------------------------------------------------

HEALTH = "/grpc.health.v1.Health/"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_check(channel: grpc.Channel, service: str = "",
                 timeout: float = RPC_TIMEOUT) -> int:
    """grpc.health.v1 Check: the service's status (the generated stub's methods are untyped)."""
    check = channel.unary_unary(HEALTH + "Check",
                                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                response_deserializer=health_pb2.HealthCheckResponse.FromString)
    status: int = check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
    return status


class HealthWatch:
    """A grpc.health.v1 Watch stream: :meth:`next` is the next status; :meth:`close` cancels."""

    def __init__(self, channel: grpc.Channel, service: str = "",
                 timeout: float = RPC_TIMEOUT) -> None:
        watch = channel.unary_stream(
            HEALTH + "Watch", request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        self._call = watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout)

    def next(self) -> int:
        status: int = next(self._call).status
        return status

    def close(self) -> None:
        self._call.cancel()


# --- requests, responses and the oracle -------------------------------------------------------


def request(graph: Graph, inputs: Mapping[str, Any], *, raw: bool = True, batch_size: int = 0,
            upstream: Mapping[str, Any] | None = None, request_id: str = "",
            wrt: tuple[str, ...] = ()) -> pb.ComputeRequest:
    """A ComputeRequest carrying the whole graph; tensors as raw_data or as double_data."""
    return pb.ComputeRequest(
        request_id=request_id,
        graph=graph_to_wire(graph, raw=raw),
        inputs=tensors_to_wire({k: np.asarray(v) for k, v in inputs.items()}, raw=raw),
        upstream=tensors_to_wire({k: np.asarray(v) for k, v in (upstream or {}).items()},
                                 raw=raw),
        batch_size=batch_size,
        wrt=list(wrt),
    )


def decode(tensors: Mapping[str, pb.Tensor]) -> Arrays:
    return {name: tensor_from_wire(t, name) for name, t in tensors.items()}


def scalars(tensors: Mapping[str, pb.Tensor]) -> dict[str, float]:
    return {name: float(a) for name, a in decode(tensors).items()}


def oracle(graph: Graph, inputs: Mapping[str, Any], *, batched: bool = False,
           upstream: Mapping[str, Any] | None = None,
           wrt: tuple[str, ...] | None = None) -> Result:
    """The engine run alone, in this process, on the same graph and values."""
    return Plan(graph).run({k: np.asarray(v) for k, v in inputs.items()}, batched=batched,
                           upstream={k: np.asarray(v) for k, v in (upstream or {}).items()},
                           wrt=wrt)


def assert_matches(response: pb.ComputeResponse, expected: Result, *, rtol: float = 1e-12,
                   atol: float = 1e-12) -> None:
    """The response holds the expected outputs, gradients (dtype, shape, values) and flags."""
    for got, want in ((decode(response.outputs), expected.outputs),
                      (decode(response.gradients), expected.gradients)):
        assert set(got) == set(want)
        for name, value in want.items():
            assert got[name].dtype == value.dtype, name
            assert got[name].shape == value.shape, name
            np.testing.assert_allclose(got[name], value, rtol=rtol, atol=atol, err_msg=name)
    assert list(response.nonfinite) == np.atleast_1d(expected.nonfinite).tolist()


# --- graphs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    """A graph and the name of its (single) output."""

    graph: Graph
    out: str


def quadratic() -> Built:
    """f(x) = 2x^2 - 3x + 4."""
    b = GraphBuilder()
    x = b.input("x")
    f = 2 * x**2 - 3 * x + 4
    return Built(b.build(f), f.name)


def loss_l() -> Built:
    """L = (a*b + c) * f."""
    b = GraphBuilder()
    a, bb, c, f = (b.input(n) for n in "abcf")
    loss = (a * bb + c) * f
    return Built(b.build(loss), loss.name)


def staged() -> Built:
    """f(x, y) = (x + sigmoid(y)) / (sigmoid(x) + (x + y)^2)."""
    b = GraphBuilder()
    x, y = b.input("x"), b.input("y")
    f = (x + y.sigmoid()) / (x.sigmoid() + (x + y) ** 2)
    return Built(b.build(f), f.name)


def classifier() -> Graph:
    """softmax_cross_entropy(logits + shift, label): 5 classes, an int64 label per example."""
    b = GraphBuilder()
    logits = b.input("logits", (5,))
    label = b.input("label", (), DType.INT64)
    shift = b.constant([0.0, 1.0, -1.0, 2.0, 0.5])
    return b.build(b.op("softmax_cross_entropy", logits + shift, label))


SLOW_N = 1500  # three n x n matmuls forward, more backward: about half a second on two cores


def slow(n: int = SLOW_N) -> Built:
    """sum(B @ B @ B) with B = broadcast_to(x, [n, n]): the value is n^4 x^3 and its derivative
    3 n^4 x^2 (exact in float64 at x = 1), with a scalar input and heavy work."""
    b = GraphBuilder()
    x = b.input("x")
    big = b.op("broadcast_to", x, shape=(n, n))
    total = ((big @ big) @ big).sum()
    return Built(b.build(total), total.name)


def slow_request(n: int = SLOW_N) -> tuple[pb.ComputeRequest, str]:
    built = slow(n)
    return request(built.graph, {"x": 1.0}), built.out


def assert_slow_answer(response: pb.ComputeResponse, out: str, n: int = SLOW_N) -> None:
    assert scalars(response.outputs) == {out: float(n**4)}
    assert scalars(response.gradients) == {"x": float(3 * n**4)}
    assert list(response.nonfinite) == [False]
