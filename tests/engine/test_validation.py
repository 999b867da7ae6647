"""Every class of bad graph is refused at compile time with the right kind, node and field."""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass, replace

import numpy as np
import pytest

from gradserve.engine import (
    Constant,
    DType,
    EngineError,
    ErrorKind,
    Graph,
    Input,
    Limits,
    Node,
    Plan,
)
from gradserve.engine.builder import GraphBuilder
from gradserve.engine.ops import AttrValue

ANY = object()  # "don't care" marker for a field the engine leaves unspecified

# The inputs most cases use: each case is bad only because of the fault it names.
INPUTS = (
    Input("x", (2, 3)),
    Input("v", (4,)),
    Input("s"),
    Input("h", (2, 3), DType.FLOAT32),
    Input("k", (2,), DType.INT64, requires_grad=False),
)


@dataclass(frozen=True)
class Case:
    """A bad graph and the error it must give."""

    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    kind: ErrorKind
    node: str | None
    field: object
    inputs: tuple[Input, ...] = INPUTS
    constants: tuple[Constant, ...] = ()

    def graph(self) -> Graph:
        return Graph(self.inputs, self.nodes, self.outputs, self.constants)


def node(name: str, op: str, *inputs: str, **attrs: AttrValue) -> Node:
    return Node(name, op, inputs, attrs)


def compile_error(graph: Graph, limits: Limits | None = None) -> EngineError:
    with pytest.raises(EngineError) as info:
        Plan(graph, limits)
    return info.value


def single(n: Node, kind: ErrorKind, field_: object,
           inputs: tuple[Input, ...] | None = None) -> Case:
    """A graph whose only node ``n`` is the output and is at fault."""
    case = Case((n,), (n.name,), kind, n.name, field_)
    return case if inputs is None else replace(case, inputs=inputs)


LONG = "n" * 257

