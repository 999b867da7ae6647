"""Validation and shape inference: everything wrong with a graph is found before anything runs.

:func:`check` resolves names, orders the nodes (iteratively, so a 100,000-node chain is fine),
checks each node's attributes against its op's schema, infers every value's per-example type,
and enforces the limits, so that e.g. a ``broadcast_to`` of a billion elements is refused before
any memory is allocated. Each problem is an :class:`EngineError` naming the node and field.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeGuard

import numpy as np

from gradserve.engine.errors import Cancelled, EngineError, ErrorKind, check_cancelled
from gradserve.engine.graph import Graph, Node
from gradserve.engine.ops import OP_TABLE, AttrKind, AttrSpec, AttrValue, OpDef
from gradserve.engine.ops.base import SCRATCH, Params
from gradserve.engine.types import DType, TensorType


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a graph may ask for; exceeding one is a LIMIT error."""

    max_nodes: int = 100_000  # nodes, and separately inputs + constants + outputs
    max_elements: int = 1 << 24  # per tensor, per example (128 MiB of float64)
    max_total_elements: int = 1 << 28  # all values of a run together (2 GiB of float64)
    max_rank: int = 16
    max_name_length: int = 256  # characters of any name: values, ops, attributes


@dataclass(frozen=True, slots=True)
class Checked:
    """What validation learnt: the live nodes in topological order (those an output depends on),
    every value's type, each node's resolved op parameters, and the largest working buffer a
    live node's rules allocate (elements per example; see ``SCRATCH``)."""

    order: tuple[Node, ...]
    types: Mapping[str, TensorType]
    params: Mapping[str, Params]
    scratch: int = 0


def check(graph: Graph, limits: Limits | None = None,
          cancelled: Cancelled | None = None) -> Checked:
    """Validate ``graph`` and infer its types, or raise the first :class:`EngineError` found
    (a CANCELLED one once ``cancelled()`` is true: a large graph takes a while)."""
    limits = limits or Limits()
    check_counts(len(graph.nodes), len(graph.inputs) + len(graph.constants) + len(graph.outputs),
                 limits.max_nodes)
    types = _leaf_types(graph, limits)
    names = set(types)
    for node in graph.nodes:
        check_cancelled(cancelled)
        _node_shape(node, limits.max_name_length)
        _claim(names, node.name, "node", limits.max_name_length)
    order = _topological_order(graph, names)
    _check_outputs(graph, names, limits.max_name_length)
    params: dict[str, Params] = {}
    for node in order:
        check_cancelled(cancelled)
        op = _op_of(node)
        attrs = _attributes(node, op)
        try:
            out, params[node.name] = op.infer([types[i] for i in node.inputs], attrs)
        except EngineError as e:
            raise EngineError(e.kind, e.message, node=node.name, field=e.field) from None
        _within_limits(out, node.name, limits)
        _scratch_within_limits(params[node.name], node.name, limits)
        types[node.name] = out
    live = _live(graph, order)
    scratch = max((params[n.name].get(SCRATCH, 0) for n in order if n.name in live), default=0)
    total = sum(t.size for name, t in types.items() if name in live) + scratch
    if total > limits.max_total_elements:
        raise EngineError(ErrorKind.LIMIT, f"a run would hold {total} elements per example; "
                          f"the limit is {limits.max_total_elements}", field="nodes")
    return Checked(tuple(n for n in order if n.name in live), MappingProxyType(types),
                   MappingProxyType(params), scratch)


def check_counts(nodes: int, named: int, max_nodes: int) -> None:
    """Refuse a graph of more than ``max_nodes`` nodes, or of more than ``max_nodes`` inputs,
    constants and outputs together (``named``): a LIMIT error naming the field ``nodes`` or
    ``inputs``. Only counts are needed, so a caller can refuse a graph before building it."""
    for what, count in (("nodes", nodes), ("inputs", named)):
        if count > max_nodes:
            raise EngineError(ErrorKind.LIMIT, f"the graph has {count} {what}; the limit is "
                              f"{max_nodes}", field=what)


def overlong(name: str, limit: int, node: str | None, field: str) -> EngineError:
    """The error for a name over ``limit`` characters (which it does not echo)."""
    return EngineError(ErrorKind.NAME, f"a name of {len(name)} characters; names have at most "
                       f"{limit}", node=node, field=field)


def _claim(names: set[str], name: object, what: str, limit: int) -> None:
    """Reserve ``name`` (single assignment): it must be a new, non-empty string of at most
    ``limit`` characters."""
    if not isinstance(name, str) or not name:
        raise EngineError(ErrorKind.UNKNOWN_NAME, f"every {what} needs a name (a non-empty "
                          "string)", node=name if isinstance(name, str) else None, field="name")
    if len(name) > limit:
        raise overlong(name, limit, name, "name")
    if name in names:
        raise EngineError(ErrorKind.DUPLICATE_NAME, f"the name is assigned twice (a {what} "
                          "reuses it)", node=name, field="name")
    names.add(name)


