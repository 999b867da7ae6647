"""Large tensors: the server reads them as views of the bytes received and writes them straight
from the result's arrays, and the answers are still right. Expected values come from numpy
written out by hand; the codec's direct paths are checked against protobuf's own parse."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from numpy.typing import NDArray

from gradserve.engine import DType, Graph
from gradserve.engine.builder import GraphBuilder
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.bulk import RawData, parse_detached, serialize_with_tensors
from gradserve.wire.requests import DETACH_BYTES
from gradserve.wire.tensors import tensors_into_wire, tensors_to_wire
from tests.server.conftest import (
    HOST,
    RPC_TIMEOUT,
    Arrays,
    Served,
    compute_failure,
    decode,
    request,
)
from tests.server.test_malformed import corrupt_variants
from tests.server.test_process import EXIT_TIMEOUT, clean_env, free_port, wait_serving

N = DETACH_BYTES // 8 * 3 + 5  # float64 elements: three times the size that is detached
COMPUTE = "/gradserve.v1.GradientService/Compute"
RECEIVE = [("grpc.max_receive_message_length", 64 << 20)]  # the server's default limit


@pytest.fixture(scope="module")
def channel(served: Served) -> Iterator[grpc.Channel]:
    """A channel to the module's server taking answers as large as the server sends."""
    with grpc.insecure_channel(served.server.target, options=RECEIVE) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GradientServiceStub:
    return pb_grpc.GradientServiceStub(channel)


def affine(n: int = N) -> tuple[Graph, str, str]:
    """y = x*w + c (n elements) and L = sum(x*x): the graph and the outputs' names."""
    g = GraphBuilder()
    x, w, c = g.input("x", (n,)), g.input("w", (n,)), g.input("c")
    y, loss = x * w + c, (x * x).sum()
    return g.build(y, loss), y.name, loss.name


def values(n: int = N, seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal(n), "w": rng.standard_normal(n),
            "c": np.asarray(rng.standard_normal()), "u": rng.standard_normal(n)}


def assert_affine(response: pb.ComputeResponse, v: Arrays, y: str, loss: str) -> None:
    """Outputs and gradients as numpy says, with the upstream gradient ``u`` into y."""
    x, w, c, u = v["x"], v["w"], v["c"], v["u"]
    outputs, gradients = decode(response.outputs), decode(response.gradients)
    np.testing.assert_allclose(outputs[y], x * w + c, rtol=1e-15)
    np.testing.assert_allclose(outputs[loss], np.dot(x, x), rtol=1e-12)
    np.testing.assert_allclose(gradients["x"], u * w + 2 * x, rtol=1e-15)
    np.testing.assert_allclose(gradients["w"], u * x, rtol=1e-15)
    np.testing.assert_allclose(gradients["c"], u.sum(), rtol=1e-12)
    assert gradients["x"].shape == (N,) and gradients["x"].dtype == np.float64


def affine_request(v: Arrays) -> tuple[pb.ComputeRequest, str, str]:
    graph, y, loss = affine()
    return request(graph, {k: v[k] for k in "xwc"}, upstream={y: v["u"]}), y, loss


def test_large_inputs_upstream_and_results_round_trip(
        stub: pb_grpc.GradientServiceStub) -> None:
    v = values()
    message, y, loss = affine_request(v)
    assert_affine(stub.Compute(message, timeout=RPC_TIMEOUT), v, y, loss)


def test_large_float32_batch_and_intermediates(stub: pb_grpc.GradientServiceStub) -> None:
    g = GraphBuilder()
    x = g.input("x", (1 << 14,), DType.FLOAT32)
    squares = x * x
    total = squares.sum()
    xs = np.random.default_rng(1).standard_normal((64, 1 << 14)).astype(np.float32)
    message = request(g.build(total), {"x": xs}, batch_size=64)
    message.options.return_intermediates = True
    response = stub.Compute(message, timeout=RPC_TIMEOUT)
    got = decode(response.gradients)["x"]
    assert got.dtype == np.float32 and got.shape == xs.shape
    np.testing.assert_allclose(got, 2 * xs, rtol=1e-6)
    np.testing.assert_allclose(decode(response.outputs)[total.name],
                               (xs.astype(np.float64) ** 2).sum(axis=1), rtol=1e-4)
    np.testing.assert_allclose(decode(response.values)[squares.name], xs * xs, rtol=1e-6)
    assert list(response.nonfinite) == [False] * 64


def test_large_requests_on_a_stream(stub: pb_grpc.GradientServiceStub) -> None:
    v = values(seed=3)
    message, y, loss = affine_request(v)
    message.request_id = "big"
    answers = list(stub.ComputeStream(iter([pb.ComputeStreamRequest(request=message)]),
                                             timeout=RPC_TIMEOUT))
    assert [a.request_id for a in answers] == ["big"]
    assert_affine(answers[0].response, v, y, loss)


def test_a_key_given_twice_takes_the_last_value(channel: grpc.Channel) -> None:
    first, second = values(seed=4), values(seed=5)
    message, y, loss = affine_request(first)
    again = pb.ComputeRequest(inputs=tensors_to_wire({"x": second["x"]}))
    raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(COMPUTE)
    response = pb.ComputeResponse.FromString(
        raw(message.SerializeToString() + again.SerializeToString(), timeout=RPC_TIMEOUT))
    assert_affine(response, first | {"x": second["x"]}, y, loss)


