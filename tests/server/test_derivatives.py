"""Beyond the gradient through a live server: JVPs, Hessian-vector products, dense Jacobians
and Hessians (raw stubs, as any gRPC client sends them, and the Python clients), checked
against hand-derived values and finite differences; and the refusals, each naming its field.

Expected values come from hand derivations, from central differences of plain math or of
onnx's ReferenceEvaluator, or from differences of the engine's first-order gradient run alone
in this process; never from the server under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import grpc
import numpy as np
import pytest

from gradserve.client.api import AsyncGradientClient, GradientClient, GradserveError
from gradserve.client.networks import cnn, transformer
from gradserve.engine import OP_TABLE, DType, Graph, Plan
from gradserve.engine.builder import GraphBuilder
from gradserve.importer import import_model
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.tensors import tensor_from_wire, tensors_to_wire
from tests.engine.test_forward_mode import staged_gradient, staged_value
from tests.server.conftest import (
    RPC_TIMEOUT,
    Served,
    ServerFactory,
    decode,
    failure,
    loss_l,
    quadratic,
    request,
    staged,
)
from tests.server.test_onnx_models import evaluator

Arr = Any
Stub = pb_grpc.GradientServiceStub
SEED = {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0}
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def loss_hessian(a: float, b: float, c: float, f: float) -> Arr:
    """The Hessian of L = (a*b + c) * f over (a, b, c, f), by hand."""
    return np.array([[0, f, 0, b], [f, 0, 0, a], [0, 0, 0, 1], [b, a, 1, 0]], dtype=float)


def loss_gradient(a: float, b: float, c: float, f: float) -> Arr:
    return np.array([b * f, a * f, f, a * b + c])


def blocks(found: Any) -> dict[tuple[str, str], Arr]:
    return {(b.row, b.column): tensor_from_wire(b.value, "value") for b in found}


def with_tangents(message: pb.ComputeRequest, given: dict[str, Any]) -> pb.ComputeRequest:
    for name, value in tensors_to_wire({k: np.asarray(v) for k, v in given.items()}).items():
        message.tangents[name].CopyFrom(value)
    return message


def with_vectors(message: pb.ComputeRequest, given: dict[str, Any]) -> pb.ComputeRequest:
    for name, value in tensors_to_wire({k: np.asarray(v) for k, v in given.items()}).items():
        message.hvp_vectors[name].CopyFrom(value)
    return message


def call(stub: Stub, message: pb.ComputeRequest) -> pb.ComputeResponse:
    response: pb.ComputeResponse = stub.Compute(message, timeout=RPC_TIMEOUT)
    return response


# --- the seeds -------------------------------------------------------------------------------


@pytest.mark.parametrize("x", [2.0, -3.0, 0.5])
def test_the_quadratic(stub: Stub, x: float) -> None:
    q = quadratic()
    message = request(q.graph, {"x": x})
    message.options.hessian = True
    response = call(stub, message)
    hessian = blocks(response.hessian)
    assert list(hessian) == [("x", "x")] and float(hessian[("x", "x")]) == 4.0  # f'' = 4
    assert not response.jacobian and not response.gradients
    response = call(stub, with_tangents(request(q.graph, {"x": x}), {"x": 1.0}))
    assert float(decode(response.jvp)[q.out]) == 4 * x - 3  # f'(x)
    assert float(decode(response.outputs)[q.out]) == 2 * x**2 - 3 * x + 4
    assert not response.gradients and not response.hvp
    response = call(stub, with_vectors(request(q.graph, {"x": x}), {"x": 1.5}))
    assert set(response.hvp) == {"x"} and float(decode(response.hvp)["x"]) == 6.0  # 4 * 1.5
    message = request(q.graph, {"x": x})
    message.options.jacobian = True
    response = call(stub, message)
    assert {k: float(v) for k, v in blocks(response.jacobian).items()} == {(q.out, "x"): 4 * x - 3}
    assert not response.hessian


def test_loss_l_hessian_hvp_jvp_and_jacobian(stub: Stub) -> None:
    lo = loss_l()
    want = loss_hessian(**SEED)
    message = request(lo.graph, SEED)
    message.options.hessian = True
    hessian = blocks(call(stub, message).hessian)
    assert set(hessian) == {(r, c) for r in "abcf" for c in "abcf"}
    got = np.array([[float(hessian[(r, c)]) for c in "abcf"] for r in "abcf"])
    np.testing.assert_array_equal(got, want)
    v = [1.0, 2.0, 0.0, -1.0]
    hvp = decode(call(stub, with_vectors(request(lo.graph, SEED), dict(zip("abcf", v,
                                                                          strict=True)))).hvp)
    np.testing.assert_array_equal([float(hvp[n]) for n in "abcf"], want @ v)
    # with an upstream: the Hessian of (upstream . L)
    hvp = decode(call(stub, with_vectors(request(lo.graph, SEED, upstream={lo.out: 0.5}),
                                         dict(zip("abcf", v, strict=True)))).hvp)
    np.testing.assert_array_equal([float(hvp[n]) for n in "abcf"], 0.5 * want @ v)
    grad = loss_gradient(**SEED)
    response = call(stub, with_tangents(request(lo.graph, SEED), {"a": 1.0, "f": -1.0}))
    assert float(decode(response.jvp)[lo.out]) == grad[0] - grad[3]  # b, c held
    message = request(lo.graph, SEED)
    message.options.jacobian = True
    response = call(stub, message)
    jacobian = blocks(response.jacobian)
    assert set(jacobian) == {(lo.out, n) for n in "abcf"}
    np.testing.assert_array_equal([float(jacobian[(lo.out, n)]) for n in "abcf"], grad)
    assert float(decode(response.outputs)[lo.out]) == -4.0


def test_a_differentiated_subset(stub: Stub) -> None:
    lo = loss_l()
    message = request(lo.graph, SEED, wrt=("f", "a"))
    message.options.hessian = True
    hessian = blocks(call(stub, message).hessian)
    assert set(hessian) == {("a", "a"), ("a", "f"), ("f", "a"), ("f", "f")}
    assert float(hessian[("a", "f")]) == SEED["b"] == float(hessian[("f", "a")])
    hvp = decode(call(stub, with_vectors(request(lo.graph, SEED, wrt=("b",)), {"b": 2.0})).hvp)
    assert {k: float(v) for k, v in hvp.items()} == {"b": 0.0}  # d2L/db2 = 0
    message = request(lo.graph, SEED, wrt=("c",))
    message.options.jacobian = True
    assert {k: float(v) for k, v in blocks(call(stub, message).jacobian).items()} == {
        (lo.out, "c"): SEED["f"]}


def test_the_staged_sigmoid_hessian(stub: Stub) -> None:
    st = staged()
    x, y, k = 3.0, -4.0, 1e-6
    want = np.array([[(staged_gradient(x + k, y)[i] - staged_gradient(x - k, y)[i]) / (2 * k)
                      for i in range(2)],
                     [(staged_gradient(x, y + k)[i] - staged_gradient(x, y - k)[i]) / (2 * k)
                      for i in range(2)]])
    message = request(st.graph, {"x": x, "y": y})
    message.options.hessian = True
    hessian = blocks(call(stub, message).hessian)
    got = np.array([[float(hessian[(r, c)]) for c in "xy"] for r in "xy"])
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)
    assert got[0, 1] == pytest.approx(got[1, 0], rel=1e-14)
    response = call(stub, with_tangents(request(st.graph, {"x": x, "y": y}), {"y": 1.0}))
    assert float(decode(response.jvp)[st.out]) == pytest.approx(staged_gradient(x, y)[1],
                                                                rel=1e-12)
    assert float(decode(response.outputs)[st.out]) == pytest.approx(staged_value(x, y),
                                                                    rel=1e-14)


# --- batches and shapes ------------------------------------------------------------------------


POINTS = [SEED, {"a": 1.0, "b": 0.5, "c": -1.0, "f": 4.0}, {"a": -2.0, "b": 3.0, "c": 0.0,
                                                             "f": 0.25}]


def test_batched_examples_each_get_their_own(stub: Stub) -> None:
    q = quadratic()
    xs = np.array([2.0, 6.0, -2.0])
    message = with_tangents(request(q.graph, {"x": xs}, batch_size=3), {"x": np.ones(3)})
    response = call(stub, message)
    np.testing.assert_array_equal(decode(response.jvp)[q.out], 4 * xs - 3)
    np.testing.assert_array_equal(decode(response.outputs)[q.out], 2 * xs**2 - 3 * xs + 4)
    assert list(response.nonfinite) == [False] * 3
    message = request(q.graph, {"x": xs}, batch_size=3)
    message.options.hessian = True
    hessian = blocks(call(stub, message).hessian)[("x", "x")]
    np.testing.assert_array_equal(hessian, [4.0, 4.0, 4.0])

    lo = loss_l()
    stacked = {n: np.array([p[n] for p in POINTS]) for n in "abcf"}
    v = {n: np.array([1.0, -1.0, 0.5]) * (k + 1) for k, n in enumerate("abcf")}
    hvp = decode(call(stub, with_vectors(request(lo.graph, stacked, batch_size=3), v)).hvp)
    for j, p in enumerate(POINTS):
        want = loss_hessian(**p) @ [v[n][j] for n in "abcf"]
        np.testing.assert_array_equal([hvp[n][j] for n in "abcf"], want, err_msg=str(j))
    message = request(lo.graph, stacked, batch_size=3)
    message.options.jacobian = True
    response = call(stub, message)
    jacobian = blocks(response.jacobian)
    for j, p in enumerate(POINTS):
        np.testing.assert_array_equal([jacobian[(lo.out, n)][j] for n in "abcf"],
                                      loss_gradient(**p), err_msg=str(j))
    assert decode(response.outputs)[lo.out].shape == (3,)
    message = request(lo.graph, stacked, batch_size=3)
    message.options.hessian = True
    hessian = blocks(call(stub, message).hessian)
    for j, p in enumerate(POINTS):
        got = np.array([[hessian[(r, c)][j] for c in "abcf"] for r in "abcf"])
        np.testing.assert_array_equal(got, loss_hessian(**p), err_msg=str(j))


def vector_function() -> tuple[Graph, str, str]:
    """y = W @ x (2,) and s = sum(sin(x) * x) (); x (3,), W (2, 3)."""
    g = GraphBuilder()
    x, w = g.input("x", (3,)), g.input("w", (2, 3))
    y = w @ x
    s = (g.op("sin", x) * x).sum()
    return g.build(y, s), y.name, s.name


def test_blocks_have_the_documented_shapes(stub: Stub) -> None:
    graph, y, s = vector_function()
    rng = np.random.default_rng(5)
    xs, ws = rng.standard_normal((2, 3)), rng.standard_normal((2, 2, 3))
    message = request(graph, {"x": xs, "w": ws}, batch_size=2)
    message.options.jacobian = True
    jacobian = blocks(call(stub, message).jacobian)
    assert {k: v.shape for k, v in jacobian.items()} == {
        (y, "x"): (2, 2, 3), (y, "w"): (2, 2, 2, 3), (s, "x"): (2, 3), (s, "w"): (2, 2, 3)}
    for j in range(2):
        x, w = xs[j], ws[j]
        np.testing.assert_allclose(jacobian[(y, "x")][j], w, rtol=1e-15)
        dy_dw = np.zeros((2, 2, 3))
        dy_dw[0, 0], dy_dw[1, 1] = x, x
        np.testing.assert_allclose(jacobian[(y, "w")][j], dy_dw, rtol=1e-15)
        np.testing.assert_allclose(jacobian[(s, "x")][j], np.sin(x) + x * np.cos(x),
                                   rtol=1e-14)
        np.testing.assert_array_equal(jacobian[(s, "w")][j], np.zeros((2, 3)))
    # the Hessian of sum(y) + s: x-x diag(2cos x - x sin x), x-w [i,k,l] = delta_il, w-w 0
    message = request(graph, {"x": xs[0], "w": ws[0]})
    message.options.hessian = True
    hessian = blocks(call(stub, message).hessian)
    assert {k: v.shape for k, v in hessian.items()} == {
        ("x", "x"): (3, 3), ("x", "w"): (3, 2, 3), ("w", "x"): (2, 3, 3), ("w", "w"): (2, 3, 2, 3)}
    x = xs[0]
    np.testing.assert_allclose(hessian[("x", "x")], np.diag(2 * np.cos(x) - x * np.sin(x)),
                               rtol=1e-14, atol=1e-15)
    xw = np.zeros((3, 2, 3))
    for i in range(3):
        xw[i, :, i] = 1.0
    np.testing.assert_array_equal(hessian[("x", "w")], xw)
    np.testing.assert_array_equal(hessian[("w", "x")], np.transpose(xw, (1, 2, 0)))
    np.testing.assert_array_equal(hessian[("w", "w")], np.zeros((2, 3, 2, 3)))


# --- ONNX models ---------------------------------------------------------------------------


def small_transformer() -> Any:
    return transformer(seed=2, dtype=np.float64, seq=4, width=8, heads=2, hidden=16)


def test_an_onnx_models_hvp_matches_finite_differences(stub: Stub) -> None:
    """A transformer block (smooth: GELU, softmax, layer norm): the served H v against
    central differences of the in-process gradient, and v . H v against second differences
    of onnx's ReferenceEvaluator; batched, each example its own."""
    model = small_transformer()
    data = model.SerializeToString()
    out = model.graph.output[0].name
    rng = np.random.default_rng(0)
    x, v = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 4, 8))
    u = rng.standard_normal((2, 4, 8))
    message = pb.ComputeRequest(onnx_model=pb.OnnxModel(model=data), batch_size=2,
                                inputs=tensors_to_wire({"x": x}),
                                upstream=tensors_to_wire({out: u}),
                                hvp_vectors=tensors_to_wire({"x": v}))
    hvp = decode(call(stub, message).hvp)["x"]
    assert hvp.shape == x.shape
    plan = Plan(import_model(data).graph)
    reference = evaluator(model)
    for j in range(2):
        def gradient(eps: float, j: int = j) -> Arr:
            return plan.run({"x": x[j] + eps * v[j]}, upstream={out: u[j]}).gradients["x"]

        numeric = (gradient(1e-5) - gradient(-1e-5)) / 2e-5
        np.testing.assert_allclose(hvp[j], numeric, rtol=1e-5, atol=1e-7, err_msg=str(j))

        def s(eps: float, j: int = j) -> float:
            return float(np.sum(u[j] * reference({"x": (x[j] + eps * v[j])[None]})[0][0]))

        h = 1e-4
        second = (s(h) - 2 * s(0.0) + s(-h)) / h**2
        assert float(np.sum(v[j] * hvp[j])) == pytest.approx(second, rel=1e-4, abs=1e-5)
    # one example alone: the same as the batch's first
    single = pb.ComputeRequest(onnx_model=pb.OnnxModel(model=data),
                               inputs=tensors_to_wire({"x": x[0]}),
                               upstream=tensors_to_wire({out: u[0]}),
                               hvp_vectors=tensors_to_wire({"x": v[0]}))
    np.testing.assert_allclose(decode(call(stub, single).hvp)["x"], hvp[0], rtol=1e-12,
                               atol=1e-13)


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_an_onnx_models_jvp_matches_the_reference(stub: Stub, name: str) -> None:
    model = cnn(dtype=np.float64) if name == "cnn" else small_transformer()
    shape = (1, 28, 28) if name == "cnn" else (4, 8)
    out = model.graph.output[0].name
    rng = np.random.default_rng(1)
    x, v = rng.standard_normal(shape), rng.standard_normal(shape)
    message = pb.ComputeRequest(onnx_model=pb.OnnxModel(model=model.SerializeToString()),
                                inputs=tensors_to_wire({"x": x}),
                                tangents=tensors_to_wire({"x": v}))
    response = call(stub, message)
    reference = evaluator(model)

    def f(at: Arr) -> Arr:
        return reference({"x": at[None]})[0][0]

    np.testing.assert_allclose(decode(response.outputs)[out], f(x), rtol=1e-12, atol=1e-12)
    # of the steps 1e-5 and 1e-6 the closer counts: a ReLU or max-pool kink within one step
    jvp = decode(response.jvp)[out]
    errors = [np.max(np.abs((f(x + h * v) - f(x - h * v)) / (2 * h) - jvp)) for h in (1e-5,
                                                                                         1e-6)]
    assert min(errors) < 1e-6 * (1 + float(np.max(np.abs(jvp))))