def _node_shape(node: Node, limit: int) -> None:
    """The node's own fields have the right types (a string op, a sequence of names, a map),
    and its names at most ``limit`` characters: graphs also come from callers who build them
    by hand, not through the typed builder."""
    inputs: object = node.inputs
    if not isinstance(node.op, str):
        raise EngineError(ErrorKind.UNKNOWN_OP, f"op {node.op!r} is not a name", node=str(
            node.name), field="op")
    if not isinstance(inputs, tuple | list) or not all(isinstance(i, str) for i in inputs):
        raise EngineError(ErrorKind.UNKNOWN_NAME, "inputs must be a sequence of names",
                          node=str(node.name), field="inputs")
    if not isinstance(node.attrs, Mapping):
        raise EngineError(ErrorKind.ATTRIBUTE, "attributes must be a mapping of name to value",
                          node=str(node.name), field="attrs")
    named = [(node.op, "op"), *((x, f"inputs[{k}]") for k, x in enumerate(inputs)),
             *((attr, "attrs") for attr in node.attrs)]
    for name, field in named:
        if isinstance(name, str) and len(name) > limit:
            raise overlong(name, limit, str(node.name), field)


def _leaf_types(graph: Graph, limits: Limits) -> dict[str, TensorType]:
    types: dict[str, TensorType] = {}
    names: set[str] = set()
    for inp in graph.inputs:
        _claim(names, inp.name, "input", limits.max_name_length)
        if not isinstance(inp.dtype, DType):
            raise EngineError(ErrorKind.DTYPE, f"unsupported dtype {inp.dtype!r}", node=inp.name,
                              field="dtype")
        if any(type(d) is not int or d < 1 for d in inp.shape):
            raise EngineError(ErrorKind.SHAPE, f"shape {list(inp.shape)} needs integer "
                              "dimensions >= 1", node=inp.name, field="shape")
        types[inp.name] = inp.type
        _within_limits(inp.type, inp.name, limits)
    for const in graph.constants:
        _claim(names, const.name, "constant", limits.max_name_length)
        if not isinstance(const.value, np.ndarray):
            raise EngineError(ErrorKind.DTYPE, "the value is not a numpy array",
                              node=const.name, field="value")
        dtype = DType.of(const.value.dtype)
        if dtype is None:
            raise EngineError(ErrorKind.DTYPE, f"unsupported dtype {const.value.dtype}; use "
                              "float64, float32 or int64", node=const.name, field="value")
        if 0 in const.value.shape:
            raise EngineError(ErrorKind.SHAPE, "constants must not be empty", node=const.name,
                              field="value")
        types[const.name] = TensorType(const.value.shape, dtype)
        _within_limits(types[const.name], const.name, limits)
    return types


def _within_limits(t: TensorType, name: str, limits: Limits) -> None:
    if t.rank > limits.max_rank:
        raise EngineError(ErrorKind.LIMIT, f"rank {t.rank} exceeds the limit of "
                          f"{limits.max_rank}", node=name)
    if t.size > limits.max_elements:
        raise EngineError(ErrorKind.LIMIT, f"{t} would hold {t.size} elements; the limit is "
                          f"{limits.max_elements} per tensor", node=name)


def _scratch_within_limits(params: Params, name: str, limits: Limits) -> None:
    """A rule's working buffer (conv's unfolded windows) counts against the element limit as
    a tensor would; it is refused here, before any run allocates it."""
    scratch = params.get(SCRATCH, 0)
    if scratch > limits.max_elements:
        raise EngineError(ErrorKind.LIMIT, f"the op would allocate a working buffer of "
                          f"{scratch} elements (its unfolded windows); the limit is "
                          f"{limits.max_elements} per tensor", node=name)


def _op_of(node: Node) -> OpDef:
    op = OP_TABLE.get(node.op)
    if op is None:
        raise EngineError(ErrorKind.UNKNOWN_OP, f"unknown op {node.op!r}", node=node.name,
                          field="op")
    n = len(node.inputs)
    if n < op.min_arity or (op.max_arity is not None and n > op.max_arity):
        raise EngineError(ErrorKind.ARITY, f"{op.name} takes {op.arity_text} operands, got {n}",
                          node=node.name, field="inputs")
    return op


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value)


_KIND_CHECKS: Mapping[AttrKind, Callable[[object], bool]] = {
    AttrKind.INT: _is_int,
    AttrKind.FLOAT: _is_float,
    AttrKind.BOOL: lambda v: isinstance(v, bool),
    AttrKind.STRING: lambda v: isinstance(v, str),
    AttrKind.INTS: lambda v: isinstance(v, tuple) and all(map(_is_int, v)),
}


