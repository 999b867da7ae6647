"""Real networks: gradserve on client/networks.py's ONNX models against torch.autograd.

Run: ``python bench/models.py`` (about two minutes on two cores; ``--quick``, CI's smoke run,
under a minute). Needs PyTorch (CPU). Only 127.0.0.1 is used; every loop is bounded in calls
and in time; every server started is stopped by its PID.

1. The engine's forward and backward pass against torch.autograd on CPU, float32 on both sides,
   torch on one thread and BLAS held at one: LeNet-5 (``networks.cnn()``) on a batch of 64
   28x28 images and a transformer encoder block (``networks.transformer()``) on a batch of 8
   sequences of 32 tokens of width 64, each differentiated with respect to its input and every
   weight; the same two as the service computes them (weights constant, the gradient with
   respect to the input only, the examples stacked in one batched run, and the CNN on one
   example); and bench/suite_engine.py's MLP 784-256-10 at batch 64. torch runs the same ops
   (bench/torch_models.py) with the weights taken from the ONNX models' initializers; the
   engine runs the imported model. Every output and gradient is checked, engine against torch,
   before anything is timed; the two sides alternate in rounds and each keeps its best
   (bench/engine_vs_numpy.py's ``compare``). Targets: engine / torch <= 1.5x for the CNN and
   the transformer with their weights.

   For the weights' gradients the models are imported with their batch axis fixed (N = 64, N =
   8) and the weights made inputs (``import_model(..., inputs=[...])``): the engine then sums
   each weight's gradient over the batch, as torch does. (A batched run of the model as it is,
   weights fed per example, would compute 64 per-example weight gradients instead: another
   computation, not torch.autograd's.)
2. Import: an MLP 784-1024-256-10 written with onnx.helper (1.07 million parameters) imported
   and compiled (``import_model``, ``Plan``, and the backward program ``Plan.program``), against
   reading the same bytes (``onnx.ModelProto.FromString`` and every initializer to numpy).
   Target: under one second.
3. Service: the ``cnn`` workload (one image per request, registered as the ONNX model, the
   gradient with respect to the image), 64 unary calls in flight, against gradserve (batching
   on, its default), gradserve with ``--max-batch-size 1`` (batching off) and
   bench/torch_server.py ``--model cnn`` (grpc.aio, torch.autograd per request on one thread),
   all driven by ``gradserve loadtest``'s driver (``drive``) on held-open channels, every
   server's answers checked first and a share of them during the runs. Rounds run every server
   once (the order reversed every other round); rates and latencies are the medians of the
   rounds, ratios the medians of the rounds' ratios. Targets: batching on / off >= 1.5x,
   gradserve / torch server >= 2x.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import load_driver
import numpy as np
import onnx
from engine_vs_numpy import compare, mlp_numpy
from grpc import aio
from onnx import helper, numpy_helper
from servers import free_port, gradserve, process
from suite_engine import ENGINE_ROUNDS, duration, engine_cases, torch_call, torch_forwards
from suite_load import LoadCase, LoadRow
from suite_report import Goal
from threadpoolctl import threadpool_limits
from torch_models import encoder_block, initializers, lenet, tensors, weight_names

from gradserve.client import networks
from gradserve.client.loadtest import OPTIONS, LoadConfig, Run, Unary, drive
from gradserve.client.workloads import WORKLOADS, Arrays
from gradserve.engine import Plan
from gradserve.importer import import_model
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.requests import request
from gradserve.wire.responses import decode_response

Arr = np.ndarray[Any, Any]
TORCH_SERVER = Path(__file__).resolve().parent / "torch_server.py"
RTOL = 1e-4  # float32 against float32, summed in other orders
CONCURRENCY = 64
VERIFY_EVERY = 16  # during the runs, one answer in this many is checked
MODEL_TARGET = 1.5  # engine / torch, the CNN and the transformer with their weights
IMPORT_TARGET = 1.0  # seconds
BATCHING_TARGET = 1.5  # batching on / off, requests/s
TORCH_SERVER_TARGET = 2.0  # gradserve / torch server, requests/s
ON, OFF, PLAIN = ("gradserve (batching on)", "gradserve --max-batch-size 1",
                  "torch server (torch.autograd)")


# --- 1. the engine against torch.autograd ------------------------------------------------------


@dataclass(frozen=True)
class ModelCase:
    """One engine row: two functions computing the same outputs and gradients (in one
    order), the engine's and torch's; the graph's nodes; and the target engine / torch, if
    it has one."""

    name: str
    nodes: int
    engine: Callable[[], Sequence[Any]]
    torch: Callable[[], Sequence[Any]]
    bound: float | None = None


@dataclass(frozen=True)
class ModelRow:
    """Seconds per call: the engine's and torch's (best rounds, paired)."""

    case: ModelCase
    engine: float
    torch: float

    @property
    def ratio(self) -> float:
        return self.engine / self.torch

    def goal(self) -> Goal | None:
        return None if self.case.bound is None else Goal(
            f"engine / torch.autograd, {self.case.name}", self.ratio, self.case.bound, False)


def fixed_batch(model: onnx.ModelProto, n: int) -> onnx.ModelProto:
    """The model with its symbolic batch dimension fixed at ``n`` in every input and output."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in (*fixed.graph.input, *fixed.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        assert not dim.HasField("dim_value"), f"{value.name}'s leading dimension is not symbolic"
        dim.dim_value = n
    return fixed