# --- the Python clients --------------------------------------------------------------------


def test_the_sync_client(served: Served) -> None:
    lo = loss_l()
    want = loss_hessian(**SEED)
    grad = loss_gradient(**SEED)
    with GradientClient(served.server.target) as client:
        answer = client.jvp(lo.graph, SEED, {"a": 1.0})
        assert float(answer.jvp[lo.out]) == grad[0] and float(answer.outputs[lo.out]) == -4.0
        hessian = client.hessian(lo.graph, SEED).hessian
        np.testing.assert_array_equal([[float(hessian[(r, c)]) for c in "abcf"]
                                       for r in "abcf"], want)
        jacobian = client.jacobian(lo.graph, SEED).jacobian
        np.testing.assert_array_equal([float(jacobian[(lo.out, n)]) for n in "abcf"], grad)
        v = {"a": 1.0, "b": 0.0, "c": 2.0, "f": 0.0}
        hvp = client.hvp(lo.graph, SEED, v).hvp
        np.testing.assert_array_equal([float(hvp[n]) for n in "abcf"],
                                      want @ list(v.values()))
        q = quadratic()
        batched = client.hvp(q.graph, {"x": np.array([1.0, 2.0])}, {"x": np.array([1.0, 3.0])},
                             batch_size=2)
        np.testing.assert_array_equal(batched.hvp["x"], [4.0, 12.0])
        with pytest.raises(GradserveError) as caught:
            client.jvp(lo.graph, SEED, {"zz": 1.0})
        assert caught.value.code is INVALID and caught.value.field == "tangents.zz"


