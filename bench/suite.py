"""The benchmark suite: gradserve's engine and service against what they replace, side by side
in one run, written to BENCHMARKS.md with plots under docs/benchmarks/.

Run: ``python bench/suite.py`` (about five and a half minutes on two cores). ``--quick`` is a
smoke run of under a minute (CI's): short timings, one round, a smaller large tensor, written to
a temporary folder unless ``--markdown``/``--plots`` say otherwise, so a smoke run never replaces
the committed figures. Only 127.0.0.1 is used; every load loop is bounded in calls and in time;
every server started is stopped by its PID.

Absolute times on a shared machine drift by tens of percent from one minute to the next, so
every figure judged against a target is a ratio of two measurements taken in the same run,
interleaved: rounds that alternate the two sides, the best round of each (engine section, as
bench/engine_vs_numpy.py does), or rounds that run every load case once, those compared next to
each other, each ratio the median of the rounds' ratios (load sections).

1. Engine against hand-written numpy (the same forward and backward pass written out; BLAS held
   at one thread) and, when PyTorch is installed, ``torch.autograd`` on CPU (one thread): the
   seed expressions, the 21-op scalar expression on one and on 1,024 examples, and an MLP's loss
   at batch 64 and 1,024 in float64 and float32. Every result is checked against numpy first.
2. Service ceiling: a bare echo RPC on gradserve's gRPC stack (grpc.aio) against gradserve on the
   21-op expression (on its defaults, and with batching off), unary and on the bidirectional
   stream, at concurrency 1, 16 and 64: requests/s, p50 and p99 latency, the server's CPU time
   per request, and the ratios to the echo's.
3. What a user would otherwise write: bench/torch_server.py, a plain grpc.aio server of the same
   contract computing each request on its own, with torch.autograd (when installed) and with
   hand-written numpy; the same loads as 2.
4. Dynamic batching on (the default server: adaptive) against off (``--max-batch-size 1``): the
   21-op expression at concurrency 1, 16 and 64 and with 64 and 1,024 examples per request,
   and the served MLP 784-256-10 (``mlp-model``, one example per request) at concurrency 1
   and 64: examples/s and p50 latency.
5. Large tensors: one request carrying a 1e7-element float64 input through sum(x*x), end to end
   (request built, sent, computed, the 80 MB gradient sent back and decoded) against serialising
   that request with protobuf and copying its bytes once.

This module is the command. Each section is a module of its own (``suite_engine``,
``suite_load``, ``suite_large_tensors``), the load sections driven by ``gradserve loadtest``'s
own driver (``load_driver``); ``suite_report`` writes the report and draws the plots.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from suite_engine import ENGINE_ROUNDS, engine_section
from suite_large_tensors import LARGE_ELEMENTS, QUICK_LARGE_ELEMENTS, large_section
from suite_load import load_section
from suite_report import REPO, Report, draw, machine, markdown
from threadpoolctl import threadpool_limits


def load_torch() -> Any:
    """The torch module (one intra-op thread, as BLAS is held at one), or None with a note."""
    try:
        import torch
    except ImportError as e:
        print(f"note: PyTorch is not installed ({e}): its rows are skipped")
        return None
    torch.set_num_threads(1)
    return torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI's)")
    parser.add_argument("--seconds", type=float, help="engine: seconds per row and pairing "
                        "(default 3; quick 0.2)")
    parser.add_argument("--load-seconds", type=float, help="load: seconds per case and round "
                        "(default 1.5; quick 0.3)")
    parser.add_argument("--rounds", type=int, help="load: rounds, the median shown "
                        "(default 5; quick 1)")
    parser.add_argument("--markdown", type=Path, help="where to write the report (default "
                        "BENCHMARKS.md; quick: a temporary folder)")
    parser.add_argument("--plots", type=Path, help="folder for the plots (default "
                        "docs/benchmarks; quick: a temporary folder)")
    args = parser.parse_args()
    quick = args.quick
    scratch = Path(tempfile.gettempdir()) / "gradserve-bench-quick"
    markdown_path = args.markdown or (scratch / "BENCHMARKS.md" if quick else
                                      REPO / "BENCHMARKS.md")
    plots_dir = args.plots or (scratch / "benchmarks" if quick else REPO / "docs" / "benchmarks")
    seconds = args.seconds or (0.2 if quick else 3.0)
    load_seconds = args.load_seconds or (0.3 if quick else 1.5)
    rounds = args.rounds or (1 if quick else 5)
    max_calls = 300 if quick else 1_000_000
    elements = QUICK_LARGE_ELEMENTS if quick else LARGE_ELEMENTS

    started, clock = datetime.now(UTC), time.perf_counter()
    torch = load_torch()
    notes = [] if torch is not None else [
        "PyTorch is not installed on this machine: the torch.autograd columns and rows are "
        "skipped (install it and rerun to fill them)."]
    print("1. engine against hand-written numpy" + (" and torch.autograd" if torch else ""))
    with threadpool_limits(limits=1, user_api="blas"):
        engine_rows = engine_section(seconds, torch)
    print("2-4. service, plain servers, batching")
    load_rows = asyncio.run(load_section(load_seconds, rounds, max_calls, torch))
    print(f"5. large tensors: {elements:,} float64 values")
    large = asyncio.run(large_section(elements, 2 if quick else 5))

    report = Report(
        command=shlex.join(["python", "bench/suite.py", *sys.argv[1:]]),
        quick=quick, started=started, elapsed=time.perf_counter() - clock,
        settings=f"engine {seconds:g} s per row and pairing in {ENGINE_ROUNDS} rounds; load "
                 f"{rounds} round(s) of {load_seconds:g} s per case; large tensor best of "
                 f"{2 if quick else 5}",
        machine=machine(torch), engine=engine_rows, load=load_rows, large=large, notes=notes)
    plots = draw(report, plots_dir)
    text = markdown(report, plots, markdown_path)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(text)
    print()
    print(text)
    print(f"wrote {markdown_path}" + "".join(f", {p}" for p in plots))


if __name__ == "__main__":
    main()
