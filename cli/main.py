"""The ``gradserve`` command: serve, compute gradients of an expression, list ops, check health,
load-test.

    gradserve serve --port 50051
    gradserve grad "2*x**2 - 3*x + 4" x=2            # value and every gradient
    gradserve grad "L = (a*b + c) * f" a=3 b=-2 c=8 f=-2 --json
    gradserve grad "sum(relu(W @ x))" W=@w.npy x=[1,2,3] --dot graph.svg
    gradserve grad --graph graph.json x=2            # a Graph in the proto's JSON mapping
    gradserve grad --onnx model.onnx x=@x.npy        # an ONNX model's gradients
    gradserve grad "2*x**2 - 3*x + 4" x=2 --hessian  # second order (--jvp x=1, --hvp x=1)
    gradserve inspect model.onnx                    # its inputs, outputs, ops; would it import
    gradserve ops
    gradserve loadtest -c 16 -n 2000 --verify 0.1     # drive a server, report like ghz
    gradserve health --target HOST:PORT             # exit 0 only when SERVING
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import credentials
from gradserve.client.api import (
    DEFAULT_TARGET,
    GradientClient,
    GradserveError,
    Model,
    as_graph,
    load_model,
)
from gradserve.client.dot import draw, drawing_format
from gradserve.client.expr import ExpressionError, fold_name, parse_expression, parse_value
from gradserve.client.workloads import WORKLOADS
from gradserve.engine import DType, EngineError, Graph, Plan
from gradserve.engine.derivatives import Kind, compute, derive
from gradserve.importer import ModelError
from gradserve.wire.graphs import graph_from_json
from gradserve.wire.ops import arity_of
from gradserve.wire.responses import Gradients
from gradserve.wire.tensors import WireError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except (GradserveError, EngineError, ExpressionError, WireError, ModelError, OSError) as e:
        print(f"gradserve: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # bad files, bad values: a message, not a traceback
        print(f"gradserve: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradserve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n\n")[1:]))
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    from gradserve.server.config import ServerConfig  # the server's own flags and defaults

    serve = commands.add_parser("serve", help="run the gRPC server")
    ServerConfig.add_arguments(serve, os.environ)
    serve.set_defaults(run=_serve)
    _add_grad(commands)

    ops = commands.add_parser("ops", help="list the server's ops")
    ops.add_argument("--target", default=DEFAULT_TARGET)
    credentials.add_arguments(ops)
    ops.set_defaults(run=_ops)
    _add_loadtest(commands)

    inspect = commands.add_parser("inspect", help="describe an ONNX model and say whether it "
                                  "imports, and if not, why")
    inspect.add_argument("model", metavar="FILE", help="the .onnx file")
    inspect.add_argument("--initializer", action="append", default=[], metavar="NAME",
                         help="import with this initializer made an input; repeatable")
    inspect.add_argument("--json", action="store_true", help="print the description as JSON")
    inspect.set_defaults(run=_inspect)

    health = commands.add_parser("health", help="exit 0 when the server is SERVING")
    health.add_argument("--target", default=DEFAULT_TARGET)
    health.add_argument("--timeout", type=float, default=5.0)
    credentials.add_arguments(health)
    health.set_defaults(run=_health)
    return parser


Commands = Any  # argparse's subparsers action (its type is private)


def _add_grad(commands: Commands) -> None:
    grad = commands.add_parser("grad", help="compute an expression's value and gradients")
    grad.add_argument("expression", nargs="?", help='e.g. "2*x**2 - 3*x + 4" (or use --graph)')
    grad.add_argument("values", nargs="*", metavar="NAME=VALUE",
                      help="input values: 2, [1,2,3], [[1,2],[3,4]] or @file.npy")
    grad.add_argument("--graph", metavar="FILE", help="a Graph in the proto's JSON mapping")
    grad.add_argument("--onnx", metavar="FILE", help="an ONNX model; a batched model's "
                      "inputs are given in its own shapes, batch first")
    grad.add_argument("--initializer", action="append", default=[], metavar="NAME",
                      help="with --onnx: feed this initializer as an input (its value in the "
                      "model unless NAME=VALUE gives another) and differentiate it; repeatable")
    grad.add_argument("--wrt", action="append", metavar="NAME",
                      help="differentiate only these inputs (default: every float input); "
                      "repeatable")
    grad.add_argument("--upstream", action="append", default=[], metavar="NAME=VALUE",
                      help="the gradient flowing into an output (default: ones); repeatable")
    beyond = grad.add_mutually_exclusive_group()
    beyond.add_argument("--jvp", nargs="+", metavar="NAME=VALUE", help="forward mode: the "
                        "outputs' derivatives along this direction (inputs left out are held "
                        "fixed) instead of the gradients")
    beyond.add_argument("--hvp", nargs="+", metavar="NAME=VALUE", help="the Hessian of the "
                        "outputs' sum (or of upstream . outputs) times this vector, one value per "
                        "differentiated input")
    beyond.add_argument("--hessian", action="store_true", help="the dense Hessian of the "
                        "outputs' sum (or of upstream . outputs)")
    beyond.add_argument("--jacobian", action="store_true", help="every output's dense "
                        "Jacobian")
    grad.add_argument("--json", action="store_true", help="print {outputs, gradients} as JSON")
    grad.add_argument("--dot", metavar="FILE", help="draw the graph to FILE (.svg or .png)")
    grad.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    grad.add_argument("--local", action="store_true", help="run the engine in-process")
    grad.add_argument("--target", default=DEFAULT_TARGET, help="server host:port")
    credentials.add_arguments(grad)
    grad.set_defaults(run=_grad)


def _add_loadtest(commands: Commands) -> None:
    load = commands.add_parser("loadtest", help="drive a server with a workload and report",
                               description=_loadtest_doc())
    load.add_argument("--target", default=DEFAULT_TARGET, help="server host:port")
    load.add_argument("--workload", default="expr21", choices=sorted(WORKLOADS),
                      help="a built-in graph (default expr21, the 21-op scalar expression)")
    load.add_argument("--graph", metavar="FILE", help="a Graph in the proto's JSON mapping "
                      "instead (random inputs of its declared shapes)")
    load.add_argument("--mlp-batch", type=int, default=64, help="rows of the mlp workload")
    load.add_argument("--batch", type=int, default=0, help="examples per request (0: one, "
                      "unbatched)")
    load.add_argument("--mode", choices=["unary", "stream"], default="unary")
    load.add_argument("-c", "--concurrency", type=int, default=8, help="callers (streams)")
    load.add_argument("-n", "--requests", type=int, help="requests in all (default 200 "
                      "unless -z is given)")
    load.add_argument("-z", "--duration", type=duration, help="run this long (10s, 2m, "
                      "500ms); without -n, as many requests as fit")
    load.add_argument("--rps", type=float, help="open loop: send this many requests per "
                      "second on a fixed schedule; latency counts from when each was due")
    load.add_argument("--deadline", type=duration, default=30.0, help="each call's deadline")
    load.add_argument("--verify", type=float, default=0.0, metavar="SHARE",
                      help="compare this share of the answers (0 to 1) with the engine run "
                      "locally; any wrong answer makes the exit status 1")
    load.add_argument("--format", choices=["text", "json", "csv"], default="text")
    load.add_argument("--plot", metavar="FILE.png", help="latency over time and histogram")
    load.add_argument("--metrics", metavar="URL", help="the server's /metrics, to report "
                      "the batches it formed")
    load.add_argument("--seed", type=int, default=0, help="random inputs' seed")
    credentials.add_arguments(load)
    load.set_defaults(run=_loadtest)


def _serve(args: argparse.Namespace) -> int:
    from gradserve.server.app import serve
    from gradserve.server.config import ServerConfig

    serve(ServerConfig.from_namespace(args))
    return 0


def _grad(args: argparse.Namespace) -> int:
    if (args.graph or args.onnx) and args.expression:  # then every positional is NAME=VALUE
        args.values, args.expression = [args.expression, *args.values], None
    if args.initializer and not args.onnx:
        raise ExpressionError("--initializer goes with --onnx")
    # An expression's names are read as Python reads them; a file's, as written.
    name_of = fold_name if args.expression else str
    values = _named_values(args.values, name_of)
    upstream = _named_values(args.upstream, name_of)
    if args.dot:
        drawing_format(args.dot)
    source: Graph | Model
    if args.onnx:
        source = load_model(args.onnx, args.initializer)
        values = {**_initializers(args.onnx, args.initializer, values), **values}
    else:
        source = _load_graph(args, {k: np.shape(v) for k, v in values.items()},
                             DType(args.dtype))
    graph = as_graph(source)
    declared = {i.name: i.dtype.numpy for i in graph.inputs}
    feed = {k: np.asarray(v, dtype=declared.get(k)) for k, v in values.items()}
    wrt = [name_of(n) for n in args.wrt] if args.wrt else None
    kind, directions = _beyond(args, name_of, declared)
    if kind is not None:
        return _derivative(source, kind, feed, directions, args, wrt=wrt,
                           upstream=upstream or None)
    result = _compute(source, feed, args, local=args.local, keep=bool(args.dot),
                      wrt=wrt, upstream=upstream or None)
    if args.dot:
        draw(graph, result.values, result.value_gradients, args.dot)
    _warn_nonfinite(result.nonfinite)
    if args.json:
        print(json.dumps({"outputs": _plain(result.outputs),
                          "gradients": _plain(result.gradients)}))
    else:
        for name, value in result.outputs.items():
            print(f"{name} = {_text(value)}")
            for given, grad in result.gradients.items():
                print(f"d{name}/d{given} = {_text(grad)}")
    return 0


def _beyond(args: argparse.Namespace, name_of: Callable[[str], str],
            declared: dict[str, Any]) -> tuple[Kind | None, dict[str, Any]]:
    """The derivative beyond the gradient asked for, and its directions (--jvp, --hvp)."""
    if args.jvp or args.hvp:
        given = _named_values(args.jvp or args.hvp, name_of)
        return (Kind.JVP if args.jvp else Kind.HVP), {
            k: np.asarray(v, dtype=declared.get(k)) for k, v in given.items()}
    if args.hessian:
        return Kind.HESSIAN, {}
    return (Kind.JACOBIAN if args.jacobian else None), {}


def _derivative(source: Graph | Model, kind: Kind, feed: dict[str, Any],
                directions: dict[str, Any], args: argparse.Namespace, *,
                wrt: list[str] | None, upstream: dict[str, Any] | None) -> int:
    """Compute, print (and draw: the derived graph, run here) a derivative beyond the
    gradient."""
    graph = as_graph(source)
    if args.local or args.dot:
        fed, batch = source.feed(feed) if isinstance(source, Model) else (feed, None)
        answer = compute(graph, kind, fed, directions=directions, upstream=upstream, wrt=wrt,
                         batch=batch)
        result = Gradients(answer.outputs, answer.gradients, answer.nonfinite(batch),
                           jvp=answer.jvp, hvp=answer.hvp,
                           jacobian=answer.blocks if kind is Kind.JACOBIAN else {},
                           hessian=answer.blocks if kind is Kind.HESSIAN else {})
        if args.dot:
            _draw_derived(graph, kind, fed, directions, upstream, wrt, batch, args.dot)
    if not args.local:
        with GradientClient(args.target,
                            credentials=credentials.from_arguments(args)) as client:
            options: dict[str, Any] = {"wrt": wrt, "upstream": upstream}
            if kind is Kind.JVP:
                result = client.jvp(source, feed, directions, **options)
            elif kind is Kind.HVP:
                result = client.hvp(source, feed, directions, **options)
            elif kind is Kind.HESSIAN:
                result = client.hessian(source, feed, **options)
            else:
                result = client.jacobian(source, feed, **options)
    _warn_nonfinite(result.nonfinite)
    _print_derivative(result, kind, graph, args.json)
    return 0


def _print_derivative(result: Gradients, kind: Kind, graph: Graph, as_json: bool) -> None:
    blocks = result.jacobian or result.hessian
    if as_json:
        found: dict[str, Any] = {"outputs": _plain(result.outputs),
                                 "gradients": _plain(result.gradients),
                                 "jvp": _plain(result.jvp), "hvp": _plain(result.hvp)}
        if kind in (Kind.JACOBIAN, Kind.HESSIAN):  # {row: {column: block}}
            found[str(kind)] = {row: {col: np.asarray(v).tolist()
                                      for (r, col), v in blocks.items() if r == row}
                                for row, _ in blocks}
        print(json.dumps(found))
        return
    for name, value in result.outputs.items():
        print(f"{name} = {_text(value)}")
    for name, value in result.jvp.items():
        print(f"jvp {name} = {_text(value)}")
    for name, value in result.hvp.items():
        print(f"hvp {name} = {_text(value)}")
    of = graph.outputs[0] if len(graph.outputs) == 1 else "(sum)"
    for (row, col), value in blocks.items():
        mark = f"d{row}/d{col}" if kind is Kind.JACOBIAN else f"d2{of}/d{row} d{col}"
        print(f"{mark} = {_text(value)}")


def _draw_derived(graph: Graph, kind: Kind, feed: dict[str, Any], directions: dict[str, Any],
                  upstream: dict[str, Any] | None, wrt: list[str] | None, batch: int | None,
                  path: str) -> None:
    """Draw the graph the derivative runs (forward mode written as ops), with its values."""
    names = list(directions) if kind is Kind.JVP else (wrt or [
        i.name for i in graph.inputs if i.requires_grad and i.dtype.is_float])
    derived = derive(graph, kind, names)
    run = derived.feed(feed, upstream or {}, directions, batch, 1 << 28)
    r = Plan(derived.graph).run(run.inputs, wrt=run.wrt, upstream=run.upstream,
                                batched=run.batch is not None, keep_intermediates=True)
    draw(derived.graph, r.values or {}, r.value_gradients or {}, path)


def _warn_nonfinite(flags: Sequence[bool]) -> None:
    if any(flags):
        print("gradserve: warning: the results hold NaN or infinite values", file=sys.stderr)


MAX_SECONDS = 600.0  # a load test's bound in time when it is given only a count


def _loadtest_doc() -> str:
    from gradserve.client import loadtest

    return (loadtest.__doc__ or "").split("\n\n")[1].replace("\n", " ")


def duration(text: str) -> float:
    """A duration: 30, 30s, 500ms, 2m."""
    for unit, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return float(text[: -len(unit)]) * scale
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (say 10s, 2m, 500ms)"
                                         ) from None


def _loadtest(args: argparse.Namespace) -> int:
    import asyncio

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from gradserve.client import loadreport
    from gradserve.client.loadtest import LoadConfig, run_load
    from gradserve.client.workloads import from_graph, mlp

    if args.graph:
        workload = from_graph(graph_from_json(Path(args.graph).read_text()), args.graph)
    elif args.workload == "mlp":
        workload = mlp(batch=args.mlp_batch)
    else:
        workload = WORKLOADS[args.workload]()
    requests = args.requests or (1 << 62 if args.duration else 200)
    config = LoadConfig(target=args.target, workload=workload, batch=args.batch or None,
                        mode=args.mode, concurrency=args.concurrency, requests=requests,
                        seconds=args.duration or MAX_SECONDS, rps=args.rps,
                        deadline=args.deadline, verify=args.verify, seed=args.seed,
                        credentials=credentials.from_arguments(args))
    before = loadreport.read_batching(args.metrics) if args.metrics else None
    bar = Progress("[progress.description]{task.description}", BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), transient=True,
                   console=Console(stderr=True))  # the report alone goes to stdout
    total = args.requests or None
    with bar:
        task = bar.add_task(f"{workload.name} -> {args.target}", total=total)
        run = asyncio.run(run_load(config, lambda done: bar.update(task, completed=done)))
    batching = (loadreport.batching_between(before, loadreport.read_batching(args.metrics))
                if before is not None else None)
    summary = loadreport.summarize(run, batching)
    print(loadreport.render(summary, run, args.format))
    if args.plot:
        loadreport.plot(run, args.plot)
    return 1 if summary.wrong else 0


def _load_graph(args: argparse.Namespace, shapes: dict[str, tuple[int, ...]],
                dtype: DType) -> Graph:
    if args.graph:
        return graph_from_json(Path(args.graph).read_text())
    if not args.expression:
        raise ExpressionError("give an expression or --graph FILE")
    return parse_expression(args.expression, shapes, dtype)


def _named_values(items: Sequence[str], name_of: Callable[[str], str]) -> dict[str, Any]:
    """NAME=VALUE arguments as values by name."""
    values: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ExpressionError(f"expected NAME=VALUE, got {item!r}")
        try:
            values[name_of(name)] = parse_value(text)
        except ExpressionError as e:
            raise ExpressionError(f"{name}: {e}") from None
    return values


def _initializers(path: str, names: Sequence[str], given: dict[str, Any]) -> dict[str, Any]:
    """The model's own values of the initializers fed as inputs and not given."""
    missing = set(names) - set(given)
    if not missing:
        return {}
    return {t.name: onnx.numpy_helper.to_array(t)
            for t in onnx.load(path).graph.initializer if t.name in missing}


