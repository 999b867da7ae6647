"""Forward mode as a graph transformation: the JVP of a graph is a graph.

:func:`jvp_graph` returns a graph that computes, beside the original outputs, the derivative of
each output along a direction given for the inputs (a tangent per input: a Jacobian-vector
product). Each op's forward-mode rule (``OpDef.jvp``, one entry per op in the op table, beside
its forward and VJP rules) writes the tangent of its value with the table's own ops, through
the ``Tangents`` writer of ``ops/tangents.py``. The result is an ordinary graph: the same
validation, limits, compiler, generated code and batcher serve it, and reverse mode applied to
it gives second order (``derivatives``): the gradient of (upstream . J v) with respect to the
inputs is H v, H the Hessian of (upstream . outputs), for each example.

A rule gets a ``Step``: the node's operands and their tangents (None where an operand has none:
its tangent is zero), its own value's name and its attributes, and returns its value's tangent
(None: zero). Rules use only ops of the table, so what they write is differentiable in reverse
mode too; an op without a rule (``jvp`` None) refuses forward mode with an ORDER error naming
it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gradserve.engine.errors import EngineError, ErrorKind
from gradserve.engine.graph import Constant, Graph, Input, Node
from gradserve.engine.ops import OP_TABLE
from gradserve.engine.ops.tangents import Step, Tangents
from gradserve.engine.validate import Limits, check

TANGENT_SUFFIX = ".tangent"  # an input's tangent is fed under its name plus this


@dataclass(frozen=True, slots=True)
class Forward:
    """A graph with forward mode added: ``graph`` computes the original outputs, then the
    tangent of each (in ``tangent_outputs``, by output); it takes the original inputs and a
    tangent for each input in ``tangent_inputs`` (by input)."""

    graph: Graph
    tangent_inputs: Mapping[str, str]
    tangent_outputs: Mapping[str, str]


def jvp_graph(graph: Graph, wrt: Sequence[str], limits: Limits | None = None,
              keep_outputs: bool = True) -> Forward:
    """``graph`` with the tangents of its outputs along tangents fed for the inputs ``wrt``
    (float inputs), after its own outputs (``keep_outputs``) or alone. Raises EngineError:
    the graph's own errors, or ORDER for an op on the path from ``wrt`` to the outputs that
    has no forward-mode rule."""
    checked = check(graph, limits)
    inputs = {i.name: i for i in graph.inputs}
    taken = {i.name for i in graph.inputs} | {c.name for c in graph.constants} | {
        n.name for n in graph.nodes}
    t = Tangents(taken, checked.types)
    tangent: dict[str, str] = {}
    added: list[Input] = []
    for name in wrt:
        given = inputs.get(name)
        if given is None:
            raise EngineError(ErrorKind.UNKNOWN_NAME, f"{name!r} is not an input", node=name)
        if not given.dtype.is_float:
            raise EngineError(ErrorKind.DTYPE, f"input {name!r} is {given.dtype}: only float "
                              "inputs have tangents", node=name)
        tangent[name] = t.fresh(name + TANGENT_SUFFIX)
        added.append(Input(tangent[name], given.shape, given.dtype, requires_grad=False))
    for node in checked.order:
        tangents = tuple(tangent.get(i) for i in node.inputs)
        if all(x is None for x in tangents):
            continue
        rule = OP_TABLE[node.op].jvp
        if rule is None:
            raise EngineError(ErrorKind.ORDER, f"op {node.op!r} has no forward-mode rule: its "
                              "derivatives beyond the first are not available", node=node.name,
                              field="op")
        t.context = node.name
        out = rule(t, Step(node.inputs, tangents, node.name, node.attrs))
        if out is not None:
            tangent[node.name] = out
    outputs: dict[str, str] = {}
    for o in graph.outputs:
        v = tangent.get(o) or t.zeros_like(o)
        if v in outputs.values() or (keep_outputs and v in graph.outputs):  # distinct names
            v = t.op("mul", v, t.const(1.0, o))
        outputs[o] = v
    result = Graph(graph.inputs + tuple(added),
                   graph.nodes + tuple(Node(*n) for n in t.nodes),
                   (graph.outputs if keep_outputs else ()) + tuple(outputs.values()),
                   graph.constants + tuple(Constant(*c) for c in t.constants))
    return Forward(result, {n: tangent[n] for n in wrt}, outputs)
