"""Dependencies point one way: engine <- importer <- wire <- (server, client) <- cli. Every
import of every module (at the top or inside a function) is read from its source, so a module
that breaks the direction fails here, naming the line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each package, and the gradserve packages and outside libraries it must never import.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "engine": ("gradserve.importer", "gradserve.wire", "gradserve.server", "gradserve.client",
               "gradserve.cli", "gradserve.v1", "grpc", "google.protobuf", "onnx"),
    "importer": ("gradserve.wire", "gradserve.server", "gradserve.client", "gradserve.cli",
                 "gradserve.v1"),
    "wire": ("gradserve.server", "gradserve.client", "gradserve.cli"),
    "server": ("gradserve.client", "gradserve.cli"),
    "client": ("gradserve.server", "gradserve.cli"),
    "cli": (),
}


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_what_lies_below_it(package: str) -> None:
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, f"{package}/ has no modules"
    broken = [f"{path.relative_to(ROOT)}:{line} imports {name}"
              for path in modules for line, name in imports(path)
              if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package])]
    assert not broken, "\n".join(broken)


def test_the_rule_catches_a_breach(tmp_path: Path) -> None:
    """The reader sees imports inside functions too (where a cycle likes to hide)."""
    module = tmp_path / "m.py"
    module.write_text("def serve():\n    from gradserve.server.app import serve\n")
    assert imports(module) == [(2, "gradserve.server.app")]
