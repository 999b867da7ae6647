"""The Python client's ONNX path against a live server on loopback.

``register_onnx`` takes a ``.onnx`` path, the model's bytes or a ModelProto (all one model, one
id, the id the contract gives the model); ``compute`` takes inputs in the model's own shapes,
the batch inferred from a batched model's leading dimension (one example or several), with
``wrt`` and ``upstream``, and initializers fed as inputs; the asyncio client does the same. The
mistakes the client can see are found before any call: a wrong-rank input is a ValueError, a
model that does not import a ModelError (shown against an address where nothing listens).

Expected values are hand-derived for a small dense model, and come from onnx's
ReferenceEvaluator and central finite differences for the CNN, never from gradserve.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from gradserve.client.api import AsyncGradientClient, GradientClient, Model, load_model
from gradserve.client.networks import cnn
from gradserve.importer import ModelError, TensorInfo
from gradserve.server.app import GradServer
from gradserve.server.config import ServerConfig
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from tests.importer.models import In, make, node

Arr = NDArray[Any]
HOST = "127.0.0.1"
W = np.array([[0.5, -1.0, 0.25, 2.0], [1.5, 0.75, -0.5, 0.0], [-0.25, 1.0, 1.25, -1.5]])


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    """One server (default settings, 127.0.0.1, an ephemeral port) for the module."""
    server = GradServer(ServerConfig(host=HOST, port=0, metrics_port=-1))
    server.start()
    try:
        yield server.target
    finally:
        server.stop(grace=1.0)


def dead_target() -> str:
    """An address on loopback where nothing listens: a call to it could only fail."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    return f"{HOST}:{port}"


# --- a small dense model and its hand-derived gradients ---------------------------------------


def dense() -> onnx.ModelProto:
    """y = tanh(a @ W) * b: a (N, 3), b (N, 4), W (3, 4) an initializer; y (N, 4)."""
    return make([node("MatMul", ["a", "W"], ["z"]), node("Tanh", ["z"], ["t"]),
                 node("Mul", ["t", "b"])], {"a": In(("N", 3)), "b": In(("N", 4))}, ["y"],
                initializers={"W": W}, declare={"y": ("N", 4)})


def dense_answer(a: Arr, b: Arr, w: Arr, up: Arr) -> dict[str, Arr]:
    """y, and the vector-Jacobian products with ``up`` for a, b and W, per example (leading
    axis): with t = tanh(a W) and s = up * b * (1 - t^2), dy.a = s W^T, dy.b = up * t and
    dy.W = a^T s (outer product, per example)."""
    t = np.tanh(np.einsum("ni,nij->nj", a, w))
    s = up * b * (1 - t**2)
    return {"y": t * b, "a": np.einsum("nj,nij->ni", s, w), "b": up * t,
            "W": np.einsum("ni,nj->nij", a, s)}


def draw(n: int, seed: int) -> tuple[Arr, Arr, Arr]:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, 3)), rng.uniform(-2, 2, (n, 4)), rng.standard_normal((n, 4))


def logits(reference: ReferenceEvaluator, x: Arr) -> Arr:
    """The CNN's logits as onnx.reference computes them."""
    (out,) = list(reference.run(None, {"x": x}))
    return np.asarray(out)


def close(got: Arr, want: Arr) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


# --- registering ---------------------------------------------------------------------------------


def test_register_onnx_from_a_path_bytes_and_a_model_proto(target: str, tmp_path: Path) -> None:
    model = dense()
    path = tmp_path / "dense.onnx"
    onnx.save(model, str(path))
    with grpc.insecure_channel(target) as channel:  # the id the contract gives this model
        contract_id = pb_grpc.GradientServiceStub(channel).RegisterGraph(
            pb.RegisterGraphRequest(onnx_model=pb.OnnxModel(model=model.SerializeToString())),
            timeout=10).graph_id
    a, b, up = draw(2, 0)
    want = dense_answer(a, b, np.stack([W] * 2), up)
    with GradientClient(target) as client:
        for source in (path, str(path), model.SerializeToString(), model):
            loaded = client.register_onnx(source)
            assert isinstance(loaded, Model)
            assert loaded.inputs == (TensorInfo("a", (None, 3), "float64"),
                                     TensorInfo("b", (None, 4), "float64"))
            assert loaded.outputs == (TensorInfo("y", (None, 4), "float64"),)
            assert loaded.batched
            assert client.register(loaded) == contract_id
            r = client.compute(loaded, {"a": a, "b": b}, upstream=up)
            assert list(r.outputs) == ["y"] and list(r.gradients) == ["a", "b"]
            for name in ("a", "b"):
                close(r.gradients[name], want[name])
            close(r.output, want["y"])
            assert r.nonfinite == [False, False]


