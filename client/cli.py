"""The ``gradserve`` command: serve, compute gradients of an expression, list ops, check health.

    gradserve serve --port 50051
    gradserve grad "2*x**2 - 3*x + 4" x=2            # value and every gradient
    gradserve grad "L = (a*b + c) * f" a=3 b=-2 c=8 f=-2 --json
    gradserve grad "sum(relu(W @ x))" W=@w.npy x=[1,2,3] --dot graph.svg
    gradserve grad --graph graph.json x=2            # a Graph in the proto's JSON mapping
    gradserve ops
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
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client.api import DEFAULT_TARGET, GradientClient, Gradients, GradserveError
from gradserve.client.codec import WireError, graph_from_wire
from gradserve.client.expr import ExpressionError, parse_expression, parse_value
from gradserve.engine import DType, EngineError, Graph, Plan
from gradserve.v1 import gradserve_pb2 as pb


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
    grad.set_defaults(run=_grad)

    ops = commands.add_parser("ops", help="list the server's ops")
    ops.add_argument("--target", default=DEFAULT_TARGET)
    ops.set_defaults(run=_ops)

    health = commands.add_parser("health", help="exit 0 when the server is SERVING")
    health.add_argument("--target", default=DEFAULT_TARGET)
    health.add_argument("--timeout", type=float, default=5.0)
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
        values[name] = parse_value(text)
    if args.dot and Path(args.dot).suffix.lower() not in (".svg", ".png"):
        raise ExpressionError(f"--dot writes .svg or .png files, not {args.dot!r}")
    dtype = DType(args.dtype)
    graph = _load_graph(args, {k: np.shape(v) for k, v in values.items()}, dtype)
    feed = {k: np.asarray(v, dtype=next((i.dtype.numpy for i in graph.inputs if i.name == k),
                                        None)) for k, v in values.items()}
    result = _compute(graph, feed, args.target, local=args.local, keep=bool(args.dot))
    if args.dot:
        from gradserve.client.dot import draw

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


def _load_graph(args: argparse.Namespace, shapes: dict[str, tuple[int, ...]],
                dtype: DType) -> Graph:
    if args.graph:
        message = json_format.Parse(Path(args.graph).read_text(), pb.Graph())
        return graph_from_wire(message)
    if not args.expression:
        raise ExpressionError("give an expression or --graph FILE")
    return parse_expression(args.expression, shapes, dtype)


def _compute(graph: Graph, feed: dict[str, Any], target: str, *, local: bool,
             keep: bool) -> Gradients:
    if local:
        r = Plan(graph).run(feed, keep_intermediates=keep)
        return Gradients(r.outputs, r.gradients, [bool(r.nonfinite)], r.values or {},
                         r.value_gradients or {})
    with GradientClient(target) as client:
        return client.compute(graph, feed, return_intermediates=keep)


def _ops(args: argparse.Namespace) -> int:
    with GradientClient(args.target) as client:
        for op in client.ops():
            arity = str(op.min_arity) if op.min_arity == op.max_arity else (
                f"{op.min_arity}+" if op.max_arity < 0 else f"{op.min_arity}-{op.max_arity}")
            attrs = ", ".join(f"{a.name}: {a.kind}" for a in op.attributes)
            print(f"{op.name:24s} {arity:5s} {op.doc}" + (f"  [{attrs}]" if attrs else ""))
    return 0


def _health(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.target) as channel:
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