CASES = {
    "unknown_op": single(node("y", "frobnicate", "x"), ErrorKind.UNKNOWN_OP, "op"),
    "unknown_input_name_0": single(node("y", "neg", "nope"), ErrorKind.UNKNOWN_NAME, "inputs[0]"),
    "unknown_input_name_1": single(node("y", "add", "x", "nope"), ErrorKind.UNKNOWN_NAME,
                                   "inputs[1]"),
    "unknown_output": Case((node("y", "neg", "x"),), ("y", "zzz"), ErrorKind.UNKNOWN_NAME, "zzz",
                           "outputs[1]"),
    "duplicate_input_vs_node": Case((node("x", "neg", "s"),), ("x",),
                                    ErrorKind.DUPLICATE_NAME, "x", "name"),
    "duplicate_node_vs_node": Case((node("y", "neg", "x"), node("y", "exp", "x")), ("y",),
                                   ErrorKind.DUPLICATE_NAME, "y", "name"),
    "duplicate_input_vs_input": Case((node("y", "neg", "s"),), ("y",), ErrorKind.DUPLICATE_NAME,
                                     "s", "name", inputs=(Input("s"), Input("s", (2,)))),
    "duplicate_constant_vs_input": Case((node("y", "neg", "s"),), ("y",),
                                        ErrorKind.DUPLICATE_NAME, "s", "name",
                                        inputs=(Input("s"),),
                                        constants=(Constant("s", np.array(1.0)),)),
    "duplicate_output": Case((node("y", "neg", "x"),), ("y", "y"), ErrorKind.DUPLICATE_NAME, "y",
                             "outputs[1]"),
    "add_one_operand": single(node("y", "add", "x"), ErrorKind.ARITY, "inputs"),
    "add_three_operands": single(node("y", "add", "x", "x", "x"), ErrorKind.ARITY, "inputs"),
    "concat_no_operands": single(node("y", "concat"), ErrorKind.ARITY, "inputs"),
    "neg_two_operands": single(node("y", "neg", "x", "x"), ErrorKind.ARITY, "inputs"),
    "unknown_attribute": single(node("y", "neg", "x", axis=(0,)), ErrorKind.ATTRIBUTE,
                                "attrs.axis"),
    "unknown_attribute_sum": single(node("y", "sum", "x", axes=(0,)), ErrorKind.ATTRIBUTE,
                                    "attrs.axes"),
    "axis_as_str_sum": single(node("y", "sum", "x", axis="0"), ErrorKind.ATTRIBUTE, "attrs.axis"),
    "axis_as_str_concat": single(node("y", "concat", "x", "x", axis="0"), ErrorKind.ATTRIBUTE,
                                 "attrs.axis"),
    "axis_as_bool_concat": single(node("y", "concat", "x", "x", axis=True), ErrorKind.ATTRIBUTE,
                                  "attrs.axis"),
    "axis_as_bool_sum": single(node("y", "sum", "x", axis=True), ErrorKind.ATTRIBUTE,
                               "attrs.axis"),
    "keepdims_as_int": single(node("y", "sum", "x", keepdims=1), ErrorKind.ATTRIBUTE,
                              "attrs.keepdims"),
    "reduction_as_int": single(node("y", "softmax_cross_entropy", "x", "x", reduction=0),
                               ErrorKind.ATTRIBUTE, "attrs.reduction"),
    "reshape_without_shape": single(node("y", "reshape", "x"), ErrorKind.ATTRIBUTE,
                                    "attrs.shape"),
    "broadcast_to_without_shape": single(node("y", "broadcast_to", "x"), ErrorKind.ATTRIBUTE,
                                         "attrs.shape"),
    "reduction_avg": single(node("y", "softmax_cross_entropy", "x", "x", reduction="avg"),
                            ErrorKind.ATTRIBUTE, "attrs.reduction"),
    "sum_axis_out_of_range": single(node("y", "sum", "x", axis=(2,)), ErrorKind.ATTRIBUTE,
                                    "attrs.axis"),
    "sum_negative_axis_out_of_range": single(node("y", "sum", "x", axis=(-3,)),
                                             ErrorKind.ATTRIBUTE, "attrs.axis"),
    "softmax_axis_out_of_range": single(node("y", "softmax", "x", axis=5), ErrorKind.ATTRIBUTE,
                                        "attrs.axis"),
    "concat_axis_out_of_range": single(node("y", "concat", "x", "x", axis=2),
                                       ErrorKind.ATTRIBUTE, "attrs.axis"),
    "sum_repeated_axis": single(node("y", "sum", "x", axis=(0, -2)), ErrorKind.ATTRIBUTE,
                                "attrs.axis"),
    "perm_repeats": single(node("y", "transpose", "x", perm=(0, 0)), ErrorKind.ATTRIBUTE,
                           "attrs.perm"),
    "perm_too_short": single(node("y", "transpose", "x", perm=(0,)), ErrorKind.ATTRIBUTE,
                             "attrs.perm"),
    "perm_out_of_range": single(node("y", "transpose", "x", perm=(1, 2)), ErrorKind.ATTRIBUTE,
                                "attrs.perm"),
    "add_shape_mismatch": single(node("y", "add", "x", "v"), ErrorKind.SHAPE, ANY),
    "matmul_inner_mismatch": single(node("y", "matmul", "x", "v"), ErrorKind.SHAPE, ANY),
    "matmul_scalar": single(node("y", "matmul", "s", "x"), ErrorKind.SHAPE, ANY),
    "reshape_count_mismatch": single(node("y", "reshape", "x", shape=(4,)), ErrorKind.SHAPE, ANY),
    "reshape_two_minus_ones": single(node("y", "reshape", "x", shape=(-1, -1)),
                                     ErrorKind.ATTRIBUTE, "attrs.shape"),
    "broadcast_to_incompatible": single(node("y", "broadcast_to", "x", shape=(2, 4)),
                                        ErrorKind.SHAPE, ANY),
    "dtype_mismatch": single(node("y", "add", "x", "h"), ErrorKind.DTYPE, "inputs[1]"),
    "dtype_mismatch_matmul": single(node("y", "matmul", "h", "x"), ErrorKind.DTYPE, "inputs[1]"),
    "int64_into_exp": single(node("y", "exp", "k"), ErrorKind.DTYPE, "inputs[0]"),
    "int64_into_mul": single(node("y", "mul", "s", "k"), ErrorKind.DTYPE, "inputs[1]"),
    "labels_wrong_shape": single(node("y", "softmax_cross_entropy", "x", "k"), ErrorKind.SHAPE,
                                 "inputs[1]", inputs=(Input("x", (2, 3)),
                                                      Input("k", (3,), DType.INT64))),
    "input_dimension_zero": Case((node("y", "neg", "z"),), ("y",), ErrorKind.SHAPE, "z", "shape",
                                 inputs=(Input("z", (2, 0)),)),
    "input_dimension_negative": Case((node("y", "neg", "z"),), ("y",), ErrorKind.SHAPE, "z",
                                     "shape", inputs=(Input("z", (-1,)),)),
    "empty_constant": Case((node("y", "neg", "c"),), ("y",), ErrorKind.SHAPE, "c", "value",
                           constants=(Constant("c", np.zeros((0,))),)),
    "int32_constant": Case((node("y", "neg", "c"),), ("y",), ErrorKind.DTYPE, "c", "value",
                           constants=(Constant("c", np.zeros((2,), np.int32)),)),
    "no_outputs": Case((node("y", "neg", "x"),), (), ErrorKind.UNKNOWN_NAME, None, "outputs"),
    # A node no output depends on is still checked.
    "dead_unknown_op": Case((node("y", "neg", "x"), node("dead", "frobnicate", "x")), ("y",),
                            ErrorKind.UNKNOWN_OP, "dead", "op"),
    "dead_shape_mismatch": Case((node("y", "neg", "x"), node("dead", "add", "x", "v")), ("y",),
                                ErrorKind.SHAPE, "dead", ANY),
    "dead_unknown_name": Case((node("y", "neg", "x"), node("dead", "add", "x", "nope")), ("y",),
                              ErrorKind.UNKNOWN_NAME, "dead", "inputs[1]"),
    "dead_bad_attribute": Case((node("y", "neg", "x"), node("dead", "sum", "x", axis=(7,))),
                               ("y",), ErrorKind.ATTRIBUTE, "dead", "attrs.axis"),
    "dead_downstream_of_bad": Case((node("y", "neg", "x"), node("d1", "exp", "k"),
                                    node("d2", "neg", "d1")), ("y",), ErrorKind.DTYPE, "d1",
                                   "inputs[0]"),
    # names over the length limit (256): refused wherever they stand, never echoed
    "overlong_input": Case((node("y", "neg", LONG),), ("y",), ErrorKind.NAME, LONG, "name",
                           inputs=(Input(LONG),)),
    "overlong_node": Case((node(LONG, "neg", "x"),), (LONG,), ErrorKind.NAME, LONG, "name"),
    "overlong_constant": Case((node("y", "neg", LONG),), ("y",), ErrorKind.NAME, LONG, "name",
                              constants=(Constant(LONG, np.array(1.0)),)),
    "overlong_operand": single(node("y", "add", "x", LONG), ErrorKind.NAME, "inputs[1]"),
    "overlong_op": single(node("y", LONG, "x"), ErrorKind.NAME, "op"),
    "overlong_attribute": single(Node("y", "neg", ("x",), {LONG: 1}), ErrorKind.NAME, "attrs"),
    "overlong_output": Case((node("y", "neg", "x"),), ("y", LONG), ErrorKind.NAME, None,
                            "outputs[1]"),
}