def test_large_values_that_disagree_with_their_shape_are_refused(
        stub: pb_grpc.GradientServiceStub) -> None:
    v = values()
    message, _, _ = affine_request(v)
    message.inputs["x"].raw_data = v["x"][:-1].tobytes()
    failed = compute_failure(stub, message)
    assert failed.code is grpc.StatusCode.INVALID_ARGUMENT
    assert failed.fields == ["inputs.x.raw_data"]


def test_a_truncated_large_request_is_malformed(channel: grpc.Channel) -> None:
    message, _, _ = affine_request(values())
    data = message.SerializeToString()
    raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(COMPUTE)
    for cut in (len(data) - 1, len(data) // 2):
        with pytest.raises(grpc.RpcError) as caught:
            raw(data[:cut], timeout=RPC_TIMEOUT)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


# --- the codec's direct paths against protobuf ------------------------------------------------

SMALL = 64  # bytes: the detaching threshold the codec tests use, so small messages exercise it


def rejoined(message: pb.ComputeRequest, raw: RawData) -> pb.ComputeRequest:
    """``message`` with the detached raw_data put back."""
    whole = pb.ComputeRequest()
    whole.CopyFrom(message)
    for field, entries in raw.items():
        for key, data in entries.items():
            getattr(whole, field)[key].raw_data = bytes(data)
    return whole


def test_parse_detached_agrees_with_protobuf_on_corrupt_bytes() -> None:
    rng = np.random.default_rng(8)
    message = pb.ComputeRequest(
        request_id="r", graph_id="g", batch_size=2, wrt=["x"],
        inputs=tensors_to_wire({"x": rng.standard_normal((2, 9)), "é": np.arange(12),
                                "s": np.float32(1.5)}),
        upstream=tensors_to_wire({"y": rng.standard_normal(10)}))
    valid = message.SerializeToString()
    parsed, raw = parse_detached(pb.ComputeRequest, valid, ("inputs", "upstream"), SMALL)
    assert {f: sorted(e) for f, e in raw.items()} == {"inputs": ["x", "é"], "upstream": ["y"]}
    assert parsed.inputs["x"].raw_data == b"" and rejoined(parsed, raw) == message
    for data in [valid, *corrupt_variants(valid, rng), *(valid[:k] for k in range(len(valid)))]:
        try:
            want = pb.ComputeRequest.FromString(data)
        except DecodeError:
            with pytest.raises(DecodeError):
                parse_detached(pb.ComputeRequest, data, ("inputs", "upstream"), SMALL)
            continue
        got, raw = parse_detached(pb.ComputeRequest, data, ("inputs", "upstream"), SMALL)
        assert rejoined(got, raw) == want


def test_detached_tensors_are_views_of_the_bytes_received() -> None:
    x = np.random.default_rng(9).standard_normal(100)
    data = pb.ComputeRequest(inputs=tensors_to_wire({"x": x})).SerializeToString()
    _, raw = parse_detached(pb.ComputeRequest, data, ("inputs",), SMALL)
    view = np.frombuffer(raw["inputs"]["x"])
    assert np.shares_memory(view, np.frombuffer(data, np.uint8))
    np.testing.assert_array_equal(view, x)


@pytest.mark.parametrize("array", [
    np.arange(30.0).reshape(5, 6).T,  # not contiguous
    np.arange(40, dtype=">i8"),  # big-endian
    np.linspace(0, 1, 50, dtype=np.float32).reshape(2, 25),
    np.arange(3.0),  # below the threshold: encoded as usual
])
def test_serialize_with_tensors_matches_protobuf(array: NDArray[Any]) -> None:
    maps = {"outputs": {"out": array, "twice": 2 * array}, "gradients": {"ü": -array}}
    plain = pb.ComputeResponse(request_id="r", nonfinite=[False, True])
    for field, arrays in maps.items():
        tensors_into_wire(getattr(plain, field), arrays)
    direct = serialize_with_tensors(pb.ComputeResponse(request_id="r", nonfinite=[False, True]),
                                    maps, SMALL)
    assert pb.ComputeResponse.FromString(direct) == plain


# --- the server process with freed memory kept for reuse --------------------------------------


def test_a_server_keeping_freed_memory_answers_large_requests(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gradserve.server", "--port", str(port),
             "--malloc-retain-bytes", str(1 << 28)],
            stdout=sink, stderr=subprocess.STDOUT, env=clean_env(), cwd=tmp_path)
    try:
        with grpc.insecure_channel(f"{HOST}:{port}", options=RECEIVE) as channel:
            wait_serving(channel, proc, log)
            stub = pb_grpc.GradientServiceStub(channel)
            for seed in range(3):
                v = values(seed=seed)
                message, y, loss = affine_request(v)
                assert_affine(stub.Compute(message, timeout=RPC_TIMEOUT), v, y, loss)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EXIT_TIMEOUT) == 0, log.read_text()
        assert "mallopt" not in log.read_text()  # every option applied
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=EXIT_TIMEOUT)


def test_an_out_of_range_malloc_setting_stops_the_server() -> None:
    done = subprocess.run([sys.executable, "-m", "gradserve.server", "--port", "0",
                           "--malloc-retain-bytes", str(1 << 31)], env=clean_env(),
                          capture_output=True, text=True, timeout=EXIT_TIMEOUT, check=False)
    assert done.returncode != 0 and "--malloc-retain-bytes must be" in done.stderr