def engine_call(plan: Plan, feed: Arrays, order: Sequence[str], batched: bool = False
                ) -> Callable[[], list[Any]]:
    """One engine run: its output, then the gradients of ``order``."""
    output = plan.outputs[0]

    def run() -> list[Any]:
        result = plan.run(feed, batched=batched)
        return [result.outputs[output], *(result.gradients[k] for k in order)]

    return run


def autograd_call(torch: Any, forward: Callable[[dict[str, Any]], Any], arrays: Arrays,
                  order: Sequence[str]) -> Callable[[], list[Any]]:
    """One torch.autograd pass of ``forward`` on tensors of ``arrays`` (made once, as a
    training loop holds them), the gradients of ``order`` (the leaves) with ones upstream."""
    leaves = tensors(torch, arrays, frozenset(order))
    targets = [leaves[k] for k in order]

    def run() -> list[Any]:
        out = forward(leaves)
        return [out, *torch.autograd.grad(out, targets, torch.ones_like(out))]

    return run


def on_input(torch: Any, forward: Callable[..., Any]) -> Callable[[dict[str, Any]], Any]:
    """A model's torch function (bench/torch_models.py) on its tensors, applied to ``x``."""
    return lambda t: forward(torch, t, t["x"])


def model_cases(torch: Any, rng: np.random.Generator) -> list[ModelCase]:
    """The rows: each model with its weights at its batch, each as the service computes it,
    and suite_engine's MLP at batch 64 in float32."""
    cases = []
    for label, model, batch, x_shape, forward in (
            ("LeNet CNN", networks.cnn(), 64, (1, 28, 28), lenet),
            ("transformer block", networks.transformer(), 8, (32, 64), encoder_block)):
        weights = initializers(model)
        names = weight_names(model)
        x = rng.uniform(-1, 1, (batch, *x_shape)).astype(np.float32)
        run_torch = on_input(torch, forward)
        # the model's batch fixed, every weight an input: gradients summed over the batch
        imported = import_model(fixed_batch(model, batch).SerializeToString(), inputs=names)
        plan, order = Plan(imported.graph), ["x", *names]
        cases.append(ModelCase(
            f"{label}, batch {batch}, d/dx and every weight", len(imported.graph.nodes),
            engine_call(plan, {"x": x, **{k: weights[k] for k in names}}, order),
            autograd_call(torch, run_torch, {"x": x, **weights}, order), MODEL_TARGET))
        # as the service computes it: weights constant, examples stacked in a batched run
        imported = import_model(model.SerializeToString())
        assert imported.batched, label
        plan = Plan(imported.graph)
        cases.append(ModelCase(
            f"{label}, {batch} examples batched, d/dx only", len(imported.graph.nodes),
            engine_call(plan, {"x": x}, ["x"], batched=True),
            autograd_call(torch, run_torch, {"x": x, **weights}, ["x"])))
        if label == "LeNet CNN":  # a request with batching off: one image
            cases.append(ModelCase(
                f"{label}, one example, d/dx only", len(imported.graph.nodes),
                engine_call(plan, {"x": x[0]}, ["x"]),
                autograd_call(torch, lambda t: lenet(torch, t, t["x"][None])[0],
                              {"x": x[0], **weights}, ["x"])))
    mlp = next(c for c in engine_cases(rng) if c.name == "MLP 784-256-10, batch 64, float32")
    mlp_plan = Plan(mlp.graph)
    cases.append(ModelCase(mlp.name, len(mlp.graph.nodes),
                           engine_call(mlp_plan, mlp.feed, mlp.wrt),
                           torch_call(torch, torch_forwards(torch)["mlp"], mlp.feed, mlp.wrt)))
    want = mlp_numpy(*mlp.feed.values())  # the MLP's own check, as suite_engine does it
    check(f"engine, {mlp.name}", cases[-1].engine(), want, mlp.rtol, mlp.atol)
    check(f"torch, {mlp.name}", cases[-1].torch(), want, mlp.rtol, mlp.atol)
    return cases


