"""Responses: engine results into ``ComputeResponse`` messages, and back into arrays.

The server encodes a result as a message (:func:`encode_response`) or, when it is large, as
bytes written straight from the arrays' memory (:func:`serialise_response`, ``bulk``). The
client decodes a response into :class:`Gradients`, numpy arrays by name, without copying.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from numpy.typing import NDArray

from gradserve.engine import Graph, Result
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
    jvp: dict[str, NDArray[Any]] = field(default_factory=dict)  # by output
    hvp: dict[str, NDArray[Any]] = field(default_factory=dict)  # by input
    # (output, input) and (input, input) blocks of the dense Jacobian and Hessian
    jacobian: dict[tuple[str, str], NDArray[Any]] = field(default_factory=dict)
    hessian: dict[tuple[str, str], NDArray[Any]] = field(default_factory=dict)

    @property
    def output(self) -> NDArray[Any]:
        """The value of the only output (a graph of several: read them from ``outputs``)."""
        if len(self.outputs) != 1:
            raise ValueError(f"the graph has {len(self.outputs)} outputs "
                             f"({', '.join(self.outputs)}): read each from .outputs[name]")
        (value,) = self.outputs.values()
        return value


def decode_response(response: pb.ComputeResponse, graph: Graph | None = None) -> Gradients:
    """Gradients from a ComputeResponse (arrays decoded without copying). A message's maps
    come in no particular order: given the ``graph``, outputs and gradients are put in its
    order of outputs and inputs."""
    outputs = tensors_from_wire(response.outputs, "outputs")
    gradients = tensors_from_wire(response.gradients, "gradients")
    if graph is not None:
        outputs = _ordered(outputs, graph.outputs)
        gradients = _ordered(gradients, [i.name for i in graph.inputs])
    return Gradients(
        outputs=outputs,
        gradients=gradients,
        nonfinite=list(response.nonfinite),
        values=tensors_from_wire(response.values, "values"),
        value_gradients=tensors_from_wire(response.value_gradients, "value_gradients"),
        gradient_checks=dict(response.gradient_checks),
        jvp=_ordered(tensors_from_wire(response.jvp, "jvp"), graph.outputs if graph else ()),
        hvp=_ordered(tensors_from_wire(response.hvp, "hvp"),
                     [i.name for i in graph.inputs] if graph else ()),
        jacobian=_blocks(response.jacobian, "jacobian"),
        hessian=_blocks(response.hessian, "hessian"),
    )


def _blocks(blocks: Sequence[pb.DerivativeBlock], field: str) -> dict[tuple[str, str],
                                                                       NDArray[Any]]:
    return {(b.row, b.column): tensors_from_wire({"value": b.value}, f"{field}[{k}]")["value"]
            for k, b in enumerate(blocks)}



def _ordered(arrays: dict[str, NDArray[Any]], names: Sequence[str]) -> dict[str, NDArray[Any]]:
    """``arrays`` in the order of ``names`` (any others after them)."""
    return {**{n: arrays[n] for n in names if n in arrays}, **arrays}


def encode_response(request_id: str, result: Result,
                    signature: pb.GraphSignature | None = None) -> pb.ComputeResponse:
    """The response carrying ``result`` (and the graph's ``signature``, when given;
    thread-safe)."""
    response = _bare(request_id, result, signature)
    for name, arrays in _tensors(result).items():
        tensors_into_wire(getattr(response, name), arrays)
    return response


def serialise_response(request_id: str, result: Result,
                       signature: pb.GraphSignature | None = None) -> bytes:
    """The bytes of :func:`encode_response`'s message, large tensors written straight from
    the arrays' memory (thread-safe)."""
    return serialize_with_tensors(_bare(request_id, result, signature), _tensors(result),
                                  DETACH_BYTES)


def _bare(request_id: str, result: Result,
          signature: pb.GraphSignature | None) -> pb.ComputeResponse:
    """The response without ``result``'s tensors."""
    response = pb.ComputeResponse(request_id=request_id, signature=signature)
    response.nonfinite.extend(result.nonfinite.ravel().tolist())
    return response


def _tensors(result: Result) -> dict[str, Mapping[str, Any]]:
    """``result``'s tensors by the response's map field."""
    return {"outputs": result.outputs, "gradients": result.gradients,
            "values": result.values or {}, "value_gradients": result.value_gradients or {}}
