"""ONNX models through a live server, as any gRPC client sees the contract: RegisterGraph and
Compute with an ``OnnxModel`` (by graph_id and inline), the ``GraphSignature`` they return, and
the INVALID_ARGUMENT (or, over a limit, RESOURCE_EXHAUSTED) refusals naming the field at fault.

The models are the example networks (``client/networks.py``: a LeNet CNN and a transformer
block, float32 and float64) and PyTorch exports (an MLP with cross-entropy and a LeNet with
BatchNorm, by both exporters). Expected values never come from gradserve: outputs from onnx's
ReferenceEvaluator, gradients from torch.autograd (for the exports, weights included) or from
central finite differences of the ReferenceEvaluator's outputs; signatures from the models' own
declarations. The concurrent test runs both networks at once under a batching server and checks
every request's answer against the oracle, and that passes held several requests.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from gradserve.client.networks import cnn, transformer
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.tensors import tensors_to_wire
from tests.importer.models import In, make, node
from tests.importer.test_torch import SPECS, Exported, export, param_grads, torch_run, weights
from tests.server.conftest import (
    RPC_TIMEOUT,
    WAIT,
    Arrays,
    Failure,
    ServerFactory,
    decode,
    failure,
    quadratic,
)

Arr = NDArray[Any]
Stub = pb_grpc.GradientServiceStub
Source = str | pb.OnnxModel  # a graph_id, or the model sent inline

WIRE_DTYPES: dict[int, pb.DataType.ValueType] = {
    onnx.TensorProto.FLOAT: pb.DATA_TYPE_FLOAT32, onnx.TensorProto.DOUBLE: pb.DATA_TYPE_FLOAT64,
    onnx.TensorProto.INT64: pb.DATA_TYPE_INT64}
NETWORKS: dict[str, Callable[..., onnx.ModelProto]] = {"cnn": cnn, "transformer": transformer}
B = 3  # examples in a batched request


# --- the oracle ------------------------------------------------------------------------------


class Erf(OpRun):
    """Erf in the input's own precision (the reference evaluator picks a replacement op by its
    class name): onnx's reference Erf rounds through float32, which would make a float64 oracle
    float32-accurate (it is the GELU of the transformer)."""

    op_domain = ""

    def _run(self, x: Arr) -> tuple[Arr]:
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)


def evaluator(model: onnx.ModelProto) -> Callable[[Mapping[str, Arr]], list[Arr]]:
    """The model run by onnx.reference (float64 models with an exact Erf)."""
    ev = ReferenceEvaluator(model, new_ops=[Erf])
    return lambda feeds: list(ev.run(None, dict(feeds)))


def of_x(run: Callable[[Mapping[str, Arr]], list[Arr]]) -> Callable[[Arr], Arr]:
    """A one-input model's first output as a function of its input x."""
    return lambda x: run({"x": x})[0]


def widened(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 model computed in float64 with the very same weights (every float32 value is a
    float64 value): the oracle for finite differences of a float32 model's gradients."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    graph = wide.graph
    for t in graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(t).astype(np.float64), t.name))
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            v.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    assert not any(n.op_type in ("Cast", "Constant") for n in graph.node)  # nothing left behind
    return wide


def check_directional(run: Callable[[Arr], Arr], x: Arr, upstream: Arr, grad: Arr,
                      rng: np.random.Generator, rtol: float, directions: int = 2) -> None:
    """Central finite differences of <upstream, run(x)> along random directions v, per example
    (leading axis), against <grad, v>: |fd - analytic| within rtol of sum |grad * v| (the scale
    of the terms, robust where they cancel). Of the steps 1e-5 and 1e-6, the closer counts: a
    ReLU or max-pool kink within one step of x makes that difference wrong, and one within a
    tenth of it is rare."""
    x64, up = x.astype(np.float64), upstream.astype(np.float64)
    for _ in range(directions):
        v = rng.standard_normal(x.shape)
        terms = (grad.astype(np.float64) * v).reshape(len(x), -1)
        errors = [np.abs(((run(x64 + h * v) - run(x64 - h * v)) * up).reshape(len(x), -1)
                         .sum(1) / (2 * h) - terms.sum(1)) for h in (1e-5, 1e-6)]
        np.testing.assert_array_less(np.minimum(*errors), rtol * np.abs(terms).sum(1))


