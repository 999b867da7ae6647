"""Bytes that are not a valid message, sent straight to every method: each gets
INVALID_ARGUMENT with a short message (never UNKNOWN and a traceback per call), the server logs
at most one line about them per interval, and goes on serving."""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.requests import LOG_INTERVAL
from tests.server.conftest import RPC_TIMEOUT, Served, quadratic, request, scalars

SERVICE = "/gradserve.v1.GradientService/"


def corrupt_variants(valid: bytes, rng: np.random.Generator) -> list[bytes]:
    """Truncations of a valid message, single-byte flips, an oversized length prefix, and
    random bytes: only those protobuf itself refuses to parse (the oracle) are kept."""
    candidates = [valid[:k] for k in range(1, len(valid))]
    for _ in range(60):
        flipped = bytearray(valid)
        flipped[int(rng.integers(len(valid)))] ^= int(rng.integers(1, 256))
        candidates.append(bytes(flipped))
    candidates.append(b"\x0a\xff\xff\xff\xff\x0f" + valid)  # field 1, a 4 GB length
    candidates += [rng.bytes(int(rng.integers(1, 200))) for _ in range(60)]
    return [c for c in candidates if not parses(pb.ComputeRequest, c)]


def parses(message: type[Message], data: bytes) -> bool:
    try:
        message.FromString(data)
    except DecodeError:
        return False
    return True


def test_malformed_compute_requests_get_invalid_argument(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    q = quadratic()
    valid = request(q.graph, {"x": 2.0}).SerializeToString()
    bad = corrupt_variants(valid, np.random.default_rng(7))
    assert len(bad) > 50
    raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = served.channel.unary_unary(
        SERVICE + "Compute")
    start = time.monotonic()
    with caplog.at_level(logging.INFO):
        for data in bad:
            with pytest.raises(grpc.RpcError) as caught:
                raw(data, timeout=RPC_TIMEOUT)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == ("request: not a valid gradserve.v1.ComputeRequest "
                                              "message: the bytes are truncated or corrupt")
    lines = [r for r in caplog.records if "not a valid" in r.getMessage()]
    periods = 1 + int((time.monotonic() - start) // LOG_INTERVAL)
    assert len(lines) <= periods, "malformed requests flood the log"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a traceback logged"
    # the server goes on serving
    response = served.stub.Compute(request(q.graph, {"x": 2.0}), timeout=RPC_TIMEOUT)
    assert scalars(response.gradients) == {"x": 5.0}


@pytest.mark.parametrize("method", ["RegisterGraph", "ListOps"])
def test_other_unary_methods_refuse_malformed_bytes(served: Served, method: str) -> None:
    raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = served.channel.unary_unary(
        SERVICE + method)
    with pytest.raises(grpc.RpcError) as caught:
        raw(b"\x0a\x05ab", timeout=RPC_TIMEOUT)  # a 5-byte field holding 2
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"not a valid gradserve.v1.{method}Request" in (caught.value.details() or "")


def test_a_stream_with_a_malformed_message_ends_with_invalid_argument(served: Served) -> None:
    q = quadratic()
    good = pb.ComputeStreamRequest(request=request(q.graph, {"x": 2.0}, request_id="a"))
    raw: grpc.StreamStreamMultiCallable[bytes, bytes] = served.channel.stream_stream(
        SERVICE + "ComputeStream")
    replies = raw(iter([good.SerializeToString(), b"\x0a\xff\xff"]), timeout=RPC_TIMEOUT)
    with pytest.raises(grpc.RpcError) as caught:
        list(replies)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid gradserve.v1.ComputeStreamRequest" in (caught.value.details() or "")
