"""RunOptions over the wire: intermediates (every named value and gradient) and gradient checks."""

from __future__ import annotations

import grpc
import numpy as np

from gradserve.engine import Graph
from gradserve.engine.builder import GraphBuilder
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from tests.server.conftest import (
    RPC_TIMEOUT,
    compute_failure,
    request,
    scalars,
    staged,
)

ABCF = {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0}


def named_l() -> Graph:
    """L = (a*b + c) * f with its intermediates named: d = a*b, e = d + c."""
    b = GraphBuilder()
    a, bb, c, f = (b.input(n) for n in "abcf")
    d = b.op("mul", a, bb, name="d")
    e = b.op("add", d, c, name="e")
    return b.build(b.op("mul", e, f, name="L"))


def with_options(message: pb.ComputeRequest, **options: bool) -> pb.ComputeRequest:
    message.options.CopyFrom(pb.RunOptions(**options))
    return message


def test_return_intermediates(stub: pb_grpc.GradientServiceStub) -> None:
    message = with_options(request(named_l(), ABCF), return_intermediates=True)
    response = stub.Compute(message, timeout=RPC_TIMEOUT)
    assert scalars(response.outputs) == {"L": -4.0}
    assert scalars(response.values) == {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0, "d": -6.0,
                                        "e": 2.0, "L": -4.0}
    # dL/dL = 1, dL/de = f = -2, dL/dd = dL/de = -2, dL/df = e = 2, dL/da = -2 b = 4,
    # dL/db = -2 a = -6, dL/dc = dL/de = -2
    assert scalars(response.value_gradients) == {"L": 1.0, "e": -2.0, "d": -2.0, "f": 2.0,
                                                 "a": 4.0, "b": -6.0, "c": -2.0}
    assert scalars(response.gradients) == {"a": 4.0, "b": -6.0, "c": -2.0, "f": 2.0}


def test_check_gradients(stub: pb_grpc.GradientServiceStub) -> None:
    s = staged()
    message = with_options(request(s.graph, {"x": 3.0, "y": -4.0}), check_gradients=True)
    response = stub.Compute(message, timeout=RPC_TIMEOUT)
    assert set(response.gradient_checks) == {"x", "y"}
    for name, check in response.gradient_checks.items():
        assert check.ok, name
        assert check.worst_excess <= 0, name
        assert 0 <= check.worst_abs_error < 1e-6, name


def test_check_gradients_takes_one_example(stub: pb_grpc.GradientServiceStub) -> None:
    s = staged()
    message = with_options(request(s.graph, {"x": np.array([3.0, 1.0]),
                                             "y": np.array([-4.0, 2.0])}, batch_size=2),
                           check_gradients=True)
    fail = compute_failure(stub, message)
    assert fail.code is grpc.StatusCode.INVALID_ARGUMENT
    assert fail.fields == ["options.check_gradients"]
