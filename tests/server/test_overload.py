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

from gradserve.v1 import gradserve_pb2 as pb
from tests.server.conftest import (
    NOT_SERVING,
    RPC_TIMEOUT,
    SERVING,
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