@pytest.mark.parametrize("case", [
    pytest.param(case, id=name)
    for name, case in CASES.items()
])
def test_bad_graph(case: Case) -> None:
    err = compile_error(case.graph())
    assert err.kind is case.kind, str(err)
    assert err.node == case.node, str(err)
    if case.field is not ANY:
        assert err.field == case.field, str(err)
    if case.node is not None:
        assert str(err).startswith(f"{case.node}: ")
    assert err.message
    assert LONG not in err.message


def test_error_is_a_value_error() -> None:
    err = compile_error(CASES["unknown_op"].graph())
    assert isinstance(err, ValueError)
    assert "frobnicate" in err.message


def test_shape_mismatch_message_names_the_shapes() -> None:
    err = compile_error(CASES["add_shape_mismatch"].graph())
    assert "[2, 3]" in err.message
    assert "[4]" in err.message


def test_matmul_mismatch_message_names_the_inner_dimensions() -> None:
    err = compile_error(CASES["matmul_inner_mismatch"].graph())
    assert "3" in err.message
    assert "4" in err.message


@pytest.mark.parametrize(
    ("nodes", "cycles"),
    [
        # a <-> b
        ((node("a", "add", "b", "x"), node("b", "neg", "a")), ("a -> b -> a", "b -> a -> b")),
        # a self-loop
        ((node("a", "neg", "a"),), ("a -> a",)),
        # a three-cycle behind a healthy prefix (listed along data flow or against it)
        ((node("p", "neg", "x"), node("q", "add", "p", "r"), node("r", "exp", "t"),
          node("t", "neg", "q")), ("q -> t -> r -> q", "r -> q -> t -> r", "t -> r -> q -> t",
                                   "q -> r -> t -> q", "r -> t -> q -> r", "t -> q -> r -> t")),
    ],
    ids=["two_nodes", "self_loop", "three_nodes"],
)
def test_cycle(nodes: tuple[Node, ...], cycles: tuple[str, ...]) -> None:
    err = compile_error(Graph((Input("x", (2, 3)),), nodes, (nodes[-1].name,)))
    assert err.kind is ErrorKind.CYCLE
    assert any(c in err.message for c in cycles), err.message
    assert err.node is not None
    assert err.node in "".join(cycles)


def test_dead_cycle_is_reported() -> None:
    nodes = (node("y", "neg", "x"), node("a", "neg", "b"), node("b", "neg", "a"))
    err = compile_error(Graph((Input("x"),), nodes, ("y",)))
    assert err.kind is ErrorKind.CYCLE


def chain(n: int) -> Graph:
    nodes = [node("n0", "neg", "x")] + [node(f"n{k}", "neg", f"n{k - 1}") for k in range(1, n)]
    return Graph((Input("x"),), tuple(nodes), (f"n{n - 1}",))


