"""Expressions as graphs: ``"2*x**2 - 3*x + 4"`` or ``"c = a + b; c += c + 1; c*d"``.

The text is parsed with Python's ``ast`` and only a whitelist of node types is accepted, so
nothing is ever evaluated: arithmetic operators, numbers, names, calls of ops by name with
number, list and string arguments (``relu(x)``, ``sum(x, axis=[0])``, ``maximum(x, y)``), and
statements separated by ``;`` or newlines with assignments and augmented assignments. The last
statement is the output. Names not assigned before their first use are the graph's inputs.
"""

from __future__ import annotations

import ast
import unicodedata
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gradserve.engine import OP_TABLE, DType, Graph
from gradserve.engine.builder import GraphBuilder, Value
from gradserve.engine.ops import AttrValue

_OPS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div", ast.Pow: "pow",
        ast.MatMult: "matmul"}


class ExpressionError(ValueError):
    """Text that is not an expression gradserve can build, with where it went wrong."""

    def __init__(self, message: str, node: ast.AST | None = None) -> None:
        where = f" (column {node.col_offset + 1})" if node is not None and hasattr(
            node, "col_offset") else ""
        super().__init__(message + where)


def parse_expression(text: str, shapes: Mapping[str, tuple[int, ...]],
                     dtype: DType = DType.FLOAT64) -> Graph:
    """The graph ``text`` describes; ``shapes`` gives each input's shape (default scalar)."""
    try:
        with _nesting("the expression"):
            module = ast.parse(text.strip(), mode="exec")  # ";" separates statements, as in Python
            if not module.body:
                raise ExpressionError("the expression is empty")
            return _Builder(shapes, dtype).build(module.body)
    except SyntaxError as e:
        raise ExpressionError(f"not an expression: {e.msg}") from None


def fold_name(name: str) -> str:
    """``name`` as the parser reads it: Python folds identifiers to NFKC (a black-letter or a
    fullwidth H is H), so a value given for an input by name must be folded alike to meet it."""
    return unicodedata.normalize("NFKC", name)


@contextmanager
def _nesting(what: str) -> Iterator[None]:
    """Nesting too deep for CPython's parser as one clear error, whichever limit it hits: the
    tokenizer's 200 open brackets (a SyntaxError), the recursion limit, or the parser's stack (a
    bare MemoryError, e.g. for 50,000 unary minus signs or a 3,000-deep ``**`` chain)."""
    try:
        yield
    except (SyntaxError, RecursionError, MemoryError) as e:
        if isinstance(e, SyntaxError) and e.msg != "too many nested parentheses":
            raise
        raise ExpressionError(f"{what} is nested too deeply") from None


