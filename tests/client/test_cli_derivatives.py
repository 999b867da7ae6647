"""``gradserve grad`` beyond the gradient: --hessian, --jvp, --hvp and --jacobian, in text and
JSON, in-process and through a live server, and --dot drawing the derived graph."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradserve.cli.main import main
from gradserve.server.app import GradServer

LOSS = ["L = (a*b + c) * f", "a=3", "b=-2", "c=8", "f=-2"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(params=["local", "server"])
def where(request: pytest.FixtureRequest, server: GradServer) -> list[str]:
    return ["--local"] if request.param == "local" else ["--target", server.target]


def test_the_quadratics_second_derivative_and_slope(capsys: pytest.CaptureFixture[str],
                                                    where: list[str]) -> None:
    code, out, err = run(capsys, "grad", "2*x**2 - 3*x + 4", "x=2", "--hessian", *where)
    assert code == 0, err
    assert out.splitlines() == ["d2out/dx dx = 4"]
    code, out, _ = run(capsys, "grad", "2*x**2 - 3*x + 4", "x=2", "--jvp", "x=1", *where)
    assert out.splitlines() == ["out = 6", "jvp out = 5"]


def test_loss_l_in_json(capsys: pytest.CaptureFixture[str], where: list[str]) -> None:
    code, out, err = run(capsys, "grad", *LOSS, "--hessian", "--json", *where)
    assert code == 0, err
    hessian = json.loads(out)["hessian"]
    assert hessian["a"] == {"a": 0.0, "b": -2.0, "c": 0.0, "f": -2.0}
    assert hessian["b"]["f"] == 3.0 and hessian["f"]["c"] == 1.0
    code, out, _ = run(capsys, "grad", *LOSS, "--hvp", "a=1", "b=2", "c=0", "f=-1", "--json",
                       *where)
    assert json.loads(out)["hvp"] == {"a": -2.0, "b": -5.0, "c": -1.0, "f": 4.0}  # H v by hand
    code, out, _ = run(capsys, "grad", *LOSS, "--jacobian", "--json", *where)
    assert json.loads(out)["jacobian"] == {"L": {"a": 4.0, "b": -6.0, "c": -2.0, "f": 2.0}}


def test_dot_draws_the_derived_graph(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "hvp.svg"
    code, _, err = run(capsys, "grad", *LOSS, "--hvp", "a=1", "b=0", "c=0", "f=0", "--local",
                       "--dot", str(target))
    assert code == 0, err
    text = target.read_text()
    assert "a.tangent" in text and "L.tangent" in text  # the forward-mode part drawn


def test_refusals_exit_1(capsys: pytest.CaptureFixture[str], server: GradServer) -> None:
    code, _, err = run(capsys, "grad", *LOSS, "--jvp", "zz=1", "--target", server.target)
    assert code == 1 and "tangents.zz" in err
    with pytest.raises(SystemExit):  # argparse: one kind at a time
        main(["grad", *LOSS, "--hessian", "--jacobian"])
