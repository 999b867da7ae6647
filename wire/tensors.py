"""Tensors: gradserve.v1 ``Tensor`` messages to numpy arrays and back.

Both sides use it: the server decodes requests' values and encodes results; the client does the
reverse. Every problem with a message raises :class:`WireError` naming the offending field by
its path in the message (``inputs.x``, ``graph.constants[2].value``), which the server reports
as a ``google.rpc.BadRequest`` field violation. Raw data is little-endian, as the contract
states; ``bulk`` writes and reads large tensors without copies.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, MutableMapping
from math import prod
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gradserve.engine import DType
from gradserve.v1 import gradserve_pb2 as pb

# Wire dtypes and their little-endian numpy layouts (the byte order the contract states).
_DTYPES: dict[pb.DataType.ValueType, tuple[DType, np.dtype[Any]]] = {
    pb.DATA_TYPE_FLOAT64: (DType.FLOAT64, np.dtype("<f8")),
    pb.DATA_TYPE_FLOAT32: (DType.FLOAT32, np.dtype("<f4")),
    pb.DATA_TYPE_INT64: (DType.INT64, np.dtype("<i8")),
}
_WIRE = {dtype: wire for wire, (dtype, _) in _DTYPES.items()}
# numpy dtypes (either byte order) to wire dtypes, for encoding without a lookup through DType.
_WIRE_OF = {layout.newbyteorder(order): wire for wire, (_, layout) in _DTYPES.items()
            for order in ("<", ">")}
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
_INT64_END = 2.0**63  # the first double past int64's range (its least is -2^63 exactly)


class WireError(ValueError):
    """A message that cannot be decoded: ``field`` is the path to the offending field."""

    def __init__(self, field: str, description: str) -> None:
        self.field = field
        self.description = description
        super().__init__(f"{field}: {description}")


def dtype_from_wire(value: pb.DataType.ValueType, field: str) -> DType:
    """The engine dtype of a wire ``DataType``, or a WireError naming ``field``."""
    try:
        return _DTYPES[value][0]
    except KeyError:
        raise _dtype_error(value, field) from None


def wire_dtype_of(dtype: DType) -> pb.DataType.ValueType:
    """The wire ``DataType`` of an engine dtype."""
    return _WIRE[dtype]


def _dtype_error(value: int, field: str) -> WireError:
    return WireError(field, f"dtype {value} is not FLOAT64, FLOAT32 or INT64")


def shape_from_wire(dims: Any, field: str, max_elements: int) -> tuple[int, ...]:
    """A checked shape: every dimension at least 1, and no more elements than allowed."""
    shape = tuple(map(int, dims))
    if shape and min(shape) < 1:
        raise WireError(field, f"shape {list(shape)} has a dimension below 1")
    if prod(shape) > max_elements:
        raise WireError(field, f"shape {list(shape)} holds {prod(shape)} elements; the limit "
                        f"is {max_elements}")
    return shape


def tensor_from_wire(t: pb.Tensor, field: str, max_elements: int = 1 << 28,
                     raw_data: bytes | memoryview | None = None) -> NDArray[Any]:
    """Decode a Tensor. Raw data becomes a read-only view of the message's bytes (no copy);
    ``raw_data`` is the tensor's when ``bulk.parse_detached`` left it out of ``t``."""
    try:
        dtype, layout = _DTYPES[t.dtype]
    except KeyError:
        raise _dtype_error(t.dtype, f"{field}.dtype") from None
    dims = t.shape
    shape = shape_from_wire(dims, f"{field}.shape", max_elements) if dims else ()
    count = prod(shape)
    raw = t.raw_data if raw_data is None else raw_data
    doubles, ints = t.double_data, t.int64_data
    if raw and not doubles and not ints:  # the fast path
        if len(raw) != count * layout.itemsize:
            raise WireError(f"{field}.raw_data", f"{len(raw)} bytes do not match {dtype} "
                            f"{list(shape)} ({count} x {layout.itemsize} bytes)")
        return np.frombuffer(raw, dtype=layout).reshape(shape)
    given = [name for name, values in (("raw_data", raw), ("double_data", doubles),
                                       ("int64_data", ints)) if values]
    if len(given) != 1:
        which = " and ".join(given) if given else "none"
        raise WireError(field, "set exactly one of raw_data, double_data, int64_data "
                        f"(got {which})")
    values = doubles or ints
    if len(values) != count:
        raise WireError(f"{field}.{given[0]}", f"{len(values)} values do not match shape "
                        f"{list(shape)} ({count} elements)")
    if ints and dtype is not DType.INT64:
        raise WireError(f"{field}.int64_data", f"int64_data cannot hold {dtype} values")
    arr = np.asarray(values, dtype=np.float64 if doubles else np.int64)
    if dtype is DType.INT64 and doubles:
        _check_integral(arr, f"{field}.double_data")
    decoded: NDArray[Any] = arr.astype(layout, copy=False).reshape(shape)
    return decoded