def as_numpy(value: Any) -> Arr:
    """A result as a numpy array (torch tensors detached)."""
    return np.asarray(value.detach().numpy() if hasattr(value, "detach") else value)


def check(name: str, got: Sequence[Any], want: Sequence[Any], rtol: float = RTOL,
          atol: float | None = None) -> None:
    """Fail loudly unless ``got`` matches ``want``, result by result (shapes too). The
    default absolute tolerance is ``rtol`` times each reference's largest magnitude (a sum of
    float32 terms that cancels keeps only that much), but never less than a thousandth of the
    largest magnitude of all the results: a gradient that is zero but for rounding (the
    attention keys' bias: softmax ignores a shift) is that rounding on both sides."""
    assert len(got) == len(want), (name, len(got), len(want))
    wants = [as_numpy(w) for w in want]
    scales = [float(np.max(np.abs(w))) if w.size else 0.0 for w in wants]
    floor = max(scales, default=0.0) * 1e-3
    for k, (given, w, scale) in enumerate(zip(got, wants, scales, strict=True)):
        g = as_numpy(given)
        assert g.shape == w.shape, f"{name}: result {k} has shape {g.shape}, not {w.shape}"
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(scale, floor)
                                   if atol is None else atol, err_msg=f"{name}: result {k}")


def engine_section(torch: Any, seconds: float) -> list[ModelRow]:
    """Every engine row, checked (engine against torch), then timed in alternating rounds."""
    rows = []
    for case in model_cases(torch, np.random.default_rng(0)):
        check(case.name, case.engine(), case.torch())
        engine, theirs = compare(case.engine, case.torch, seconds, ENGINE_ROUNDS)
        row = ModelRow(case, engine, theirs)
        rows.append(row)
        print(f"  {case.name:50s} engine {duration(engine):>9s}  torch {duration(theirs):>9s}"
              f"  {row.ratio:5.2f}x", flush=True)
    return rows


# --- 2. importing a model of a million parameters ----------------------------------------------