class _Builder:
    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: DType) -> None:
        self.graph = GraphBuilder()
        self.shapes = shapes
        self.dtype = dtype
        self.scope: dict[str, Value] = {}  # what each name means now
        self.taken: set[str] = set()  # every name used in the graph

    def build(self, statements: list[ast.stmt]) -> Graph:
        out: Value | None = None
        for stmt in statements:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(
                    stmt.targets[0], ast.Name):
                target = stmt.targets[0].id
                out = self.scope[target] = self.value(stmt.value, self.label(target))
            elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
                target = stmt.target.id
                current = self.name(stmt.target)
                out = self.scope[target] = self.binary(stmt.op, current, self.operand(stmt.value),
                                                       stmt, self.label(target))
            elif isinstance(stmt, ast.Expr):
                out = self.value(stmt.value, self.label("out"))
            else:
                raise ExpressionError(f"{type(stmt).__name__} statements are not allowed", stmt)
        if out is None:
            raise ExpressionError("the expression is empty")
        return self.graph.build(out)

    def label(self, name: str) -> str:
        """A fresh node name for ``name``: itself, then ``name_2``, ``name_3`` (single
        assignment)."""
        label, k = name, 1
        while label in self.taken:
            k += 1
            label = f"{name}_{k}"
        self.taken.add(label)
        return label

    def name(self, node: ast.Name) -> Value:
        if node.id not in self.scope:
            self.taken.add(node.id)
            self.scope[node.id] = self.graph.input(node.id, self.shapes.get(node.id, ()),
                                                   self.dtype)
        return self.scope[node.id]

    def value(self, node: ast.expr, name: str | None = None) -> Value:
        result = self.operand(node, name)
        if isinstance(result, Value):
            return result
        return self.graph.constant(result, self.dtype, name=name)

    def operand(self, node: ast.expr, name: str | None = None) -> Value | float:
        """The value of ``node``; the node that computes it, if any, is called ``name``."""
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not \
                isinstance(node.value, bool):
            return float(_float64(node.value, node))
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.BinOp):
            return self.binary(node.op, self.operand(node.left), self.operand(node.right), node,
                               name)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            inner = self.operand(node.operand)
            if isinstance(node.op, ast.UAdd):
                return inner
            return self.graph.op("neg", inner, name=name) if isinstance(inner, Value) else -inner
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return self.call(node, node.func.id, name)
        raise ExpressionError(f"{type(node).__name__} is not allowed in an expression", node)

    def binary(self, op: ast.operator, left: Value | float, right: Value | float,
               node: ast.AST, name: str | None = None) -> Value:
        kind = _OPS.get(type(op))
        if kind is None:
            raise ExpressionError(f"operator {type(op).__name__} is not supported", node)
        if not isinstance(left, Value) and not isinstance(right, Value):
            left = self.graph.constant(left, self.dtype)
        return self.graph.op(kind, left, right, name=name)

    def call(self, node: ast.Call, op: str, name: str | None) -> Value:
        if op not in OP_TABLE:
            raise ExpressionError(f"unknown op {op!r}", node)
        args = [self.value(a) for a in node.args]
        if any(k.arg is None for k in node.keywords):
            raise ExpressionError("**kwargs is not allowed", node)
        attrs = {str(k.arg): _attribute(k.value) for k in node.keywords}
        return self.graph.apply(op, args, attrs, name)


def _attribute(node: ast.expr) -> AttrValue:
    """An attribute's value: a whole number, a bool, a string, or a list of whole numbers."""
    if isinstance(node, ast.Constant) and isinstance(node.value, bool | int | str):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(
            node.operand, ast.Constant) and type(node.operand.value) is int:
        return -node.operand.value
    if isinstance(node, ast.List | ast.Tuple):
        items = [_attribute(e) for e in node.elts]
        ints = [i for i in items if type(i) is int]
        if len(ints) == len(items):
            return tuple(ints)
    raise ExpressionError("attributes are whole numbers, bools, strings or lists of whole "
                          "numbers", node)


def _float64(literal: object, node: ast.AST | None = None) -> NDArray[np.float64]:
    """A number or nested list of numbers as float64, refusing any number too large for it
    whether it is an int or a float: Python reads a float literal past the range as inf."""
    try:
        array = np.asarray(literal, dtype=np.float64)
    except OverflowError:  # an int past the range
        array = np.asarray(np.inf)
    if np.isinf(array).any():
        raise ExpressionError("a number is too large for float64", node)
    return array


def parse_value(text: str) -> NDArray[Any]:
    """An input value from the command line: a number, a nested list (JSON), or ``@file.npy``."""
    if text.startswith("@"):
        return _load(text[1:])
    try:
        with _nesting("the value"):
            return _float64(ast.literal_eval(text))
    except ExpressionError:  # too large, or nested too deeply: it says so already
        raise
    except (ValueError, SyntaxError, TypeError):
        raise ExpressionError(f"not a number, list of numbers or @file.npy: {text!r}") from None


def _load(path: str) -> NDArray[Any]:
    """The array in a .npy file. Nothing is ever unpickled, and a file that is not a .npy array
    of numbers (text, .npz, objects) is refused as such, never with numpy's advice to load it
    unsafely."""
    with open(path, "rb") as file, suppress(ValueError):  # numpy's refusals carry that advice
        loaded = np.lib.format.read_array(file, allow_pickle=False)
        if loaded.dtype.kind in "biuf":
            return loaded
    raise ExpressionError(f"not a .npy array of numbers: {path!r}")