def test_max_nodes_limit() -> None:
    err = compile_error(chain(6), Limits(max_nodes=5))
    assert err.kind is ErrorKind.LIMIT
    assert err.field == "nodes"
    assert err.node is None
    assert "6" in err.message
    Plan(chain(5), Limits(max_nodes=5))  # exactly at the limit is fine


def test_the_default_node_limit_is_the_servers() -> None:
    """100,000 nodes, the default a server runs with (its settings read the engine's)."""
    err = compile_error(chain(100_001))
    assert err.kind is ErrorKind.LIMIT
    assert err.message == "the graph has 100001 nodes; the limit is 100000"


def test_max_rank_limit() -> None:
    graph = Graph((Input("x", (1,) * 4),), (node("y", "neg", "x"),), ("y",))
    err = compile_error(graph, Limits(max_rank=3))
    assert err.kind is ErrorKind.LIMIT
    assert err.node == "x"


def test_max_elements_limit_on_input() -> None:
    graph = Graph((Input("x", (10, 11)),), (node("y", "neg", "x"),), ("y",))
    err = compile_error(graph, Limits(max_elements=100))
    assert err.kind is ErrorKind.LIMIT
    assert err.node == "x"


def test_max_elements_limit_on_node() -> None:
    graph = Graph((Input("x", (10,)),), (node("y", "broadcast_to", "x", shape=(11, 10)),), ("y",))
    Plan(graph, Limits(max_elements=110))
    err = compile_error(graph, Limits(max_elements=109))
    assert err.kind is ErrorKind.LIMIT
    assert err.node == "y"


def test_huge_broadcast_is_refused_without_allocating() -> None:
    graph = Graph((Input("x"),), (node("big", "broadcast_to", "x", shape=(100_000, 100_000)),
                                  node("y", "sum", "big")), ("y",))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        err = compile_error(graph)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.kind is ErrorKind.LIMIT
    assert err.node == "big"
    assert "big" in str(err)
    assert elapsed < 1.0
    assert peak < 1 << 20  # 80 GB of float64 was asked for; well under 1 MiB was used


def test_valid_graph_compiles() -> None:
    """The shared inputs, and every op and attribute the cases misuse, are fine when used right."""
    nodes = (
        node("a", "add", "x", "x"),
        node("b", "sum", "a", axis=(0, -1), keepdims=True),
        node("c", "transpose", "x", perm=(1, 0)),
        node("d", "reshape", "x", shape=(3, 2)),
        node("e", "concat", "x", "x", axis=1),
        node("f", "matmul", "x", "d"),
        node("g", "softmax_cross_entropy", "x", "k", reduction="sum"),
        node("i", "exp", "h"),
    )
    plan = Plan(Graph(INPUTS, nodes, ("b", "c", "e", "f", "g", "i")))
    assert plan.outputs == ("b", "c", "e", "f", "g", "i")


def test_a_name_at_the_length_limit_is_fine() -> None:
    name = "n" * 256
    plan = Plan(Graph((Input(name),), (node("y", "neg", name),), ("y",)))
    assert float(plan.run({name: 2.0}).gradients[name]) == -1.0
    with pytest.raises(EngineError) as info:  # one character more, as a fed name
        plan.run({name: 2.0, name + "n": 1.0})
    assert info.value.kind is ErrorKind.NAME and name not in info.value.message


def test_an_int_stands_for_a_list_of_one_wherever_ints_are_taken() -> None:
    """``g.op("sum", x, axis=1)`` means ``axis=(1,)``, as ``x.sum(axis=1)`` does; a graph from
    the wire, whose int_value arrives as an int, is read the same way."""
    x = Input("x", (2, 3))
    one = (node("s", "sum", "x", axis=1), node("r", "reshape", "s", shape=2),
           node("t", "slice", "r", starts=1, ends=2, axes=0, steps=1))
    listed = (node("s", "sum", "x", axis=(1,)), node("r", "reshape", "s", shape=(2,)),
              node("t", "slice", "r", starts=(1,), ends=(2,), axes=(0,), steps=(1,)))
    feed = {"x": np.arange(6.0).reshape(2, 3)}
    got, want = (Plan(Graph((x,), nodes, ("s", "t"))).run(feed) for nodes in (one, listed))
    assert got.outputs["s"].tolist() == want.outputs["s"].tolist() == [3.0, 12.0]
    assert got.outputs["t"].tolist() == want.outputs["t"].tolist() == [12.0]
    np.testing.assert_array_equal(got.gradients["x"], want.gradients["x"])
    g = GraphBuilder()
    v = g.input("x", (2, 3))
    by_op, by_method = g.op("sum", v, axis=1), v.sum(axis=1)
    result = Plan(g.build(by_op, by_method)).run(feed)
    np.testing.assert_array_equal(result.outputs[by_op.name], result.outputs[by_method.name])