def _attributes(node: Node, op: OpDef) -> dict[str, AttrValue]:
    """The node's attributes checked against the op's schema, with defaults filled in; an
    int given for a list of ints is a list of one, and an int given for a float a float."""
    for name in node.attrs:
        if name not in op.attrs:
            known = ", ".join(op.attrs) or "none"
            raise EngineError(ErrorKind.ATTRIBUTE, f"{op.name} has no attribute {name!r} "
                              f"(it takes: {known})", node=node.name, field=f"attrs.{name}")
    resolved: dict[str, AttrValue] = {}
    for name, spec in op.attrs.items():
        value = node.attrs.get(name, spec.default)
        if value is None:
            if spec.required:
                raise EngineError(ErrorKind.ATTRIBUTE, f"{op.name} needs attribute {name!r}",
                                  node=node.name, field=f"attrs.{name}")
            continue
        if spec.kind is AttrKind.INTS and _is_int(value):
            value = (value,)  # one int where a list of them is taken: axis=1 as axis=(1,)
        elif spec.kind is AttrKind.FLOAT and _is_int(value) and abs(value) <= _EXACT_INTS:
            value = float(value)  # alpha=1 as alpha=1.0
        _check_value(node, name, spec, value)
        resolved[name] = value
    return resolved


_EXACT_INTS = 2**53  # the ints a float holds exactly: a larger one is no float attribute


def _check_value(node: Node, name: str, spec: AttrSpec, value: AttrValue) -> None:
    if not _KIND_CHECKS[spec.kind](value):
        kind = "a finite float" if spec.kind is AttrKind.FLOAT else spec.kind
        raise EngineError(ErrorKind.ATTRIBUTE, f"attribute {name!r} must be {kind}, got "
                          f"{value!r}", node=node.name, field=f"attrs.{name}")
    if spec.choices and value not in spec.choices:
        raise EngineError(ErrorKind.ATTRIBUTE, f"attribute {name!r} must be one of "
                          f"{', '.join(spec.choices)}; got {value!r}", node=node.name,
                          field=f"attrs.{name}")


def _topological_order(graph: Graph, known: set[str]) -> list[Node]:
    """Kahn's algorithm, in the graph's own node order where there is a choice; no recursion."""
    producer = {node.name: node for node in graph.nodes}
    waiting: dict[str, int] = {}
    consumers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for k, name in enumerate(node.inputs):
            if name not in known:
                raise EngineError(ErrorKind.UNKNOWN_NAME, f"input {name!r} is not an input, "
                                  "constant or node of the graph", node=node.name,
                                  field=f"inputs[{k}]")
            if name in producer:
                consumers.setdefault(name, []).append(node)
        waiting[node.name] = sum(name in producer for name in node.inputs)
    ready = deque(node for node in graph.nodes if waiting[node.name] == 0)
    order: list[Node] = []
    while ready:
        node = ready.popleft()
        order.append(node)
        for user in consumers.get(node.name, ()):
            waiting[user.name] -= 1
            if waiting[user.name] == 0:
                ready.append(user)
    if len(order) < len(graph.nodes):
        raise _cycle_error(producer, {n for n, w in waiting.items() if w > 0})
    return order


def _check_outputs(graph: Graph, known: set[str], limit: int) -> None:
    if not graph.outputs:
        raise EngineError(ErrorKind.UNKNOWN_NAME, "the graph names no outputs", field="outputs")
    seen: set[str] = set()
    for k, name in enumerate(graph.outputs):
        if isinstance(name, str) and len(name) > limit:
            raise overlong(name, limit, None, f"outputs[{k}]")
        if name not in known:
            raise EngineError(ErrorKind.UNKNOWN_NAME, f"output {name!r} is not a value of the "
                              "graph", node=name, field=f"outputs[{k}]")
        if name in seen:
            raise EngineError(ErrorKind.DUPLICATE_NAME, f"output {name!r} is listed twice",
                              node=name, field=f"outputs[{k}]")
        seen.add(name)


def _cycle_error(producer: Mapping[str, Node], stuck: set[str]) -> EngineError:
    """Walk back from a stuck node through stuck inputs until a name repeats: that is a cycle."""
    path: list[str] = [min(stuck)]
    seen = {path[0]: 0}
    while True:
        nxt = next(i for i in producer[path[-1]].inputs if i in stuck)
        if nxt in seen:
            cycle = [*path[seen[nxt]:], nxt]
            return EngineError(ErrorKind.CYCLE, "the graph has a cycle: " + " -> ".join(cycle),
                               node=nxt, field="inputs")
        seen[nxt] = len(path)
        path.append(nxt)


def _live(graph: Graph, order: list[Node]) -> set[str]:
    """The names the outputs depend on (dead nodes are checked but not run)."""
    live = set(graph.outputs)
    for node in reversed(order):
        if node.name in live:
            live.update(node.inputs)
    return live
