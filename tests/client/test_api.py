"""The Python client against a real server on loopback."""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np
import pytest

from gradserve.client.api import AsyncGradientClient, GradientClient, GradserveError
from gradserve.engine import DType, Graph, Plan
from gradserve.engine import plan as plan_module
from gradserve.engine.builder import GraphBuilder, Value
from gradserve.server.app import GradServer


def seed_loss() -> Value:
    g = GraphBuilder()
    a, b, c, f = (g.input(n) for n in "abcf")
    return g.op("mul", (a * b + c), f, name="L")


SEED = {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0}


def test_seed_examples_through_the_client(server: GradServer) -> None:
    with GradientClient(server.target) as client:
        result = client.compute(seed_loss(), SEED)
        assert result.outputs["L"] == -4.0
        assert {k: float(v) for k, v in result.gradients.items()} == {
            "a": 4.0, "b": -6.0, "c": -2.0, "f": 2.0}
        g = GraphBuilder()
        x = g.input("x")
        f = 2 * x**2 - 3 * x + 4
        for value, want, slope in ((2.0, 6.0, 5.0), (6.0, 58.0, 21.0), (-2.0, 18.0, -11.0)):
            r = client.compute(f, {"x": value})
            assert (float(r.output), float(r.gradients["x"])) == (want, slope)


def test_staged_sigmoid_expression(server: GradServer) -> None:
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    f = (x + y.sigmoid()) / (x.sigmoid() + (x + y) ** 2)
    with GradientClient(server.target) as client:
        r = client.compute(f, {"x": 3.0, "y": -4.0})
    sigy, sigx = 1 / (1 + math.exp(4.0)), 1 / (1 + math.exp(-3.0))
    num, den = 3.0 + sigy, sigx + (3.0 - 4.0) ** 2
    dden = -num / den**2
    dx = 2 * (3.0 - 4.0) * dden + sigx * (1 - sigx) * dden + 1 / den
    dy = 2 * (3.0 - 4.0) * dden + sigy * (1 - sigy) / den
    assert r.output == pytest.approx(num / den, rel=1e-12)
    assert r.gradients["x"] == pytest.approx(dx, rel=1e-12)
    assert r.gradients["y"] == pytest.approx(dy, rel=1e-12)


def test_many_examples_in_one_request_and_float32(server: GradServer) -> None:
    g = GraphBuilder()
    x = g.input("x", (3,), DType.FLOAT32)
    w = g.input("w", (3,), DType.FLOAT32)
    loss = (x * w).sum().tanh()
    xs = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    ws = np.ones((4, 3), np.float32) / 2
    with GradientClient(server.target) as client:
        r = client.compute(loss, {"x": xs, "w": ws}, batch_size=4)
    want = np.tanh((xs * ws).sum(axis=1))
    assert r.output.dtype == np.float32 and r.gradients["x"].dtype == np.float32
    np.testing.assert_allclose(r.output, want, rtol=1e-6)
    np.testing.assert_allclose(r.gradients["x"], ws * (1 - want**2)[:, None], rtol=1e-5)
    assert r.nonfinite == [False] * 4


def test_an_unknown_id_falls_back_to_sending_the_whole_graph(server: GradServer) -> None:
    with GradientClient(server.target) as client:
        loss = seed_loss()
        first = client.register(loss)
        assert client.register(loss) == first
        client.compute(loss, SEED)
        ids = client._graphs._ids
        ids[next(iter(ids))] = "evicted-id"  # as a replica that never saw it
        assert client.compute(loss, SEED).outputs["L"] == -4.0


def test_errors_carry_code_and_field_violations(server: GradServer) -> None:
    g = GraphBuilder()
    x = g.input("x", (2,))
    with GradientClient(server.target) as client, pytest.raises(GradserveError) as info:
        client.compute(x.sum(axis=3), {"x": [1.0, 2.0]})
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field_violations[0][0].endswith("attributes.axis")


def test_bulk_stream_keeps_order_and_reports_each_failure(server: GradServer) -> None:
    g = GraphBuilder()
    labels = g.input("labels", (2,), DType.INT64)
    logits = g.input("logits", (2, 3))
    loss = g.op("softmax_cross_entropy", logits, labels)
    rng = np.random.default_rng(0)
    items = [{"logits": rng.standard_normal((2, 3)), "labels": np.array([k % 3, 1])}
             for k in range(40)]
    items[7]["labels"] = np.array([5, 0])  # out of range: only this item fails
    plan = Plan(loss.builder.build(loss))
    with GradientClient(server.target) as client:
        results = client.compute_many(loss, items)
        for k, item in enumerate(items):
            got = next(results)
            if k == 7:
                assert isinstance(got, GradserveError)
                assert got.code is grpc.StatusCode.INVALID_ARGUMENT
                continue
            assert not isinstance(got, GradserveError)
            want = plan.run(item)
            np.testing.assert_allclose(got.output, want.outputs[loss.name], rtol=1e-12)
            np.testing.assert_allclose(got.gradients["logits"], want.gradients["logits"],
                                       rtol=1e-12)
        assert next(results, None) is None


def test_async_client(server: GradServer) -> None:
    async def main() -> list[float]:
        async with AsyncGradientClient(server.target) as client:
            loss = seed_loss()
            results = await asyncio.gather(*(
                client.compute(loss, {**SEED, "a": float(a)}) for a in range(5)))
            streamed = [r async for r in client.compute_many(loss, [SEED, SEED])]
            assert [float(r.output) for r in streamed if not isinstance(r, Exception)] == [
                -4.0, -4.0]
            return [float(r.gradients["b"]) for r in results]

    # dL/db = a * f = -2a
    assert asyncio.run(main()) == [0.0, -2.0, -4.0, -6.0, -8.0]


