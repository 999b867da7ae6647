"""What a run hands back: :class:`Result`, and building it from a program's registers.

A result's arrays belong to the caller: writeable, aliasing nothing the caller fed or the plan
holds. Only an input with a differentiable path to an output gets a gradient; one without (an
unused input, a ``where`` condition) gets no entry, as PyTorch's autograd returns None for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from gradserve.engine.plan import Backward, Plan


@dataclass(frozen=True)
class Result:
    """What a run returns. Arrays are numpy arrays; in a batched run each leads with the batch axis.

    ``gradients`` holds one per input differentiated that an output depends on through
    differentiable steps (an input without such a path gets none). ``values`` and
    ``value_gradients`` hold every named value and every gradient the backward pass formed,
    when ``keep_intermediates`` was asked for.
    """

    outputs: dict[str, NDArray[Any]]
    gradients: dict[str, NDArray[Any]]
    batch: int | None = None
    values: dict[str, NDArray[Any]] | None = None
    value_gradients: dict[str, NDArray[Any]] | None = None

    @property
    def batched(self) -> bool:
        return self.batch is not None

    @cached_property
    def nonfinite(self) -> NDArray[np.bool_]:
        """Whether an output or gradient (or a kept intermediate) holds a NaN or an infinity:
        one flag, or one per example when batched. Computed when first asked for."""
        arrays = [*self.outputs.values(), *self.gradients.values(),
                  *(self.values or {}).values(), *(self.value_gradients or {}).values()]
        return _nonfinite(arrays, self.batch)

    def split(self) -> list[Result]:
        """A batched result as one result per example (views, no copies)."""
        if self.batch is None:
            raise ValueError("split() needs a batched result")
        return [self.part(k) for k in range(self.batch)]

    def part(self, index: int | slice) -> Result:
        """Some examples of a batched result, as views: one example (an int: the part is
        unbatched) or a run of them (a slice). Their non-finite flags are sliced from this
        result's, which are computed once for the whole batch."""
        if self.batch is None:
            raise ValueError("part() needs a batched result")

        def take(d: dict[str, NDArray[Any]] | None) -> dict[str, NDArray[Any]] | None:
            return None if d is None else {name: a[index] for name, a in d.items()}

        batch = None if isinstance(index, int) else len(range(self.batch)[index])
        part = Result(take(self.outputs) or {}, take(self.gradients) or {}, batch,
                      take(self.values), take(self.value_gradients))
        part.__dict__["nonfinite"] = self.nonfinite[index]  # fills the cached property
        return part


def collect(plan: Plan, vals: list[Any], grads: list[Any], seeds: Sequence[Any],
            backward: Backward, batch: int | None, keep: bool) -> Result:
    """The run's outputs and gradients (and, with ``keep``, every value and gradient) as
    arrays the caller owns: writeable, aliasing neither each other nor what the caller or the
    plan own (fed inputs, upstream gradients, constants). Fresh arrays are handed out as they
    are, once; views (a reshape, a slice, a broadcast) and owned arrays are copied. ``vals``
    and ``grads`` hold every slot's value and gradient (None: no gradient was formed)."""
    taken = {*map(id, vals[: len(plan.inputs)]), *map(id, seeds), *plan.constant_ids}

    def owned(slot: int, x: Any) -> NDArray[Any]:
        dtype = plan.types[slot].numpy_dtype
        if batch is not None and not plan.batched[slot]:  # shared by all examples
            x = np.broadcast_to(x, (batch, *plan.types[slot].shape))
        if type(x) is not np.ndarray or x.dtype != dtype:
            x = np.asarray(x, dtype=dtype)  # a numpy scalar (or a view): into an array
        arr: NDArray[Any] = x.copy() if x.base is not None or id(x) in taken else x
        taken.add(id(arr))
        return arr

    outputs = {n: owned(s, vals[s]) for n, s in plan.output_slots}
    gradients = {plan.names[s]: owned(s, grads[s]) for s in backward.inputs
                 if grads[s] is not None}
    values = value_grads = None
    if keep:
        values = {n: owned(s, vals[s]) for s, n in enumerate(plan.names)}
        value_grads = {n: owned(s, grads[s]) for s, n in enumerate(plan.names)
                       if grads[s] is not None}
    return Result(outputs, gradients, batch, values, value_grads)


def _nonfinite(arrays: Sequence[NDArray[Any]], batch: int | None) -> NDArray[np.bool_]:
    """Per example (or overall, unbatched): does any of ``arrays`` hold a NaN or an infinity?
    A finite sum screens an array cheaply (a NaN or infinity makes the sum non-finite); only
    when it is not is the array inspected element by element."""
    flag = np.zeros(() if batch is None else batch, dtype=bool)
    for a in arrays:
        if a.dtype.kind != "f" or math.isfinite(a if a.ndim == 0 else np.sum(a)):
            continue
        finite = np.isfinite(a)
        flag |= ~finite.all() if batch is None else ~finite.reshape(batch, -1).all(axis=1)
    return flag
