"""Overload and shutdown: deadlines expiring in the queue, a full queue, and a graceful drain.

Each test occupies the single engine thread (batch_threads=1, and every pass on a thread:
inline_max_elements=0) deterministically: a cheap request whose engine pass is held in the
batcher's ``on_batch`` hook until the test releases it (see ``BatchLog``); behind it waits a slow
request (sum(B @ B @ B), about half a second of real work) whose answer is known by hand.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from gradserve.engine.builder import GraphBuilder
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.requests import request as request_by_id
from tests.server.conftest import (
    NOT_SERVING,
    RPC_TIMEOUT,
    SERVING,
    STOP_WAIT,
    WAIT,
    HealthWatch,
    Served,
    ServerFactory,
    assert_slow_answer,
    compute_failure,
    health_check,
    loss_l,
    quadratic,
    request,
    scalars,
    slow_request,
)

ONE_ENGINE_THREAD = {"batch_threads": 1, "inline_max_elements": 0}


def occupy(served: Served) -> grpc.Future[pb.ComputeResponse]:
    """Hold the single engine slot: a cheap request (x = 2 of the quadratic) whose engine pass
    then blocks in the batch hook until the test releases it."""
    served.batches.hold()
    q = quadratic()
    held = served.stub.Compute.future(request(q.graph, {"x": 2.0}), timeout=RPC_TIMEOUT)
    assert served.batches.holding.wait(WAIT), "the engine never ran the holding request"
    return held


def assert_held_answer(response: pb.ComputeResponse) -> None:
    """The holding request's answer: f(2) = 6, f'(2) = 5."""
    assert list(scalars(response.outputs).values()) == [6.0]
    assert scalars(response.gradients) == {"x": 5.0}


def wait_until_queued(served: Served, count: int) -> None:
    """Bounded wait until the batcher holds ``count`` queued requests."""
    for _ in range(1000):
        if served.server.batcher.queued >= count:
            return
        time.sleep(0.005)
    raise AssertionError(f"the queue never held {count} requests")


def wait_until_refusing(served: Served) -> None:
    """Bounded wait until the server refuses new connections (its listener is closed)."""
    for _ in range(200):
        with grpc.insecure_channel(served.server.target) as fresh:
            try:
                health_check(fresh, timeout=0.5)
            except grpc.RpcError as e:
                if e.code() is grpc.StatusCode.UNAVAILABLE:
                    return
        time.sleep(0.01)
    raise AssertionError("the stopping server still accepts connections")


def hold_engine_and_queue_one(served: Served) -> tuple[
        grpc.Future[pb.ComputeResponse], grpc.Future[pb.ComputeResponse], str]:
    """Occupy the single engine slot, then queue a slow request behind it: (the held call,
    the slow call, the slow request's expected output)."""
    held = occupy(served)
    slow, out = slow_request()
    slow_call = served.stub.Compute.future(slow, timeout=RPC_TIMEOUT)
    wait_until_queued(served, 1)
    return held, slow_call, out


def test_deadline_expires_while_queued(make_server: ServerFactory) -> None:
    served = make_server(**ONE_ENGINE_THREAD)
    held, slow_call, out = hold_engine_and_queue_one(served)
    lo = loss_l()
    feed = {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0}
    fail = compute_failure(served.stub, request(lo.graph, feed), timeout=0.05)
    assert fail.code is grpc.StatusCode.DEADLINE_EXCEEDED
    served.batches.release()
    assert_held_answer(held.result(timeout=RPC_TIMEOUT))
    assert_slow_answer(slow_call.result(timeout=RPC_TIMEOUT), out)
    # the engine is free again: the same request with time to spare is answered
    later = served.stub.Compute(request(lo.graph, feed), timeout=RPC_TIMEOUT)
    assert scalars(later.outputs) == {lo.out: -4.0}
    # and the expired one was dropped, never computed: the passes are the held request, the
    # slow one and the later one
    assert served.batches.batches == [(1, 1), (1, 1), (1, 1)]


def test_full_queue_is_resource_exhausted(make_server: ServerFactory) -> None:
    served = make_server(**ONE_ENGINE_THREAD, max_queue_size=1)
    held, slow_call, out = hold_engine_and_queue_one(served)
    lo = loss_l()
    feed = {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0}
    # refused at once: the engine is still held, so a call that waited for room would block
    fail = compute_failure(served.stub, request(lo.graph, feed))
    assert fail.code is grpc.StatusCode.RESOURCE_EXHAUSTED  # not UNAVAILABLE: back off
    assert "busy" in fail.message
    served.batches.release()
    assert_held_answer(held.result(timeout=RPC_TIMEOUT))
    assert_slow_answer(slow_call.result(timeout=RPC_TIMEOUT), out)
    # with room again, the refused request goes through
    again = served.stub.Compute(request(lo.graph, feed), timeout=RPC_TIMEOUT)
    assert scalars(again.outputs) == {lo.out: -4.0}
    assert scalars(again.gradients) == {"a": 4.0, "b": -6.0, "c": -2.0, "f": 2.0}


def test_shutdown_drains_in_flight_and_refuses_new(make_server: ServerFactory) -> None:
    served = make_server(**ONE_ENGINE_THREAD)
    assert health_check(served.channel) == SERVING
    # A Watch stream in flight sees the status change the moment the shutdown begins (a Check
    # after that cannot: the stopping server takes no new calls, health included).
    watch = HealthWatch(served.channel)
    try:
        assert watch.next() == SERVING
        held = occupy(served)
        slow, out = slow_request()
        slow_call = served.stub.Compute.future(slow, timeout=RPC_TIMEOUT)
        wait_until_queued(served, 1)
        stopper = threading.Thread(target=served.server.stop, kwargs={"grace": 5.0},
                                   name="test-stop")
        stopper.start()
        assert watch.next() == NOT_SERVING
        watch.close()
        # the health status turns just before gRPC stops taking calls: wait until it does
        # (new connections are refused), then a new call on the open channel is refused too
        wait_until_refusing(served)
        q = quadratic()
        fail = compute_failure(served.stub, request(q.graph, {"x": 6.0}))
        assert fail.code is grpc.StatusCode.UNAVAILABLE
        # the engine goes on: the slow request, queued before the stop, is computed in the grace
        served.batches.release()
        assert_held_answer(held.result(timeout=RPC_TIMEOUT))
        assert_slow_answer(slow_call.result(timeout=RPC_TIMEOUT), out)
        stopper.join(timeout=WAIT)
        assert not stopper.is_alive()
    finally:
        watch.close()
        served.batches.release()
    # the refused request never reached the engine
    assert served.batches.batches == [(1, 1), (1, 1)]


def test_stop_without_work_is_prompt(make_server: ServerFactory) -> None:
    served = make_server()
    q = quadratic()
    assert scalars(served.stub.Compute(request(q.graph, {"x": 2.0}),
                                       timeout=RPC_TIMEOUT).outputs) == {q.out: 6.0}
    stopper = threading.Thread(target=served.server.stop, kwargs={"grace": 5.0})
    stopper.start()
    stopper.join(timeout=2.0)  # nothing in flight: no need to wait out the grace
    assert not stopper.is_alive()
    fail = compute_failure(served.stub, pb.ComputeRequest(graph_id="x"))
    assert fail.code is grpc.StatusCode.UNAVAILABLE


def test_a_long_pass_does_not_stop_the_server_answering(make_server: ServerFactory) -> None:
    # The slow request's pass is large, so it runs on the engine thread; meanwhile the event
    # loop answers health checks and small requests (computed inline) at once.
    served = make_server(batch_threads=1)
    slow, out = slow_request()
    slow_call = served.stub.Compute.future(slow, timeout=RPC_TIMEOUT)
    for _ in range(1000):  # bounded wait until the slow pass has left the queue
        if served.server.batcher.queued == 0 and not served.batches.batches:
            break
        time.sleep(0.001)
    q = quadratic()
    answered_during = 0
    while not slow_call.done() and answered_during < 20:
        assert health_check(served.channel) == SERVING
        reply = served.stub.Compute(request(q.graph, {"x": 2.0}), timeout=RPC_TIMEOUT)
        assert scalars(reply.outputs) == {q.out: 6.0}
        answered_during += not slow_call.done()
    assert answered_during >= 5, "the server stalled while the long pass ran"
    assert_slow_answer(slow_call.result(timeout=RPC_TIMEOUT), out)


def test_a_full_batch_does_not_wait_out_the_queue_delay(make_server: ServerFactory) -> None:
    served = make_server(max_queue_delay_us=30_000_000, max_batch_size=2,
                         batch_wait="fixed")
    q = quadratic()
    start = time.monotonic()
    calls = [served.stub.Compute.future(request(q.graph, {"x": x}), timeout=RPC_TIMEOUT)
             for x in (2.0, 3.0)]
    assert [scalars(c.result(timeout=RPC_TIMEOUT).outputs) for c in calls] == [
        {q.out: 6.0}, {q.out: 13.0}]
    assert time.monotonic() - start < WAIT  # two requests fill the batch: no 30 s wait
    assert served.batches.batches == [(2, 2)]


def test_shutdown_runs_a_request_waiting_out_its_queue_delay(make_server: ServerFactory) -> None:
    served = make_server(max_queue_delay_us=30_000_000, batch_wait="fixed")
    q = quadratic()
    call = served.stub.Compute.future(request(q.graph, {"x": 2.0}), timeout=RPC_TIMEOUT)
    wait_until_queued(served, 1)
    assert served.stop(grace=5.0), "stop() hung"
    assert scalars(call.result(timeout=RPC_TIMEOUT).outputs) == {q.out: 6.0}


def test_expired_requests_give_up_their_places_in_the_queue(make_server: ServerFactory) -> None:
    served = make_server(**ONE_ENGINE_THREAD, max_queue_size=2)
    held = occupy(served)
    lo = loss_l()
    feed = {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0}
    for _ in range(3):  # more than the queue holds: each leaves before the next comes
        fail = compute_failure(served.stub, request(lo.graph, feed), timeout=0.2)
        assert fail.code is grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(1000):  # bounded wait for the server to see the last one go
        if served.server.batcher.queued == 0:
            break
        time.sleep(0.005)
    assert served.server.batcher.queued == 0
    later = served.stub.Compute.future(request(lo.graph, feed), timeout=RPC_TIMEOUT)
    served.batches.release()
    assert_held_answer(held.result(timeout=RPC_TIMEOUT))
    assert scalars(later.result(timeout=RPC_TIMEOUT).outputs) == {lo.out: -4.0}
    assert served.batches.batches == [(1, 1), (1, 1)]  # the expired ones were never computed


def test_a_busy_graph_does_not_starve_another(make_server: ServerFactory) -> None:
    # One engine thread, one request per pass, every pass on the thread; eight clients keep
    # graph A's queue full (a few ms per pass) while one request for graph B comes in.
    served = make_server(**ONE_ENGINE_THREAD, max_batch_size=1)
    g = GraphBuilder()
    m = g.input("m", (150, 150))
    busy = g.build(((m @ m).tanh() @ m).sum())
    busy_id = served.stub.RegisterGraph(pb.RegisterGraphRequest(graph=graph_to_wire(busy)),
                                        timeout=RPC_TIMEOUT).graph_id
    flood = request_by_id(busy_id, None, {"m": np.eye(150)})
    stop = threading.Event()

    def client() -> None:
        end = time.monotonic() + WAIT
        while not stop.is_set() and time.monotonic() < end:
            served.stub.Compute(flood, timeout=RPC_TIMEOUT)

    clients = [threading.Thread(target=client, name=f"flood-{k}") for k in range(8)]
    for c in clients:
        c.start()
    try:
        wait_until_queued(served, 4)
        q = quadratic()
        start = time.monotonic()
        reply = served.stub.Compute(request(q.graph, {"x": 2.0}), timeout=RPC_TIMEOUT)
        waited = time.monotonic() - start
        flooding = served.server.batcher.queued > 0
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=WAIT + RPC_TIMEOUT)
    assert scalars(reply.outputs) == {q.out: 6.0}
    assert flooding, "graph A's queue emptied: the test did not keep the engine busy"
    assert waited < 2.0, f"graph B waited {waited:.2f} s behind graph A"


def test_stop_is_bounded_by_its_grace_and_a_second_stop_waits_for_the_first(
        make_server: ServerFactory) -> None:
    served = make_server(**ONE_ENGINE_THREAD)
    held = occupy(served)  # a pass that will not end within the grace
    start = time.monotonic()
    first = threading.Thread(target=served.server.stop, kwargs={"grace": 0.3}, name="stop-1")
    first.start()
    time.sleep(0.05)
    served.server.stop()  # returns only once the first stop has finished
    assert not first.is_alive()
    assert time.monotonic() - start < 0.3 + STOP_WAIT
    served.batches.release()
    try:
        held.result(timeout=RPC_TIMEOUT)
    except grpc.RpcError as e:  # the held call outlived the grace: it was cancelled
        assert e.code() is grpc.StatusCode.UNAVAILABLE  # gRPC: "Cancelling all calls"
