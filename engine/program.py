"""Generated passes: a plan's forward and backward pass as straight-line Python functions.

An interpreter loop over a plan's steps spends more time dispatching than numpy spends computing
on small tensors. A :class:`Program` instead writes one line of Python per step and one per
gradient edge, and compiles them once per plan and choice of inputs to differentiate:
looping, indexing, and deciding which operands need a gradient or a fitting all happen once,
when the source is written. The op table stays the single source of what each op computes; the
program only calls its rules.

Backward, gradients accumulate where a value fans out (the ``+=`` of the backprop notes), and
each VJP's result is fitted to its operand (summed back from the broadcast shape by
``unbroadcast``), here and nowhere else. A batched run stacks examples on a new leading axis and
gives every example exactly what a run of its own would: constants stay unbatched (numpy
broadcasts them, keeping its scalar fast paths) unless an op needs the batch axis on every
operand, and lower-rank operands get size-1 axes after it.

Safety: the source is made of this module's templates and integers (register numbers) alone.
Every object a line uses (an op's forward and VJP rules with the node's parameters bound, a
batch adapter) reaches it through the program's namespace under a name made of one letter and
integers, so nothing a client wrote (names, attributes, dtypes, constants) ever becomes program
text.

Registers: a run's state is one list ``R``: the value of slot ``s`` at ``R[s]``, its gradient at
``R[n + s]`` (``n`` slots), then the operands a batched run adapts (an unbatched run leaves
them as they are). The lines are split into functions of at most ``CHUNK_LINES`` lines, each
loading the registers it reads from ``R`` into locals and storing those it writes, so compiling
a huge graph stays linear in time and bounded in memory, while a small graph runs as one
function over locals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from gradserve.engine.errors import Cancelled, EngineError, check_cancelled
from gradserve.engine.ops.base import Array, Formula, unbroadcast

if TYPE_CHECKING:
    from gradserve.engine.plan import Backward, Edge, Plan, Step

CHUNK_LINES = 400  # lines per generated function
# The run's check (time limit, cancellation) is called after a step once the steps since the
# last check number CHECK_STEPS or touch CHECK_ELEMENTS elements per example (operands and
# result): rarely enough to cost nothing on small steps, soon after any large one.
CHECK_STEPS = 16
CHECK_ELEMENTS = 4096

Check = Callable[[], None]
Chunk = Callable[[list[Any], int | None, Check], None]
Rule = Callable[..., Array] | Formula


@dataclass(frozen=True, slots=True)
class _Line:
    """One line of a program: ``r<out> = <expr>`` (or ``<expr>`` alone when ``out`` is None),
    reading the registers ``reads``, on behalf of ``step`` (None: a check)."""

    out: int | None
    expr: str
    reads: tuple[int, ...]
    step: Step | None


@dataclass(frozen=True, slots=True)
class _Part:
    """One compiled function of a program: its source, the function, and the step each of its
    lines computes for, by line number (to name the node of an error, and in listings)."""

    source: str
    chunk: Chunk
    steps: Mapping[int, Step]


class Program:
    """A plan's forward and backward pass for one choice of inputs to differentiate, compiled
    into Python functions (see the module's doc); it runs batched or not. Unless it ``keeps``
    every value and gradient, it hands back only the outputs and the gradients asked for: the
    rest is dropped as its functions return. Immutable once built; ``source`` holds the code
    of each of its functions."""

    def __init__(self, plan: Plan, backward: Backward, keep: bool = False,
                 cancelled: Cancelled | None = None) -> None:
        self.backward = backward
        self._slots = len(plan.names)
        handed = ([*range(self._slots)] * 2 if keep else
                  [*(slot for _, slot in plan.output_slots), *backward.inputs])
        # The most bytes a run hands back per example, known before any run.
        self.answer_bytes = sum(plan.types[s].size * plan.types[s].numpy_dtype.itemsize
                                for s in handed)
        self._constants = plan.constants
        # Outputs whose gradient flows back: their registers start with the upstream gradient.
        self._seeded = tuple(k for k, name in enumerate(plan.outputs)
                             if backward.needs[plan.slot[name]])
        self._seed_slots = tuple(plan.slot[plan.outputs[k]] for k in self._seeded)
        writer = _Writer(plan, backward, self._seed_slots, cancelled)
        self.size = writer.registers
        self._clocked = writer.clocked
        chunks = _chunked(writer.lines)
        results = None if keep else {  # the registers a run hands back
            self._clocked, *(plan.slot[name] for name in plan.outputs),
            *(self._slots + s for s in backward.inputs)}
        parts: list[_Part] = []
        for k, (lines, stored) in enumerate(zip(chunks, _liveness(chunks, results),
                                                strict=True)):
            check_cancelled(cancelled)
            parts.append(_compiled(k, lines, stored, writer.namespace))
        self._parts = tuple(parts)
        self.source = tuple(part.source for part in parts)
        self._chunks = tuple(part.chunk for part in parts)
        self._steps = {part.chunk.__code__: part.steps for part in parts}

    def run(self, inputs: Sequence[Any], seeds: Sequence[Any], batch: int | None,
            check: Check) -> tuple[list[Any], list[Any], float]:
        """Run the passes on ``inputs`` (by input slot) and ``seeds`` (the gradient flowing
        into each output) for ``batch`` stacked examples (None: one, unbatched); return every
        slot's value and gradient (None where no gradient was formed), and the time.perf_counter()
        reading between the forward and the backward pass. ``check`` is called between steps
        and may raise to stop the run; an EngineError raised by an op gets the op's node. A run
        that raises lets go of everything it computed at once."""
        n = self._slots
        registers: list[Any] = [None] * self.size
        registers[: len(inputs)] = inputs
        for slot, value in self._constants:
            registers[slot] = value
        for k, slot in zip(self._seeded, self._seed_slots, strict=True):
            registers[n + slot] = seeds[k]
        try:
            for chunk in self._chunks:
                chunk(registers, batch, check)
        except BaseException as e:
            registers.clear()  # a traceback keeps this frame, and so the list, alive
            if not isinstance(e, EngineError):
                raise
            error = self._located(e)
        else:
            return registers[:n], registers[n: 2 * n], registers[self._clocked]
        raise error

    def listing(self) -> str:
        """The source of every function, each line that computes for a node with the node's
        name beside it (quoted, after a ``#``): for reading a program. The names are no part
        of what runs, which nothing a client wrote enters (see the module's doc)."""
        listed: list[str] = []
        for part in self._parts:
            lines = part.source.splitlines()
            width = max(map(len, lines))
            listed += [f"{line:<{width}}  # {part.steps[number].node!r}"
                       if number in part.steps else line
                       for number, line in enumerate(lines, 1)]
        return "\n".join(listed) + "\n"

    def _located(self, e: EngineError) -> EngineError:
        """``e`` anew, without its traceback (which holds the run's frames), naming the node
        of the step that raised it when ``e`` names none."""
        node = e.node
        tb = e.__traceback__
        while node is None and tb is not None:
            step = self._steps.get(tb.tb_frame.f_code, {}).get(tb.tb_lineno)
            node = None if step is None else step.node
            tb = tb.tb_next
        return EngineError(e.kind, e.message, node=node, field=e.field)


def _chunked(lines: Sequence[_Line]) -> list[Sequence[_Line]]:
    """``lines`` in runs of at most ``CHUNK_LINES``: one function each."""
    return [lines[start: start + CHUNK_LINES] for start in range(0, len(lines), CHUNK_LINES)]


def _liveness(chunks: Sequence[Sequence[_Line]],
              results: set[int] | None) -> list[set[int] | None]:
    """What each chunk stores back of the registers it writes: those in ``results`` (what a
    run hands back) or read by a later chunk; everything it writes when ``results`` is None."""
    if results is None:
        return [None] * len(chunks)
    needed = set(results)
    stored: list[set[int] | None] = []
    for lines in reversed(chunks):  # each chunk keeps what of its own is needed after it
        stored.append({line.out for line in lines if line.out in needed})
        needed.update(r for line in lines for r in line.reads)
    return stored[::-1]


def _compiled(part: int, lines: Sequence[_Line], stored: set[int] | None,
              namespace: dict[str, Any]) -> _Part:
    """``lines`` compiled into the function of part number ``part``, storing back the
    registers ``stored`` (all it writes: None), over the objects in ``namespace``."""
    source, first = _source(lines, stored)
    code = compile(source, f"<gradserve program, part {part}>", "exec")
    # The source is this module's templates and integers only (see the module's doc).
    exec(code, namespace)  # nosec B102
    return _Part(source, namespace.pop("chunk"), {
        number: line.step for number, line in enumerate(lines, first) if line.step is not None})


def _source(lines: Sequence[_Line], kept: set[int] | None) -> tuple[str, int]:
    """The function ``chunk(R, B, check)`` running ``lines`` over the register list ``R``,
    loading into locals the registers they read before writing and storing those they write
    (those in ``kept``, unless it is None); and the number of the source line that holds the
    first of ``lines``."""
    loads: dict[int, None] = {}
    stores: dict[int, None] = {}
    for line in lines:
        loads.update((r, None) for r in line.reads if r not in stores)
        if line.out is not None:
            stores[line.out] = None
    source = ["def chunk(R, B, check):"]
    source += [f"    r{r} = R[{r}]" for r in loads]
    first = len(source) + 1  # line numbers count from 1
    source += [f"    {line.expr}" if line.out is None else f"    r{line.out} = {line.expr}"
               for line in lines]
    source += [f"    R[{r}] = r{r}" for r in stores if kept is None or r in kept]
    return "\n".join(source) + "\n", first


class _Writer:
    """Writes a program's lines: the forward steps, then the backward edges, with checks
    between them; puts the objects they call in its ``namespace``, which the lines run in."""

    def __init__(self, plan: Plan, backward: Backward, seeded: Iterable[int],
                 cancelled: Cancelled | None) -> None:
        """Lines for the steps of ``plan`` and the gradient edges of ``backward``, whose
        gradient flows back from the output slots ``seeded``."""
        self.namespace: dict[str, Any] = {"fit": _fit, "np": np, "clock": time.perf_counter}
        self.lines: list[_Line] = [_Line(None, "check()", (), None)]  # a run may start too late
        self._types = plan.types
        self._steps = self._elements = 0  # since the last check
        self._n = len(plan.names)
        self.registers = 2 * self._n  # the values and gradients; adapted operands come after
        operands: dict[int, tuple[int, ...]] = {}  # each step's, by its out slot
        for i, step in enumerate(plan.steps):
            check_cancelled(cancelled)
            operands[step.out] = self._forward(i, step)
        self.clocked = self.registers  # the register that holds when the forward pass ended
        self.registers += 1
        self.lines.append(_Line(self.clocked, "clock()", (), None))
        index = {step.out: i for i, step in enumerate(plan.steps)}
        has_grad = set(seeded)
        for step, edges in backward.steps:
            check_cancelled(cancelled)
            if step.out in has_grad:  # else no output depends on this step
                self._backward(index[step.out], step, edges, operands[step.out], has_grad)

    def _forward(self, i: int, step: Step) -> tuple[int, ...]:
        """The lines computing ``step``; the registers holding its operands, as it saw them
        (adapted to the batch axis, in a batched run)."""
        regs = list(step.args)
        for k, (pad, lift) in enumerate(zip(step.pads, step.lifts, strict=True)):
            if pad or lift:
                name = self._put(f"a{i}_{k}", partial(_adapt, pad=pad, lift=lift))
                self.lines.append(_Line(self.registers, f"{name}(r{regs[k]}, B)", (regs[k],),
                                        step))
                regs[k] = self.registers
                self.registers += 1
        self.lines.append(_Line(step.out, self._apply(f"f{i}", step.forward, regs), tuple(regs),
                                step))
        self._stepped(step)
        return tuple(regs)

    def _backward(self, i: int, step: Step, edges: Sequence[Edge], regs: Sequence[int],
                  has_grad: set[int]) -> None:
        """The lines passing the gradient of ``step`` (the ``i``-th) to its operands along
        ``edges``, given the registers ``regs`` of its operands as it saw them; ``has_grad``
        (the slots holding a gradient so far) grows by the operands'."""
        n = self._n
        for edge in edges:
            reads = (n + step.out, step.out, *regs)  # g, y and the operands
            call = self._apply(f"d{i}_{edge.operand}", edge.vjp, reads)
            if edge.fitted:  # sum a broadcast gradient back; undo a batch padding
                call = f"fit({call}, r{regs[edge.operand]}, r{edge.slot})"
                reads += (edge.slot,)
            if edge.slot in has_grad:  # fan-out: gradients accumulate
                self.lines.append(_Line(n + edge.slot, f"r{n + edge.slot} + {call}",
                                        (n + edge.slot, *reads), step))
            else:
                self.lines.append(_Line(n + edge.slot, call, reads, step))
                has_grad.add(edge.slot)
        self._stepped(step)

    def _apply(self, name: str, rule: Rule, regs: Sequence[int]) -> str:
        """The expression applying ``rule`` to the registers ``regs``: a formula inlined, or a
        call of the function, which the namespace holds as ``name``."""
        args = [f"r{r}" for r in regs]
        if isinstance(rule, Formula):
            return rule.bind(args)
        return f"{self._put(name, rule)}({', '.join(args)})"

    def _put(self, name: str, value: object) -> str:
        self.namespace[name] = value
        return name

    def _stepped(self, step: Step) -> None:
        """Count a step's lines written; add a check if it is time for one."""
        self._steps += 1
        self._elements += sum(self._types[slot].size for slot in (*step.args, step.out))
        if self._steps >= CHECK_STEPS or self._elements >= CHECK_ELEMENTS:
            self.lines.append(_Line(None, "check()", (), None))
            self._steps = self._elements = 0


def _adapt(x: Any, batch: int | None, *, pad: int, lift: bool) -> Any:
    """An operand as a batched op needs it: a lifted one gets the batch axis (a broadcast view);
    a padded one gets ``pad`` size-1 axes after its batch axis. Unbatched, it is as it is."""
    if batch is None:
        return x
    if lift:
        return np.broadcast_to(x, (batch, *np.shape(x)))
    return np.reshape(x, (x.shape[0],) + (1,) * pad + x.shape[1:])


def _fit(d: Array, operand: Array, value: Array) -> Array:
    """A VJP's result fitted to its operand: summed back from the broadcast shape to the
    operand's (``unbroadcast``), then reshaped to the value's where a batch padding changed it."""
    d = unbroadcast(d, operand.shape)
    return d if d.shape == value.shape else np.reshape(d, value.shape)