# --- the model's declaration: the signature expected -----------------------------------------


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    tensor = value.type.tensor_type
    assert tensor.HasField("shape"), f"{value.name} declares no shape"
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tensor.shape.dim]


def declared(model: onnx.ModelProto, initializer_inputs: Sequence[str] = ()
             ) -> pb.GraphSignature:
    """The signature a model declares: inputs (the model's own, then the initializers named, in
    the model's order of initializers) and outputs, each without its symbolic leading (batch)
    dimension; batched when every input has one."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    batched = all(dims(v)[:1] and isinstance(dims(v)[0], str) for v in inputs)

    def info(v: onnx.ValueInfoProto) -> pb.ValueInfo:
        shape = dims(v)
        if batched and shape and isinstance(shape[0], str):
            shape = shape[1:]
        assert all(isinstance(d, int) for d in shape), shape
        return pb.ValueInfo(name=v.name, dtype=WIRE_DTYPES[v.type.tensor_type.elem_type],
                            shape=[int(d) for d in shape])

    weights_in = [pb.ValueInfo(name=t.name, dtype=WIRE_DTYPES[t.data_type], shape=t.dims)
                  for t in model.graph.initializer if t.name in initializer_inputs]
    return pb.GraphSignature(inputs=[info(v) for v in inputs] + weights_in,
                             outputs=[info(v) for v in model.graph.output],
                             model_batched=batched)


# --- calls ------------------------------------------------------------------------------------


def onnx_message(model: onnx.ModelProto | bytes, initializer_inputs: Sequence[str] = ()
                 ) -> pb.OnnxModel:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return pb.OnnxModel(model=data, initializer_inputs=list(initializer_inputs))


def register(stub: Stub, message: pb.OnnxModel) -> pb.RegisterGraphResponse:
    reply: pb.RegisterGraphResponse = stub.RegisterGraph(
        pb.RegisterGraphRequest(onnx_model=message), timeout=RPC_TIMEOUT)
    return reply


def compute_request(source: Source, inputs: Mapping[str, Arr], *, batch_size: int = 0,
                    upstream: Mapping[str, Arr] | None = None, request_id: str = "",
                    wrt: Sequence[str] = ()) -> pb.ComputeRequest:
    message = pb.ComputeRequest(request_id=request_id, inputs=tensors_to_wire(inputs),
                                upstream=tensors_to_wire(upstream or {}),
                                batch_size=batch_size, wrt=list(wrt))
    if isinstance(source, str):
        message.graph_id = source
    else:
        message.onnx_model.CopyFrom(source)
    return message


def compute(stub: Stub, source: Source, inputs: Mapping[str, Arr], **options: Any
            ) -> pb.ComputeResponse:
    response: pb.ComputeResponse = stub.Compute(compute_request(source, inputs, **options),
                                                timeout=RPC_TIMEOUT)
    return response


def assert_same(got: Arrays, want: Arrays, *, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert list(got) == list(want) or set(got) == set(want), (sorted(got), sorted(want))
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, rtol=rtol, atol=atol, err_msg=name)


# --- the example networks --------------------------------------------------------------------


def network_input(name: str, rng: np.random.Generator, batch: int, dtype: Any) -> Arr:
    shape = (1, 28, 28) if name == "cnn" else (32, 64)
    return rng.standard_normal((batch, *shape)).astype(dtype)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_a_network_by_id_and_inline_matches_the_reference(stub: Stub, name: str) -> None:
    """float32: outputs within 1e-5 of onnx.reference, by graph_id and inline; the signature
    is the model's declaration; the same model registered twice has one id; a batch of B
    examples is B single-example computes."""
    model = NETWORKS[name]()
    message = onnx_message(model)
    reply = register(stub, message)
    out = model.graph.output[0].name
    assert reply.signature == declared(model)
    assert reply.signature.model_batched
    assert register(stub, onnx_message(model.SerializeToString())).graph_id == reply.graph_id
    assert register(stub, onnx_message(NETWORKS[name]())).graph_id == reply.graph_id
    assert register(stub, onnx_message(NETWORKS[name](seed=1))).graph_id != reply.graph_id

    rng = np.random.default_rng(10)
    x = network_input(name, rng, B, np.float32)
    reference = evaluator(model)
    (want,) = reference({"x": x})
    upstream = rng.standard_normal(want.shape).astype(np.float32)
    by_id = compute(stub, reply.graph_id, {"x": x}, batch_size=B, upstream={out: upstream})
    inline = compute(stub, message, {"x": x}, batch_size=B, upstream={out: upstream})
    assert not by_id.HasField("signature")  # a model's signature comes where the model went
    assert inline.signature == reply.signature
    for response in (by_id, inline):
        assert list(response.nonfinite) == [False] * B
        assert_same(decode(response.outputs), {out: want}, rtol=1e-5, atol=1e-5)
        assert set(response.gradients) == {"x"}
    assert_same(decode(inline.gradients), decode(by_id.gradients))
    grads = decode(by_id.gradients)["x"]
    assert grads.dtype == np.float32 and grads.shape == x.shape

    for b in range(B):  # one example: per-example shapes, no batch axis
        single = compute(stub, reply.graph_id, {"x": x[b]}, upstream={out: upstream[b]})
        assert list(single.nonfinite) == [False]
        got = decode(single.outputs)[out]
        np.testing.assert_allclose(got, want[b], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, decode(by_id.outputs)[out][b], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(decode(single.gradients)["x"], grads[b], rtol=1e-5,
                                   atol=1e-6 * float(np.abs(grads).max()))


@pytest.mark.parametrize("name", list(NETWORKS))
def test_a_float64_network_gradient_matches_finite_differences(stub: Stub, name: str) -> None:
    model = NETWORKS[name](seed=3, dtype=np.float64)
    out = model.graph.output[0].name
    reply = register(stub, onnx_message(model))
    assert [v.dtype for v in (*reply.signature.inputs, *reply.signature.outputs)] == [
        pb.DATA_TYPE_FLOAT64] * 2
    rng = np.random.default_rng(11)
    x = network_input(name, rng, 2, np.float64)
    reference = evaluator(model)
    (want,) = reference({"x": x})
    upstream = rng.standard_normal(want.shape)
    response = compute(stub, reply.graph_id, {"x": x}, batch_size=2, upstream={out: upstream})
    assert_same(decode(response.outputs), {out: want}, rtol=1e-12, atol=1e-12)
    check_directional(of_x(reference), x, upstream,
                      decode(response.gradients)["x"], rng, rtol=1e-9, directions=3)


def test_a_fixed_shape_model_is_not_batched(stub: Stub) -> None:
    """No symbolic dimension: per-example shapes are the model's own; batch_size stacks whole
    model inputs. y = tanh(x) * w, dy/dx = (1 - tanh^2 x) w, by hand."""
    w = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
    model = make([node("Tanh", ["x"], ["t"]), node("Mul", ["t", "w"])], {"x": In((2, 3))},
                 ["y"], initializers={"w": w}, declare={"y": (2, 3)})
    reply = register(stub, onnx_message(model))
    assert reply.signature == declared(model)
    assert not reply.signature.model_batched
    assert [list(v.shape) for v in reply.signature.inputs] == [[2, 3]]
    x = np.random.default_rng(12).uniform(-2, 2, (2, 2, 3))
    response = compute(stub, reply.graph_id, {"x": x}, batch_size=2)
    assert_same(decode(response.outputs), {"y": np.tanh(x) * w}, rtol=1e-14)
    assert_same(decode(response.gradients), {"x": (1 - np.tanh(x) ** 2) * w}, rtol=1e-14)
    fed = compute(stub, onnx_message(model, ["w"]), {"x": x[0], "w": w})
    assert_same(decode(fed.gradients), {"x": (1 - np.tanh(x[0]) ** 2) * w, "w": np.tanh(x[0])},
                rtol=1e-14)
    assert [v.name for v in fed.signature.inputs] == ["x", "w"]


def test_a_plain_graph_gets_a_signature_too(stub: Stub) -> None:
    """A Graph registered gets its signature (never model_batched); a Compute that sent a graph,
    not a model, carries none."""
    q = quadratic()  # f(x) = 2x^2 - 3x + 4, x a float64 scalar
    reply = stub.RegisterGraph(pb.RegisterGraphRequest(graph=graph_to_wire(q.graph)),
                               timeout=RPC_TIMEOUT)
    assert reply.signature == pb.GraphSignature(
        inputs=[pb.ValueInfo(name="x", dtype=pb.DATA_TYPE_FLOAT64)],
        outputs=[pb.ValueInfo(name=q.out, dtype=pb.DATA_TYPE_FLOAT64)], model_batched=False)
    response = stub.Compute(pb.ComputeRequest(graph=graph_to_wire(q.graph),
                                              inputs=tensors_to_wire({"x": 6.0})),
                            timeout=RPC_TIMEOUT)
    assert not response.HasField("signature")
    assert_same(decode(response.gradients), {"x": np.array(21.0)})


# --- PyTorch exports ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[
    pytest.param((name, dynamo), id=f"{name}-{'dynamo' if dynamo else 'torchscript'}")
    for name in ("mlp", "lenet") for dynamo in (True, False)])
def exported(request: pytest.FixtureRequest) -> Iterator[Exported]:
    """An MLP with cross-entropy, or a LeNet with BatchNorm (eval), exported in float64."""
    name, dynamo = request.param
    yield export(SPECS[name], dynamo, np.float64)


@dataclass(frozen=True)
class Export:
    """What the tests need of an export: the model, its weights (initializer -> (parameter,
    transposed)) in the model's order of initializers, and its output."""

    ex: Exported
    mapping: dict[str, tuple[str, bool]]
    weight_names: list[str]
    output: str
    batched_output: bool  # the output keeps the batch axis (else the model reduces over it)

    @staticmethod
    def of(ex: Exported) -> Export:
        mapping = weights(ex)
        assert {p for p, _ in mapping.values()} == {n for n, _ in ex.module.named_parameters()}
        (output,) = ex.model.graph.output
        return Export(ex, mapping, [t.name for t in ex.model.graph.initializer
                                    if t.name in mapping],
                      output.name, bool(dims(output)[:1]) and isinstance(dims(output)[0], str))

    def arrays(self) -> dict[str, Arr]:
        return {t.name: numpy_helper.to_array(t) for t in self.ex.model.graph.initializer
                if t.name in self.mapping}

    def torch_up(self, upstream: Arr) -> Arr:
        """One example's upstream as the module, run on a batch of one, takes it."""
        return upstream[None] if self.batched_output else upstream


