"""The seed examples over the wire, with hand-derived answers; many examples in one request."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradserve.engine.builder import GraphBuilder
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from tests.server.conftest import (
    RPC_TIMEOUT,
    assert_matches,
    decode,
    loss_l,
    oracle,
    quadratic,
    request,
    scalars,
    staged,
)

TIGHT = 1e-12
ENCODINGS = pytest.mark.parametrize("raw", [True, False], ids=["raw_data", "double_data"])


def approx(expected: float | list[float]) -> object:
    return pytest.approx(expected, rel=TIGHT, abs=TIGHT)


@ENCODINGS
@pytest.mark.parametrize(("x", "value", "slope"), [(2.0, 6.0, 5.0), (6.0, 58.0, 21.0),
                                                   (-2.0, 18.0, -11.0)])
def test_quadratic(stub: pb_grpc.GradientServiceStub, raw: bool, x: float, value: float,
                   slope: float) -> None:
    # f(x) = 2x^2 - 3x + 4, f'(x) = 4x - 3
    q = quadratic()
    response = stub.Compute(request(q.graph, {"x": x}, raw=raw), timeout=RPC_TIMEOUT)
    assert scalars(response.outputs) == {q.out: approx(value)}
    assert scalars(response.gradients) == {"x": approx(slope)}
    assert list(response.nonfinite) == [False]


@ENCODINGS
def test_loss_l(stub: pb_grpc.GradientServiceStub, raw: bool) -> None:
    lo = loss_l()
    response = stub.Compute(
        request(lo.graph, {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0}, raw=raw,
                request_id="L"), timeout=RPC_TIMEOUT)
    assert response.request_id == "L"
    assert scalars(response.outputs) == {lo.out: -4.0}
    # dL/da = f*b = 4, dL/db = f*a = -6, dL/dc = f = -2, dL/df = a*b + c = 2
    assert scalars(response.gradients) == {"a": 4.0, "b": -6.0, "c": -2.0, "f": 2.0}
    assert list(response.nonfinite) == [False]


def sigmoid(t: float) -> float:
    return 1 / (1 + math.exp(-t))


def staged_by_hand(x: float, y: float) -> tuple[float, float, float]:
    """(f, df/dx, df/dy) of (x + sigmoid(y)) / (sigmoid(x) + (x+y)^2), stage by stage."""
    sigy = 1.0 / (1 + math.exp(-y))
    num = x + sigy
    sigx = 1.0 / (1 + math.exp(-x))
    xpy = x + y
    den = sigx + xpy**2
    invden = 1.0 / den
    f = num * invden
    dnum, dinvden = invden, num
    dden = (-1.0 / den**2) * dinvden
    dxpy = 2 * xpy * dden
    dx = dxpy + (1 - sigx) * sigx * dden + dnum
    dy = dxpy + (1 - sigy) * sigy * dnum
    return f, dx, dy


@ENCODINGS
def test_staged(stub: pb_grpc.GradientServiceStub, raw: bool) -> None:
    s = staged()
    response = stub.Compute(request(s.graph, {"x": 3.0, "y": -4.0}, raw=raw),
                            timeout=RPC_TIMEOUT)
    value, dx, dy = staged_by_hand(3.0, -4.0)
    # an anchor independent of the staged code: (x+y)^2 = 1 at (3, -4)
    assert value == pytest.approx((3 + sigmoid(-4)) / (sigmoid(3) + 1), rel=1e-15)
    assert scalars(response.outputs) == {s.out: approx(value)}
    assert scalars(response.gradients) == {"x": approx(dx), "y": approx(dy)}


# --- many examples in one request -------------------------------------------------------------


@ENCODINGS
def test_quadratic_batch_equals_single_requests(stub: pb_grpc.GradientServiceStub,
                                                raw: bool) -> None:
    q = quadratic()
    xs = [2.0, 6.0, -2.0]
    batched = stub.Compute(request(q.graph, {"x": np.array(xs)}, raw=raw, batch_size=3),
                           timeout=RPC_TIMEOUT)
    out, grad = decode(batched.outputs)[q.out], decode(batched.gradients)["x"]
    assert out.shape == (3,) and grad.shape == (3,)
    assert out.tolist() == approx([6.0, 58.0, 18.0])
    assert grad.tolist() == approx([5.0, 21.0, -11.0])
    assert list(batched.nonfinite) == [False, False, False]
    for k, x in enumerate(xs):
        single = stub.Compute(request(q.graph, {"x": x}, raw=raw), timeout=RPC_TIMEOUT)
        assert scalars(single.outputs)[q.out] == approx(float(out[k]))
        assert scalars(single.gradients)["x"] == approx(float(grad[k]))
        assert list(single.nonfinite) == [False]


def test_loss_l_batch_of_three(stub: pb_grpc.GradientServiceStub) -> None:
    lo = loss_l()
    feed = {"a": np.array([3.0, 1.0, 0.5]), "b": np.array([-2.0, 2.0, 4.0]),
            "c": np.array([8.0, -1.0, 0.0]), "f": np.array([-2.0, 3.0, -1.0])}
    response = stub.Compute(request(lo.graph, feed, batch_size=3), timeout=RPC_TIMEOUT)
    # by hand: L = (ab + c) f; dL/da = fb, dL/db = fa, dL/dc = f, dL/df = ab + c
    assert decode(response.outputs)[lo.out].tolist() == [-4.0, 3.0, -2.0]
    grads = {k: v.tolist() for k, v in decode(response.gradients).items()}
    assert grads == {"a": [4.0, 6.0, -4.0], "b": [-6.0, 3.0, -0.5], "c": [-2.0, 3.0, -1.0],
                     "f": [2.0, 1.0, 2.0]}
    assert list(response.nonfinite) == [False, False, False]


@ENCODINGS
def test_nonfinite_flag_per_example(stub: pb_grpc.GradientServiceStub, raw: bool) -> None:
    b = GraphBuilder()
    y = b.input("x").log()
    graph = b.build(y)
    response = stub.Compute(request(graph, {"x": np.array([1.0, -1.0, 0.0, 4.0])}, raw=raw,
                                    batch_size=4), timeout=RPC_TIMEOUT)
    # log(1) = 0, log(-1) = nan, log(0) = -inf, log(4) finite; d/dx = 1/x: 1, -1, inf, 1/4
    assert list(response.nonfinite) == [False, True, True, False]
    out = decode(response.outputs)[y.name]
    assert out[0] == 0.0 and math.isnan(out[1]) and out[2] == -math.inf
    assert decode(response.gradients)["x"].tolist() == [1.0, -1.0, math.inf, 0.25]
    single = stub.Compute(request(graph, {"x": -1.0}, raw=raw), timeout=RPC_TIMEOUT)
    assert list(single.nonfinite) == [True]


def test_upstream_and_wrt(stub: pb_grpc.GradientServiceStub) -> None:
    lo = loss_l()
    feed = {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0}
    response = stub.Compute(request(lo.graph, feed, upstream={lo.out: 0.5}, wrt=("a", "f")),
                            timeout=RPC_TIMEOUT)
    # a vector-Jacobian product: upstream 0.5 scales the gradients; only a and f are asked for
    assert scalars(response.gradients) == {"a": 2.0, "f": 1.0}
    assert_matches(response, oracle(lo.graph, feed, upstream={lo.out: 0.5}, wrt=("a", "f")))


def test_call_without_deadline(stub: pb_grpc.GradientServiceStub) -> None:
    q = quadratic()
    call = stub.Compute.future(request(q.graph, {"x": 6.0}))  # no deadline: bounded here
    try:
        response = call.result(timeout=RPC_TIMEOUT)
    finally:
        call.cancel()
    assert scalars(response.outputs) == {q.out: 58.0}
    assert scalars(response.gradients) == {"x": 21.0}
