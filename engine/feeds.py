"""Feeding a plan: what a run is given (inputs, the inputs to differentiate, upstream
gradients), checked before anything is computed, and running it.

:func:`prepare` checks a run's inputs and options and makes a :class:`Feed`; :meth:`Feed.run`
runs the plan's compiled program (``program.py``) on it and collects the :class:`Result`
(``results.py``). Checking and running are apart so that a caller can refuse a bad request
early and run good ones later, or stack several into one batched run.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from gradserve.engine.errors import Cancelled, EngineError, ErrorKind, check_cancelled
from gradserve.engine.ops.base import Array
from gradserve.engine.results import Result, collect
from gradserve.engine.types import TensorType
from gradserve.engine.validate import overlong

if TYPE_CHECKING:
    from gradserve.engine.plan import Plan


def as_value(arr: NDArray[Any]) -> Any:
    """How a value runs: a 0-d array as a numpy scalar (whose arithmetic is several times
    faster than a 0-d array's), anything else as it is."""
    return arr[()] if arr.ndim == 0 else arr


def feed_error(message: str, name: str | None = None, field: str | None = None) -> EngineError:
    """An error about what the caller fed a plan (inputs, upstream gradients, ``wrt``)."""
    return EngineError(ErrorKind.FEED, message, node=name, field=field)


@dataclass(frozen=True, slots=True)
class Feed:
    """What a run of ``plan`` is fed, checked: the inputs' values by slot, the batch size
    (None unbatched), the input slots to differentiate and the gradient flowing into each
    output. Made by :func:`prepare`; :meth:`run` computes it without checking anything again,
    so a caller can refuse bad feeds early and run good ones later (or stack several)."""

    plan: Plan
    values: tuple[Any, ...]
    batch: int | None
    wrt: frozenset[int]
    seeds: tuple[Any, ...]

    @staticmethod
    def stack(feeds: Sequence[Feed]) -> Feed:
        """One batched feed holding the examples of ``feeds`` (checked feeds of one plan, with
        one choice of inputs to differentiate) in order, to run them all in one pass: an
        unbatched feed adds one example. A LIMIT error if the pass would hold too many
        elements."""
        first = feeds[0]

        def joined(parts: Iterable[tuple[Any, int | None]]) -> Array:
            return np.concatenate([x if batch is not None else np.asarray(x)[None]
                                   for x, batch in parts])

        total = sum(1 if f.batch is None else f.batch for f in feeds)
        _check_total(first.plan, total)
        return Feed(first.plan,
                    tuple(joined((f.values[k], f.batch) for f in feeds)
                          for k in range(len(first.values))),
                    total, first.wrt,
                    tuple(joined((f.seeds[k], f.batch) for f in feeds)
                          for k in range(len(first.seeds))))

    def result_bytes(self, keep_intermediates: bool = False) -> int:
        """The most bytes the arrays a run of this feed hands back can take (its outputs and
        the gradients asked for; with ``keep_intermediates``, every value and gradient), known
        before running it (a gradient no output depends on is not formed, nor handed back)."""
        examples = 1 if self.batch is None else self.batch
        return examples * self.plan.program(self.wrt, keep_intermediates).answer_bytes

    def run(self, *, keep_intermediates: bool = False, time_limit: float | None = None,
            cancelled: Cancelled | None = None, timer: Timer | None = None) -> Result:
        """The forward pass, then the backward pass. Between steps the run stops with a LIMIT
        error once it has taken longer than ``time_limit`` seconds, and with a CANCELLED
        error once ``cancelled()`` is true (its caller went away: the rest is wasted work).
        ``timer`` adds up the seconds each pass took."""
        plan = self.plan
        program = plan.program(self.wrt, keep_intermediates, cancelled)
        start = time.perf_counter()
        with np.errstate(all="ignore"):  # non-finite results are reported in the Result
            vals, grads, forward_end = program.run(self.values, self.seeds, self.batch,
                                                   _checker(time_limit, cancelled))
        if timer is not None:
            timer.forward += forward_end - start
            timer.backward += time.perf_counter() - forward_end
        return collect(plan, vals, grads, self.seeds, program.backward, self.batch,
                       keep_intermediates)


@dataclass(slots=True)
class Timer:
    """Seconds spent in forward and in backward passes, added up over the runs given it."""

    forward: float = 0.0
    backward: float = 0.0


def prepare(
    plan: Plan,
    inputs: Mapping[str, Any],
    *,
    wrt: Iterable[str] | None = None,
    upstream: Mapping[str, Any] | None = None,
    batched: bool = False,
) -> Feed:
    """Check ``inputs`` (name -> array-like) and the options for a run of ``plan``, raising the
    :class:`EngineError` that names what is wrong; compute nothing.

    ``wrt`` names the inputs to differentiate (default: those marked ``requires_grad``);
    ``upstream`` gives the gradient flowing into each output (default: ones), which makes the
    result a vector-Jacobian product. With ``batched``, every input carries a leading batch axis
    of one common size B and each of the B examples is computed as if run alone.
    """
    vals: list[Any] = [None] * len(plan.inputs)
    batch = _feed(plan, inputs, batched, vals)
    return Feed(plan, tuple(vals), batch, _wrt_slots(plan, wrt),
                tuple(_upstream(plan, upstream or {}, batch)))


def _checker(time_limit: float | None, cancelled: Cancelled | None) -> Callable[[], None]:
    """What a run calls between steps: it raises once the run is out of time or cancelled."""
    deadline = None if time_limit is None else time.monotonic() + time_limit

    def check() -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise EngineError(ErrorKind.LIMIT, f"the run took longer than its time limit of "
                              f"{time_limit:g} s", field="time")
        check_cancelled(cancelled)

    return check


def _as_array(value: Any, t: TensorType, what: str, name: str, field: str = "dtype") -> Array:
    """``value`` as an array of dtype ``t`` (its shape is checked by the caller), or an error.
    numpy values must already have the right dtype; other values (floats, lists) are converted
    when that loses no kind of information (an int list may feed a float input, not vice versa)."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise feed_error(f"{what} {name!r} is not a tensor: {e}", name) from None
    if arr.dtype != t.numpy_dtype:
        numpy_value = isinstance(value, np.ndarray | np.generic)
        if numpy_value or not np.can_cast(arr.dtype, t.numpy_dtype, "same_kind"):
            raise EngineError(ErrorKind.DTYPE, f"{what} {name!r} has dtype {arr.dtype}; the graph "
                              f"declares {t.dtype}", node=name, field=field)
        arr = arr.astype(t.numpy_dtype)
    return arr


def _check_shape(arr: Array, t: TensorType, what: str, name: str, batch: int | None,
                 field: str = "shape") -> None:
    want = t.shape if batch is None else (batch, *t.shape)
    if arr.shape != want:
        expected = str(list(want))
        raise EngineError(ErrorKind.SHAPE, f"{what} {name!r} has shape {list(arr.shape)}; "
                          f"expected {expected}", node=name, field=field)


def _feed(plan: Plan, inputs: Mapping[str, Any], batched: bool, vals: list[Any]) -> int | None:
    """Put the inputs in their slots; return the batch size (None for an unbatched run)."""
    check_names(plan, inputs)
    arrays: list[Array] = []
    for inp in plan.inputs:
        if inp.name not in inputs:
            raise feed_error(f"input {inp.name!r} is missing", inp.name)
        arrays.append(_as_array(inputs[inp.name], plan.types[len(arrays)], "input", inp.name))
    batch: int | None = None
    if batched:
        if not arrays:
            raise feed_error("a batched run needs at least one input to carry the batch axis")
        batch = arrays[0].shape[0] if arrays[0].ndim else 0
        if batch < 1:
            raise EngineError(ErrorKind.SHAPE, f"input {plan.inputs[0].name!r} has no batch "
                              "axis of size >= 1", node=plan.inputs[0].name, field="shape")
        _check_total(plan, batch)
    for slot, (inp, arr) in enumerate(zip(plan.inputs, arrays, strict=True)):
        _check_shape(arr, plan.types[slot], "input", inp.name, batch)
        vals[slot] = as_value(arr)
    return batch


def check_names(plan: Plan, inputs: Iterable[str], upstream: Iterable[str] = ()) -> None:
    """Refuse the first name fed to ``plan`` that it does not know: an input that is not one of
    its inputs, an upstream gradient for a name that is not one of its outputs. Only names are
    looked at, so a caller can refuse a request before decoding any of its values."""
    for name in inputs:
        if plan.slot.get(name, len(plan.inputs)) >= len(plan.inputs):
            raise _unknown(plan, name, "inputs", "is not an input of the graph")
    for name in upstream:
        if name not in plan.output_set:
            raise _unknown(plan, name, "upstream", "has an upstream gradient but is not an "
                           "output")


def _check_total(plan: Plan, batch: int) -> None:
    """A run of ``batch`` examples must hold at most the limit's elements in all."""
    if batch * plan.total_elements > plan.limits.max_total_elements:
        raise EngineError(ErrorKind.LIMIT, f"{batch} examples would hold "
                          f"{batch * plan.total_elements} elements; the limit is "
                          f"{plan.limits.max_total_elements}", field="batch")


def _unknown(plan: Plan, name: str, field: str, problem: str) -> EngineError:
    """An error for a name fed to ``plan`` that it does not know, echoed unless overlong."""
    limit = plan.limits.max_name_length
    if len(name) > limit:
        return overlong(name, limit, None, field)
    return feed_error(f"{name!r} {problem}", name, field)


def _wrt_slots(plan: Plan, wrt: Iterable[str] | None) -> frozenset[int]:
    if wrt is None:
        return plan.default_wrt
    if isinstance(wrt, str):
        raise feed_error(f"wrt must be a collection of input names, not the string {wrt!r}",
                         field="wrt")
    slots = set()
    for name in wrt:
        slot = plan.slot.get(name)
        if slot is None or slot >= len(plan.inputs):
            raise _unknown(plan, name, "wrt", "cannot be differentiated: it is not an input")
        if not plan.inputs[slot].dtype.is_float:
            raise EngineError(ErrorKind.DTYPE, f"cannot differentiate {name!r}: it is "
                              f"{plan.inputs[slot].dtype}", node=name, field="wrt")
        slots.add(slot)
    return frozenset(slots)


def _upstream(plan: Plan, given: Mapping[str, Any], batch: int | None) -> list[Any]:
    """The gradient flowing into each output: the caller's (checked), else ones."""
    check_names(plan, (), given)
    seeds = []
    for name in plan.outputs:
        t = plan.types[plan.slot[name]]
        if name in given:
            what = "upstream gradient for output"  # errors name the field "upstream"
            arr = _as_array(given[name], t, what, name, "upstream")
            _check_shape(arr, t, what, name, batch, "upstream")
            seeds.append(as_value(arr))
        elif batch is None and not t.shape:
            seeds.append(t.numpy_dtype.type(1))  # as_value(np.ones(())), with no array made
        else:
            seeds.append(_ones(t.shape if batch is None else (batch, *t.shape), t.numpy_dtype))
    return seeds


ONES_CACHED = 1 << 16  # elements: default upstream gradients up to this size are shared


def _ones(shape: tuple[int, ...], dtype: np.dtype[Any]) -> Array:
    """Ones of ``shape``: the default upstream gradient, read-only (no rule writes to a
    gradient, and results never alias one: see results.collect). Small ones are made once and
    shared; a larger one is a broadcast view of a single one, which takes no memory however
    long a feed waits to run."""
    if math.prod(shape) <= ONES_CACHED:
        return _shared_ones(shape, dtype)
    return np.broadcast_to(_shared_ones((), dtype), shape)


@functools.lru_cache(maxsize=32)
def _shared_ones(shape: tuple[int, ...], dtype: np.dtype[Any]) -> Array:
    ones = np.ones(shape, dtype)
    ones.flags.writeable = False
    return ones
