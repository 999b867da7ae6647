"""What a model's values become while it is imported, and the engine graph they are written to.

Each ONNX value is one of three things:

* :class:`Known`: an array computed at import. Initializers start so, and so does everything
  computed from known values alone: the integer shape arithmetic of an export (``Shape``,
  ``Gather``, ``Concat``, ``Range`` ...) folds away with numpy, so the engine runs only the
  differentiable part. A known value that an engine op needs becomes an engine constant.
* :class:`Sym`: a value the engine computes, named in the engine graph, with its shape per
  example as the model sees it. In a batched import the model's batch axis is part of that
  shape with size 1: every example runs as the model run with a batch of one, so every ONNX
  axis attribute keeps its meaning and no op mixes examples. Where it pays, the engine holds a
  value *squeezed*, without that leading unit axis: the batched inputs themselves (their
  per-example shape has no batch axis), and the (C, spatial...) tensors that the convolution
  family takes per example.
* :class:`Missing`: an output this importer does not compute (a pooling's indices), with the
  reason, refused if anything uses it.

:class:`Emitter` writes engine nodes: each op's type comes from the engine's own shape rule at
once, so a mismatch is reported at the ONNX node that caused it; an op whose operands are all
known is computed with numpy instead (``FOLDS``) where that op has a fold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gradserve.engine import (
    OP_TABLE,
    Constant,
    DType,
    EngineError,
    ErrorKind,
    Graph,
    Input,
    Node,
    TensorType,
)
from gradserve.engine.ops import AttrValue
from gradserve.engine.types import Shape
from gradserve.engine.validate import Limits
from gradserve.importer.errors import ModelError


@dataclass(frozen=True, slots=True, eq=False)
class Known:
    """A value computed at import; ``name`` is the ONNX name it had, if any (the name of the
    engine constant it becomes)."""

    array: NDArray[Any]
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Sym:
    """A value the engine computes: its engine name, its shape per example as the model sees
    it, its dtype, and whether the engine holds it without ``shape``'s leading unit axis."""

    name: str
    shape: Shape
    dtype: DType
    squeezed: bool = False

    @property
    def engine_shape(self) -> Shape:
        """The shape the engine holds per example."""
        return self.shape[1:] if self.squeezed else self.shape


@dataclass(frozen=True, slots=True)
class Missing:
    """An output the importer does not compute, and why."""

    reason: str


Tensor = Known | Sym
Value = Known | Sym | Missing


def shape_of(t: Tensor) -> Shape:
    """The value's shape per example, as the model sees it."""
    return tuple(t.array.shape) if isinstance(t, Known) else t.shape


def engine_shape(t: Tensor) -> Shape:
    """The shape the engine holds per example (a known value: its own)."""
    return tuple(t.array.shape) if isinstance(t, Known) else t.engine_shape


def engine_array(arr: NDArray[Any]) -> NDArray[Any]:
    """A known array as the engine can hold it: float32, float64 or int64 as they are; booleans
    and narrower integers widened to int64 (exactly); anything else refused."""
    if DType.of(arr.dtype) is not None:
        return arr
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    raise ModelError(f"data type {arr.dtype} is not supported: the engine computes on float32, "
                     "float64 and int64")


def _divide(a: NDArray[Any], b: NDArray[Any]) -> NDArray[Any]:
    """ONNX Div: true division for floats, truncation toward zero for integers (as C does)."""
    if np.issubdtype(a.dtype, np.integer):
        return np.asarray(np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b)), a.dtype)
    return np.asarray(np.divide(a, b))


def _slice(x: NDArray[Any], starts: tuple[int, ...], ends: tuple[int, ...],
           axes: tuple[int, ...] | None = None,
           steps: tuple[int, ...] | None = None) -> NDArray[Any]:
    index: list[slice] = [slice(None)] * x.ndim
    for axis, start, end, step in zip(axes or range(len(starts)), starts, ends,
                                      steps or (1,) * len(starts), strict=True):
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _reduction(fn: Callable[..., Any]) -> Callable[..., NDArray[Any]]:
    def fold(x: NDArray[Any], axis: tuple[int, ...] | None = None,
             keepdims: bool = False) -> NDArray[Any]:
        return np.asarray(fn(x, axis=axis, keepdims=keepdims), x.dtype)

    return fold