def test_torch_exports_weights_as_inputs_match_autograd(stub: Stub, exported: Exported) -> None:
    """Every weight fed (per example) and differentiated: outputs, input gradients and weight
    gradients match torch.autograd on each example alone; outputs match onnx.reference."""
    e = Export.of(exported)
    message = onnx_message(exported.model, e.weight_names)
    reply = register(stub, message)
    assert reply.signature == declared(exported.model, e.weight_names)
    assert reply.signature.model_batched
    assert [v.name for v in reply.signature.inputs][-len(e.weight_names):] == e.weight_names
    plain = register(stub, onnx_message(exported.model))
    assert plain.graph_id != reply.graph_id  # weights as constants: another graph
    assert register(stub, message).graph_id == reply.graph_id

    rng = np.random.default_rng(13)
    feed = exported.feed(rng, B)
    arrays = e.arrays()
    stacked = {k: np.stack([a] * B) for k, a in arrays.items()}
    (out_info,) = reply.signature.outputs
    upstream = rng.standard_normal((B, *out_info.shape))
    response = compute(stub, reply.graph_id, {**feed, **stacked}, batch_size=B,
                       upstream={e.output: upstream})
    outputs, grads = decode(response.outputs), decode(response.gradients)
    floats = {k for k, v in feed.items() if v.dtype.kind == "f"}
    assert set(grads) == floats | set(e.weight_names)  # the int64 labels get none
    reference = evaluator(exported.model)
    for b in range(B):
        one = {k: v[b:b + 1] for k, v in feed.items()}
        want, want_inputs, want_params = torch_run(exported, one, e.torch_up(upstream[b]))
        (ref,) = reference(one)
        for oracle in (want, ref):
            np.testing.assert_allclose(outputs[e.output][b], oracle[0] if e.batched_output
                                       else oracle, rtol=1e-10, atol=1e-12)
        for name in floats:
            np.testing.assert_allclose(grads[name][b], want_inputs[name][0], rtol=1e-8,
                                       atol=1e-11, err_msg=name)
        got_params = param_grads({k: grads[k][b] for k in e.weight_names}, e.mapping)
        assert set(got_params) == set(want_params)
        for pname, g in got_params.items():
            np.testing.assert_allclose(g, want_params[pname], rtol=1e-8, atol=1e-11,
                                       err_msg=pname)