def _compute(source: Graph | Model, feed: dict[str, Any], args: argparse.Namespace, *,
             local: bool, keep: bool, wrt: list[str] | None,
             upstream: dict[str, Any] | None) -> Gradients:
    if local:
        feed, batch = source.feed(feed) if isinstance(source, Model) else (feed, None)
        plan = Plan(as_graph(source))
        r = plan.run(feed, wrt=wrt, upstream=upstream, batched=batch is not None,
                     keep_intermediates=keep)
        return Gradients(r.outputs, r.gradients, np.ravel(r.nonfinite).tolist(),
                         r.values or {}, r.value_gradients or {})
    with GradientClient(args.target, credentials=credentials.from_arguments(args)) as client:
        return client.compute(source, feed, return_intermediates=keep, wrt=wrt,
                              upstream=upstream)


def _inspect(args: argparse.Namespace) -> int:
    """Describe a model; exit 1 when it would be refused."""
    from gradserve.importer.inspection import inspect_model

    found = inspect_model(args.model, inputs=args.initializer)

    def dims(shape: tuple[int | None, ...]) -> list[int | str]:
        return ["N" if d is None else d for d in shape]

    if args.json:
        print(json.dumps({
            "opsets": found.opsets, "producer": found.producer,
            "inputs": [{"name": i.name, "shape": dims(i.shape), "dtype": i.dtype}
                       for i in found.inputs],
            "outputs": [{"name": o.name, "shape": dims(o.shape), "dtype": o.dtype}
                        for o in found.outputs],
            "initializers": found.initializers, "weights": found.weights, "ops": found.ops,
            "unsupported": list(found.unsupported), "engine_nodes": found.engine_nodes,
            "batched": found.batched,
            "refusal": None if found.refusal is None else str(found.refusal)}))
    else:
        print(f"opsets: {', '.join(f'{d} {v}' for d, v in found.opsets.items())}"
              + (f"; producer: {found.producer}" if found.producer else ""))
        for title, infos in (("inputs", found.inputs), ("outputs", found.outputs)):
            print(f"{title}:")
            for i in infos:
                print(f"  {i.name}: {i.dtype} {dims(i.shape)}")
        print(f"initializers: {found.initializers} ({found.weights} weights)")
        print("ops: " + ", ".join(f"{op} x{n}" + (" (unsupported)" if op in found.unsupported
                                                   else "") for op, n in found.ops.items()))
        if found.refusal is not None:
            print(f"refused: {found.refusal}")
        else:
            print(f"imports as {found.engine_nodes} engine ops"
                  + ("; its dynamic batch dimension is the batch axis" if found.batched else ""))
    return 0 if found.refusal is None else 1


def _ops(args: argparse.Namespace) -> int:
    with GradientClient(args.target, credentials=credentials.from_arguments(args)) as client:
        for op in client.ops():
            attrs = ", ".join(f"{a.name}: {a.kind}" for a in op.attributes)
            print(f"{op.name:24s} {arity_of(op):5s} {op.doc}" + (f"  [{attrs}]" if attrs else "")
                  + (f"  At edge points: {op.edges}" if op.edges else ""))
    return 0


def _health(args: argparse.Namespace) -> int:
    with credentials.from_arguments(args).channel(args.target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # its type stubs omit the methods
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{args.target}: {e.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _plain(arrays: dict[str, Any]) -> dict[str, Any]:
    return {k: np.asarray(v).tolist() for k, v in arrays.items()}


def _text(value: Any) -> str:
    arr = np.asarray(value)
    return f"{arr.item():g}" if arr.ndim == 0 else np.array2string(arr, precision=6)


if __name__ == "__main__":
    sys.exit(main())
