"""The wire contract: generated code matches the .proto, and buf's lint and format are clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
BUF = ROOT / "tests" / "node" / "node_modules" / ".bin" / "buf"
GENERATED = ("gradserve_pb2.py", "gradserve_pb2.pyi", "gradserve_pb2_grpc.py",
             "gradserve_pb2_grpc.pyi")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([str(PROTOS / "generate"), str(tmp_path)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in GENERATED:
        fresh = (tmp_path / "gradserve" / "v1" / name).read_bytes()
        committed = (PROTOS / "gradserve" / "v1" / name).read_bytes()
        assert fresh == committed, f"{name} is stale: run protos/generate"


@pytest.mark.parametrize("args", [["lint"], ["format", "-d", "--exit-code"]],
                         ids=["lint", "format"])
def test_buf(args: list[str]) -> None:
    buf = str(BUF) if BUF.exists() else shutil.which("buf")
    assert buf, "buf is missing: .ci/test installs it (npm install --prefix tests/node)"
    result = subprocess.run([buf, *args], check=False, cwd=PROTOS, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_since_the_last_release() -> None:
    """From the first release (a v* tag) on, the contract only grows compatibly."""
    tag = subprocess.run(["git", "describe", "--tags", "--abbrev=0", "--match", "v*"],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    if tag.returncode != 0:
        pytest.skip("no release tag yet: nothing to compare the contract with")
    against = f".git#tag={tag.stdout.strip()},subdir=protos"
    result = subprocess.run([str(BUF), "breaking", "protos", "--against", against], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
