"""The wire codec: gradserve.v1 messages to the engine's own types and back.

Both sides use it: the server decodes requests into engine graphs and arrays and encodes
results; the client does the reverse. Every problem with a message raises :class:`WireError`
naming the offending field by its path in the message (``inputs.x``, ``graph.constants[2]``),
which the server reports as a ``google.rpc.BadRequest`` field violation.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterator, Mapping, MutableMapping
from math import prod
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import Message
from numpy.typing import NDArray

from gradserve.engine import Constant, DType, Graph, Input, Node
from gradserve.engine.ops import AttrValue
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
_LENGTH_DELIMITED = 2  # the wire type of bytes, strings and messages
M = TypeVar("M", bound=Message)
RawData = dict[str, dict[str, memoryview]]  # map field -> key -> a tensor's raw_data, in place


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
    ``raw_data`` is the tensor's when :func:`parse_detached` left it out of ``t``."""
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
    if dtype is DType.INT64 and doubles and not np.all(arr == np.round(arr)):
        raise WireError(f"{field}.double_data", "INT64 values must be integral")
    decoded: NDArray[Any] = arr.astype(layout, copy=False).reshape(shape)
    return decoded


def tensor_to_wire(value: Any, *, raw: bool = True) -> pb.Tensor:
    """Encode an array (its dtype must be float64, float32 or int64) as a Tensor."""
    message = pb.Tensor()
    write_tensor(message, value, raw=raw)
    return message


def write_tensor(message: pb.Tensor, value: Any, *, raw: bool = True) -> None:
    """Encode an array into ``message`` (a fresh Tensor, or a map entry of a message being
    built, which saves building a Tensor and copying it in)."""
    arr = np.asarray(value)
    message.dtype = _wire_dtype(arr)
    message.shape[:] = arr.shape
    if raw:
        message.raw_data = _little_endian(arr).tobytes()
    else:
        values = arr.ravel().tolist()
        (message.int64_data if arr.dtype.kind == "i" else message.double_data)[:] = values


def _wire_dtype(arr: NDArray[Any]) -> pb.DataType.ValueType:
    wire = _WIRE_OF.get(arr.dtype)
    if wire is None:
        raise ValueError(f"cannot send dtype {arr.dtype}; use float64, float32 or int64")
    return wire


def _little_endian(arr: NDArray[Any]) -> NDArray[Any]:
    """``arr`` in the wire's byte order (itself on a little-endian host)."""
    if _LITTLE_ENDIAN_HOST and arr.dtype.isnative:
        return arr
    return arr.astype(arr.dtype.newbyteorder("<"))


def attribute_from_wire(value: pb.AttributeValue, field: str) -> AttrValue:
    """An attribute's Python value (ints become a tuple)."""
    kind = value.WhichOneof("value")
    if kind is None:
        raise WireError(field, "the attribute has no value")
    if kind == "ints_value":
        return tuple(int(i) for i in value.ints_value.values)
    result: AttrValue = getattr(value, kind)
    return result


def attribute_to_wire(value: AttrValue) -> pb.AttributeValue:
    """An attribute's wire form."""
    if isinstance(value, bool):
        return pb.AttributeValue(bool_value=value)
    if isinstance(value, int):
        return pb.AttributeValue(int_value=value)
    if isinstance(value, str):
        return pb.AttributeValue(string_value=value)
    return pb.AttributeValue(ints_value=pb.IntList(values=list(value)))


