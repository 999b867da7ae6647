"""Beyond the gradient through a live server: JVPs, Hessian-vector products, dense Jacobians
and Hessians (raw stubs, as any gRPC client sends them, and the Python clients), checked
against hand-derived values and finite differences; and the refusals, each naming its field.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest

from gradserve.client.api import AsyncGradientClient, GradientClient
from gradserve.client.networks import cnn
from gradserve.engine import Plan
from gradserve.engine.builder import GraphBuilder
from gradserve.importer import import_model
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.tensors import tensor_from_wire, tensors_to_wire
from tests.server.conftest import (
    RPC_TIMEOUT,
    Served,
    ServerFactory,
    decode,
    failure,
    loss_l,
    quadratic,
    request,
)

SEED = {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0}


def blocks(found: Any) -> dict[tuple[str, str], Any]:
    return {(b.row, b.column): tensor_from_wire(b.value, "value") for b in found}


def test_the_quadratic_second_derivative_and_slope(stub: pb_grpc.GradientServiceStub) -> None:
    q = quadratic()
    message = request(q.graph, {"x": 2.0})
    message.options.hessian = True
    hessian = blocks(stub.Compute(message, timeout=RPC_TIMEOUT).hessian)
    assert float(hessian[("x", "x")]) == 4.0
    message = request(q.graph, {"x": 2.0})
    message.tangents["x"].CopyFrom(tensors_to_wire({"x": 1.0})["x"])
    response = stub.Compute(message, timeout=RPC_TIMEOUT)
    assert float(decode(response.jvp)[q.out]) == 5.0  # f'(2) = 4*2 - 3
    assert float(decode(response.outputs)[q.out]) == 6.0
    assert not response.gradients


def test_loss_l_hessian_hvp_and_jacobian(stub: pb_grpc.GradientServiceStub) -> None:
    lo = loss_l()
    a, b, _, f = SEED.values()
    want = {("a", "b"): f, ("a", "f"): b, ("b", "f"): a, ("c", "f"): 1.0}
    message = request(lo.graph, SEED)
    message.options.hessian = True
    hessian = blocks(stub.Compute(message, timeout=RPC_TIMEOUT).hessian)
    for r in "abcf":
        for col in "abcf":
            expected = want.get((r, col), want.get((col, r), 0.0))
            assert float(hessian[(r, col)]) == expected, (r, col)
    message = request(lo.graph, SEED)
    for name, value in {"a": 1.0, "b": 2.0, "c": 0.0, "f": -1.0}.items():
        message.hvp_vectors[name].CopyFrom(tensors_to_wire({name: value})[name])
    hvp = decode(stub.Compute(message, timeout=RPC_TIMEOUT).hvp)
    h = np.array([[0, f, 0, b], [f, 0, 0, a], [0, 0, 0, 1], [b, a, 1, 0]])
    np.testing.assert_array_equal([float(hvp[n]) for n in "abcf"], h @ [1.0, 2.0, 0.0, -1.0])
    message = request(lo.graph, SEED)
    message.options.jacobian = True
    response = stub.Compute(message, timeout=RPC_TIMEOUT)
    jacobian = blocks(response.jacobian)
    assert {k[1]: float(v) for k, v in jacobian.items()} == {"a": 4.0, "b": -6.0, "c": -2.0,
                                                             "f": 2.0}
    assert float(decode(response.outputs)[lo.out]) == -4.0


def test_batched_examples_each_get_their_own(stub: pb_grpc.GradientServiceStub) -> None:
    q = quadratic()
    xs = np.array([2.0, 6.0, -2.0])
    message = request(q.graph, {"x": xs}, batch_size=3)
    message.tangents["x"].CopyFrom(tensors_to_wire({"x": np.ones(3)})["x"])
    np.testing.assert_array_equal(decode(stub.Compute(message, timeout=RPC_TIMEOUT).jvp)[q.out],
                                  4 * xs - 3)
    message = request(q.graph, {"x": xs}, batch_size=3)
    message.options.hessian = True
    hessian = blocks(stub.Compute(message, timeout=RPC_TIMEOUT).hessian)[("x", "x")]
    np.testing.assert_array_equal(hessian, [4.0, 4.0, 4.0])


def test_an_onnx_models_hvp_matches_finite_differences(
        stub: pb_grpc.GradientServiceStub) -> None:
    model = cnn(dtype=np.float64).SerializeToString()
    rng = np.random.default_rng(0)
    x, v = rng.standard_normal((1, 28, 28)), rng.standard_normal((1, 28, 28))
    message = pb.ComputeRequest(onnx_model=pb.OnnxModel(model=model),
                                inputs=tensors_to_wire({"x": x}),
                                hvp_vectors=tensors_to_wire({"x": v}))
    hvp = decode(stub.Compute(message, timeout=RPC_TIMEOUT).hvp)["x"]
    plan = Plan(import_model(model).graph)

    def gradient(eps: float) -> Any:
        return plan.run({"x": x + eps * v}).gradients["x"]

    numeric = (gradient(1e-6) - gradient(-1e-6)) / 2e-6
    np.testing.assert_allclose(hvp, numeric, rtol=1e-4, atol=1e-7)


def test_the_clients_sync_and_async(served: Served) -> None:
    lo = loss_l()
    target = served.server.target
    with GradientClient(target) as client:
        assert float(client.jvp(lo.graph, SEED, {"a": 1.0}).jvp[lo.out]) == 4.0
        assert float(client.hessian(lo.graph, SEED).hessian[("b", "f")]) == 3.0
        assert float(client.jacobian(lo.graph, SEED).jacobian[(lo.out, "b")]) == -6.0
        vectors = {"a": 1.0, "b": 0.0, "c": 0.0, "f": 0.0}
        assert {k: float(v) for k, v in client.hvp(lo.graph, SEED, vectors).hvp.items()} == {
            "a": 0.0, "b": -2.0, "c": 0.0, "f": -2.0}

    async def run() -> tuple[Any, Any]:
        async with AsyncGradientClient(target) as client:
            return await asyncio.gather(client.jvp(lo.graph, SEED, {"f": 1.0}),
                                        client.hessian(lo.graph, SEED))

    jvp, hessian = asyncio.run(run())
    assert float(jvp.jvp[lo.out]) == 2.0  # dL/df = a*b + c
    assert float(hessian.hessian[("a", "f")]) == -2.0


def refused(stub: pb_grpc.GradientServiceStub, message: pb.ComputeRequest
            ) -> tuple[grpc.StatusCode, list[str], str]:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Compute(message, timeout=RPC_TIMEOUT)
    f = failure(caught.value)
    return f.code, f.fields, f.message


def test_refusals_name_the_field(stub: pb_grpc.GradientServiceStub) -> None:
    lo = loss_l()
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    two = request(lo.graph, SEED)
    two.tangents["a"].CopyFrom(tensors_to_wire({"a": 1.0})["a"])
    two.options.hessian = True
    assert refused(stub, two)[:2] == (invalid, ["tangents"])
    unknown = request(lo.graph, SEED)
    unknown.tangents["zz"].CopyFrom(tensors_to_wire({"zz": 1.0})["zz"])
    assert refused(stub, unknown)[:2] == (invalid, ["tangents.zz"])
    missing = request(lo.graph, SEED)
    missing.hvp_vectors["a"].CopyFrom(tensors_to_wire({"a": 1.0})["a"])
    code, fields, _ = refused(stub, missing)
    assert code is invalid and fields[0].startswith("hvp_vectors.")
    mixed = request(lo.graph, SEED)
    mixed.options.jacobian = True
    mixed.options.return_intermediates = True
    assert refused(stub, mixed)[:2] == (invalid, ["options.jacobian"])
    shaped = request(lo.graph, SEED)
    shaped.tangents["a"].CopyFrom(tensors_to_wire({"a": np.ones(3)})["a"])
    code, _, message = refused(stub, shaped)
    assert code is invalid and "a" in message
    good = stub.Compute(request(lo.graph, SEED), timeout=RPC_TIMEOUT)  # still serving
    assert float(decode(good.outputs)[lo.out]) == -4.0


def test_a_dense_hessian_past_the_limit_is_resource_exhausted(
        make_server: ServerFactory) -> None:
    served = make_server(max_request_elements=1000)
    g = GraphBuilder()
    x = g.input("x", (40,))
    graph = g.build((x * x).sum())
    message = request(graph, {"x": np.ones(40)})
    message.options.hessian = True
    code, fields, _ = refused(served.stub, message)
    assert (code, fields) == (grpc.StatusCode.RESOURCE_EXHAUSTED, ["options.hessian"])
    small = request(graph, {"x": np.ones(40)})
    small.hvp_vectors["x"].CopyFrom(tensors_to_wire({"x": np.ones(40)})["x"])
    np.testing.assert_array_equal(decode(served.stub.Compute(small, timeout=RPC_TIMEOUT).hvp)
                                  ["x"], np.full(40, 2.0))
