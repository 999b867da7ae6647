"""Derivatives beyond the gradient on the wire: which one a ComputeRequest asks for (tangents,
hvp_vectors, options.jacobian, options.hessian: at most one), and the answer's fields.

The engine computes them (``gradserve.engine.derivatives``); this maps the contract onto it.
"""

from __future__ import annotations

from gradserve.engine.derivatives import Answer, Kind
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.status import invalid
from gradserve.wire.tensors import tensor_to_wire, tensors_into_wire


def kind_of(request: pb.ComputeRequest) -> Kind | None:
    """The derivative ``request`` asks for beyond the gradient, if any (INVALID_ARGUMENT for
    more than one, or one with return_intermediates or check_gradients)."""
    asked = [kind for kind, wanted in ((Kind.JVP, bool(request.tangents)),
                                       (Kind.HVP, bool(request.hvp_vectors)),
                                       (Kind.JACOBIAN, request.options.jacobian),
                                       (Kind.HESSIAN, request.options.hessian)) if wanted]
    if not asked:
        return None
    field = DERIVATIVE_FIELDS[asked[0]]
    if len(asked) > 1:
        raise invalid(field, f"ask for one of tangents, hvp_vectors, options.jacobian and "
                      f"options.hessian per request, not {len(asked)}")
    if request.options.return_intermediates or request.options.check_gradients:
        raise invalid(field, "a derivative beyond the gradient goes without "
                      "options.return_intermediates and options.check_gradients")
    return asked[0]


# The request field each kind is asked by, which its refusals name.
DERIVATIVE_FIELDS = {Kind.JVP: "tangents", Kind.HVP: "hvp_vectors",
                     Kind.JACOBIAN: "options.jacobian", Kind.HESSIAN: "options.hessian"}


def answer_to_wire(request_id: str, answer: Answer, kind: Kind,
                   batch: int | None) -> pb.ComputeResponse:
    """The response carrying a derivative request's answer (of ``batch`` examples)."""
    response = pb.ComputeResponse(request_id=request_id, nonfinite=answer.nonfinite(batch))
    tensors_into_wire(response.outputs, answer.outputs)
    tensors_into_wire(response.gradients, answer.gradients)
    tensors_into_wire(response.jvp, answer.jvp)
    tensors_into_wire(response.hvp, answer.hvp)
    blocks = response.jacobian if kind is Kind.JACOBIAN else response.hessian
    for (row, column), value in answer.blocks.items():
        blocks.add(row=row, column=column, value=tensor_to_wire(value))
    return response