# Engine ops computed with numpy when every operand is known at import (any dtype: the shape
# arithmetic is int64), with the engine op's attributes as keyword arguments. Ops not here run
# in the engine even on constants (a convolution of constants is rare; its value is not needed
# at import).
FOLDS: Mapping[str, Callable[..., NDArray[Any]]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": _divide, "pow": np.power,
    "neg": np.negative, "abs": np.abs, "exp": np.exp, "log": np.log, "sqrt": np.sqrt,
    "maximum": np.maximum, "minimum": np.minimum, "where": np.where,
    "equal": np.equal, "less": np.less, "less_equal": np.less_equal, "greater": np.greater,
    "greater_equal": np.greater_equal, "and": np.logical_and, "or": np.logical_or,
    "not": np.logical_not,
    "reshape": np.reshape,
    "transpose": lambda x, perm=None: np.transpose(x, perm),
    "broadcast_to": np.broadcast_to,
    "concat": lambda *xs, axis: np.concatenate(xs, axis=axis),
    "slice": _slice,
    "gather": lambda data, indices, axis: np.take(data, indices, axis=axis),
    "sum": _reduction(np.sum), "mean": _reduction(np.mean), "max": _reduction(np.max),
    "min": _reduction(np.min),
}


class Emitter:
    """The engine graph under construction: its inputs, constants and nodes.

    Nodes get fresh names derived from the ONNX value being converted (``context``);
    :meth:`finish` then gives each node the ONNX name of the value it computes, where it can,
    so the engine graph reads like the model (and its outputs keep their ONNX names).
    """

    def __init__(self, limits: Limits, onnx_names: Iterable[str]) -> None:
        self.limits = limits
        self.context = "value"  # the ONNX value being converted: the stem of fresh names
        self._inputs: list[Input] = []
        self._constants: list[Constant] = []
        self._nodes: list[Node] = []
        self._producer: dict[str, Node] = {}
        self._held: dict[str, Sym] = {}  # engine name -> the value it holds (inputs, nodes)
        self._taken = set(onnx_names)  # names a fresh name must avoid
        self._leaves: set[str] = set()  # names of inputs and constants
        self._fresh: set[str] = set()  # node names made here (which finish may rename)
        self._constant_of: dict[int, tuple[Known, str]] = {}  # id(known) -> (known, name)
        self._full: dict[str, Sym] = {}  # squeezed value -> the same with its unit axis
        self._squeezed: dict[str, Sym] = {}  # and the other way round

    # --- leaves -----------------------------------------------------------------------------

    def input(self, name: str, shape: Shape, dtype: DType, squeezed: bool) -> Sym:
        """An engine input named as the model's; ``squeezed``: it has a batch axis, which the
        engine's batch axis replaces (its per-example shape lacks it)."""
        value = self._held[name] = Sym(name, shape, dtype, squeezed)
        self._inputs.append(Input(name, value.engine_shape, dtype, requires_grad=dtype.is_float))
        self._taken.add(name)
        self._leaves.add(name)
        return value

    def constant(self, known: Known, name: str | None = None) -> str:
        """The engine constant holding ``known`` (one per known value), named ``name``, else
        after the ONNX value it was, else freshly."""
        made = self._constant_of.get(id(known))
        if made is not None and name in (None, made[1]):
            return made[1]
        value = engine_array(known.array)
        if name is None:
            name = known.name
            if name is None or made is not None or name in self._leaves:
                name = self._name("const")
        self._taken.add(name)
        self._leaves.add(name)
        self._constants.append(Constant(name, value))
        self._constant_of.setdefault(id(known), (known, name))
        return name

    # --- ops --------------------------------------------------------------------------------

    def op(self, op: str, operands: Sequence[Tensor], attrs: Mapping[str, AttrValue] | None = None,
           *, squeezed: bool = False) -> Tensor:
        """Apply engine op ``op`` to the operands as the engine holds them (squeezed values
        without their unit axis): with numpy when all are known and the op folds, else as an
        engine node. ``squeezed``: the result is held without a leading unit axis."""
        attrs = dict(attrs or {})
        fold = FOLDS.get(op)
        if fold is not None and all(isinstance(o, Known) for o in operands):
            return Known(np.asarray(fold(*(o.array for o in operands if isinstance(o, Known)),
                                         **attrs)))
        return self._emit(op, operands, attrs, squeezed)

    def reshape(self, t: Tensor, shape: Shape) -> Tensor:
        """``t`` as the engine holds it, reshaped to ``shape``: see :meth:`_reshape`."""
        if isinstance(t, Known):
            return Known(t.array.reshape(shape))
        return self._reshape(t, shape, False)

    def _reshape(self, t: Sym, shape: Shape, squeezed: bool) -> Sym:
        """``t`` reshaped: nothing when the engine holds it in that shape already, and a
        reshape of a reshape's operand rather than of the reshape."""
        node = self._producer.get(t.name)
        if node is not None and node.op == "reshape" and node.inputs[0] in self._held:
            t = self._held[node.inputs[0]]
        if t.engine_shape == shape:
            return Sym(t.name, (1, *shape) if squeezed else shape, t.dtype, squeezed)
        return self._emit("reshape", [t], {"shape": shape}, squeezed)

    def _emit(self, op: str, operands: Sequence[Tensor], attrs: Mapping[str, AttrValue],
              squeezed: bool) -> Sym:
        """An engine node applying ``op``, typed by the engine's own shape rule."""
        spec = OP_TABLE.get(op)
        if spec is None:
            raise ModelError(f"it needs the engine op {op!r}, which this engine does not have")
        types = [TensorType(engine_shape(o), self._dtype(o)) for o in operands]
        resolved = {name: a.default for name, a in spec.attrs.items() if a.default is not None}
        resolved.update(attrs)
        try:
            out, _ = spec.infer(types, resolved)
        except EngineError as e:
            raise ModelError(f"the engine's {op} cannot take it: {e.message}",
                             limit=e.kind is ErrorKind.LIMIT) from None
        self._check_size(out)
        node = Node(self._name(f"{self.context}.{op}"), op,
                    tuple(self._engine_name(o) for o in operands), dict(attrs))
        self._nodes.append(node)
        self._producer[node.name] = node
        self._fresh.add(node.name)
        shape = (1, *out.shape) if squeezed else out.shape
        value = self._held[node.name] = Sym(node.name, shape, out.dtype, squeezed)
        return value

    def full(self, t: Tensor) -> Tensor:
        """``t`` held with its leading unit axis: what every op that is not written for
        squeezed values takes."""
        if isinstance(t, Known) or not t.squeezed:
            return t
        made = self._full.get(t.name)
        if made is None:
            if not t.dtype.is_float:
                raise ModelError(f"the {t.dtype} value {t.name!r} is used where the engine "
                                 "would have to reshape it; integer values can be indices "
                                 "(Gather), class labels (the losses) and comparison operands")
            made = self._full[t.name] = self._reshape(t, t.shape, False)
            self._squeezed.setdefault(made.name, t)
        return made

    def squeezed(self, t: Tensor) -> Tensor:
        """``t`` held without its leading axis, which must have size 1: how batched class
        labels come, so a loss's scores must match them."""
        shape = shape_of(t)
        if not shape or shape[0] != 1:
            raise ModelError(f"the batched labels need scores with a leading axis of size 1, "
                             f"not {list(shape)}")
        if isinstance(t, Known):
            return Known(t.array[0])
        if t.squeezed:
            return t
        made = self._squeezed.get(t.name)
        if made is None:
            made = self._squeezed[t.name] = self._reshape(t, shape[1:], True)
            self._full.setdefault(made.name, t)
        return made

    # --- the graph --------------------------------------------------------------------------

    def finish(self, outputs: Sequence[tuple[str, Tensor]],
               values: Iterable[tuple[str, Value]]) -> Graph:
        """The engine graph computing ``outputs`` (each under its ONNX name, as the engine
        holds it), with only the nodes and constants they need; nodes take the ONNX names of
        the ``values`` they compute where those are free."""
        rename: dict[str, str] = {}
        used = set(self._leaves)
        for name, t in outputs:
            if isinstance(t, Known):
                self.constant(t, name)
            elif t.name in self._fresh and t.name not in rename and name not in used:
                rename[t.name] = name
            elif t.name != name:
                self.context = name
                rename[self._emit("reshape", [t], {"shape": t.engine_shape}, False).name] = name
            used.add(name)
        for name, v in values:
            if isinstance(v, Sym) and v.name in self._fresh and v.name not in rename \
                    and name not in used:
                rename[v.name] = name
                used.add(name)
        nodes = [Node(rename.get(n.name, n.name), n.op,
                      tuple(rename.get(i, i) for i in n.inputs), n.attrs) for n in self._nodes]
        wanted = tuple(name for name, _ in outputs)
        live = _live(nodes, wanted)
        return Graph(tuple(self._inputs), tuple(n for n in nodes if n.name in live), wanted,
                     tuple(c for c in self._constants if c.name in live))

    # --- helpers ----------------------------------------------------------------------------

    def _name(self, stem: str) -> str:
        name, k = stem, 1
        while name in self._taken:
            k += 1
            name = f"{stem}.{k}"
        self._taken.add(name)
        return name

    def _engine_name(self, t: Tensor) -> str:
        return self.constant(t) if isinstance(t, Known) else t.name

    def _dtype(self, t: Tensor) -> DType:
        if isinstance(t, Sym):
            return t.dtype
        return DType(engine_array(t.array).dtype.name)

    def _check_size(self, t: TensorType) -> None:
        if t.rank > self.limits.max_rank:
            raise ModelError(f"it would make a tensor of rank {t.rank}; the limit is "
                             f"{self.limits.max_rank}", field="limits", limit=True)
        if t.size > self.limits.max_elements:
            raise ModelError(f"it would make a tensor of {t.size} elements per example; the "
                             f"limit is {self.limits.max_elements}", field="limits",
                             limit=True)


def _live(nodes: Sequence[Node], outputs: Sequence[str]) -> set[str]:
    """The names the outputs depend on."""
    live = set(outputs)
    for node in reversed(nodes):
        if node.name in live:
            live.update(node.inputs)
    return live

