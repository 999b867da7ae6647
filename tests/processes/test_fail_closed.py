"""Auth fails closed, against real server processes: settings that ask for bearer tokens but
yield none stop the server from starting, with a message saying why; and a call without a token
is refused at once, whatever its shape, even when it never sends a message."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.processes.conftest import Backend
from tests.server.test_process import clean_env

START_TIMEOUT = 30.0
# A refusal must come long before the call's own deadline: gRPC's answer to a call that never
# sends its message would otherwise be DEADLINE_EXCEEDED, after CALL_DEADLINE.
CALL_DEADLINE = 30.0
PROMPT = 10.0
SILENT_CALLS = 200
SERVICE = "/gradserve.v1.GradientService/"


def exits_refusing(folder: Path, *flags: str, **env: str) -> str:
    """Start ``python -m gradserve.server`` with ``flags`` and ``GRADSERVE_*`` ``env``; it must
    exit non-zero on its own; return what it printed."""
    done = subprocess.run([sys.executable, "-m", "gradserve.server", "--port", "0", *flags],
                          capture_output=True, text=True, timeout=START_TIMEOUT, cwd=folder,
                          env={**clean_env(), **env}, check=False)
    assert done.returncode != 0, f"the server started:\n{done.stdout}{done.stderr}"
    return done.stderr


@pytest.mark.parametrize("content", ["", "\n", "  \n\t\n"])
def test_a_token_file_with_no_token_stops_the_server(tmp_path: Path, content: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(content)
    said = exits_refusing(tmp_path, "--auth-token-file", str(tokens))
    assert f"no bearer token in --auth-token-file {str(tokens)!r}" in said
    assert "refusing to serve without authentication" in said
    assert "Traceback" not in said


@pytest.mark.parametrize("value", [",", " , ,", " "])
def test_a_token_variable_with_no_token_stops_the_server(tmp_path: Path, value: str) -> None:
    said = exits_refusing(tmp_path, GRADSERVE_AUTH_TOKENS=value)
    assert "no bearer token in --auth-tokens (GRADSERVE_AUTH_TOKENS)" in said
    assert "Traceback" not in said


def test_a_missing_token_file_stops_the_server(tmp_path: Path) -> None:
    said = exits_refusing(tmp_path, "--auth-token-file", str(tmp_path / "absent"))
    assert "No such file or directory" in said and str(tmp_path / "absent") in said
    assert "Traceback" not in said


def silent(stop: threading.Event) -> Iterator[bytes]:
    """A request stream that sends nothing until ``stop`` (then ends): a client that stays open
    without a word."""
    stop.wait(CALL_DEADLINE)
    yield from ()


def test_calls_without_a_token_are_refused_at_once_whatever_they_send(
        backend: Callable[..., Backend]) -> None:
    """ComputeStream half-closed at once, and every method (unary ones included, called as raw
    streams) left open without a message: each gets UNAUTHENTICATED promptly."""
    server = backend("--auth-tokens", "alpha")
    stop = threading.Event()
    methods = ("ComputeStream", "Compute", "RegisterGraph", "ListOps")
    with grpc.insecure_channel(server.target) as channel:

        def raw(method: str) -> grpc.StreamStreamMultiCallable[bytes, bytes]:
            return channel.stream_stream(SERVICE + method)

        start = time.monotonic()
        calls = [raw("ComputeStream")(iter(()), timeout=CALL_DEADLINE)]
        calls += [raw(methods[k % len(methods)])(silent(stop), timeout=CALL_DEADLINE)
                  for k in range(SILENT_CALLS)]
        try:
            codes = [call.code() for call in calls]
            elapsed = time.monotonic() - start
        finally:
            stop.set()
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
        assert elapsed < PROMPT, f"{len(calls)} refusals took {elapsed:.1f} s"
        # With the token, the same server answers.
        list_ops: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            SERVICE + "ListOps")
        ops = list_ops(b"", timeout=CALL_DEADLINE, metadata=(("authorization", "Bearer alpha"),))
        assert len(ops) > 100