# --- computing in the model's own shapes ------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5])
def test_the_batch_is_the_inputs_leading_dimension(target: str, n: int) -> None:
    a, b, _ = draw(n, n)
    want = dense_answer(a, b, np.stack([W] * n), np.ones((n, 4)))
    with GradientClient(target) as client:
        model = client.register_onnx(dense())
        r = client.compute(model, {"a": a, "b": b})  # upstream: ones
        close(r.output, want["y"])
        close(r.gradients["a"], want["a"])
        close(r.gradients["b"], want["b"])
        assert r.nonfinite == [False] * n


@pytest.mark.parametrize("n", [1, 4])
def test_the_cnn_with_one_image_and_several(target: str, n: int) -> None:
    """float32 logits within 1e-5 of onnx.reference; the float64 CNN's gradient along random
    directions matches central finite differences (the better of two steps: a ReLU or
    max-pool kink may lie within one)."""
    rng = np.random.default_rng(20 + n)
    x = rng.standard_normal((n, 1, 28, 28))
    with GradientClient(target) as client:
        for dtype in (np.float32, np.float64):
            onnx_model = cnn(dtype=dtype)
            model = client.register_onnx(onnx_model)
            xs = x.astype(dtype)
            up = rng.standard_normal((n, 10)).astype(dtype)
            r = client.compute(model, {"x": xs}, upstream={"logits": up})
            reference = ReferenceEvaluator(onnx_model)
            want = logits(reference, xs)
            assert r.output.shape == (n, 10) and r.output.dtype == dtype
            tol = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(r.output, want, rtol=tol, atol=tol)
            grad = r.gradients["x"]
            assert grad.shape == xs.shape and grad.dtype == dtype
            if dtype == np.float64:
                v = rng.standard_normal(x.shape)
                terms = (grad * v).reshape(n, -1)
                errors = [np.abs(((logits(reference, x + h * v) - logits(reference, x - h * v))
                                  * up).sum(1) / (2 * h) - terms.sum(1)) for h in (1e-5, 1e-6)]
                np.testing.assert_array_less(np.minimum(*errors), 1e-9 * np.abs(terms).sum(1))


def test_wrt_and_upstream(target: str) -> None:
    a, b, up = draw(3, 1)
    want = dense_answer(a, b, np.stack([W] * 3), up)
    with GradientClient(target) as client:
        model = client.register_onnx(dense())
        only_b = client.compute(model, {"a": a, "b": b}, wrt=["b"], upstream=up)
        assert list(only_b.gradients) == ["b"]
        close(only_b.gradients["b"], want["b"])
        only_a = client.compute(model, {"a": a, "b": b}, wrt=["a"], upstream={"y": up})
        assert list(only_a.gradients) == ["a"]
        close(only_a.gradients["a"], want["a"])
        close(only_a.output, want["y"])


def test_weights_fed_as_inputs_get_their_gradients(target: str) -> None:
    """W made an input: fed per example (each example is the model on a batch of one, with
    its own weights), differentiated per example."""
    n = 3
    a, b, up = draw(n, 2)
    ws = W + np.random.default_rng(3).standard_normal((n, 3, 4)) * 0.1  # one W per example
    want = dense_answer(a, b, ws, up)
    with GradientClient(target) as client:
        model = client.register_onnx(dense(), inputs=["W"])
        assert [i.name for i in model.inputs] == ["a", "b", "W"]
        assert model.inputs[2] == TensorInfo("W", (3, 4), "float64")
        r = client.compute(model, {"a": a, "b": b, "W": ws}, upstream=up)
        assert list(r.gradients) == ["a", "b", "W"]
        close(r.output, want["y"])
        for name in ("a", "b", "W"):
            close(r.gradients[name], want[name])
        only_w = client.compute(model, {"a": a, "b": b, "W": ws}, wrt=["W"], upstream=up)
        assert list(only_w.gradients) == ["W"]
        close(only_w.gradients["W"], want["W"])
        constants = client.register_onnx(dense())  # W a constant again: the model's own
        assert [i.name for i in constants.inputs] == ["a", "b"]
        close(client.compute(constants, {"a": a, "b": b}).output,
              dense_answer(a, b, np.stack([W] * n), up)["y"])


def test_a_weight_given_once_is_every_examples(target: str) -> None:
    """W fed as an input but given in its own shape (3, 4), as the model declares it: the same
    W for each of the batch's examples, as torch would use it; their gradients per example."""
    n = 4
    a, b, up = draw(n, 5)
    want = dense_answer(a, b, np.stack([W] * n), up)
    with GradientClient(target) as client:
        model = client.register_onnx(dense(), inputs=["W"])
        r = client.compute(model, {"a": a, "b": b, "W": W}, upstream=up)
    for name in ("a", "b", "W"):
        close(r.gradients[name], want[name])


# --- the client's own refusals ------------------------------------------------------------------


