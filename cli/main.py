"""The ``gradserve`` command: serve, compute gradients of an expression, list ops, check health,
load-test.

    gradserve serve --port 50051
    gradserve grad "2*x**2 - 3*x + 4" x=2            # value and every gradient
    gradserve grad "L = (a*b + c) * f" a=3 b=-2 c=8 f=-2 --json
    gradserve grad "sum(relu(W @ x))" W=@w.npy x=[1,2,3] --dot graph.svg
    gradserve grad --graph graph.json x=2            # a Graph in the proto's JSON mapping
    gradserve ops
    gradserve loadtest -c 16 -n 2000 --verify 0.1     # drive a server, report like ghz
    gradserve health --target HOST:PORT             # exit 0 only when SERVING
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import credentials
from gradserve.client.api import DEFAULT_TARGET, GradientClient, GradserveError
from gradserve.client.dot import draw, drawing_format
from gradserve.client.expr import ExpressionError, fold_name, parse_expression, parse_value
from gradserve.client.workloads import WORKLOADS
from gradserve.engine import DType, EngineError, Graph, Plan
from gradserve.wire.graphs import graph_from_json
from gradserve.wire.ops import arity_of
from gradserve.wire.responses import Gradients
from gradserve.wire.tensors import WireError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except (GradserveError, EngineError, ExpressionError, WireError, OSError) as e:
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

    grad = commands.add_parser("grad", help="compute an expression's value and gradients")
    grad.add_argument("expression", nargs="?", help='e.g. "2*x**2 - 3*x + 4" (or use --graph)')
    grad.add_argument("values", nargs="*", metavar="NAME=VALUE",
                      help="input values: 2, [1,2,3], [[1,2],[3,4]] or @file.npy")
    grad.add_argument("--graph", metavar="FILE", help="a Graph in the proto's JSON mapping")
    grad.add_argument("--json", action="store_true", help="print {outputs, gradients} as JSON")
    grad.add_argument("--dot", metavar="FILE", help="draw the graph to FILE (.svg or .png)")
    grad.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    grad.add_argument("--local", action="store_true", help="run the engine in-process")
    grad.add_argument("--target", default=DEFAULT_TARGET, help="server host:port")
    credentials.add_arguments(grad)
    grad.set_defaults(run=_grad)

    ops = commands.add_parser("ops", help="list the server's ops")
    ops.add_argument("--target", default=DEFAULT_TARGET)
    credentials.add_arguments(ops)
    ops.set_defaults(run=_ops)

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

    health = commands.add_parser("health", help="exit 0 when the server is SERVING")
    health.add_argument("--target", default=DEFAULT_TARGET)
    health.add_argument("--timeout", type=float, default=5.0)
    credentials.add_arguments(health)
    health.set_defaults(run=_health)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from gradserve.server.app import serve
    from gradserve.server.config import ServerConfig

    serve(ServerConfig.from_namespace(args))
    return 0


def _grad(args: argparse.Namespace) -> int:
    if args.graph and args.expression:  # with --graph, every positional is a NAME=VALUE
        args.values, args.expression = [args.expression, *args.values], None
    values: dict[str, Any] = {}
    for item in args.values:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ExpressionError(f"expected NAME=VALUE, got {item!r}")
        try:
            value = parse_value(text)
        except ExpressionError as e:
            raise ExpressionError(f"{name}: {e}") from None
        # An expression's names are read as Python reads them; a graph file's, as written.
        values[fold_name(name) if args.expression else name] = value
    if args.dot:
        drawing_format(args.dot)
    dtype = DType(args.dtype)
    graph = _load_graph(args, {k: np.shape(v) for k, v in values.items()}, dtype)
    feed = {k: np.asarray(v, dtype=next((i.dtype.numpy for i in graph.inputs if i.name == k),
                                        None)) for k, v in values.items()}
    result = _compute(graph, feed, args, local=args.local, keep=bool(args.dot))
    if args.dot:
        draw(graph, result.values, result.value_gradients, args.dot)
    if any(result.nonfinite):
        print("gradserve: warning: the results hold NaN or infinite values", file=sys.stderr)
    if args.json:
        print(json.dumps({"outputs": _plain(result.outputs),
                          "gradients": _plain(result.gradients)}))
    else:
        for name, value in result.outputs.items():
            print(f"{name} = {_text(value)}")
            for wrt, grad in result.gradients.items():
                print(f"d{name}/d{wrt} = {_text(grad)}")
    return 0


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


def _compute(graph: Graph, feed: dict[str, Any], args: argparse.Namespace, *, local: bool,
             keep: bool) -> Gradients:
    if local:
        r = Plan(graph).run(feed, keep_intermediates=keep)
        return Gradients(r.outputs, r.gradients, [bool(r.nonfinite)], r.values or {},
                         r.value_gradients or {})
    with GradientClient(args.target, credentials=credentials.from_arguments(args)) as client:
        return client.compute(graph, feed, return_intermediates=keep)


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
