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

``--model cnn`` serves client/networks.py's LeNet CNN instead (torch only), for
bench/models.py: RegisterGraph takes the model as ``onnx_model`` and answers the fixed id
``cnn``; Compute takes that id or the model inline. Its weights are the received model's
initializers (a model of any other structure is refused); each request's image (one, or
``batch_size`` stacked) goes through bench/torch_models.py's ``lenet`` and one backward pass on
one torch thread, and the response carries the logits and the gradient with respect to ``x``,
encoded as gradserve encodes them.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, cast

import grpc
import numpy as np
import onnx
from engine_vs_numpy import expression_numpy
from google.protobuf.message import DecodeError
from grpc import aio
from torch_models import initializers, lenet, tensors

from gradserve.client import networks
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
CNN_ID = "cnn"  # what RegisterGraph answers with --model cnn


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


class ExpressionModel:
    """The expression graph alone, by ``backend``."""

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

    def register(self, request: pb.RegisterGraphRequest) -> pb.RegisterGraphResponse:
        """The answer to RegisterGraph, or RefusedError."""
        if request.HasField("onnx_model"):
            raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT,
                               "this server computes the built-in expression graph only")
        self._check_graph(request.graph)
        return pb.RegisterGraphResponse(graph_id=GRAPH_ID)


Weights = dict[str, Any]  # torch tensors by initializer name


def _skeleton(model: onnx.ModelProto) -> tuple[Any, ...]:
    """What a model computes but for its weights' values: its nodes, inputs, outputs, opsets,
    and its initializers' names, types and shapes."""
    g = model.graph
    return (tuple(n.SerializeToString(deterministic=True) for n in g.node),
            tuple(v.SerializeToString(deterministic=True) for v in (*g.input, *g.output)),
            tuple((t.name, t.data_type, tuple(t.dims)) for t in g.initializer),
            tuple((o.domain, o.version) for o in model.opset_import))


