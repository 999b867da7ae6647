"""Concurrent clients under dynamic batching: every answer equals the engine run alone on that
request's own inputs, whatever else shared its batch; a bad request fails alone."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

from gradserve.engine import EngineError, Graph
from gradserve.engine.builder import GraphBuilder
from gradserve.v1 import gradserve_pb2 as pb
from tests.server.conftest import (
    RPC_TIMEOUT,
    WAIT,
    ServerFactory,
    assert_matches,
    classifier,
    failure,
    oracle,
    quadratic,
    request,
    scalars,
)

THREADS = 16
ROUNDS = 4
BAD_LABEL = 9  # the classifier has 5 classes
CALL_TIMEOUT = 5.0  # per request; ample for these small graphs


def dense() -> Graph:
    """tanh(x @ w) + bias, per example x [2, 3], w [3, 4] (a matrix output)."""
    b = GraphBuilder()
    x, w = b.input("x", (2, 3)), b.input("w", (3, 4))
    bias = b.constant([0.5, -1.0, 0.25, 2.0])
    return b.build((x @ w).tanh() + bias)


def joined() -> Graph:
    """Two outputs: concat(exp(x), y*y) and its mean, per example x [3], y [2]."""
    b = GraphBuilder()
    x, y = b.input("x", (3,)), b.input("y", (2,))
    both = b.op("concat", x.exp(), y * y, axis=0)
    return b.build(both, both.mean())


GRAPHS: dict[str, Graph] = {"quadratic": quadratic().graph, "dense": dense(),
                            "classifier": classifier(), "joined": joined()}
SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "quadratic": {"x": ()}, "dense": {"x": (2, 3), "w": (3, 4)},
    "classifier": {"logits": (5,)}, "joined": {"x": (3,), "y": (2,)}}


@dataclass(frozen=True)
class Sent:
    """One request of the run and how to check its answer."""

    kind: str
    inputs: dict[str, Any]
    batch_size: int
    upstream: dict[str, Any]
    bad: bool  # holds a class label out of range

    @property
    def graph(self) -> Graph:
        return GRAPHS[self.kind]

    @property
    def examples(self) -> int:
        return self.batch_size or 1

    def message(self, rid: str) -> pb.ComputeRequest:
        return request(self.graph, self.inputs, batch_size=self.batch_size,
                       upstream=self.upstream, request_id=rid)


def make(kind: str, batch_size: int, rng: np.random.Generator, bad: bool = False) -> Sent:
    lead = (batch_size,) if batch_size else ()
    inputs: dict[str, Any] = {name: rng.standard_normal(lead + shape)
                              for name, shape in SHAPES[kind].items()}
    upstream: dict[str, Any] = {}
    if kind == "classifier":
        labels = rng.integers(0, 5, lead)
        if bad:
            labels.flat[-1] = BAD_LABEL
        inputs["label"] = np.asarray(labels, dtype=np.int64)
    if kind == "quadratic" and rng.random() < 0.3:  # another batching group: seeded outputs
        upstream[GRAPHS[kind].outputs[0]] = rng.standard_normal(lead)
    return Sent(kind, inputs, batch_size, upstream, bad)


def plan_requests() -> list[list[Sent]]:
    """Per thread, its requests: first all threads on one graph (so batches surely form, mixing
    batched and unbatched requests), then the graphs interleaved across threads."""
    kinds = list(GRAPHS)
    plans: list[list[Sent]] = []
    for t in range(THREADS):
        rng = np.random.default_rng(1000 + t)
        sent = [make("quadratic", (0, 2)[t % 2], rng)]
        for r in range(1, ROUNDS):
            kind = kinds[(t + r) % len(kinds)]
            bad = kind == "classifier" and (t + r) % 3 == 0
            sent.append(make(kind, int(rng.integers(0, 4)), rng, bad))
        plans.append(sent)
    return plans


@pytest.mark.parametrize("batch_threads", [1, 2])
def test_concurrent_clients_get_their_own_answers(make_server: ServerFactory,
                                                  batch_threads: int) -> None:
    served = make_server(max_queue_delay_us=20_000, batch_wait="fixed",
                         batch_threads=batch_threads)
    plans = plan_requests()
    answers: list[list[pb.ComputeResponse | grpc.RpcError | None]] = [
        [None] * ROUNDS for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS)

    def client(t: int) -> None:
        barrier.wait(timeout=WAIT)
        for k, sent in enumerate(plans[t]):
            try:
                answers[t][k] = served.stub.Compute(sent.message(f"{t}/{k}"),
                                                    timeout=CALL_TIMEOUT)
            except grpc.RpcError as e:
                answers[t][k] = e

    threads = [threading.Thread(target=client, args=(t,), name=f"client-{t}")
               for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=CALL_TIMEOUT * ROUNDS + WAIT)
    assert not any(th.is_alive() for th in threads)

    bad_seen = 0
    for t in range(THREADS):
        for k, sent in enumerate(plans[t]):
            answer = answers[t][k]
            where = f"request {t}/{k} ({sent.kind}, batch_size {sent.batch_size})"
            if sent.bad:
                bad_seen += 1
                with pytest.raises(EngineError):  # the engine alone refuses it too
                    oracle(sent.graph, sent.inputs, batched=bool(sent.batch_size))
                assert isinstance(answer, grpc.RpcError), where
                fail = failure(answer)
                assert fail.code is grpc.StatusCode.INVALID_ARGUMENT, where
                assert fail.fields == ["inputs.label"], where
                assert str(BAD_LABEL) in fail.message
                continue
            assert isinstance(answer, pb.ComputeResponse), f"{where}: {answer}"
            assert answer.request_id == f"{t}/{k}"
            expected = oracle(sent.graph, sent.inputs, batched=bool(sent.batch_size),
                              upstream=sent.upstream)
            assert_matches(answer, expected, rtol=1e-10)
    assert bad_seen > 0

    batches = served.batches.batches
    # every request was computed exactly once (a batch with a bad request is rerun per request
    # inside the same engine turn, which the hook counts once)
    assert sum(r for r, _ in batches) == THREADS * ROUNDS
    assert sum(e for _, e in batches) == sum(s.examples for p in plans for s in p)
    # and batching happened: some engine pass served several requests at once
    assert max(r for r, _ in batches) > 1, batches
    assert served.stop(), "the server did not stop"


def test_two_engine_slots_with_a_queue_delay(make_server: ServerFactory) -> None:
    """The smallest case of the race: eight concurrent requests for one graph."""
    served = make_server(max_queue_delay_us=20_000, batch_wait="fixed", batch_threads=2)
    q = quadratic()
    xs = [float(k) for k in range(8)]
    calls = [served.stub.Compute.future(request(q.graph, {"x": x}), timeout=CALL_TIMEOUT)
             for x in xs]
    codes = []
    for call in calls:
        try:
            call.result(timeout=CALL_TIMEOUT + WAIT)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
    assert codes == [grpc.StatusCode.OK] * len(xs)
    for x, call in zip(xs, calls, strict=True):
        assert scalars(call.result().outputs) == {q.out: 2 * x * x - 3 * x + 4}
    assert served.stop(), "stop() hung"


def test_bad_request_in_a_shared_batch_fails_alone(make_server: ServerFactory) -> None:
    # a long queue delay: the four requests, sent back to back, wait for one another
    served = make_server(max_queue_delay_us=300_000, batch_wait="fixed", batch_threads=1)
    rng = np.random.default_rng(7)
    sent = [make("classifier", bs, rng, bad=(k == 2)) for k, bs in enumerate((0, 2, 3, 0))]
    calls = [served.stub.Compute.future(s.message(str(k)), timeout=RPC_TIMEOUT)
             for k, s in enumerate(sent)]
    outcomes: list[pb.ComputeResponse | grpc.RpcError] = []
    for call in calls:
        try:
            outcomes.append(call.result(timeout=RPC_TIMEOUT))
        except grpc.RpcError as e:
            outcomes.append(e)
    assert served.batches.batches == [(4, 1 + 2 + 3 + 1)]  # one engine pass took all four
    for k, (s, outcome) in enumerate(zip(sent, outcomes, strict=True)):
        if s.bad:
            assert isinstance(outcome, grpc.RpcError)
            fail = failure(outcome)
            assert fail.code is grpc.StatusCode.INVALID_ARGUMENT
            assert fail.fields == ["inputs.label"]
            continue
        assert isinstance(outcome, pb.ComputeResponse), outcome
        assert outcome.request_id == str(k)
        assert_matches(outcome, oracle(s.graph, s.inputs, batched=bool(s.batch_size)))
