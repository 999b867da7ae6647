"""Drawing a computed graph, micrograd's ``draw_dot`` style: each value shows data | grad."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import graphviz
import numpy as np
from numpy.typing import NDArray

from gradserve.engine import Graph


def _brief(a: NDArray[Any] | None) -> str:
    if a is None:
        return "-"
    arr = np.asarray(a)
    if arr.size == 1:
        return f"{arr.item():.4g}"
    return f"{list(arr.shape)} mean {arr.mean():.4g}"


def drawing_format(path: str) -> str:
    """The format a drawing to ``path`` takes, from its suffix (a ValueError for one that is not
    .svg or .png): the CLI asks before it computes anything."""
    fmt = Path(path).suffix.lstrip(".").lower()
    if fmt not in ("svg", "png"):
        raise ValueError(f"--dot writes .svg or .png files, not {Path(path).name!r}")
    return fmt


def draw(graph: Graph, values: Mapping[str, NDArray[Any]],
         gradients: Mapping[str, NDArray[Any]], path: str) -> Path:
    """Render ``graph`` with every value and gradient to ``path`` (.svg or .png)."""
    target = Path(path)
    dot = graphviz.Digraph(format=drawing_format(path), graph_attr={"rankdir": "LR"})
    ids: dict[str, str] = {}  # value name -> node id (ids are ours: names may hold ':' etc.)

    def value_node(name: str) -> None:
        ids[name] = f"v{len(ids)}"
        data, grad = _brief(values.get(name)), _brief(gradients.get(name))
        label = f"{{ {_escape(name)} | data {data} | grad {grad} }}"
        dot.node(ids[name], label=label, shape="record")

    for leaf in (*(i.name for i in graph.inputs), *(c.name for c in graph.constants)):
        value_node(leaf)
    for k, node in enumerate(graph.nodes):
        value_node(node.name)
        dot.node(f"op{k}", label=node.op, shape="ellipse")
        dot.edge(f"op{k}", ids[node.name])
    for k, node in enumerate(graph.nodes):
        for operand in node.inputs:
            dot.edge(ids[operand], f"op{k}")
    rendered = dot.render(outfile=str(target), cleanup=True)
    return Path(rendered)


def _escape(name: str) -> str:
    """A name as literal text in a record label (where {}|<> are syntax)."""
    return "".join("\\" + c if c in "{}|<>\\ " else c for c in name)
