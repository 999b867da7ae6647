"""What a user would otherwise write: a plain gRPC server running torch.autograd per request.

Run: ``python bench/torch_server.py --port 50052`` (``--backend numpy`` for the variant below).
bench/suite.py starts it as a process on 127.0.0.1 and drives it exactly as it drives gradserve,
so the ratio between the two is what gradserve's engine, batching and serving stack buy over the
obvious hand-rolled service.

It speaks gradserve's own contract (``gradserve.v1.GradientService``: RegisterGraph, Compute and
ComputeStream) for one graph only, the built-in 21-op scalar expression
(``gradserve.client.workloads``), so the same client and the same messages work against both. It
is written the way such a server usually is: the generated servicer on ``grpc.aio`` with
asyncio's default event loop, inputs decoded with gradserve's codec, and each request computed
on its own, on the event loop, by ``torch.autograd`` (the expression is the very function the
engine's graph is built from, applied to torch tensors). Stacked examples (``batch_size``) are
computed in one call, as torch would; requests are never batched together.

``--backend numpy`` computes with bench/engine_vs_numpy.py's hand-written numpy forward and
backward pass instead: the same server with the cheapest per-request math there is, which also
needs no torch (the suite runs it everywhere; the torch backend only where torch is installed).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc
import numpy as np
from engine_vs_numpy import expression_numpy
from grpc import aio

from gradserve.client.workloads import WORKLOADS, expression
from gradserve.engine import structural_key
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_from_wire
from gradserve.wire.tensors import WireError, tensors_from_wire, tensors_into_wire

Arr = np.ndarray[Any, Any]
# The expression's value and its gradients with respect to x and y, at (x, y).
Backend = Callable[[Arr, Arr], tuple[Arr, Arr, Arr]]
GRAPH_ID = "expr21"  # what RegisterGraph answers: this server knows one graph


def torch_backend() -> Backend:
    """``torch.autograd`` on the expression: fresh leaf tensors per request (from the decoded,
    read-only arrays: ``torch.tensor`` copies them), one forward and one backward pass."""
    import torch

    def grads(x: Arr, y: Arr) -> tuple[Arr, Arr, Arr]:
        tx = torch.tensor(x, requires_grad=True)
        ty = torch.tensor(y, requires_grad=True)
        # the workload's own function, on torch tensors (it is typed for engine Values)
        out: Any = expression(cast(Any, tx), cast(Any, ty))
        dx, dy = torch.autograd.grad(out, (tx, ty), torch.ones_like(out))
        return out.detach().numpy(), dx.numpy(), dy.numpy()

    return grads


def numpy_backend() -> Backend:
    """bench/engine_vs_numpy.py's hand-written forward and backward pass."""
    def grads(x: Arr, y: Arr) -> tuple[Arr, Arr, Arr]:
        out, dx, dy = expression_numpy(x, y)
        return np.asarray(out), np.asarray(dx), np.asarray(dy)

    return grads


class RefusedError(Exception):
    """A request this server cannot answer: the status code and why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PlainService(pb_grpc.GradientServiceServicer):
    """GradientService for the expression graph alone, one request at a time."""

    def __init__(self, backend: Backend) -> None:
        graph = WORKLOADS["expr21"]().graph
        self._backend = backend
        self._key = structural_key(graph)
        self._output = graph.outputs[0]

    def _check_graph(self, graph: pb.Graph) -> None:
        try:
            key = structural_key(graph_from_wire(graph))
        except WireError as e:
            raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if key != self._key:
            raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT,
                               "this server computes the built-in expression graph only")

    def compute(self, request: pb.ComputeRequest) -> pb.ComputeResponse:
        """The response to one request, or RefusedError."""
        source = request.WhichOneof("graph_source")
        if source == "graph":
            self._check_graph(request.graph)
        elif request.graph_id != GRAPH_ID:
            raise RefusedError(grpc.StatusCode.NOT_FOUND, f"unknown graph {request.graph_id!r}")
        try:
            inputs = tensors_from_wire(request.inputs, "inputs")
        except WireError as e:
            raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        shape = (request.batch_size,) if request.batch_size else ()
        for name in ("x", "y"):
            given = inputs.get(name)
            if given is None or given.dtype != np.float64 or given.shape != shape:
                raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"inputs.{name}: a float64 of shape {list(shape)} is needed")
        out, dx, dy = self._backend(inputs["x"], inputs["y"])
        response = pb.ComputeResponse(request_id=request.request_id)
        tensors_into_wire(response.outputs, {self._output: out})
        tensors_into_wire(response.gradients, {"x": dx, "y": dy})
        finite = np.isfinite(out) & np.isfinite(dx) & np.isfinite(dy)
        response.nonfinite.extend(np.atleast_1d(~finite).tolist())
        return response

    async def RegisterGraph(  # noqa: N802 - gRPC's name
            self, request: pb.RegisterGraphRequest,
            context: aio.ServicerContext[pb.RegisterGraphRequest, pb.RegisterGraphResponse]
    ) -> pb.RegisterGraphResponse:
        try:
            self._check_graph(request.graph)
        except RefusedError as e:
            await context.abort(e.code, e.message)
        return pb.RegisterGraphResponse(graph_id=GRAPH_ID)

    async def Compute(  # noqa: N802
            self, request: pb.ComputeRequest,
            context: aio.ServicerContext[pb.ComputeRequest, pb.ComputeResponse]
    ) -> pb.ComputeResponse:
        try:
            return self.compute(request)
        except RefusedError as e:
            await context.abort(e.code, e.message)

    async def ComputeStream(  # noqa: N802
            self, request_iterator: AsyncIterator[pb.ComputeStreamRequest],
            context: aio.ServicerContext[pb.ComputeStreamRequest, pb.ComputeStreamResponse]
    ) -> AsyncIterator[pb.ComputeStreamResponse]:
        async for item in request_iterator:
            request_id = item.request.request_id
            try:
                yield pb.ComputeStreamResponse(request_id=request_id,
                                               response=self.compute(item.request))
            except RefusedError as e:
                yield pb.ComputeStreamResponse(request_id=request_id, error=pb.StreamError(
                    code=e.code.value[0], message=e.message))

    async def ListOps(  # noqa: N802
            self, request: pb.ListOpsRequest,
            context: aio.ServicerContext[pb.ListOpsRequest, pb.ListOpsResponse]
    ) -> pb.ListOpsResponse:
        return pb.ListOpsResponse()  # no general ops: the one graph is built in


async def serve(port: int, backend: Backend) -> None:
    """Serve on 127.0.0.1:port until the process is stopped."""
    server = aio.server()
    pb_grpc.add_GradientServiceServicer_to_server(PlainService(backend), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=50052, help="port on 127.0.0.1")
    parser.add_argument("--backend", choices=("torch", "numpy"), default="torch",
                        help="torch.autograd (default) or hand-written numpy")
    args = parser.parse_args()
    asyncio.run(serve(args.port, torch_backend() if args.backend == "torch"
                      else numpy_backend()))


if __name__ == "__main__":
    main()