def test_the_async_client(served: Served) -> None:
    lo = loss_l()
    want = loss_hessian(**SEED)
    grad = loss_gradient(**SEED)
    v = {"a": 0.0, "b": 1.0, "c": 0.0, "f": -1.0}

    async def run() -> list[Any]:
        async with AsyncGradientClient(served.server.target) as client:
            return list(await asyncio.gather(
                client.jvp(lo.graph, SEED, {"f": 1.0}), client.hvp(lo.graph, SEED, v),
                client.jacobian(lo.graph, SEED), client.hessian(lo.graph, SEED)))

    jvp, hvp, jacobian, hessian = asyncio.run(run())
    assert float(jvp.jvp[lo.out]) == grad[3]  # dL/df = a*b + c
    np.testing.assert_array_equal([float(hvp.hvp[n]) for n in "abcf"], want @ list(v.values()))
    np.testing.assert_array_equal([float(jacobian.jacobian[(lo.out, n)]) for n in "abcf"], grad)
    np.testing.assert_array_equal([[float(hessian.hessian[(r, c)]) for c in "abcf"]
                                   for r in "abcf"], want)


# --- refusals ------------------------------------------------------------------------------


def refused(stub: Stub, message: pb.ComputeRequest) -> tuple[grpc.StatusCode, list[str], str]:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Compute(message, timeout=RPC_TIMEOUT)
    f = failure(caught.value)
    return f.code, f.fields, f.message


