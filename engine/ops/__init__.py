"""The op table: every op the engine knows, by name, each one declarative entry (see ``base``)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from gradserve.engine.ops import (
    compare,
    conv,
    elementwise,
    indexing,
    linalg,
    loss,
    norm,
    pool,
    reduce,
    shape,
)
from gradserve.engine.ops.base import AttrKind, AttrSpec, AttrValue, OpDef, unbroadcast

OP_TABLE: Mapping[str, OpDef] = MappingProxyType(
    {op.name: op for module in (elementwise, compare, reduce, shape, indexing, linalg, conv, pool,
                                norm, loss) for op in module.OPS}
)

__all__ = ["OP_TABLE", "AttrKind", "AttrSpec", "AttrValue", "OpDef", "unbroadcast"]
