"""One ONNX node as a converter sees it: its inputs as importer values, its attributes typed.

Reading is checked: an attribute of the wrong type, an input that must be known at import but
depends on the model's inputs, an output the importer does not compute, each is a
:class:`ModelError` naming the node, its op type and opset and the field. The view remembers
which attributes were read, so an attribute no converter understood is refused instead of
silently ignored (it could change what the op computes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

from gradserve.importer.emitter import Emitter, Known, Missing, Tensor, Value
from gradserve.importer.errors import ModelError

_KIND = onnx.AttributeProto.AttributeType


class NodeView:
    """The node ``proto`` (the ``index``-th of its graph), whose op is at version ``version``
    of its schema under the model's ``opset``; ``inputs`` holds a value per input name (None
    for an omitted optional input)."""

    def __init__(self, proto: onnx.NodeProto, index: int, version: int, opset: int,
                 inputs: Sequence[Value | None], emitter: Emitter) -> None:
        self.proto = proto
        self.index = index
        self.version = version
        self.opset = opset
        self.op_type = proto.op_type
        self.name = proto.name or (proto.output[0] if proto.output else f"node {index}")
        self.outputs: tuple[str, ...] = tuple(proto.output)
        self._inputs = inputs
        self._emitter = emitter
        self._attrs = {a.name: a for a in proto.attribute}
        self._read: set[str] = set()

    # --- errors -----------------------------------------------------------------------------

    def error(self, message: str, field: str | None = None,
              limit: bool = False) -> ModelError:
        """A :class:`ModelError` at this node; ``field`` within it (``"attribute.axis"``)."""
        where = f"graph.node[{self.index}]" + (f".{field}" if field else "")
        return ModelError(message, node=self.name, op_type=self.op_type, opset=self.opset,
                          field=where, limit=limit)

    # --- inputs -----------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """How many inputs the node lists (omitted optional ones included)."""
        return len(self._inputs)

    def raw(self, k: int) -> Tensor:
        """Input ``k`` as the engine holds it (a batched value may be squeezed)."""
        value = self._inputs[k] if k < len(self._inputs) else None
        if value is None:
            raise self.error(f"{self.op_type} needs input {k}", f"input[{k}]")
        if isinstance(value, Missing):
            raise self.error(f"input {k} ({self.proto.input[k]!r}) is not computed: "
                             f"{value.reason}", f"input[{k}]")
        return value

    def value(self, k: int) -> Tensor:
        """Input ``k`` with every axis the model gives it (what most converters take)."""
        return self._emitter.full(self.raw(k))

    def optional(self, k: int) -> Tensor | None:
        """Optional input ``k``, or None when omitted."""
        if k >= len(self._inputs) or self._inputs[k] is None:
            return None
        return self.value(k)

    def known(self, k: int) -> NDArray[Any]:
        """Input ``k``, which must be known at import (a shape, axes, a bound)."""
        value = self.raw(k)
        if not isinstance(value, Known):
            raise self.error(f"input {k} ({self.proto.input[k]!r}) must be known when the model "
                             "is imported, but it depends on the model's inputs",
                             f"input[{k}]")
        return value.array

    def optional_known(self, k: int) -> NDArray[Any] | None:
        """Optional input ``k`` known at import, or None when omitted."""
        if k >= len(self._inputs) or self._inputs[k] is None:
            return None
        return self.known(k)

    def known_ints(self, k: int) -> tuple[int, ...]:
        """Input ``k`` as a tuple of ints, known at import (a shape, axes)."""
        ints = self.optional_ints(k)
        if ints is None:
            raise self.error(f"{self.op_type} needs input {k}", f"input[{k}]")
        return ints

    def optional_ints(self, k: int) -> tuple[int, ...] | None:
        """Optional input ``k`` as a tuple of ints known at import, or None when omitted."""
        arr = self.optional_known(k)
        if arr is None:
            return None
        if not np.issubdtype(arr.dtype, np.integer):
            raise self.error(f"input {k} must be integers, not {arr.dtype}", f"input[{k}]")
        return tuple(int(v) for v in arr.reshape(-1))

    # --- attributes -------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        """Whether the node sets attribute ``name``."""
        return name in self._attrs

    def int_(self, name: str, default: int) -> int:
        value = self._get(name, _KIND.INT)
        return default if value is None else int(value)

    def float_(self, name: str, default: float) -> float:
        value = self._get(name, _KIND.FLOAT)
        return default if value is None else float(value)

    def string(self, name: str, default: str) -> str:
        value = self._get(name, _KIND.STRING)
        return default if value is None else bytes(value).decode()

    def ints(self, name: str) -> tuple[int, ...] | None:
        value = self._get(name, _KIND.INTS)
        return None if value is None else tuple(int(v) for v in value)

    def tensor(self, name: str) -> onnx.TensorProto | None:
        value = self._get(name, _KIND.TENSOR)
        return None if value is None else value

    def attr(self, name: str) -> Any:
        """Attribute ``name``'s value, of whatever type it has, or None when absent."""
        attr = self._attrs.get(name)
        return self._get(name, attr.type) if attr is not None else None

    def ignore(self, *names: str) -> None:
        """Mark attributes as understood though unused (momentum of an inference batch norm)."""
        self._read.update(names)

    def unread(self) -> list[str]:
        """The attributes the converter did not read."""
        return [name for name in self._attrs if name not in self._read]

    def _get(self, name: str, kind: int) -> Any:
        self._read.add(name)
        attr = self._attrs.get(name)
        if attr is None:
            return None
        if attr.type != kind:
            raise self.error(f"attribute {name!r} must be {_KIND.Name(kind)}, not "
                             f"{_KIND.Name(attr.type)}", f"attribute.{name}")
        return onnx.helper.get_attribute_value(attr)

    # --- axes -------------------------------------------------------------------------------

    def axis(self, axis: int, rank: int, field: str) -> int:
        """``axis`` of a rank-``rank`` tensor as a non-negative index, or an error."""
        if not -rank <= axis < rank:
            raise self.error(f"axis {axis} is out of range for rank {rank}", field)
        return axis % rank

    def axes(self, axes: Sequence[int], rank: int, field: str) -> tuple[int, ...]:
        """Several axes, normalised, without repeats, in order."""
        out = sorted({self.axis(a, rank, field) for a in axes})
        if len(out) != len(axes):
            raise self.error(f"axes {list(axes)} repeat an axis", field)
        return tuple(out)