@pytest.mark.parametrize(("first", "second"), [("tangents", "hessian"),
                                               ("tangents", "hvp_vectors"),
                                               ("hvp_vectors", "jacobian"),
                                               ("jacobian", "hessian")])
def test_two_kinds_in_one_request_are_refused(stub: Stub, first: str, second: str) -> None:
    lo = loss_l()
    message = request(lo.graph, SEED)
    for kind in (first, second):
        if kind == "tangents":
            with_tangents(message, {"a": 1.0})
        elif kind == "hvp_vectors":
            with_vectors(message, {n: 1.0 for n in "abcf"})
        else:
            setattr(message.options, kind, True)
    field = first if first in ("tangents", "hvp_vectors") else f"options.{first}"
    assert refused(stub, message)[:2] == (INVALID, [field])


def test_refusals_name_the_field(stub: Stub) -> None:
    lo = loss_l()
    unknown = with_tangents(request(lo.graph, SEED), {"zz": 1.0})
    code, fields, message = refused(stub, unknown)
    assert (code, fields) == (INVALID, ["tangents.zz"]) and "zz" in message
    unknown = with_vectors(request(lo.graph, SEED), {**{n: 1.0 for n in "abcf"}, "zz": 1.0})
    assert refused(stub, unknown)[:2] == (INVALID, ["hvp_vectors.zz"])
    missing = with_vectors(request(lo.graph, SEED), {"a": 1.0, "c": 1.0, "f": 1.0})
    code, fields, message = refused(stub, missing)
    assert (code, fields) == (INVALID, ["hvp_vectors.b"]) and "b" in message
    missing = with_vectors(request(lo.graph, SEED, wrt=("a", "f")), {"a": 1.0})
    assert refused(stub, missing)[:2] == (INVALID, ["hvp_vectors.f"])
    for kind in ("jacobian", "hessian"):
        mixed = request(lo.graph, SEED)
        setattr(mixed.options, kind, True)
        mixed.options.return_intermediates = True
        assert refused(stub, mixed)[:2] == (INVALID, [f"options.{kind}"])
    mixed = with_vectors(request(lo.graph, SEED), {n: 1.0 for n in "abcf"})
    mixed.options.check_gradients = True
    assert refused(stub, mixed)[:2] == (INVALID, ["hvp_vectors"])
    good = call(stub, request(lo.graph, SEED))  # still serving
    assert float(decode(good.outputs)[lo.out]) == -4.0


