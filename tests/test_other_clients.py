"""The contract needs no Python: a Node.js client and buf curl (through reflection) get answers."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
from pathlib import Path

from gradserve.server.app import GradServer

NODE_DIR = Path(__file__).resolve().parent / "node"
BUF = NODE_DIR / "node_modules" / ".bin" / "buf"


def test_node_client_computes_the_seed_loss(server: GradServer) -> None:
    node = shutil.which("node")
    assert node, "node is missing"
    done = subprocess.run([node, str(NODE_DIR / "compute_seed.js"), server.target],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply == {"request_id": "node-1", "outputs": {"L": [-4.0]},
                     "gradients": {"a": [4.0], "b": [-6.0], "c": [-2.0], "f": [2.0]}}


def curl(server: GradServer, method: str, body: dict[str, object]) -> dict[str, object]:
    done = subprocess.run(
        [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d",
         json.dumps(body), f"http://{server.target}/gradserve.v1.GradientService/{method}"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    reply: dict[str, object] = json.loads(done.stdout)
    return reply


def scalar(value: float) -> dict[str, object]:
    return {"dtype": "DATA_TYPE_FLOAT64", "doubleData": [value]}


def test_buf_curl_through_reflection(server: GradServer) -> None:
    ops = curl(server, "ListOps", {})
    assert isinstance(ops["ops"], list) and len(ops["ops"]) == 55
    reply = curl(server, "Compute", {
        "graph": {"inputs": [{"name": "x", "dtype": "DATA_TYPE_FLOAT64"}],
                  "constants": [{"name": "two", "value": scalar(2)}],
                  "nodes": [{"name": "y", "op": "pow", "inputs": ["x", "two"]}],
                  "outputs": ["y"]},
        "inputs": {"x": scalar(3)},
    })
    # JSON clients get raw_data back base64-encoded: 9.0 and 6.0 as little-endian doubles.
    outputs, gradients = reply["outputs"], reply["gradients"]
    assert isinstance(outputs, dict) and isinstance(gradients, dict)
    assert struct.unpack("<d", base64.b64decode(outputs["y"]["rawData"])) == (9.0,)
    assert struct.unpack("<d", base64.b64decode(gradients["x"]["rawData"])) == (6.0,)