def test_torch_exports_inline_one_example_and_a_batch(stub: Stub, exported: Exported) -> None:
    """Weights as constants, the model sent inline: one example (per-example shapes, no batch
    axis) and a batch agree with autograd and with each other."""
    e = Export.of(exported)
    message = onnx_message(exported.model)
    rng = np.random.default_rng(14)
    feed = exported.feed(rng, B)
    batch = compute(stub, message, feed, batch_size=B)
    assert batch.signature == declared(exported.model)
    floats = sorted(k for k, v in feed.items() if v.dtype.kind == "f")
    assert sorted(batch.gradients) == floats
    for b in range(B):
        single = compute(stub, message, {k: v[b] for k, v in feed.items()})
        want, want_inputs, _ = torch_run(exported, {k: v[b:b + 1] for k, v in feed.items()},
                                         None)
        want_out = want[0] if e.batched_output else want
        for response, index in ((single, ()), (batch, (b,))):
            np.testing.assert_allclose(decode(response.outputs)[e.output][index], want_out,
                                       rtol=1e-10, atol=1e-12)
            for name in floats:
                np.testing.assert_allclose(decode(response.gradients)[name][index],
                                           want_inputs[name][0], rtol=1e-8, atol=1e-11)


def test_a_batch_mean_of_the_mlp_loss_is_torchs_batch_loss(stub: Stub) -> None:
    """The MLP's loss averages over N; each example is its own batch of one, so the mean of
    the per-example losses and weight gradients is the model's batch loss and gradient."""
    ex = export(SPECS["mlp"], False, np.float64)
    e = Export.of(ex)
    n = 5
    feed = ex.feed(np.random.default_rng(15), n)
    response = compute(stub, onnx_message(ex.model, e.weight_names),
                       {**feed, **{k: np.stack([a] * n) for k, a in e.arrays().items()}},
                       batch_size=n)
    loss, inputs, params = torch_run(ex, feed, None)
    grads = decode(response.gradients)
    np.testing.assert_allclose(decode(response.outputs)[e.output].mean(), loss, rtol=1e-12)
    np.testing.assert_allclose(grads["x"] / n, inputs["x"], rtol=1e-9, atol=1e-13)
    for pname, g in param_grads({k: grads[k].mean(axis=0) for k in e.weight_names},
                                e.mapping).items():
        np.testing.assert_allclose(g, params[pname], rtol=1e-9, atol=1e-13, err_msg=pname)


