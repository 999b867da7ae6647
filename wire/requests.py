"""Requests: building ``ComputeRequest`` messages, and decoding received ones without ever
raising.

The client builds a request from engine graphs and numpy values (:func:`request`). The server
decodes what arrives with :func:`tolerant`: bytes that are not a valid message become a
:class:`Malformed` value, which its handler answers with INVALID_ARGUMENT (:func:`decoded`),
logging at most one line per interval about them however many arrive. A large request's
tensors are not copied out of the received bytes (:func:`detaching`, ``bulk``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any, Generic, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message
from numpy.typing import NDArray

from gradserve.engine import Graph
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.bulk import RawData, parse_detached
from gradserve.wire.graphs import graph_to_wire
from gradserve.wire.status import invalid
from gradserve.wire.tensors import tensors_to_wire

log = logging.getLogger("gradserve.wire")
LOG_INTERVAL = 10.0  # seconds between two log lines about malformed requests
DETACH_BYTES = 1 << 20  # tensors this large stay in the bytes a request arrived in
TENSOR_OVERHEAD = 1024  # bytes a decoded tensor's objects take beyond its values (a bound)
_ITEMSIZE = {pb.DATA_TYPE_FLOAT32: 4}  # bytes per element by wire dtype; the others take 8
M = TypeVar("M", bound=Message)
T = TypeVar("T")


def request(graph_id: str | None, graph: Graph | None, inputs: Mapping[str, Any], *,
            wrt: Sequence[str] | None = None, upstream: Mapping[str, Any] | None = None,
            batch_size: int | None = None, return_intermediates: bool = False,
            check_gradients: bool = False, request_id: str = "",
            tangents: Mapping[str, Any] | None = None,
            hvp_vectors: Mapping[str, Any] | None = None, jacobian: bool = False,
            hessian: bool = False) -> pb.ComputeRequest:
    """The ComputeRequest message: by graph id when there is one, else the whole graph.
    ``tangents``, ``hvp_vectors``, ``jacobian`` and ``hessian`` ask for a derivative beyond
    the gradient (one per request)."""
    declared = {} if graph is None else {i.name: i.dtype.numpy for i in graph.inputs}
    floats = next((t for t in declared.values() if t.kind == "f"), None)
    message = pb.ComputeRequest(
        request_id=request_id,
        inputs=tensors_to_wire({k: _as_sent(v, declared.get(k)) for k, v in inputs.items()}),
        upstream=tensors_to_wire({k: _as_sent(v, floats) for k, v in (upstream or {}).items()}),
        wrt=list(wrt or ()),
        batch_size=batch_size or 0,
        options=pb.RunOptions(return_intermediates=return_intermediates,
                              check_gradients=check_gradients, jacobian=jacobian,
                              hessian=hessian),
        tangents=tensors_to_wire({k: _as_sent(v, declared.get(k))
                                  for k, v in (tangents or {}).items()}),
        hvp_vectors=tensors_to_wire({k: _as_sent(v, declared.get(k))
                                     for k, v in (hvp_vectors or {}).items()}),
    )
    if graph_id is not None:
        message.graph_id = graph_id
    elif graph is not None:
        message.graph.CopyFrom(graph_to_wire(graph))
    return message


def _as_sent(value: Any, declared: np.dtype[Any] | None) -> NDArray[Any]:
    """Plain numbers and lists take the declared dtype when that loses nothing of their kind
    (1.9 is not quietly sent as label 1: the server refuses it instead); numpy values keep
    theirs."""
    arr = np.asarray(value)
    if (declared is not None and not isinstance(value, np.ndarray | np.generic)
            and np.can_cast(arr.dtype, declared, "same_kind")):
        return arr.astype(declared)
    return arr



@dataclass(frozen=True, slots=True)
class Malformed:
    """Bytes a client sent that do not decode as a message of type ``message``."""

    message: str  # the message's full name, e.g. gradserve.v1.ComputeRequest
    size: int  # bytes received


def tolerant(message: type[M]) -> Callable[[bytes], M | Malformed]:
    """A request deserializer for ``message`` that returns :class:`Malformed` where
    ``FromString`` would raise."""
    name = message.DESCRIPTOR.full_name

    def decode(data: bytes) -> M | Malformed:
        try:
            return message.FromString(data)
        except DecodeError:
            return Malformed(name, len(data))

    return decode


@dataclass(frozen=True, slots=True)
class Detached(Generic[M]):
    """A request whose large tensors' raw_data was left in the received bytes: ``raw`` holds
    views of it by map field and key (see ``bulk.parse_detached``)."""

    message: M
    raw: RawData
    size: int  # bytes received


def detaching(message: type[M], fields: Collection[str]) -> Callable[[bytes], Detached[M] |
                                                                   Malformed]:
    """A request deserializer like :func:`tolerant`'s that leaves the raw_data of tensors of at
    least DETACH_BYTES in ``fields`` in the received bytes (saving two copies of each)."""
    plain = tolerant(message)

    def decode(data: bytes) -> Detached[M] | Malformed:
        if len(data) < DETACH_BYTES:
            got = plain(data)
            return got if isinstance(got, Malformed) else Detached(got, {}, len(data))
        try:
            return Detached(*parse_detached(message, data, fields, DETACH_BYTES), len(data))
        except DecodeError:
            return Malformed(message.DESCRIPTOR.full_name, len(data))

    return decode


class _Throttle:
    """Says whether to log now: at most once per ``interval`` seconds; counts what it held."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = 0.0
        self.held = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            self.held += 1
            return False
        self._next = now + self._interval
        return True


_malformed_log = _Throttle(LOG_INTERVAL)


def decoded(request: T | Malformed) -> T:
    """``request`` as decoded, or INVALID_ARGUMENT (a RequestError) for malformed bytes."""
    if isinstance(request, Malformed):
        if _malformed_log.ready():
            held, _malformed_log.held = _malformed_log.held, 0
            log.warning("refused %d bytes that are not a valid %s (and %d more malformed "
                        "requests in the last %g s)", request.size, request.message, held,
                        LOG_INTERVAL)
        raise invalid("request", f"not a valid {request.message} message: the bytes are "
                      "truncated or corrupt")
    return request


def request_elements(request: pb.ComputeRequest) -> int:
    """The elements a request's tensors hold, by their shapes (ByteSize would encode the
    message, which takes as long as copying it)."""
    return sum(prod(t.shape) for tensors in (request.inputs, request.upstream)
               for t in tensors.values())


def decode_cost(request: pb.ComputeRequest) -> int:
    """About how many bytes a request's tensors take decoded: their values, and
    TENSOR_OVERHEAD for each tensor's objects (a million tiny tensors cost far more as objects
    than as bytes on the wire). Read from the shapes alone, before anything is decoded."""
    return sum(prod(t.shape) * _ITEMSIZE.get(t.dtype, 8) + TENSOR_OVERHEAD
               for tensors in (request.inputs, request.upstream) for t in tensors.values())