def test_retries_until_the_server_is_up(start_server: object) -> None:
    import socket
    import threading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started: list[GradServer] = []
    timer = threading.Timer(0.3, lambda: started.append(start_server(port=port)))  # type: ignore[operator]
    timer.start()
    try:
        with GradientClient(f"127.0.0.1:{port}", timeout=10) as client:
            assert client.compute(seed_loss(), SEED).outputs["L"] == -4.0
    finally:
        timer.join()


def test_plain_numbers_take_the_graphs_dtypes_but_never_lose_their_kind(
        server: GradServer) -> None:
    g = GraphBuilder()
    x = g.input("x", (), DType.FLOAT32)
    y = x * 3.0
    g = GraphBuilder()
    labels = g.input("labels", (1,), DType.INT64)
    logits = g.input("logits", (1, 3))
    loss = g.op("softmax_cross_entropy", logits, labels)
    with GradientClient(server.target) as client:
        r = client.compute(y, {"x": 2.0}, upstream={y.name: 0.5})  # float32 graph, plain upstream
        assert r.gradients["x"].dtype == np.float32 and r.gradients["x"] == 1.5
        with pytest.raises(GradserveError) as info:
            client.compute(loss, {"labels": [1.9], "logits": [[0.0, 1.0, 2.0]]})
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "labels" in info.value.message


# --- the client fits the hand -----------------------------------------------------------------


def test_results_come_in_the_graphs_order(server: GradServer) -> None:
    """Inputs declared d, a, c, b (a map on the wire has no order of its own)."""
    g = GraphBuilder()
    d, a, c, b = (g.input(n) for n in "dacb")
    out = g.op("add", a * b, c * d, name="z")
    inputs = {"a": 3.0, "b": -2.0, "c": 8.0, "d": -2.0}
    for _ in range(5):  # the wire's order varies with the names: once is not enough
        with GradientClient(server.target) as client:
            r = client.compute(out, inputs)
        assert list(r.gradients) == ["d", "a", "c", "b"]
        assert {k: float(v) for k, v in r.gradients.items()} == {
            "d": 8.0, "a": -2.0, "c": -2.0, "b": 3.0}


def test_a_lone_upstream_array_and_values_as_keys(server: GradServer) -> None:
    g = GraphBuilder()
    x = g.input("x", (3,))
    y = (x * x).exp()  # its generated name is exp_<n>: nobody need know it
    xs = np.array([0.1, -0.2, 0.3])
    up = np.array([1.0, 2.0, -1.0])
    want = up * np.exp(xs**2) * 2 * xs  # d/dx of <up, exp(x^2)>
    with GradientClient(server.target) as client:
        for upstream in (up, {y: up}, {y.name: up}):
            r = client.compute(y, {x: xs}, upstream=upstream)
            np.testing.assert_allclose(r.gradients["x"], want, rtol=1e-12)


def test_several_outputs_say_how_to_read_them(server: GradServer) -> None:
    g = GraphBuilder()
    x = g.input("x")
    graph = g.build(g.op("mul", x, x, name="square"), g.op("neg", x, name="minus"))
    with GradientClient(server.target) as client:
        r = client.compute(graph, {"x": 3.0})
        with pytest.raises(ValueError, match=r"2 outputs \(square, minus\).*outputs\[name\]"):
            _ = r.output
        assert (float(r.outputs["square"]), float(r.outputs["minus"])) == (9.0, -3.0)
        with pytest.raises(ValueError, match=r"2 outputs \(square, minus\)"):
            client.compute(graph, {"x": 3.0}, upstream=1.0)


def test_a_refusal_names_its_field(server: GradServer) -> None:
    with GradientClient(server.target) as client, pytest.raises(GradserveError) as caught:
        client.compute(seed_loss(), {**SEED, "e": 1.0})
    assert caught.value.field == "inputs.e"
    assert "not an input" in caught.value.description


def test_the_async_stream_takes_a_timeout(server: GradServer) -> None:
    async def run() -> list[float]:
        async with AsyncGradientClient(server.target) as client:
            return [float(r.gradients["a"]) async for r in client.compute_many(
                seed_loss(), [SEED] * 3, timeout=10) if not isinstance(r, GradserveError)]

    assert asyncio.run(run()) == [4.0, 4.0, 4.0]


def test_a_graphs_key_is_computed_once_and_by_id_requests_hash_nothing(
        server: GradServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """An MLP layer with a 784 x 256 weight constant: hashing it takes about a millisecond, so
    the client computes the key once per graph object, and the server, asked by id, never."""
    digests: list[int] = []
    digest = plan_module._digest

    def counted(graph: Graph) -> str:
        digests.append(1)
        return digest(graph)

    monkeypatch.setattr(plan_module, "_digest", counted)
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((784, 256))
    g = GraphBuilder()
    x = g.input("x", (784,))
    w = g.constant(weights)
    loss = g.op("matmul", x, w).tanh().sum()
    weights[:] = 0.0  # the graph froze its own copy: changing the caller's array changes nothing
    xs = rng.standard_normal(784)
    want = (1 - np.tanh(xs @ g.build(loss).constants[0].value) ** 2) @ \
        g.build(loss).constants[0].value.T
    with GradientClient(server.target) as client:
        for _ in range(20):
            r = client.compute(loss, {"x": xs})
            np.testing.assert_allclose(r.gradients["x"], want, rtol=1e-10)
    assert len(digests) == 2  # the client's one, and the server's when the graph was registered
    assert g.build(loss).constants[0].value.any()
