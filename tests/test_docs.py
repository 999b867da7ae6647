"""The generated reference pages match the code they describe."""

from __future__ import annotations

import re
import runpy
from collections.abc import Callable
from pathlib import Path

import pytest

from gradserve.engine import ErrorKind
from gradserve.wire.status import REJECTION_REASONS

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES: dict[str, Callable[[], str]] = runpy.run_path(str(DOCS / "generate.py"))["PAGES"]


@pytest.mark.parametrize("name", sorted(PAGES))
def test_generated_page_is_fresh(name: str) -> None:
    assert (DOCS / name).read_text() == PAGES[name](), f"docs/{name} is stale: run " \
        "python docs/generate.py"


def test_errors_page_lists_every_error() -> None:
    """docs/errors.md names every engine error kind, every refusal reason the metrics count,
    and every status code the server's code gives."""
    page = (DOCS / "errors.md").read_text()
    codes = {m for package in ("server", "wire") for f in (DOCS.parent / package).glob("*.py")
             for m in re.findall(r"StatusCode\.([A-Z_]+)", f.read_text())}
    assert {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"} <= codes
    for name in (*(k.value for k in ErrorKind), *REJECTION_REASONS, *codes):
        assert f"`{name}`" in page, f"docs/errors.md does not list `{name}`"
