"""``gradserve loadtest`` against real servers on 127.0.0.1: closed and open loop, unary and
stream (one request or a window of them in flight), the report's figures and formats, failures
counted as they came, the server's batches read from its metrics, and --verify catching a
server that answers wrong."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradserve.cli.main import main
from gradserve.client import loadreport
from gradserve.client.api import GradientClient
from gradserve.client.loadtest import LoadConfig, Run, run_load
from gradserve.client.workloads import WORKLOADS
from gradserve.engine import Result
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import responses
from tests.conftest import StartServer


def load(target: str, **settings: Any) -> Run:
    config = LoadConfig(target=target, workload=WORKLOADS["quadratic"](), **settings)
    return asyncio.run(run_load(config))


def test_closed_loop_unary_every_call_answered_and_verified(start_server: StartServer) -> None:
    server = start_server()
    run = load(server.target, requests=60, concurrency=4, verify=1.0)
    summary = loadreport.summarize(run)
    assert summary.count == 60 and summary.statuses == {"OK": 60}
    assert (summary.checked, summary.wrong) == (60, 0)
    lat = summary.latency
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert sum(n for _, n in summary.histogram) == 60
    assert summary.requests_per_second == pytest.approx(60 / run.seconds)


def test_open_loop_keeps_its_schedule_and_measures_from_when_each_was_due(
        start_server: StartServer) -> None:
    server = start_server()
    run = load(server.target, requests=40, rps=100.0, mode="unary")
    dues = sorted(c.due for c in run.calls)
    # request k is due k / 100 s after the start, whatever the answers did
    np.testing.assert_allclose(dues, np.arange(40) / 100.0, atol=0.02)
    assert run.seconds >= 0.39
    assert all(c.latency > 0 and c.code == "OK" for c in run.calls)


def test_streams_with_batches_verify_and_count_examples(start_server: StartServer) -> None:
    server = start_server()
    run = load(server.target, requests=30, concurrency=3, mode="stream", batch=8, verify=0.5)
    summary = loadreport.summarize(run)
    assert summary.statuses == {"OK": 30}
    assert summary.checked == 15 and summary.wrong == 0
    assert summary.examples_per_second == pytest.approx(30 * 8 / run.seconds)


def test_a_closed_loop_stream_sends_each_request_once_the_last_is_answered(
        start_server: StartServer) -> None:
    server = start_server()
    run = load(server.target, requests=30, concurrency=1, mode="stream")
    calls = sorted(run.calls, key=lambda c: c.due)
    assert [c.code for c in calls] == ["OK"] * 30
    for last, this in itertools.pairwise(calls):
        assert this.due >= last.due + last.latency  # not sent before the last came back


def test_a_closed_loop_stream_keeps_its_window_of_requests_in_flight(
        start_server: StartServer) -> None:
    server = start_server()
    run = load(server.target, requests=40, concurrency=1, mode="stream", window=4)
    assert [c.code for c in run.calls] == ["OK"] * 40
    in_flight = [sum(other.due <= call.due < other.due + other.latency for other in run.calls)
                 for call in run.calls]
    assert 1 < max(in_flight) <= 4


def test_failures_are_counted_as_they_came_never_retried(start_server: StartServer) -> None:
    server = start_server(max_queue_size=1, max_queue_delay_us=200_000, batch_wait="fixed")
    summary = loadreport.summarize(load(server.target, requests=40, concurrency=8))
    # a one-place queue that waits 0.2 s for company: most calls find it full
    assert summary.count == 40 == sum(summary.statuses.values())
    assert summary.statuses.get("RESOURCE_EXHAUSTED", 0) > 0
    assert any("queue is full" in message for message in summary.errors)


def test_verify_catches_a_server_that_answers_wrong(start_server: StartServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    honest = responses.encode_response

    def lying(request_id: str, result: Result,
              signature: pb.GraphSignature | None = None) -> pb.ComputeResponse:
        response = honest(request_id, result, signature)
        response.gradients["x"].raw_data = np.float64(42.0).tobytes()
        return response

    monkeypatch.setattr("gradserve.server.service.encode_response", lying)
    server = start_server()
    summary = loadreport.summarize(load(server.target, requests=20, verify=0.25))
    assert (summary.checked, summary.wrong) == (5, 5)


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_model_workloads_register_the_model_and_answer_right(start_server: StartServer,
                                                             name: str) -> None:
    """The model workloads register their ONNX model and send one example per request; every
    answer is checked against the ONNX reference evaluator's outputs (an independent oracle)
    and the gradient's shape."""
    from onnx.reference import ReferenceEvaluator

    from gradserve.client import networks

    workload = WORKLOADS[name]()
    assert workload.model is not None
    server = start_server()
    config = LoadConfig(target=server.target, workload=workload, concurrency=4, requests=12,
                        verify=1.0)
    summary = loadreport.summarize(asyncio.run(run_load(config)))
    assert (summary.checked, summary.wrong) == (12, 0)
    reference = ReferenceEvaluator(getattr(networks, name)())
    rng = np.random.default_rng(3)
    x = workload.inputs(rng, None)["x"]
    with GradientClient(server.target) as client:
        got = client.compute(workload.graph, {"x": x})
    outputs: Any = reference.run(None, {"x": x[None]})  # its stubs allow a dict too
    want = np.asarray(outputs[0])
    np.testing.assert_allclose(next(iter(got.outputs.values())), want[0], rtol=1e-4,
                               atol=1e-5)
    assert got.gradients["x"].shape == x.shape


def test_cli_reports_text_json_csv_batches_and_a_plot(start_server: StartServer,
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    server = start_server(metrics_port=0)
    metrics = f"http://127.0.0.1:{server.metrics_port}/metrics"
    common = ["loadtest", "--target", server.target, "--workload", "staged", "-n", "30"]
    assert main([*common, "--metrics", metrics, "--verify", "1"]) == 0
    text = capsys.readouterr().out
    assert "Count:        30" in text and "[OK]\t30 responses" in text
    assert "Verified: 30 answers against the local engine, 0 wrong" in text
    assert "engine passes" in text
    assert main([*common, "--format", "json", "--metrics", metrics]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 30 and report["statuses"] == {"OK": 30}
    # the server computed the 30 requests in passes of one or more of them
    batching = report["batching"]
    assert batching["passes"] * batching["requests_per_pass"] == pytest.approx(30)
    plot = tmp_path / "latency.png"
    assert main([*common, "--format", "csv", "--plot", str(plot)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 30 and {r["status"] for r in rows} == {"OK"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_exits_1_when_an_answer_is_wrong(start_server: StartServer,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    honest = responses.encode_response

    def lying(request_id: str, result: Result,
              signature: pb.GraphSignature | None = None) -> pb.ComputeResponse:
        response = honest(request_id, result, signature)
        response.outputs[next(iter(response.outputs))].raw_data = np.float64(-1).tobytes()
        return response

    monkeypatch.setattr("gradserve.server.service.encode_response", lying)
    server = start_server()
    assert main(["loadtest", "--target", server.target, "--workload", "quadratic", "-n", "4",
                 "--verify", "1"]) == 1
    assert "4 wrong" in capsys.readouterr().out


def test_a_duration_bounds_a_run_without_a_count(start_server: StartServer,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    server = start_server()
    assert main(["loadtest", "--target", server.target, "-z", "300ms", "-c", "2",
                 "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.3 <= report["seconds"] < 5 and report["count"] > 0