BAD_DIRECTIONS: dict[str, tuple[dict[str, Any], int, dict[str, Any]]] = {
    "shape": ({}, 0, {"a": np.ones(3)}),
    "dtype": ({}, 0, {"a": np.float32(1.0)}),
    "batch": ({"a": np.ones(3)}, 3, {"a": np.ones(2)}),
    "unbatched": ({"a": np.ones(3)}, 3, {"a": 1.0}),
}


@pytest.mark.parametrize("bad", list(BAD_DIRECTIONS))
def test_a_direction_of_the_wrong_shape_or_dtype_names_its_field(stub: Stub, bad: str) -> None:
    """A direction that does not fit its input: INVALID_ARGUMENT naming the request's field
    (tangents.a, hvp_vectors.a), not a name of the derived graph the server made."""
    lo = loss_l()
    inputs, batch, direction = BAD_DIRECTIONS[bad]
    fed = {**{n: np.full(batch, v) if batch else v for n, v in SEED.items()}, **inputs}
    found = {}
    for field in ("tangents", "hvp_vectors"):
        message = request(lo.graph, fed, batch_size=batch)
        if field == "tangents":
            with_tangents(message, direction)
        else:
            with_vectors(message, {**{n: np.ones(batch) if batch else 1.0 for n in "bcf"},
                                   **direction})
        code, fields, text = refused(stub, message)
        found[field] = (code, fields, ".tangent" in text)
    assert found == {"tangents": (INVALID, ["tangents.a"], False),
                     "hvp_vectors": (INVALID, ["hvp_vectors.a"], False)}