class CnnModel:
    """client/networks.py's LeNet CNN by torch.autograd (one intra-op thread), with the
    weights of the model registered (or sent inline): bench/torch_models.py's ``lenet`` on the
    image, then the gradient of the logits (upstream: ones, or the request's) with respect to
    it."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(1)
        self._torch = torch
        reference = networks.cnn()
        self._skeleton = _skeleton(reference)
        self._output = reference.graph.output[0].name
        self._input = reference.graph.input[0].name
        self._registered: Weights | None = None
        self._inline: tuple[bytes, Weights] | None = None  # the model last sent inline
        float32 = pb.DATA_TYPE_FLOAT32
        self._signature = pb.GraphSignature(
            inputs=[pb.ValueInfo(name=self._input, dtype=float32, shape=[1, 28, 28])],
            outputs=[pb.ValueInfo(name=self._output, dtype=float32, shape=[10])],
            model_batched=True)

    def _weights(self, message: pb.OnnxModel, field: str) -> Weights:
        """The weights of a model message, if it is the CNN; RefusedError if not."""
        if self._inline is not None and self._inline[0] == message.model:
            return self._inline[1]
        if message.initializer_inputs:
            raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}.initializer_inputs: "
                               "this server takes the model's weights as constants only")
        try:
            model = onnx.ModelProto.FromString(message.model)
        except DecodeError as e:
            raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}.model: {e}") from None
        if _skeleton(model) != self._skeleton:
            raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{field}.model: this server computes the LeNet CNN of "
                               "client/networks.py only")
        weights = tensors(self._torch, initializers(model))
        self._inline = (message.model, weights)
        return weights

    def register(self, request: pb.RegisterGraphRequest) -> pb.RegisterGraphResponse:
        """The answer to RegisterGraph, or RefusedError."""
        if not request.HasField("onnx_model"):
            raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT,
                               "this server computes the CNN model only: send it as onnx_model")
        self._registered = self._weights(request.onnx_model, "onnx_model")
        return pb.RegisterGraphResponse(graph_id=CNN_ID, signature=self._signature)

    def compute(self, request: pb.ComputeRequest) -> pb.ComputeResponse:
        """The response to one request, or RefusedError."""
        source = request.WhichOneof("graph_source")
        if source == "onnx_model":
            weights = self._weights(request.onnx_model, "onnx_model")
        elif source == "graph_id" and request.graph_id == CNN_ID and self._registered is not None:
            weights = self._registered
        elif source == "graph_id":
            raise RefusedError(grpc.StatusCode.NOT_FOUND, f"unknown graph {request.graph_id!r}")
        else:
            raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT,
                               "this server computes the CNN model only: send it as onnx_model")
        if list(request.wrt) not in ([], [self._input]):
            raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"wrt: only the gradient with respect to {self._input!r} is "
                               "computed here")
        try:
            inputs = tensors_from_wire(request.inputs, "inputs")
            upstream = tensors_from_wire(request.upstream, "upstream")
        except WireError as e:
            raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        lead = (request.batch_size,) if request.batch_size else ()
        x = inputs.get(self._input)
        if set(inputs) != {self._input} or x is None or x.dtype != np.float32 \
                or x.shape != (*lead, 1, 28, 28):
            raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT, f"inputs: {self._input} alone, "
                               f"a float32 of shape {[*lead, 1, 28, 28]}, is needed")
        seed = upstream.get(self._output)
        if set(upstream) - {self._output} or (
                seed is not None and (seed.dtype != np.float32 or seed.shape != (*lead, 10))):
            raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT, f"upstream: {self._output} "
                               f"alone, a float32 of shape {[*lead, 10]}, may be given")
        torch = self._torch
        image = torch.tensor(x, requires_grad=True)  # a copy: the decoded array is read-only
        logits = lenet(torch, weights, image if lead else image[None])
        grad_out = torch.ones_like(logits) if seed is None else torch.tensor(
            seed if lead else seed[None])
        (dx,) = torch.autograd.grad(logits, (image,), grad_out)
        out = logits.detach().numpy()
        out, dx = (out, dx.numpy()) if lead else (out[0], dx.numpy())
        response = pb.ComputeResponse(request_id=request.request_id)
        if source == "onnx_model":
            response.signature.CopyFrom(self._signature)
        tensors_into_wire(response.outputs, {self._output: out})
        tensors_into_wire(response.gradients, {self._input: dx})
        finite = (np.isfinite(out).reshape(*lead, -1).all(axis=-1)
                  & np.isfinite(dx).reshape(*lead, -1).all(axis=-1))
        response.nonfinite.extend(np.atleast_1d(~finite).tolist())
        return response


class Model(Protocol):
    """What a plain server computes: RegisterGraph's answer and Compute's."""

    def register(self, request: pb.RegisterGraphRequest) -> pb.RegisterGraphResponse: ...

    def compute(self, request: pb.ComputeRequest) -> pb.ComputeResponse: ...


class PlainService(pb_grpc.GradientServiceServicer):
    """GradientService for one model alone, one request at a time."""

    def __init__(self, model: Model) -> None:
        self.compute = model.compute
        self.register = model.register

    async def RegisterGraph(  # noqa: N802 - gRPC's name
            self, request: pb.RegisterGraphRequest,
            context: aio.ServicerContext[pb.RegisterGraphRequest, pb.RegisterGraphResponse]
    ) -> pb.RegisterGraphResponse:
        try:
            return self.register(request)
        except RefusedError as e:
            await context.abort(e.code, e.message)

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


async def serve(port: int, model: Model) -> None:
    """Serve on 127.0.0.1:port until the process is stopped."""
    server = aio.server()
    pb_grpc.add_GradientServiceServicer_to_server(PlainService(model), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=50052, help="port on 127.0.0.1")
    parser.add_argument("--backend", choices=("torch", "numpy"), default="torch",
                        help="torch.autograd (default) or hand-written numpy")
    parser.add_argument("--model", choices=("expr21", "cnn"), default="expr21",
                        help="the 21-op expression (default) or the LeNet CNN (ONNX; torch)")
    args = parser.parse_args()
    if args.model == "cnn" and args.backend != "torch":
        parser.error("--model cnn is computed with torch only")
    model: Model = CnnModel() if args.model == "cnn" else ExpressionModel(
        torch_backend() if args.backend == "torch" else numpy_backend())
    asyncio.run(serve(args.port, model))


if __name__ == "__main__":
    main()
