"""Write the reference pages generated from the code: docs/ops.md (the engine's op table) and
docs/configuration.md (the server's settings). Run ``python docs/generate.py``; a test fails
when the committed pages differ from what this writes."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

from gradserve.engine import OP_TABLE
from gradserve.server.config import ServerConfig

DOCS = Path(__file__).resolve().parent


def ops_page() -> str:
    lines = [
        "# Op reference",
        "",
        "Generated from the engine's op table by `python docs/generate.py`; `gradserve ops` and",
        "the ListOps RPC give the same list from a running server. Operands broadcast like numpy",
        "where noted; axes may be negative; every op's gradient is checked against finite",
        "differences in the test suite. Where calculus leaves a gradient open (a kink at 0, a",
        "tie, an infinity), every op follows PyTorch; the last column says what it gives there.",
        "",
        "| op | operands | attributes | what it computes | at edge points |",
        "|---|---|---|---|---|",
    ]
    for op in sorted(OP_TABLE.values(), key=lambda o: o.name):
        attrs = "<br>".join(
            f"`{name}` ({spec.kind}{', required' if spec.required else ''}"
            f"{'' if spec.default is None else f', default `{spec.default}`'}"
            f"{', one of ' + '/'.join(spec.choices) if spec.choices else ''}): {spec.doc}"
            for name, spec in op.attrs.items()) or "-"
        lines.append(f"| `{op.name}` | {op.arity_text} | {attrs} | {op.doc} | "
                     f"{op.edges or '-'} |")
    return "\n".join(lines) + "\n"


def configuration_page() -> str:
    lines = [
        "# Server configuration",
        "",
        "Generated from `ServerConfig` by `python docs/generate.py`. Every setting is a flag of",
        "`gradserve serve` and an environment variable; a flag wins over the variable, which",
        "wins over the default.",
        "",
        "| flag | environment variable | default | meaning |",
        "|---|---|---|---|",
    ]
    for f in fields(ServerConfig):
        default = f.default if f.default is not MISSING else ""
        lines.append(f"| `--{f.name.replace('_', '-')}` | `GRADSERVE_{f.name.upper()}` | "
                     f"`{default}` | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"


PAGES = {"ops.md": ops_page, "configuration.md": configuration_page}


def main() -> None:
    for name, page in PAGES.items():
        (DOCS / name).write_text(page())


if __name__ == "__main__":
    main()