def test_a_tangent_for_an_integer_input_is_refused(stub: Stub) -> None:
    g = GraphBuilder()
    x = g.input("x", (3,))
    k = g.input("k", (), DType.INT64)
    graph = g.build(g.op("gather", x, k))
    message = request(graph, {"x": np.array([1.0, 2.0, 3.0]), "k": np.array(1)})
    with_tangents(message, {"k": np.array(1)})
    code, fields, _ = refused(stub, message)
    assert code is INVALID and fields and fields[0].startswith("tangents")
    ok = with_tangents(request(graph, {"x": np.array([1.0, 2.0, 3.0]), "k": np.array(1)}),
                       {"x": np.array([5.0, 7.0, 9.0])})
    assert float(decode(call(stub, ok).jvp)[graph.outputs[0]]) == 7.0


def test_an_op_without_a_rule_is_refused_naming_it(make_server: ServerFactory,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    table = dict(OP_TABLE)
    table["sigmoid"] = dataclasses.replace(OP_TABLE["sigmoid"], jvp=None)
    monkeypatch.setattr("gradserve.engine.forward.OP_TABLE", table)
    served = make_server()
    st = staged()
    message = with_tangents(request(st.graph, {"x": 3.0, "y": -4.0}), {"x": 1.0})
    code, fields, text = refused(served.stub, message)
    assert code is INVALID and "'sigmoid'" in text
    # the sigmoid on x's path (sigmoid(y) has no tangent along x: not refused)
    (index,) = [k for k, n in enumerate(st.graph.nodes) if n.op == "sigmoid" and n.inputs == ("x",)]
    assert fields == [f"graph.nodes[{index}].op"]
    message = request(st.graph, {"x": 3.0, "y": -4.0})
    message.options.hessian = True
    code, _, text = refused(served.stub, message)
    assert code is INVALID and "sigmoid" in text
    # the gradient and the dense Jacobian need no forward-mode rule
    message = request(st.graph, {"x": 3.0, "y": -4.0})
    message.options.jacobian = True
    jacobian = blocks(call(served.stub, message).jacobian)
    np.testing.assert_allclose([float(jacobian[(st.out, n)]) for n in "xy"],
                               staged_gradient(3.0, -4.0), rtol=1e-12)


@pytest.mark.parametrize("kind", ["jacobian", "hessian"])
def test_a_dense_kind_past_the_limit_is_resource_exhausted(make_server: ServerFactory,
                                                           kind: str) -> None:
    served = make_server(max_request_elements=1000)
    g = GraphBuilder()
    x = g.input("x", (40,))
    y = x * x
    graph = g.build(y)  # 40 outputs of 40 inputs: 40 passes of 40 elements, over 1000
    message = request(graph, {"x": np.ones(40)})
    setattr(message.options, kind, True)
    code, fields, _ = refused(served.stub, message)
    assert (code, fields) == (grpc.StatusCode.RESOURCE_EXHAUSTED, [f"options.{kind}"])
    # within the limit: 20 inputs, 400 elements
    g = GraphBuilder()
    x = g.input("x", (20,))
    y = x * x
    small = request(g.build(y), {"x": np.arange(20.0)})
    setattr(small.options, kind, True)
    response = call(served.stub, small)
    found = blocks(response.jacobian if kind == "jacobian" else response.hessian)
    want = np.diag(2 * np.arange(20.0)) if kind == "jacobian" else 2 * np.eye(20)
    (block,) = found.values()
    np.testing.assert_array_equal(block, want)
    # an HVP is one pass, whatever the size
    vectors = with_vectors(request(graph, {"x": np.ones(40)}), {"x": np.ones(40)})
    np.testing.assert_array_equal(decode(call(served.stub, vectors).hvp)["x"], np.full(40, 2.0))
