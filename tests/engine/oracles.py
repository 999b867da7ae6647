"""Plain references for the windowed ops, written the slow, obvious way: a loop over every
window (and every output channel), reading the window's elements by their positions. They share
nothing with the engine's kernel-offset formulation, so they check it independently."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Arr = Any


def out_size(n: int, k: int, stride: int, dilation: int, begin: int, end: int,
             ceil: bool = False) -> int:
    """ONNX's and PyTorch's output length; with ceil_mode, a last window must start inside the
    input or the begin padding."""
    span = (n + begin + end - dilation * (k - 1) - 1) / stride
    o = (math.ceil(span) if ceil else math.floor(span)) + 1
    if ceil and (o - 1) * stride >= n + begin:
        o -= 1
    return o


def conv(x: Arr, w: Arr, b: Arr | None, strides: Sequence[int], pads: Sequence[int],
         dilations: Sequence[int], group: int) -> Arr:
    """Cross-correlation of x (..., C, *spatial) with w (M, C/group, *kernel)."""
    s = w.ndim - 2
    kernel = w.shape[2:]
    c, m = x.shape[-1 - s], w.shape[0]
    cg, mg = c // group, m // group
    widths = [(0, 0)] * (x.ndim - s) + [(pads[a], pads[s + a]) for a in range(s)]
    xp: Arr = np.pad(x, widths)
    out = [out_size(x.shape[x.ndim - s + a], kernel[a], strides[a], dilations[a], pads[a],
                    pads[s + a]) for a in range(s)]
    y: Arr = np.zeros((*x.shape[: x.ndim - 1 - s], m, *out))
    for o in itertools.product(*(range(n) for n in out)):
        for j in range(m):
            g = j // mg
            window = xp[(Ellipsis, slice(g * cg, (g + 1) * cg), *(
                slice(o[a] * strides[a], o[a] * strides[a] + dilations[a] * (kernel[a] - 1) + 1,
                      dilations[a]) for a in range(s)))]
            y[(Ellipsis, j, *o)] = np.sum(window * w[j], axis=tuple(range(-1 - s, 0)))
    if b is not None:
        y += b.reshape((m,) + (1,) * s)
    return y


def windows(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
            pads: Sequence[int], dilations: Sequence[int], ceil: bool
            ) -> tuple[list[int], list[tuple[tuple[int, ...], list[tuple[int, ...]],
                                             list[tuple[int, ...]]]]]:
    """The output size, and per window its index, the input positions it reads, and every
    position it covers within the input plus the given padding (ceil's overhang excluded)."""
    s = len(size)
    out = [out_size(size[a], kernel[a], strides[a], dilations[a], pads[a], pads[s + a], ceil)
           for a in range(s)]
    result = []
    for o in itertools.product(*(range(n) for n in out)):
        reads, covered = [], []
        for t in itertools.product(*(range(k) for k in kernel)):
            pos = tuple(o[a] * strides[a] - pads[a] + t[a] * dilations[a] for a in range(s))
            if all(0 <= pos[a] < size[a] for a in range(s)):
                reads.append(pos)
            if all(-pads[a] <= pos[a] < size[a] + pads[s + a] for a in range(s)):
                covered.append(pos)
        result.append((o, reads, covered))
    return out, result


def pool(x: Arr, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
         dilations: Sequence[int], ceil: bool, how: str, count_include_pad: bool = False) -> Arr:
    """max or average pooling of x (..., C, *spatial), window by window."""
    s = len(kernel)
    out, wins = windows(x.shape[-s:], kernel, strides, pads, dilations, ceil)
    y: Arr = np.zeros((*x.shape[:-s], *out))
    for o, reads, covered in wins:
        values = np.stack([x[(Ellipsis, *pos)] for pos in reads], axis=-1)
        if how == "max":
            y[(Ellipsis, *o)] = np.max(values, axis=-1)
        else:
            y[(Ellipsis, *o)] = np.sum(values, axis=-1) / (
                len(covered) if count_include_pad else len(reads))
    return y


def covers_input(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                 pads: Sequence[int], dilations: Sequence[int], ceil: bool) -> bool:
    """Whether every window reads an input element (and there is a window at all)."""
    s = len(size)
    if any(size[a] + pads[a] + pads[s + a] < dilations[a] * (kernel[a] - 1) + 1
           for a in range(s)):
        return False
    return all(reads for _, reads, _ in windows(size, kernel, strides, pads, dilations,
                                                 ceil)[1])