def _check_integral(doubles: NDArray[Any], field: str) -> None:
    """Doubles for an INT64 tensor must be whole numbers int64 can hold: a cast would turn
    infinities, NaN and numbers past 2^63 into garbage."""
    bad = ~((doubles == np.round(doubles)) & (doubles >= -_INT64_END) & (doubles < _INT64_END))
    if bad.any():
        raise WireError(field, f"INT64 values must be integral and within [-2^63, 2^63), not "
                        f"{float(doubles[bad].flat[0])!r}")


def tensor_to_wire(value: Any, *, raw: bool = True) -> pb.Tensor:
    """Encode an array (its dtype must be float64, float32 or int64) as a Tensor."""
    message = pb.Tensor()
    write_tensor(message, value, raw=raw)
    return message


def write_tensor(message: pb.Tensor, value: Any, *, raw: bool = True) -> None:
    """Encode an array into ``message`` (a fresh Tensor, or a map entry of a message being
    built, which saves building a Tensor and copying it in)."""
    arr = np.asarray(value)
    message.dtype = wire_dtype(arr)
    message.shape[:] = arr.shape
    if raw:
        message.raw_data = little_endian(arr).tobytes()
    else:
        values = arr.ravel().tolist()
        (message.int64_data if arr.dtype.kind == "i" else message.double_data)[:] = values


def wire_dtype(arr: NDArray[Any]) -> pb.DataType.ValueType:
    wire = _WIRE_OF.get(arr.dtype)
    if wire is None:
        raise ValueError(f"cannot send dtype {arr.dtype}; use float64, float32 or int64")
    return wire


def little_endian(arr: NDArray[Any]) -> NDArray[Any]:
    """``arr`` in the wire's byte order (itself on a little-endian host)."""
    if _LITTLE_ENDIAN_HOST and arr.dtype.isnative:
        return arr
    return arr.astype(arr.dtype.newbyteorder("<"))


def tensors_from_wire(tensors: Mapping[str, pb.Tensor], field: str,
                      max_elements: int = 1 << 28,
                      raw_data: Mapping[str, memoryview] | None = None
                      ) -> dict[str, NDArray[Any]]:
    """Decode a map of named tensors (``raw_data``: those ``bulk.parse_detached`` left out)."""
    detached = raw_data or {}
    return {name: tensor_from_wire(t, f"{field}.{name}", max_elements, detached.get(name))
            for name, t in tensors.items()}


def tensors_to_wire(arrays: Mapping[str, Any], *, raw: bool = True) -> dict[str, pb.Tensor]:
    """Encode named arrays."""
    return {name: tensor_to_wire(a, raw=raw) for name, a in arrays.items()}


def tensors_into_wire(target: MutableMapping[str, pb.Tensor], arrays: Mapping[str, Any], *,
                      raw: bool = True) -> None:
    """Encode named arrays into a map field of a message being built."""
    for name, a in arrays.items():
        write_tensor(target[name], a, raw=raw)