def test_a_wrong_rank_input_is_a_value_error(target: str) -> None:
    with GradientClient(target) as client:
        model = client.register_onnx(cnn())
        image = np.zeros((1, 28, 28), np.float32)  # one image without the batch axis
        with pytest.raises(ValueError, match=r"input 'x' has shape \[1, 28, 28\]; the model "
                                             r"takes \[N, 1, 28, 28\]"):
            client.compute(model, {"x": image})
        assert client.compute(model, {"x": image[None]}).output.shape == (1, 10)
        two = client.register_onnx(dense())
        a, b, _ = draw(2, 6)
        with pytest.raises(ValueError, match=r"input 'b' has shape \[4\]; the model takes "
                                             r"\[N, 4\]"):
            client.compute(two, {"a": a, "b": b[0]})  # the second batched input checked too
        with pytest.raises(ValueError, match=r"input 'b' has a batch of 1; the inputs before "
                                             r"it, 2"):
            client.compute(two, {"a": a, "b": b[:1]})


def unsupported() -> onnx.ModelProto:
    return make([node("Relu", ["x"], ["r"]), node("Hardmax", ["r"], name="hm")],
                {"x": In(("N", 3))}, ["y"], opset=17)


def test_a_model_that_does_not_import_fails_before_any_call(tmp_path: Path) -> None:
    """Against an address where nothing listens, a call would be UNAVAILABLE: the ModelError
    shows none was made."""
    path = tmp_path / "bad.onnx"
    onnx.save(unsupported(), str(path))
    with GradientClient(dead_target(), timeout=5) as client:
        for source in (unsupported(), path, unsupported().SerializeToString()):
            with pytest.raises(ModelError) as info:
                client.register_onnx(source)
            e = info.value
            assert (e.node, e.op_type, e.opset, e.field) == ("hm", "Hardmax", 17,
                                                             "graph.node[1].op_type")
        with pytest.raises(ModelError, match="not an ONNX model"):
            client.register_onnx(b"\x0a\xff\xff\xff\xff not protobuf")
        with pytest.raises(ModelError, match="'w' is not an initializer"):
            client.register_onnx(dense(), inputs=["w"])
    with pytest.raises(ModelError):
        load_model(unsupported())


# --- asyncio -------------------------------------------------------------------------------------


def test_the_async_client_registers_and_computes_a_model(target: str, tmp_path: Path) -> None:
    path = tmp_path / "dense.onnx"
    onnx.save(dense(), str(path))
    inputs = [draw(n, 10 + n) for n in (1, 2, 3)]

    async def main() -> list[dict[str, Arr]]:
        async with AsyncGradientClient(target) as client:
            model = await client.register_onnx(path, inputs=["W"])
            assert model.batched and [i.name for i in model.inputs] == ["a", "b", "W"]
            results = await asyncio.gather(*(
                client.compute(model, {"a": a, "b": b, "W": np.stack([W] * len(a))},
                               upstream=up) for a, b, up in inputs))
            with pytest.raises(ModelError):
                await client.register_onnx(unsupported())
            return [{**r.outputs, **r.gradients} for r in results]

    for got, (a, b, up) in zip(asyncio.run(main()), inputs, strict=True):
        want = dense_answer(a, b, np.stack([W] * len(a)), up)
        assert list(got) == ["y", "a", "b", "W"]
        for name, value in want.items():
            close(got[name], value)


def test_the_async_client_refuses_a_bad_model_before_any_call() -> None:
    async def main() -> ModelError:
        async with AsyncGradientClient(dead_target(), timeout=5) as client:
            with pytest.raises(ModelError) as info:
                await client.register_onnx(unsupported())
            return info.value

    assert asyncio.run(main()).op_type == "Hardmax"


def test_a_models_own_weights_are_what_the_server_computes_with(target: str) -> None:
    """The model registered with its weights as constants computes with the model's values:
    the CNN's logits at a zero image are its dense layers applied to the conv biases' ReLU."""
    model = cnn(seed=5, dtype=np.float64)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    h = np.maximum(weights["conv1.bias"], 0)  # conv of zeros: the bias, everywhere
    h = np.maximum(np.einsum("oikl,i->o", weights["conv2.weight"], h) + weights["conv2.bias"],
                   0)  # 5x5 conv of a constant map: sum over the kernel, everywhere
    flat = np.repeat(h, 25)  # 16 channels x 5 x 5, channel-major
    for k in (1, 2, 3):
        flat = flat @ weights[f"fc{k}.weight"].T + weights[f"fc{k}.bias"]
        flat = np.maximum(flat, 0) if k < 3 else flat
    with GradientClient(target) as client:
        loaded = client.register_onnx(model)
        r = client.compute(loaded, {"x": np.zeros((1, 1, 28, 28))})
    np.testing.assert_allclose(r.output, flat[None], rtol=1e-12)
