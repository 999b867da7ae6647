"""``gradserve grad`` beyond the gradient: --hessian, --jvp, --hvp and --jacobian, in text and
JSON, in-process (--local) and through a live server, and --dot drawing the derived graph.

Expected values are derived by hand: f(x) = 2x^2 - 3x + 4 has f' = 4x - 3 and f'' = 4;
L = (a*b + c) * f at a=3, b=-2, c=8, f=-2 has the gradient (b f, a f, f, a b + c) =
(4, -6, -2, 2) and the constant Hessian [[0,f,0,b],[f,0,0,a],[0,0,0,1],[b,a,1,0]].
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest

from gradserve.cli.main import main
from gradserve.server.app import GradServer

QUADRATIC = "2*x**2 - 3*x + 4"
LOSS = ["L = (a*b + c) * f", "a=3", "b=-2", "c=8", "f=-2"]
POINT = {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0}
a, b, c, f = POINT.values()
HESSIAN = np.array([[0, f, 0, b], [f, 0, 0, a], [0, 0, 0, 1], [b, a, 1, 0]])
GRADIENT = np.array([b * f, a * f, f, a * b + c])


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def printed(out: str) -> dict[str, float]:
    """``name = value`` lines as numbers (so -0 reads as 0), in order, each name once."""
    found: dict[str, float] = {}
    for line in out.splitlines():
        name, _, value = line.partition(" = ")
        assert name and value and name not in found, line
        found[name] = float(value)
    return found


@pytest.fixture(params=["local", "server"])
def where(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "local":
        return ["--local"]
    server: GradServer = request.getfixturevalue("server")
    return ["--target", server.target]


@pytest.mark.parametrize("x", [2.0, -1.5, 10.0])
def test_the_quadratic_in_text(capsys: pytest.CaptureFixture[str], where: list[str],
                               x: float) -> None:
    at = f"x={x:g}"
    value, slope = 2 * x**2 - 3 * x + 4, 4 * x - 3
    code, out, err = run(capsys, "grad", QUADRATIC, at, "--hessian", *where)
    assert (code, err) == (0, "")
    assert out.splitlines() == ["d2out/dx dx = 4"]  # f'' = 4 wherever x is
    code, out, err = run(capsys, "grad", QUADRATIC, at, "--jvp", "x=1", *where)
    assert (code, err) == (0, "")
    assert printed(out) == {"out": value, "jvp out": slope}
    code, out, err = run(capsys, "grad", QUADRATIC, at, "--hvp", "x=-2", *where)
    assert (code, err) == (0, "")
    assert printed(out) == {"hvp x": -8.0}
    code, out, err = run(capsys, "grad", QUADRATIC, at, "--jacobian", *where)
    assert (code, err) == (0, "")
    assert printed(out) == {"out": value, "dout/dx": slope}


def test_the_quadratic_in_json(capsys: pytest.CaptureFixture[str], where: list[str]) -> None:
    code, out, err = run(capsys, "grad", QUADRATIC, "x=2", "--hessian", "--json", *where)
    assert (code, err) == (0, "")
    assert json.loads(out)["hessian"] == {"x": {"x": 4.0}}
    code, out, err = run(capsys, "grad", QUADRATIC, "x=2", "--jvp", "x=1", "--json", *where)
    assert (code, err) == (0, "")
    found = json.loads(out)
    assert found["outputs"] == {"out": 6.0} and found["jvp"] == {"out": 5.0}
    assert not found["gradients"] and not found["hvp"]
    code, out, _ = run(capsys, "grad", QUADRATIC, "x=2", "--jvp", "x=0.5", "--json", *where)
    assert json.loads(out)["jvp"] == {"out": 2.5}  # linear in the direction
    code, out, _ = run(capsys, "grad", QUADRATIC, "x=2", "--hvp", "x=1", "--json", *where)
    assert json.loads(out)["hvp"] == {"x": 4.0}
    code, out, _ = run(capsys, "grad", QUADRATIC, "x=2", "--jacobian", "--json", *where)
    found = json.loads(out)
    assert found["jacobian"] == {"out": {"x": 5.0}} and found["outputs"] == {"out": 6.0}


def test_a_vector_quadratic(capsys: pytest.CaptureFixture[str], where: list[str]) -> None:
    """sum(2*x**2 - 3*x + 4) over x = [1, 2, 3]: the Hessian is 4 I, the Jacobian 4x - 3."""
    code, out, err = run(capsys, "grad", "sum(2*x**2 - 3*x + 4)", "x=[1,2,3]", "--hessian",
                         "--json", *where)
    assert (code, err) == (0, "")
    assert json.loads(out)["hessian"] == {"x": {"x": (4 * np.eye(3)).tolist()}}
    code, out, err = run(capsys, "grad", "2*x**2 - 3*x + 4", "x=[1,2,3]", "--jacobian",
                         "--json", *where)
    assert (code, err) == (0, "")
    assert json.loads(out)["jacobian"] == {"out": {"x": np.diag([1.0, 5.0, 9.0]).tolist()}}


def test_loss_l(capsys: pytest.CaptureFixture[str], where: list[str]) -> None:
    code, out, err = run(capsys, "grad", *LOSS, "--hessian", "--json", *where)
    assert (code, err) == (0, "")
    hessian = json.loads(out)["hessian"]
    assert set(hessian) == set("abcf") and all(set(row) == set("abcf")
                                               for row in hessian.values())
    np.testing.assert_array_equal([[hessian[r][col] for col in "abcf"] for r in "abcf"],
                                  HESSIAN)
    v = [1.0, 2.0, 0.0, -1.0]
    given = [f"{n}={x:g}" for n, x in zip("abcf", v, strict=True)]
    code, out, err = run(capsys, "grad", *LOSS, "--hvp", *given, "--json", *where)
    assert (code, err) == (0, "")
    assert json.loads(out)["hvp"] == dict(zip("abcf", HESSIAN @ v, strict=True))
    code, out, err = run(capsys, "grad", *LOSS, "--hvp", *given, *where)
    assert (code, err) == (0, "")
    assert printed(out) == {f"hvp {n}": x for n, x in zip("abcf", HESSIAN @ v, strict=True)}
    code, out, err = run(capsys, "grad", *LOSS, "--jacobian", "--json", *where)
    assert (code, err) == (0, "")
    found = json.loads(out)
    assert found["jacobian"] == {"L": dict(zip("abcf", GRADIENT, strict=True))}
    assert found["outputs"] == {"L": -4.0}
    code, out, err = run(capsys, "grad", *LOSS, "--jacobian", *where)
    assert (code, err) == (0, "")
    assert printed(out) == {"L": -4.0, **{f"dL/d{n}": g for n, g in zip("abcf", GRADIENT,
                                                                         strict=True)}}
    code, out, err = run(capsys, "grad", *LOSS, "--hessian", *where)
    assert (code, err) == (0, "")
    assert printed(out) == {f"d2L/d{r} d{col}": HESSIAN["abcf".index(r), "abcf".index(col)]
                            for r in "abcf" for col in "abcf"}
    code, out, err = run(capsys, "grad", *LOSS, "--jvp", "a=1", "f=2", "--json", *where)
    assert (code, err) == (0, "")
    assert json.loads(out)["jvp"] == {"L": GRADIENT[0] + 2 * GRADIENT[3]}  # b, c held


def test_upstream_and_wrt(capsys: pytest.CaptureFixture[str], where: list[str]) -> None:
    v = ["a=1", "b=2", "c=0", "f=-1"]
    code, out, err = run(capsys, "grad", *LOSS, "--hvp", *v, "--upstream", "L=-3", "--json",
                         *where)
    assert (code, err) == (0, "")
    assert json.loads(out)["hvp"] == dict(zip("abcf", -3 * HESSIAN @ [1, 2, 0, -1],
                                              strict=True))
    code, out, err = run(capsys, "grad", *LOSS, "--hessian", "--wrt", "a", "--wrt", "f",
                         "--json", *where)
    assert (code, err) == (0, "")
    assert json.loads(out)["hessian"] == {"a": {"a": 0.0, "f": b}, "f": {"a": b, "f": 0.0}}


def svg_labels(path: Path) -> list[str]:
    """The text of an SVG's labels, in order."""
    text = path.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    return [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", text)]


def test_dot_draws_the_derived_graph(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                     where: list[str]) -> None:
    target = tmp_path / "hvp.svg"
    code, out, err = run(capsys, "grad", *LOSS, "--hvp", "a=1", "b=0", "c=0", "f=0", *where,
                         "--dot", str(target))
    assert (code, err) == (0, "")
    assert printed(out) == {f"hvp {n}": x for n, x in zip("abcf", HESSIAN[:, 0], strict=True)}
    labels = svg_labels(target)
    for name in ("a.tangent", "b.tangent", "c.tangent", "f.tangent", "L.tangent"):
        assert name in labels, name  # the forward-mode part drawn, as ops of the table
    # the drawn values: L's tangent along a is dL/da = b f = 4; a's tangent fed as 1
    assert labels[labels.index("L.tangent") + 1] == f"data {GRADIENT[0]:g}"
    assert labels[labels.index("a.tangent") + 1] == "data 1"
    target = tmp_path / "jvp.svg"
    code, _, err = run(capsys, "grad", QUADRATIC, "x=2", "--jvp", "x=1", *where,
                       "--dot", str(target))
    assert (code, err) == (0, "")
    labels = svg_labels(target)
    assert "x.tangent" in labels and any(t.endswith(".tangent") for t in labels if t != "x.tangent")
    assert "data 5" in labels  # the output's tangent: f'(2)
    target = tmp_path / "hessian.png"
    code, out, err = run(capsys, "grad", QUADRATIC, "x=2", "--hessian", *where, "--dot",
                         str(target))
    assert (code, err) == (0, "")
    assert out.splitlines() == ["d2out/dx dx = 4"]
    assert target.read_bytes().startswith(b"\x89PNG")


def test_refusals_exit_1_with_the_field(capsys: pytest.CaptureFixture[str],
                                        server: GradServer) -> None:
    code, out, err = run(capsys, "grad", *LOSS, "--jvp", "zz=1", "--target", server.target)
    assert (code, out) == (1, "") and "tangents.zz" in err and "Traceback" not in err
    code, out, err = run(capsys, "grad", *LOSS, "--hvp", "a=1", "c=1", "f=1", "--target",
                         server.target)
    assert (code, out) == (1, "") and "hvp_vectors.b" in err
    with pytest.raises(SystemExit):  # argparse: one kind at a time
        main(["grad", *LOSS, "--hessian", "--jacobian"])
    capsys.readouterr()


@pytest.mark.parametrize(("given", "named"), [(["--jvp", "zz=1"], "zz"),
                                               (["--hvp", "a=1", "c=1", "f=1"], "b")])
def test_local_refusals_give_a_message_not_an_exception_name(
        capsys: pytest.CaptureFixture[str], given: list[str], named: str) -> None:
    """In-process, a direction naming no input or an input left without a vector: exit 1
    with a message naming the input, as the server's refusal does (not a bare KeyError)."""
    code, out, err = run(capsys, "grad", *LOSS, *given, "--local")
    assert (code, out) == (1, "")
    assert f"'{named}'" in err and "KeyError" not in err and "Traceback" not in err, err