# --- concurrent clients of two models ---------------------------------------------------------

THREADS = 8
ROUNDS = 6
CALL_TIMEOUT = 10.0


@dataclass(frozen=True)
class Sent:
    kind: str
    x: Arr
    upstream: Arr
    batch_size: int
    inline: bool

    def message(self, ids: Mapping[str, str], models: Mapping[str, onnx.ModelProto],
                rid: str) -> pb.ComputeRequest:
        source: Source = onnx_message(models[self.kind]) if self.inline else ids[self.kind]
        out = models[self.kind].graph.output[0].name
        return compute_request(source, {"x": self.x}, batch_size=self.batch_size,
                               upstream={out: self.upstream}, request_id=rid)


def test_concurrent_clients_of_two_models_get_their_own_answers(
        make_server: ServerFactory) -> None:
    served = make_server(max_queue_delay_us=20_000, batch_wait="fixed", batch_threads=2)
    models = {name: make_model() for name, make_model in NETWORKS.items()}
    ids = {name: register(served.stub, onnx_message(m)).graph_id for name, m in models.items()}
    plans: list[list[Sent]] = []
    for t in range(THREADS):
        rng = np.random.default_rng(100 + t)
        sent = []
        for k in range(ROUNDS):
            kind = list(NETWORKS)[(t + k) % 2]
            batch = int(rng.integers(0, 4))
            x = network_input(kind, rng, batch or 1, np.float32)
            x = x if batch else x[0]
            out_shape = (10,) if kind == "cnn" else (32, 64)
            up = rng.standard_normal((batch, *out_shape) if batch else out_shape)
            sent.append(Sent(kind, x, up.astype(np.float32), batch, inline=(t + k) % 3 == 0))
        plans.append(sent)
    answers: list[list[pb.ComputeResponse | grpc.RpcError | None]] = [
        [None] * ROUNDS for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS)

    def client(t: int) -> None:
        barrier.wait(timeout=WAIT)
        for k, s in enumerate(plans[t]):
            try:
                answers[t][k] = served.stub.Compute(s.message(ids, models, f"{t}/{k}"),
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

    references = {k: evaluator(m) for k, m in models.items()}
    wide = {k: evaluator(widened(m)) for k, m in models.items()}
    rng = np.random.default_rng(99)
    for t, sent in enumerate(plans):
        for k, s in enumerate(sent):
            answer, where = answers[t][k], f"request {t}/{k} ({s.kind}, batch {s.batch_size})"
            assert isinstance(answer, pb.ComputeResponse), f"{where}: {answer}"
            assert answer.request_id == f"{t}/{k}", where
            out = models[s.kind].graph.output[0].name
            xs, ups = (s.x, s.upstream) if s.batch_size else (s.x[None], s.upstream[None])
            (want,) = references[s.kind]({"x": xs})
            got = decode(answer.outputs)[out]
            np.testing.assert_allclose(got if s.batch_size else got[None], want, rtol=1e-5,
                                       atol=1e-5, err_msg=where)
            grad = decode(answer.gradients)["x"]
            assert grad.shape == s.x.shape and grad.dtype == np.float32, where
            check_directional(of_x(wide[s.kind]), xs, ups,
                              grad if s.batch_size else grad[None], rng, rtol=1e-5,
                              directions=1)
    batches = served.batches.batches
    assert sum(r for r, _ in batches) == THREADS * ROUNDS
    assert sum(e for _, e in batches) == sum(s.batch_size or 1 for p in plans for s in p)
    assert max(r for r, _ in batches) > 1, batches  # batching happened
    assert max(e for _, e in batches) > 1, batches


# --- refusals -----------------------------------------------------------------------------------

X = {"x": In(("N", 3))}


def relu() -> onnx.ModelProto:
    return make([node("Relu", ["x"])], X, ["y"])


def float16_input() -> onnx.ModelProto:
    model = relu()
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    return model


@dataclass(frozen=True)
class Bad:
    """A model the server must refuse: the field at fault and what the description says."""

    message: pb.OnnxModel
    field: str
    says: tuple[str, ...]


BAD: dict[str, Callable[[], Bad]] = {
    "garbage-bytes": lambda: Bad(onnx_message(b"\x0a\xff\xff\xff\xff not protobuf"),
                                 "onnx_model.model", ("not an ONNX model",)),
    "empty-bytes": lambda: Bad(onnx_message(b""), "onnx_model.model.graph",
                               ("the model has no graph",)),
    "no-graph": lambda: Bad(onnx_message(onnx.ModelProto(ir_version=8)),
                            "onnx_model.model.graph", ("the model has no graph",)),
    "unsupported-op": lambda: Bad(
        onnx_message(make([node("Relu", ["x"], ["r"]), node("Hardmax", ["r"], name="hm")], X,
                          ["y"], opset=17)),
        "onnx_model.model.graph.node[1].op_type", ("hm", "Hardmax", "opset 17")),
    "dangling-input": lambda: Bad(
        onnx_message(make([node("Relu", ["x"], ["r"], name="first"),
                           node("Add", ["r", "ghost"], name="second")], X, ["y"])),
        "onnx_model.model.graph.node[1].input[1]", ("second", "Add", "'ghost'")),
    "float16-input": lambda: Bad(onnx_message(float16_input()),
                                 "onnx_model.model.graph.input[0].type.tensor_type.elem_type",
                                 ("x", "FLOAT16")),
    "unknown-initializer": lambda: Bad(onnx_message(relu(), ["w"]),
                                       "onnx_model.initializer_inputs", ("'w'",)),
}


def assert_refused(fail: Failure, code: grpc.StatusCode, field: str,
                   says: Sequence[str]) -> None:
    assert fail.code is code, fail
    assert fail.fields == [field], fail
    (description,) = (d for _, d in fail.violations)
    for word in says:
        assert word in description, (word, description)
        assert word in fail.message, (word, fail.message)


def assert_answers(stub: Stub) -> None:
    """The server still answers a good model: relu's gradient is the step function."""
    x = np.array([[-1.5, 0.5, 2.0]])
    response = compute(stub, onnx_message(relu()), {"x": x}, batch_size=1)
    assert_same(decode(response.outputs), {"y": np.maximum(x, 0)})
    assert_same(decode(response.gradients), {"x": np.array([[0.0, 1.0, 1.0]])})


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("method", ["RegisterGraph", "Compute"])
def test_a_bad_model_is_invalid_argument_naming_the_field(stub: Stub, case: str,
                                                          method: str) -> None:
    bad = BAD[case]()
    with pytest.raises(grpc.RpcError) as info:
        if method == "RegisterGraph":
            register(stub, bad.message)
        else:
            compute(stub, bad.message, {"x": np.ones((1, 3))}, batch_size=1)
    assert_refused(failure(info.value), grpc.StatusCode.INVALID_ARGUMENT, bad.field, bad.says)
    assert_answers(stub)


@pytest.mark.parametrize("both", [True, False], ids=["both", "neither"])
def test_register_takes_exactly_one_of_graph_and_model(stub: Stub, both: bool) -> None:
    message = pb.RegisterGraphRequest()
    if both:
        message.graph.CopyFrom(graph_to_wire(quadratic().graph))
        message.onnx_model.CopyFrom(onnx_message(relu()))
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterGraph(message, timeout=RPC_TIMEOUT)
    assert_refused(failure(info.value), grpc.StatusCode.INVALID_ARGUMENT, "graph",
                   ("exactly one of graph and onnx_model",))
    assert_answers(stub)


@pytest.mark.parametrize(("settings", "field", "says"), [
    ({"max_nodes": 8}, "onnx_model.model.graph.node", ("the limit is 8",)),
    # the initializers in order: conv1.weight (150), conv1.bias (6), conv2.weight (2400)
    ({"max_tensor_elements": 1000}, "onnx_model.model.graph.initializer[2]",
     ("conv2.weight", "2400", "1000")),
], ids=["max_nodes", "max_tensor_elements"])
def test_a_model_over_the_servers_limits_is_refused(make_server: ServerFactory,
                                                    settings: dict[str, int], field: str,
                                                    says: tuple[str, ...]) -> None:
    served = make_server(**settings)
    message = onnx_message(cnn())
    for method in ("RegisterGraph", "Compute"):
        with pytest.raises(grpc.RpcError) as info:
            if method == "RegisterGraph":
                register(served.stub, message)
            else:
                compute(served.stub, message, {"x": np.zeros((1, 1, 28, 28), np.float32)},
                        batch_size=1)
        assert_refused(failure(info.value), grpc.StatusCode.RESOURCE_EXHAUSTED, field, says)
    assert_answers(served.stub)