def wide_mlp(sizes: Sequence[int] = (784, 1024, 256, 10), seed: int = 0) -> onnx.ModelProto:
    """An MLP as torch.onnx.export writes one: x (N, 784) -> logits, Gemm layers (transB) with
    ReLU between, float32 weights drawn as PyTorch's default init draws them."""
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    h = "x"
    for k, (fin, fout) in enumerate(itertools.pairwise(sizes), 1):
        bound = 1 / np.sqrt(fin)
        for name, shape in ((f"fc{k}.weight", (fout, fin)), (f"fc{k}.bias", (fout,))):
            weights.append(numpy_helper.from_array(
                rng.uniform(-bound, bound, shape).astype(np.float32), name))
        out = "logits" if k == len(sizes) - 1 else f"fc{k}"
        nodes.append(helper.make_node("Gemm", [h, f"fc{k}.weight", f"fc{k}.bias"], [out],
                                      name=out, transB=1))
        h = out
        if k < len(sizes) - 1:
            h = f"relu{k}"
            nodes.append(helper.make_node("Relu", [out], [h], name=h))
    f32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(nodes, "wide_mlp",
                              [helper.make_tensor_value_info("x", f32, ["N", sizes[0]])],
                              [helper.make_tensor_value_info("logits", f32, ["N", sizes[-1]])],
                              weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", networks.OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp_by_hand(weights: Arrays, x: Arr) -> tuple[Arr, Arr]:
    """wide_mlp's logits and their gradient (ones upstream) with respect to x, by numpy."""
    layers = len(weights) // 2
    hs, h = [], x
    for k in range(1, layers + 1):
        h = h @ weights[f"fc{k}.weight"].T + weights[f"fc{k}.bias"]
        if k < layers:
            h = np.maximum(h, 0)
            hs.append(h)
    g = np.ones_like(h)
    for k in range(layers, 0, -1):
        g = g @ weights[f"fc{k}.weight"]
        if k > 1:
            g = g * (hs[k - 2] > 0)
    return h, g


@dataclass(frozen=True)
class ImportResult:
    """The model's size, and seconds (the best round of each): importing it, compiling its
    plan, compiling the backward program; reading its bytes (the floor)."""

    parameters: int
    megabytes: float
    imported: float
    planned: float
    programmed: float
    read: float

    @property
    def total(self) -> float:
        return self.imported + self.planned + self.programmed

    def goal(self) -> Goal:
        return Goal(f"import and compile, {self.parameters:,} parameters", self.total,
                    IMPORT_TARGET, False, "s")


def import_once(data: bytes) -> tuple[float, float, float, Plan]:
    """Import and compile ``data``: seconds to import, to plan, to compile the program."""
    start = time.perf_counter()
    imported = import_model(data)
    imported_at = time.perf_counter()
    plan = Plan(imported.graph)
    planned_at = time.perf_counter()
    plan.program(plan.default_wrt)
    done = time.perf_counter()
    return imported_at - start, planned_at - imported_at, done - planned_at, plan


def read_once(data: bytes) -> float:
    """Seconds to parse the model's bytes and read every initializer into numpy."""
    start = time.perf_counter()
    initializers(onnx.ModelProto.FromString(data))
    return time.perf_counter() - start


def import_section(rounds: int) -> ImportResult:
    """Checked once, then import and reading alternated for ``rounds`` rounds."""
    model = wide_mlp()
    data = model.SerializeToString()
    weights = initializers(model)
    x = np.random.default_rng(2).uniform(-1, 1, (16, 784)).astype(np.float32)
    *_, plan = import_once(data)
    result = plan.run({"x": x}, batched=True)
    check("imported MLP, against numpy", [result.outputs["logits"], result.gradients["x"]],
          mlp_by_hand(weights, x))
    parameters = sum(w.size for w in weights.values())
    best: tuple[float, float, float] | None = None
    read = float("inf")
    for _ in range(rounds):
        *parts, _ = import_once(data)
        if best is None or sum(parts) < sum(best):
            best = (parts[0], parts[1], parts[2])
        read = min(read, read_once(data))
    assert best is not None
    row = ImportResult(parameters, len(data) / 1e6, *best, read)
    print(f"  {parameters:,} parameters: import {duration(row.imported)}, plan "
          f"{duration(row.planned)}, program {duration(row.programmed)}; read "
          f"{duration(row.read)}", flush=True)
    return row


# --- 3. the service ----------------------------------------------------------------------------


class Verified:
    """A server's Compute, with every ``every``-th answer compared with the reference for its
    image (a wrong answer fails the run)."""

    def __init__(self, name: str, compute: Unary, expected: dict[bytes, tuple[Arr, Arr]],
                 every: int) -> None:
        self.name, self.compute, self.expected, self.every = name, compute, expected, every
        self.calls = self.checked = 0

    def __call__(self, message: pb.ComputeRequest, **kwargs: Any) -> Awaitable[Any]:
        self.calls += 1
        call = self.compute(message, **kwargs)
        return call if self.calls % self.every else self._checked(message, call)

    async def _checked(self, message: pb.ComputeRequest, call: Awaitable[Any]) -> Any:
        response = await call
        got = decode_response(response)
        check(f"{self.name}, during the run", [got.outputs["logits"], got.gradients["x"]],
              self.expected[message.inputs["x"].raw_data])
        self.checked += 1
        return response


@dataclass(frozen=True)
class ServiceResult:
    """The three servers' rows (by name), and the answers checked during the runs."""

    rows: dict[str, LoadRow]
    checked: dict[str, int]

    def goals(self) -> list[Goal]:
        on, off, plain = self.rows[ON], self.rows[OFF], self.rows[PLAIN]
        return [Goal("CNN service, batching on / off, unary c64", on.over(off),
                     BATCHING_TARGET, True),
                Goal("CNN service, gradserve / torch server, unary c64", on.over(plain),
                     TORCH_SERVER_TARGET, True)]


async def service_section(torch: Any, seconds: float, rounds: int, warmup: float,
                          max_calls: int) -> ServiceResult:
    """Every server started, checked, warmed up, then driven once per round."""
    workload = WORKLOADS["cnn"]()
    assert workload.model is not None
    rng = np.random.default_rng(1)
    pool = [workload.inputs(rng, None) for _ in range(64)]
    weights = tensors(torch, initializers(networks.cnn()))
    images = torch.tensor(np.stack([p["x"] for p in pool]), requires_grad=True)
    logits = lenet(torch, weights, images)
    (dx,) = torch.autograd.grad(logits, (images,), torch.ones_like(logits))
    expected = {p["x"].tobytes(): (logits[k].detach().numpy(), dx[k].numpy())
                for k, p in enumerate(pool)}
    config = partial(LoadConfig, "", workload, concurrency=CONCURRENCY, requests=max_calls,
                     deadline=None)

    async with AsyncExitStack() as stack:
        async def start(args: list[str], port: int) -> pb_grpc.GradientServiceAsyncStub:
            target, _ = stack.enter_context(process(args, port))
            channel = await stack.enter_async_context(aio.insecure_channel(target, OPTIONS))
            return pb_grpc.GradientServiceStub(channel)

        starts: dict[str, Callable[[int], list[str]]] = {
            ON: gradserve, OFF: lambda p: gradserve(p, "--max-batch-size", "1"),
            PLAIN: lambda p: [sys.executable, str(TORCH_SERVER), "--port", str(p), "--model",
                              "cnn"]}
        verified: dict[str, Verified] = {}
        runs: dict[str, Callable[[float], Awaitable[Run]]] = {}
        for name, args in starts.items():
            port = free_port()
            stub = await start(args(port), port)
            model = pb.OnnxModel(model=workload.model)
            graph_id = (await stub.RegisterGraph(pb.RegisterGraphRequest(onnx_model=model),
                                                 timeout=60)).graph_id
            await check_server(name, stub, graph_id, model, pool, expected)
            verified[name] = Verified(name, stub.Compute, expected, VERIFY_EVERY)
            runs[name] = partial(driven, config, pool, graph_id, cast(Unary, verified[name]))
        for name, run in runs.items():
            await run(warmup)
            verified[name].checked = 0  # the count is the timed runs'
        names = list(runs)
        done: dict[str, list[Run]] = {name: [] for name in names}
        for k in range(rounds):
            order = names if k % 2 == 0 else names[::-1]
            print(f"  round {k + 1} of {rounds}: {', '.join(order)}, {seconds:g} s each",
                  flush=True)
            for name in order:
                ran = await runs[name](seconds)
                done[name].append(ran)
                latencies = [c.latency for c in ran.calls]
                print(f"    {name:32s} {len(ran.calls) / ran.seconds:8,.0f} requests/s, p50 "
                      f"{duration(float(np.percentile(latencies, 50)))}", flush=True)
    rows = {name: LoadRow.of(LoadCase("models", name, "unary", CONCURRENCY, 1,
                                      partial(runs[name], seconds)), done[name])
            for name in names}
    return ServiceResult(rows, {name: v.checked for name, v in verified.items()})


async def driven(config: Callable[..., LoadConfig], pool: list[Arrays], graph_id: str,
                 compute: Unary, seconds: float) -> Run:
    """One run of ``seconds`` through ``compute``, every call required to be answered OK; a
    server that stopped answering fails it instead of hanging it."""
    run = drive(config(seconds=seconds), pool, graph_id, compute)
    return load_driver.answered(await asyncio.wait_for(run, timeout=seconds + 60))


async def check_server(name: str, stub: pb_grpc.GradientServiceAsyncStub, graph_id: str,
                       model: pb.OnnxModel, pool: list[Arrays],
                       expected: dict[bytes, tuple[Arr, Arr]]) -> None:
    """Fail loudly unless a server answers right: by id, with the model inline, and with
    four images stacked in one request."""
    for inputs in pool[:4]:
        got = decode_response(await stub.Compute(request(graph_id, None, inputs), timeout=60))
        check(f"{name}, by id", [got.outputs["logits"], got.gradients["x"]],
              expected[inputs["x"].tobytes()])
    inline = request(None, None, pool[4])
    inline.onnx_model.CopyFrom(model)
    got = decode_response(await stub.Compute(inline, timeout=60))
    check(f"{name}, the model inline", [got.outputs["logits"], got.gradients["x"]],
          expected[pool[4]["x"].tobytes()])
    stacked = {"x": np.stack([p["x"] for p in pool[:4]])}
    got = decode_response(await stub.Compute(request(graph_id, None, stacked, batch_size=4),
                                             timeout=60))
    want = [expected[p["x"].tobytes()] for p in pool[:4]]
    check(f"{name}, four stacked", [got.outputs["logits"], got.gradients["x"]],
          [np.stack([w[0] for w in want]), np.stack([w[1] for w in want])])
    assert got.nonfinite == [False] * 4, f"{name}: nonfinite {got.nonfinite}"


# --- the table -------------------------------------------------------------------------------


def report(engine: list[ModelRow], imported: ImportResult, service: ServiceResult,
           settings: str, elapsed: float) -> str:
    """Every figure and ratio, then every target and its verdict."""
    lines = [f"bench/models.py: {settings}; {elapsed:.0f} s", "",
             "1. engine against torch.autograd (float32; torch 1 thread, BLAS 1 thread; best "
             f"of {ENGINE_ROUNDS} alternating rounds)",
             f"  {'case':50s} {'nodes':>5s} {'engine':>9s} {'torch':>9s} {'engine/torch':>12s}"
             "  target"]
    for row in engine:
        goal = row.goal()
        target = "-" if goal is None else f"{goal.target}: {goal.verdict}"
        lines.append(f"  {row.case.name:50s} {row.case.nodes:5d} {duration(row.engine):>9s} "
                     f"{duration(row.torch):>9s} {row.ratio:11.2f}x  {target}")
    goal = imported.goal()
    lines += ["", f"2. import and compile: MLP 784-1024-256-10, {imported.parameters:,} "
              f"parameters ({imported.megabytes:.1f} MB)",
              f"  import_model {duration(imported.imported)} + Plan {duration(imported.planned)}"
              f" + program {duration(imported.programmed)} = {duration(imported.total)}  "
              f"(target {goal.target}: {goal.verdict})",
              f"  reading the bytes (parse, initializers to numpy) {duration(imported.read)}: "
              f"import and compile = {imported.total / imported.read:.1f}x reading", "",
              f"3. service: cnn workload, one image per request, unary, concurrency "
              f"{CONCURRENCY} (medians of the rounds)",
              f"  {'server':32s} {'requests/s':>10s} {'p50':>9s} {'p99':>9s} {'checked':>8s}"]
    for name, load in service.rows.items():
        lines.append(f"  {name:32s} {load.rate:10,.0f} {duration(load.p50):>9s} "
                     f"{duration(load.p99):>9s} {service.checked[name]:8d}")
    rows = service.rows
    lines += [f"  batching on / off: {rows[ON].over(rows[OFF]):.2f}x; gradserve / torch "
              f"server: {rows[ON].over(rows[PLAIN]):.2f}x; batching off / torch server: "
              f"{rows[OFF].over(rows[PLAIN]):.2f}x", "", "targets"]
    goals = [g for g in (r.goal() for r in engine) if g is not None]
    for g in [*goals, imported.goal(), *service.goals()]:
        measured = f"{g.measured:.2f}x" if g.unit == "x" else duration(g.measured)
        lines.append(f"  {g.what:76s} {measured:>9s}  {g.target:>9s}  {g.verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI's)")
    parser.add_argument("--seconds", type=float, help="engine: seconds per row and pairing "
                        "(default 3; quick 0.2)")
    parser.add_argument("--load-seconds", type=float, help="service: seconds per server and "
                        "round (default 3; quick 2)")
    parser.add_argument("--rounds", type=int, help="service: rounds, the median shown "
                        "(default 5; quick 1)")
    args = parser.parse_args()
    quick = args.quick
    seconds = args.seconds or (0.2 if quick else 3.0)
    load_seconds = args.load_seconds or (2.0 if quick else 3.0)
    rounds = args.rounds or (1 if quick else 5)
    import_rounds = 2 if quick else 5
    clock = time.perf_counter()
    try:
        import torch
    except ImportError as e:
        sys.exit(f"bench/models.py races PyTorch, which is not installed: {e}")
    torch.set_num_threads(1)
    print("1. engine against torch.autograd", flush=True)
    with threadpool_limits(limits=1, user_api="blas"):
        engine = engine_section(torch, seconds)
        print("2. import and compile", flush=True)
        imported = import_section(import_rounds)
    print("3. service", flush=True)
    service = asyncio.run(service_section(torch, load_seconds, rounds, 0.3 if quick else 1.0,
                                          1_000_000))
    settings = (f"{'--quick; ' if quick else ''}engine {seconds:g} s per row; import best of "
                f"{import_rounds}; service {rounds} round(s) of {load_seconds:g} s per server")
    print()
    print(report(engine, imported, service, settings, time.perf_counter() - clock))


if __name__ == "__main__":
    main()
