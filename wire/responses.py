"""Responses: engine results into ``ComputeResponse`` messages, and back into arrays.

The server encodes a result as a message (:func:`encode_response`) or, when it is large, as
bytes written straight from the arrays' memory (:func:`serialise_response`, ``bulk``). The
client decodes a response into :class:`Gradients`, numpy arrays by name, without copying.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from numpy.typing import NDArray

from gradserve.engine import Result
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.bulk import serialize_with_tensors
from gradserve.wire.requests import DETACH_BYTES
from gradserve.wire.tensors import tensors_from_wire, tensors_into_wire


@dataclass(frozen=True)
class Gradients:
    """A computation's results, numpy arrays by name. Batched requests lead with the batch axis."""

    outputs: dict[str, NDArray[Any]]
    gradients: dict[str, NDArray[Any]]
    nonfinite: list[bool]
    values: dict[str, NDArray[Any]] = field(default_factory=dict)
    value_gradients: dict[str, NDArray[Any]] = field(default_factory=dict)
    gradient_checks: dict[str, pb.GradientCheck] = field(default_factory=dict)

    @property
    def output(self) -> NDArray[Any]:
        """The value of the only output."""
        (value,) = self.outputs.values()
        return value


def decode_response(response: pb.ComputeResponse) -> Gradients:
    """Gradients from a ComputeResponse (arrays decoded without copying)."""
    return Gradients(
        outputs=tensors_from_wire(response.outputs, "outputs"),
        gradients=tensors_from_wire(response.gradients, "gradients"),
        nonfinite=list(response.nonfinite),
        values=tensors_from_wire(response.values, "values"),
        value_gradients=tensors_from_wire(response.value_gradients, "value_gradients"),
        gradient_checks=dict(response.gradient_checks),
    )



def encode_response(request_id: str, result: Result) -> pb.ComputeResponse:
    """The response carrying ``result`` (thread-safe)."""
    response = _bare(request_id, result)
    for name, arrays in _tensors(result).items():
        tensors_into_wire(getattr(response, name), arrays)
    return response


def serialise_response(request_id: str, result: Result) -> bytes:
    """The bytes of :func:`encode_response`'s message, large tensors written straight from
    the arrays' memory (thread-safe)."""
    return serialize_with_tensors(_bare(request_id, result), _tensors(result), DETACH_BYTES)


def _bare(request_id: str, result: Result) -> pb.ComputeResponse:
    """The response without ``result``'s tensors."""
    response = pb.ComputeResponse(request_id=request_id)
    response.nonfinite.extend(result.nonfinite.ravel().tolist())
    return response


def _tensors(result: Result) -> dict[str, Mapping[str, Any]]:
    """``result``'s tensors by the response's map field."""
    return {"outputs": result.outputs, "gradients": result.gradients,
            "values": result.values or {}, "value_gradients": result.value_gradients or {}}