def graph_from_wire(g: pb.Graph, field: str = "graph", max_elements: int = 1 << 28,
                    max_nodes: int | None = None) -> Graph:
    """The engine graph a Graph message describes (the engine validates its structure).

    With ``max_nodes``, a graph of more nodes (or inputs, constants and outputs together), as
    the engine counts them, is refused before anything is decoded: building a million nodes
    would take seconds and a gigabyte first."""
    for what, count in (("nodes", len(g.nodes)),
                        ("inputs", len(g.inputs) + len(g.constants) + len(g.outputs))):
        if max_nodes is not None and count > max_nodes:
            raise WireError(f"{field}.{what}", f"the graph has {count} {what}; the limit is "
                                               f"{max_nodes}")
    inputs = tuple(
        Input(i.name, shape_from_wire(i.shape, f"{field}.inputs[{k}].shape", max_elements),
              dtype_from_wire(i.dtype, f"{field}.inputs[{k}].dtype"),
              i.requires_grad if i.HasField("requires_grad") else True)
        for k, i in enumerate(g.inputs)
    )
    constants = tuple(
        Constant(c.name, tensor_from_wire(c.value, f"{field}.constants[{k}].value", max_elements))
        for k, c in enumerate(g.constants)
    )
    nodes = tuple(
        Node(n.name, n.op, tuple(n.inputs),
             {name: attribute_from_wire(v, f"{field}.nodes[{k}].attributes.{name}")
              for name, v in n.attributes.items()})
        for k, n in enumerate(g.nodes)
    )
    return Graph(inputs, nodes, tuple(g.outputs), constants)


def graph_to_wire(graph: Graph, *, raw: bool = True) -> pb.Graph:
    """The Graph message for an engine graph."""
    return pb.Graph(
        inputs=[pb.Input(name=i.name, dtype=_WIRE[i.dtype], shape=i.shape,
                         requires_grad=i.requires_grad) for i in graph.inputs],
        constants=[pb.Constant(name=c.name, value=tensor_to_wire(c.value, raw=raw))
                   for c in graph.constants],
        nodes=[pb.Node(name=n.name, op=n.op, inputs=n.inputs,
                       attributes={k: attribute_to_wire(v) for k, v in n.attrs.items()})
               for n in graph.nodes],
        outputs=graph.outputs,
    )


def tensors_from_wire(tensors: Mapping[str, pb.Tensor], field: str,
                      max_elements: int = 1 << 28,
                      raw_data: Mapping[str, memoryview] | None = None
                      ) -> dict[str, NDArray[Any]]:
    """Decode a map of named tensors (``raw_data``: those :func:`parse_detached` left out)."""
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


# --- large tensors, straight between arrays and message bytes -------------------------------
# Setting raw_data copies an array's bytes twice (tobytes, then into the message) and
# serialising copies them again; reading raw_data copies them out of the message. For tensors
# of many megabytes those copies dominate a call, so the two functions below write such
# tensors' entries by hand from the array's memory and read them as views of the received
# bytes. The layout is protobuf's: a map entry is a message of key (field 1) and value (2).


def serialize_with_tensors(message: Message, maps: Mapping[str, Mapping[str, Any]],
                           min_bytes: int) -> bytes:
    """``message`` serialised with ``maps[field][name]`` as entries of its map<string, Tensor>
    fields; an array of at least ``min_bytes`` bytes is written straight from its memory, in
    the one copy joining the parts makes."""
    parts: list[bytes | memoryview] = []
    for field, arrays in maps.items():
        number = message.DESCRIPTOR.fields_by_name[field].number
        for name, value in arrays.items():
            arr = np.asarray(value)
            if arr.nbytes < min_bytes:
                write_tensor(getattr(message, field)[name], arr)
            else:
                parts += _tensor_entry(number, name, arr)
    return b"".join([message.SerializeToString(), *parts])


def _tensor_entry(number: int, key: str, arr: NDArray[Any]) -> list[bytes | memoryview]:
    """A map<string, Tensor> entry of field ``number``: its header, then the array's bytes."""
    body = np.ascontiguousarray(_little_endian(arr)).data.cast("B")
    tensor = (pb.Tensor(dtype=_wire_dtype(arr), shape=arr.shape).SerializeToString()
              + _delimited(3, len(body)))
    name = key.encode()
    entry = _delimited(1, len(name)) + name + _delimited(2, len(tensor) + len(body)) + tensor
    return [_delimited(number, len(entry) + len(body)) + entry, body]


