"""Large tensors straight between numpy arrays and message bytes.

Setting raw_data copies an array's bytes twice (tobytes, then into the message) and
serialising copies them again; reading raw_data copies them out of the message. For tensors
of many megabytes those copies dominate a call, so the two functions below write such
tensors' entries by hand from the array's memory and read them as views of the received
bytes. The layout is protobuf's: a map entry is a message of key (field 1) and value (2).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import Message
from numpy.typing import NDArray

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.tensors import little_endian, wire_dtype, write_tensor

_LENGTH_DELIMITED = 2  # the wire type of bytes, strings and messages
M = TypeVar("M", bound=Message)
RawData = dict[str, dict[str, memoryview]]  # map field -> key -> a tensor's raw_data, in place
# Top-level fields parse_detached walks in Python before it leaves the bytes to protobuf: a
# message of large tensors has a few, and walking a million tiny ones would take a second.
MAX_WALKED = 1024


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
    body = np.ascontiguousarray(little_endian(arr)).data.cast("B")
    tensor = (pb.Tensor(dtype=wire_dtype(arr), shape=arr.shape).SerializeToString()
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
    not a valid message raise DecodeError; a message of more than MAX_WALKED fields is parsed
    whole."""
    numbers = {message.DESCRIPTOR.fields_by_name[f].number: f for f in fields}
    view = memoryview(data)
    kept: list[memoryview] = []
    detached: list[tuple[str, str, bytes, memoryview]] = []
    try:
        for walked, (number, kind, first, start, end) in enumerate(_fields(view, 0, len(view))):
            if walked == MAX_WALKED:
                raise _UnplainError
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
