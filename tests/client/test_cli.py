"""The gradserve command, against a real server and in-process (--local)."""

from __future__ import annotations

import html
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format

from gradserve.cli.main import main
from gradserve.engine.builder import GraphBuilder
from gradserve.server.app import GradServer
from gradserve.wire.graphs import graph_to_wire


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("x", "value", "slope"), [("2", "6", "5"), ("6", "58", "21"),
                                                    ("-2", "18", "-11")])
def test_grad_prints_value_and_gradient(server: GradServer, capsys: pytest.CaptureFixture[str],
                                        x: str, value: str, slope: str) -> None:
    code, out, _ = run(capsys, "grad", "2*x**2 - 3*x + 4", f"x={x}", "--target", server.target)
    assert code == 0
    assert out.splitlines() == [f"out = {value}", f"dout/dx = {slope}"]


def test_grad_json(server: GradServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "grad", "L = (a*b + c) * f", "a=3", "b=-2", "c=8", "f=-2",
                       "--json", "--target", server.target)
    assert code == 0
    assert json.loads(out) == {"outputs": {"L": -4.0},
                               "gradients": {"a": 4.0, "b": -6.0, "c": -2.0, "f": 2.0}}


def test_grad_prints_gradients_in_input_order(server: GradServer,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The inputs in the order the expression first uses them, in text and in JSON."""
    args = ["grad", "L = (f*c + b) * a", "a=3", "b=-2", "c=8", "f=-2", "--target", server.target]
    code, out, _ = run(capsys, *args)
    assert code == 0
    assert [line.split(" = ")[0] for line in out.splitlines()[1:]] == [
        "dL/df", "dL/dc", "dL/db", "dL/da"]
    code, out, _ = run(capsys, *args, "--json")
    assert list(json.loads(out)["gradients"]) == ["f", "c", "b", "a"]


def test_grad_tensors_and_npy_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    np.save(tmp_path / "w.npy", np.array([[1.0, 2.0], [3.0, 4.0]]))
    code, out, _ = run(capsys, "grad", "sum(relu(W @ x))", f"W=@{tmp_path / 'w.npy'}",
                       "x=[1,-1]", "--json", "--local")
    assert code == 0
    result = json.loads(out)
    # W @ x = [-1, -1] -> relu -> 0: no gradient flows.
    assert result == {"outputs": {"out": 0.0},
                      "gradients": {"W": [[0.0, 0.0], [0.0, 0.0]], "x": [0.0, 0.0]}}


def test_grad_from_a_json_graph(server: GradServer, capsys: pytest.CaptureFixture[str],
                                tmp_path: Path) -> None:
    g = GraphBuilder()
    x = g.input("x")
    y = g.op("mul", x, x, name="y")
    path = tmp_path / "graph.json"
    path.write_text(json_format.MessageToJson(graph_to_wire(g.build(y), raw=False)))
    code, out, _ = run(capsys, "grad", "--graph", str(path), "x=3", "--json",
                       "--target", server.target)
    assert code == 0
    assert json.loads(out) == {"outputs": {"y": 9.0}, "gradients": {"x": 6.0}}


@pytest.mark.parametrize("suffix", ["svg", "png"])
def test_dot_draws_values_and_gradients(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                        suffix: str) -> None:
    target = tmp_path / f"graph.{suffix}"
    code, _, _ = run(capsys, "grad", "L = (a*b + c) * f", "a=3", "b=-2", "c=8", "f=-2",
                     "--local", "--dot", str(target))
    assert code == 0
    data = target.read_bytes()
    if suffix == "svg":
        text = html.unescape(data.decode())
        for label in ("data 3", "grad 4", "data -4", "grad 1", "mul", "add"):
            assert label in text
    else:
        assert data.startswith(b"\x89PNG")


def test_errors_exit_1_with_a_message(server: GradServer,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "grad", "sum(x, axis=[5])", "x=[1,2]", "--target", server.target)
    assert code == 1 and "INVALID_ARGUMENT" in err and "axis" in err
    code, _, err = run(capsys, "grad", "__import__('os')", "--local")
    assert code == 1 and "unknown op" in err
    code, _, err = run(capsys, "grad", "log(x)", "x=0", "--local")
    assert code == 0 and "NaN or infinite" in err


def test_ops_and_health(server: GradServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ops", "--target", server.target)
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert len(names) == 55 and "softmax_cross_entropy" in names and "conv" in names
    pow_line = next(line for line in out.splitlines() if line.startswith("pow "))
    assert "At edge points:" in pow_line and "-inf where a = 0 and b < 0" in pow_line
    assert run(capsys, "health", "--target", server.target)[0] == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    code, _, err = run(capsys, "health", "--target", f"127.0.0.1:{free}", "--timeout", "1")
    assert code == 1 and "UNAVAILABLE" in err


def test_gradserve_serve_runs_until_sigterm() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "gradserve"
    proc = subprocess.Popen([str(exe), "serve", "--port", str(port), "--metrics-port", "0"],
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "GRADSERVE_LOG_JSON": "true"})
    try:
        deadline = time.monotonic() + 15
        while main(["health", "--target", f"127.0.0.1:{port}", "--timeout", "0.5"]) != 0:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0
    messages = [json.loads(line)["message"] for line in err.splitlines() if line.startswith("{")]
    assert messages[0].startswith("serving on") and messages[-1] == "stopped"


@pytest.mark.parametrize("taken", ["metrics", "grpc"])
def test_gradserve_serve_names_an_address_in_use_and_its_flag(taken: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        flags = (["--port", "0", "--metrics-port", str(port)] if taken == "metrics" else
                 ["--port", str(port), "--metrics-port", "0"])
        exe = Path(sys.executable).parent / "gradserve"
        done = subprocess.run([str(exe), "serve", *flags], capture_output=True, text=True,
                              timeout=30, check=False)
    assert done.returncode != 0
    assert f"127.0.0.1:{port}" in done.stderr
    assert ("--metrics-port" if taken == "metrics" else "--port") in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("argv", "words"), [
    (["grad", "--graph", "GRAPH", "x=1", "--local"], "ParseError"),
    (["grad", "x*2", "x=1", "--local", "--dot", "graph.txt"], ".svg or .png"),
    (["grad", "+".join(["x"] * 3000), "x=1", "--local"], "nested too deeply"),
    (["grad", "1" + "0" * 400 + "*x", "x=1", "--local"], "too large"),
    (["grad", "1e400*x", "x=1", "--local"], "too large"),
    (["grad", "2*x", "x=1e400", "--local"], "x: a number is too large for float64"),
    (["grad", "2*x", "x=" + "1" + "0" * 400, "--local"], "x: a number is too large for float64"),
    (["grad", "2*" + "-" * 50000 + "x", "x=1", "--local"], "the expression is nested too deeply"),
    (["grad", "**".join(["x"] * 3000), "x=1", "--local"], "the expression is nested too deeply"),
    (["grad", "x", "x=" + "[" * 50000 + "1" + "]" * 50000, "--local"],
     "x: the value is nested too deeply"),
])
def test_bad_input_gives_a_message_not_a_traceback(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path, argv: list[str],
                                                   words: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"bogus": 1}')
    code, _, err = run(capsys, *(str(bad) if a == "GRAPH" else a for a in argv))
    assert code == 1
    assert words in err and "Traceback" not in err


def test_a_file_that_is_not_npy_is_refused_without_advice_to_unpickle(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    code, _, err = run(capsys, "grad", "2*x", f"x=@{passwd}", "--local")
    assert code == 1
    assert err == f"gradserve: x: not a .npy array of numbers: {str(passwd)!r}\n"


BLACK_H, WIDE_X = "\N{BLACK-LETTER CAPITAL H}", "\N{FULLWIDTH LATIN SMALL LETTER X}"


@pytest.mark.parametrize(("expression", "value", "name"), [
    (f"2*{BLACK_H}", f"{BLACK_H}=3", "H"), (f"2*{WIDE_X}", f"{WIDE_X}=3", "x"),
    (f"2*{WIDE_X}", "x=3", "x"), ("2*x", f"{WIDE_X}=3", "x"),
])
def test_names_fold_alike_in_the_expression_and_the_values(
        capsys: pytest.CaptureFixture[str], expression: str, value: str, name: str) -> None:
    code, out, err = run(capsys, "grad", expression, value, "--json", "--local")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"outputs": {"out": 6.0}, "gradients": {name: 2.0}}


def test_a_graph_files_names_are_taken_as_written(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    g = GraphBuilder()
    h = g.input(BLACK_H)
    path = tmp_path / "graph.json"
    path.write_text(json_format.MessageToJson(graph_to_wire(g.build(g.op("mul", h, h, name="y")),
                                                            raw=False)))
    code, out, _ = run(capsys, "grad", "--graph", str(path), f"{BLACK_H}=3", "--json", "--local")
    assert code == 0
    assert json.loads(out) == {"outputs": {"y": 9.0}, "gradients": {BLACK_H: 6.0}}