def _delimited(number: int, length: int) -> bytes:
    """The tag and length that start a length-delimited field."""
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(length)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _UnplainError(Exception):
    """Bytes laid out in a way :func:`parse_detached` leaves to protobuf."""


def parse_detached(message: type[M], data: bytes, fields: Collection[str],
                   min_bytes: int) -> tuple[M, RawData]:
    """Parse ``data`` as ``message``, leaving in ``data`` the raw_data of every tensor of at
    least ``min_bytes`` bytes in its map<string, Tensor> ``fields``: the message holds such
    tensors without it, and ``raw[field][key]`` is a read-only view of it (no copy). Bytes
    laid out otherwise than plainly (a key given twice, say) are parsed whole; bytes that are
    not a valid message raise DecodeError."""
    numbers = {message.DESCRIPTOR.fields_by_name[f].number: f for f in fields}
    view = memoryview(data)
    kept: list[memoryview] = []
    detached: list[tuple[str, str, bytes, memoryview]] = []
    try:
        for number, kind, first, start, end in _fields(view, 0, len(view)):
            split = (_split_entry(view, start, end, min_bytes) if number in numbers and
                     kind == _LENGTH_DELIMITED and end - start >= min_bytes else None)
            if split is None:
                kept.append(view[first:end])
            else:
                detached.append((numbers[number], *split))
    except (_UnplainError, IndexError, UnicodeDecodeError):
        detached = []
    if not detached:
        return message.FromString(data), {}
    parsed = message.FromString(b"".join(kept))
    raw: RawData = {}
    for field, key, header, body in detached:
        entries = getattr(parsed, field)
        if key in entries or key in raw.get(field, {}):  # the last would win: parse whole
            return message.FromString(data), {}
        entries[key].MergeFromString(header)
        raw.setdefault(field, {})[key] = body
    return parsed, raw


def _split_entry(view: memoryview, start: int, end: int,
                 min_bytes: int) -> tuple[str, bytes, memoryview] | None:
    """A map<string, Tensor> entry's key, its Tensor's bytes but raw_data, and raw_data; None
    unless the entry is one key and one Tensor of one raw_data of at least ``min_bytes``."""
    fields = list(_fields(view, start, end))
    entry = {number: (value, after) for number, kind, _, value, after in fields
             if kind == _LENGTH_DELIMITED}
    if len(fields) != 2 or sorted(entry) != [1, 2]:
        return None
    header: list[memoryview] = []
    raw: list[memoryview] = []
    for number, kind, first, value, after in _fields(view, *entry[2]):
        if number == 3 and kind == _LENGTH_DELIMITED:
            raw.append(view[value:after])
        else:
            header.append(view[first:after])
    if len(raw) != 1 or len(raw[0]) < min_bytes:
        return None
    return bytes(view[slice(*entry[1])]).decode(), b"".join(header), raw[0]


def _fields(view: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Each field of the message in ``view[start:end]``: its number, wire type, where its tag
    starts, where its value starts (a length-delimited one's after the length), and its end."""
    at = start
    while at < end:
        first = at
        tag, at = _read_varint(view, at)
        kind = tag & 7
        if kind == 0:
            _, after = _read_varint(view, at)
        elif kind == _LENGTH_DELIMITED:
            length, at = _read_varint(view, at)
            after = at + length
        elif kind in (1, 5):  # fixed 64 and 32 bits
            after = at + (8 if kind == 1 else 4)
        else:  # groups, and invalid wire types
            raise _UnplainError
        if after > end:
            raise _UnplainError
        yield tag >> 3, kind, first, at, after
        at = after


def _read_varint(view: memoryview, at: int) -> tuple[int, int]:
    """The varint at ``at`` and where it ends (IndexError past the end)."""
    value = shift = 0
    while True:
        byte = view[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise _UnplainError
