"""The suite's report: the targets the benchmark issue sets and this run's verdict on each, what
the machine is, BENCHMARKS.md (how the figures were made, then every section's table) and the
plots under docs/benchmarks/ (matplotlib): every ratio, the service's latencies, batching."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import google.protobuf
import grpc
import numpy as np
from suite_engine import EngineRow, duration
from suite_large_tensors import LARGE_SERVER_FLAGS, LargeResult
from suite_load import (
    BATCH_CONCURRENCY,
    BATCHING_OFF,
    BATCHING_TABLE,
    CONCURRENCY,
    ECHO_SERVER,
    EXPR21,
    GRADSERVE,
    MODEL,
    PLAIN_NUMPY,
    PLAIN_TORCH,
    SERVICE,
    LoadRow,
    find,
)
from threadpoolctl import threadpool_info

REPO = Path(__file__).resolve().parent.parent
ECHO_GOAL = "gradserve / echo, unary, concurrency 64"
ECHO_CPU_GOAL = "gradserve / echo, server CPU per request, unary, concurrency 64"
TORCH_GOAL = "gradserve / plain torch.autograd server, unary, concurrency 64"
NUMPY_GOAL = "gradserve / plain numpy server, unary, concurrency 64"
LATENCY_GOAL = "p50 latency, batching on / off, unary, concurrency 1, {}"
MODEL_GOAL = "requests/s, batching on / off, mlp-model, unary, concurrency 64"
BATCHING_GOAL = "batching on / off, {}, {} per request, concurrency {}"
STREAM_GOAL = "gradserve stream / echo, one example per message, concurrency 64"
LARGE_GOAL = "large tensor ({:,} float64) end to end / serialise-and-copy"


@dataclass(frozen=True)
class Goal:
    """A target the benchmark issue sets, and the figure this run measured for it."""

    what: str
    measured: float
    bound: float
    higher: bool  # the target is measured >= bound (else measured <= bound)
    unit: str = "x"

    @property
    def met(self) -> bool:
        return self.measured >= self.bound if self.higher else self.measured <= self.bound

    @property
    def verdict(self) -> str:
        """"met", or by how much it was missed, relative to the bound."""
        if self.met:
            return "met"
        short = 1 - self.measured / self.bound if self.higher else self.measured / self.bound - 1
        return f"missed by {short:.1%}" if short < 0.1 else f"missed by {short:.0%}"

    @property
    def target(self) -> str:
        return f"{'>=' if self.higher else '<='} {number(self.bound, self.unit)}"


def number(value: float, unit: str) -> str:
    """A figure with its unit: ratios as 1.23x, rates with thousands separators."""
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "examples/s":
        return f"{value:,.0f} examples/s"
    return f"{value:.2f} {unit}"


def examples(n: int) -> str:
    return f"{n:,} example{'s' if n > 1 else ''}"


def load_goals(rows: Sequence[LoadRow]) -> list[Goal]:
    """The batching issue's targets for the service, each against this run's figure (those
    ``rows`` measure), in the issue's order: unary at concurrency 64 against the echo (rate and
    server CPU per request) and the plain servers; p50 latency at concurrency 1, batching on
    against off; batching on against off on the model workload at concurrency 64, and in every
    row of the batching table with more than one call in flight; the stream against the
    echo."""
    goals: list[Goal] = []
    ours, echo = find(rows, GRADSERVE, "unary", 64), find(rows, ECHO_SERVER, "unary", 64)
    if ours is not None and echo is not None:
        goals.append(Goal(ECHO_GOAL, ours.over(echo), 0.8, higher=True))
        if ours.cpus and echo.cpus:
            goals.append(Goal(ECHO_CPU_GOAL, ours.cpu_over(echo), 1.3, higher=False))
    for plain, what, bound in ((PLAIN_NUMPY, NUMPY_GOAL, 1.0), (PLAIN_TORCH, TORCH_GOAL, 2.5)):
        theirs = find(rows, plain, "unary", 64)
        if ours is not None and theirs is not None:
            goals.append(Goal(what, ours.over(theirs), bound, higher=True))
    for workload in (EXPR21, MODEL):
        on = find(rows, GRADSERVE, "unary", 1, workload=workload)
        off = find(rows, BATCHING_OFF, "unary", 1, workload=workload)
        if on is not None and off is not None:
            goals.append(Goal(LATENCY_GOAL.format(workload), on.p50_over(off), 1.1,
                              higher=False))
    on = find(rows, GRADSERVE, "unary", 64, workload=MODEL)
    off = find(rows, BATCHING_OFF, "unary", 64, workload=MODEL)
    if on is not None and off is not None:
        goals.append(Goal(MODEL_GOAL, on.over(off), 1.5, higher=True))
    # dynamic batching never costs throughput where there is anything to batch (alone, at
    # concurrency 1, it is judged by its latency, above)
    for workload, c, n in BATCHING_TABLE:
        if c == 1:
            continue
        on = find(rows, GRADSERVE, "unary", c, n, workload)
        off = find(rows, BATCHING_OFF, "unary", c, n, workload)
        if on is not None and off is not None:
            goals.append(Goal(BATCHING_GOAL.format(workload, examples(n), c), on.over(off),
                              1.0, higher=True))
    stream = find(rows, GRADSERVE, "stream", 64)
    if stream is not None and echo is not None:
        goals.append(Goal(STREAM_GOAL, stream.over(echo), 0.8, higher=True))
    return goals


@dataclass(frozen=True)
class Report:
    """Everything one run measured, and how."""

    command: str
    quick: bool
    started: datetime
    elapsed: float
    settings: str
    machine: list[tuple[str, str]]
    engine: list[EngineRow]
    load: list[LoadRow]
    large: LargeResult
    notes: list[str]

    def service(self, server: str, mode: str, concurrency: int) -> LoadRow | None:
        """A row of sections 2-3 (the expression, one example per request), if measured."""
        return find(self.load, server, mode, concurrency)

    def batching(self, server: str, workload: str, concurrency: int, examples: int
                 ) -> LoadRow | None:
        """A row of the batching table (unary), if it was measured."""
        return find(self.load, server, "unary", concurrency, examples, workload)

    def goals(self) -> list[Goal]:
        """The issue's targets against this run's figures (those it could measure)."""
        goals: list[Goal] = []
        for row in self.engine:
            if row.case.goal == "numpy":
                goals.append(Goal(f"engine / hand numpy, {row.case.name}",
                                  row.engine / row.numpy, 1.2, higher=False))
            elif row.case.goal == "node":
                goals.append(Goal(f"engine per node, {row.case.name}",
                                  row.engine / row.nodes * 1e6, 3.0, False, "us/node"))
                if row.torch is not None:
                    engine, torch = row.torch
                    goals.append(Goal(f"torch.autograd / engine, {row.case.name}",
                                      torch / engine, 3.0, higher=True))
        goals += load_goals(self.load)
        bulk = self.batching(GRADSERVE, EXPR21, BATCH_CONCURRENCY, 1024)
        if bulk is not None:
            goals.append(Goal(f"examples/s, 1,024 examples per request, concurrency "
                              f"{BATCH_CONCURRENCY}", bulk.examples_rate, 500_000, True,
                              "examples/s"))
        goals.append(Goal(LARGE_GOAL.format(self.large.elements), self.large.ratio, 3.0,
                          higher=False))
        return goals

    def ratios(self) -> list[tuple[str, float, Goal | None]]:
        """Every ratio of the run, labelled, with its target if it has one (for the plot)."""
        goals = {g.what: g for g in self.goals()}
        out: list[tuple[str, float, Goal | None]] = []
        for row in self.engine:
            out.append((f"engine/numpy: {row.case.name}", row.engine / row.numpy,
                        goals.get(f"engine / hand numpy, {row.case.name}")))
            if row.torch is not None:
                out.append((f"torch/engine: {row.case.name}", row.torch[1] / row.torch[0],
                            goals.get(f"torch.autograd / engine, {row.case.name}")))
        for load in self.load:
            case, echo = load.case, self.service(ECHO_SERVER, "unary", load.case.concurrency)
            if case.section == SERVICE and case.server != ECHO_SERVER and echo is not None:
                goal = goals.get({(GRADSERVE, "unary", 64): ECHO_GOAL,
                                  (GRADSERVE, "stream", 64): STREAM_GOAL}.get(
                    (case.server, case.mode, case.concurrency), ""))
                out.append((f"{case.server} / echo, {case.mode}, c{case.concurrency}",
                            load.over(echo), goal))
        ours, echo = self.service(GRADSERVE, "unary", 64), self.service(ECHO_SERVER, "unary", 64)
        if ours is not None and echo is not None and ours.cpus and echo.cpus:
            out.append(("gradserve / echo, server CPU per request, unary, c64",
                        ours.cpu_over(echo), goals.get(ECHO_CPU_GOAL)))
        for plain, what in ((PLAIN_NUMPY, NUMPY_GOAL), (PLAIN_TORCH, TORCH_GOAL)):
            theirs = self.service(plain, "unary", 64)
            if ours is not None and theirs is not None:
                out.append((f"gradserve / {plain}, unary, c64", ours.over(theirs),
                            goals.get(what)))
        for workload in (EXPR21, MODEL):
            on = self.batching(GRADSERVE, workload, 1, 1)
            off = self.batching(BATCHING_OFF, workload, 1, 1)
            if on is not None and off is not None:
                what = LATENCY_GOAL.format(workload)
                out.append((what, on.p50_over(off), goals.get(what)))
        for workload, c, n in BATCHING_TABLE:
            on = self.batching(GRADSERVE, workload, c, n)
            off = self.batching(BATCHING_OFF, workload, c, n)
            if on is not None and off is not None:
                what = BATCHING_GOAL.format(workload, examples(n), c)
                out.append((what, on.over(off), goals.get(
                    MODEL_GOAL if (workload, c, n) == (MODEL, 64, 1) else what)))
        out.append(("large tensor: end to end / floor", self.large.ratio,
                    goals.get(LARGE_GOAL.format(self.large.elements))))
        return out


def machine(torch: Any) -> list[tuple[str, str]]:
    """What this machine is, and the versions that matter to the figures."""
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info
                          if line.startswith("model name")), "unknown")
    except OSError:
        model = platform.processor() or "unknown"
    cores = f"{os.cpu_count()}"
    if hasattr(os, "sched_getaffinity"):
        cores += f" ({len(os.sched_getaffinity(0))} usable by this process)"
    memory = "unknown"
    try:
        with open("/proc/meminfo") as info:
            kb = next(int(line.split()[1]) for line in info if line.startswith("MemTotal"))
        memory = f"{kb / (1 << 20):.1f} GiB"
    except (OSError, StopIteration):
        pass
    blas = "; ".join(f"{i['internal_api']} {i.get('version', '')} ({i['num_threads']} threads "
                     f"by default)" for i in threadpool_info() if i["user_api"] == "blas")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                            capture_output=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, text=True,
                           capture_output=True, check=False).stdout.strip()
    return [
        ("CPU", model),
        ("cores", cores),
        ("memory", memory),
        ("OS", platform.platform()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("numpy", np.__version__),
        ("grpcio", grpc.__version__),
        ("protobuf", google.protobuf.__version__),
        ("PyTorch", "not installed: its rows are skipped" if torch is None else
         f"{torch.__version__} (CPU, {torch.get_num_threads()} thread)"),
        ("BLAS", f"{blas or 'none found'}; held at 1 thread in section 1"),
        ("commit", (commit or "unknown") + (" with uncommitted changes" if dirty else "")),
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """A Markdown table: the first ``left`` columns left-aligned (names), the rest
    right-aligned (figures)."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if k < left else "---:" for k in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def service_table(report: Report) -> list[str]:
    """Sections 2-3's table: every service row, its rate, latencies and server CPU per
    request, each against the echo's at the same concurrency."""
    rows = []
    for row in report.load:
        if row.case.section != SERVICE:
            continue
        echo = report.service(ECHO_SERVER, "unary", row.case.concurrency)
        if row.case.server == ECHO_SERVER or echo is None:
            ratio = cpu = "ceiling"
        else:
            ratio = f"{row.over(echo):.2f}x"
            cpu = f"{row.cpu_over(echo):.2f}x" if echo.cpus and row.cpus else ""
        rows.append([row.case.server, row.case.mode, str(row.case.concurrency),
                     f"{row.rate:,.0f}", ratio, duration(row.p50), duration(row.p99),
                     duration(row.cpu) if row.cpus else "", cpu])
    return table(["server", "call", "concurrency", "requests/s", "vs echo", "p50", "p99",
                  "server CPU / request", "vs echo"], rows, left=2)


def markdown(report: Report, plots: Sequence[Path], markdown_path: Path) -> str:
    """BENCHMARKS.md: how it was made, the machine, the targets, each section, the plots."""
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `bench/suite.py` on {report.started:%Y-%m-%d %H:%M} UTC in "
        f"{report.elapsed:.0f} s ({report.settings}). Reproduce from the repository root:",
        "",
        "```sh",
        report.command,
        "```",
        "",
        "Absolute times on a shared machine drift, so every judged figure is a ratio of two "
        "measurements taken side by side in this run. Section 1 alternates the two sides in "
        "rounds and keeps each side's best round (as bench/engine_vs_numpy.py does). Sections "
        "2-4 run every case once per round, the cases compared with each other next to each "
        "other; rates and latencies are the medians of the rounds, and ratios the medians of "
        "the rounds' ratios; each server's CPU time (user and system, all its threads, from "
        "/proc) is read around each run and divided by the requests answered. Section 5 "
        "alternates and keeps the best of each. The client and the servers share this "
        "machine's cores.",
        "",
    ]
    if report.quick:
        lines += ["**A `--quick` smoke run: too short for its figures to mean anything.**", ""]
    lines += [*(f"- {note}" for note in report.notes), ""] if report.notes else []
    lines += ["## Machine", "", *table(["", ""], report.machine, left=2), "",
              "## Targets", "",
              *table(["target", "measured", "wanted", "verdict"],
                     [[g.what, number(g.measured, g.unit), g.target, g.verdict]
                      for g in report.goals()]), ""]

    lines += ["## 1. Engine against hand-written numpy and torch.autograd", "",
              "Seconds per call of a forward and backward pass (outputs and every gradient), "
              "each checked against the hand-written numpy first. torch.autograd is paired with "
              "the engine separately; its ratio is torch's time over the engine's in that "
              "pairing (above 1: the engine is faster).", ""]
    lines += table(["case", "nodes", "engine", "numpy", "engine / numpy", "torch.autograd",
                    "torch / engine"],
                   [[r.case.name, str(r.nodes), duration(r.engine), duration(r.numpy),
                     f"{r.engine / r.numpy:.2f}x",
                     duration(r.torch[1]) if r.torch else "not installed",
                     f"{r.torch[1] / r.torch[0]:.2f}x" if r.torch else ""]
                    for r in report.engine])
    lines += ["", "## 2-3. Service against a bare echo, and against plain servers", "",
              "The 21-op scalar expression, one example per request, registered once and "
              "called by id; the echo returns the same request bytes on gradserve's gRPC stack "
              "(the ceiling for any service). Streams keep that many requests in flight on one "
              "stream; their ratio is to the unary echo at the same concurrency. gradserve "
              "runs on its defaults (adaptive batching), and with `--max-batch-size 1` "
              "(batching off). The plain servers are bench/torch_server.py: grpc.aio, each "
              "request computed on its own (torch.autograd, or hand-written numpy). Server "
              "CPU: the server process's CPU time per request answered, and its ratio to the "
              "echo's at the same concurrency.", ""]
    lines += service_table(report)
    versus = []
    for plain in (PLAIN_NUMPY, PLAIN_TORCH):
        for mode in ("unary", "stream"):
            for c in CONCURRENCY:
                ours, theirs = report.service(GRADSERVE, mode, c), report.service(plain, mode, c)
                if ours is not None and theirs is not None:
                    versus.append([plain, mode, str(c), f"{ours.over(theirs):.2f}x"])
    lines += ["", "gradserve's requests/s over each plain server's:", "",
              *table(["plain server", "call", "concurrency", "gradserve / plain"], versus,
                     left=2)]
    if report.service(PLAIN_TORCH, "unary", 1) is None:
        lines += ["", "PyTorch is not installed here, so there are no torch.autograd rows."]
    lines += ["", "## 4. Dynamic batching", "",
              "Unary calls, the default server (adaptive batching on) against "
              "`--max-batch-size 1` (off), the two run next to each other in each round. "
              "`expr21`: the 21-op expression, examples stacked in each request (its "
              "one-example rows are section 2's); `mlp-model`: a served MLP 784-256-10 "
              "(weights constant), one example per request, the gradient with respect to x, "
              "alone and with 64 calls in flight.", ""]
    rows = []
    for workload, c, n in BATCHING_TABLE:
        on = report.batching(GRADSERVE, workload, c, n)
        off = report.batching(BATCHING_OFF, workload, c, n)
        if on is not None and off is not None:
            rows.append([workload, str(c), f"{n:,}", f"{on.examples_rate:,.0f}",
                         f"{off.examples_rate:,.0f}", f"{on.over(off):.2f}x", duration(on.p50),
                         duration(off.p50), f"{on.p50_over(off):.2f}x"])
    lines += table(["workload", "calls in flight", "examples per request", "on: examples/s",
                    "off: examples/s", "on / off", "on: p50", "off: p50", "p50 on / off"],
                   rows)
    large = report.large
    lines += ["", "## 5. Large tensors", "",
              f"One request carrying {large.elements:,} float64 values "
              f"({large.request_bytes / 1e6:.0f} MB) through sum(x*x), the server started with "
              f"`{shlex.join(LARGE_SERVER_FLAGS)}` and the client channel's message limits "
              "raised to match. End "
              "to end: the request built, sent, computed, and the gradient (as large again) "
              "sent back and decoded. The floor: building and serialising that request with "
              "protobuf, plus one copy of its bytes. Best of the rounds, alternating. (gRPC's "
              "own round trip of such a message is not measured apart: bench/servers.py's echo "
              "servers keep gRPC's 4 MB message limit.)", ""]
    lines += table(["", "time"], [
        ["end to end", duration(large.end_to_end)],
        ["floor: build and serialise the request", duration(large.serialise)],
        ["floor: copy its bytes once", duration(large.copy)],
        ["end to end / floor", f"{large.ratio:.2f}x"],
    ])
    if plots:
        lines += ["", "## Plots", ""]
        for path in plots:
            link = os.path.relpath(path, markdown_path.parent)
            lines += [f"![{path.stem}]({link})", ""]
    return "\n".join(lines).rstrip() + "\n"


def draw(report: Report, directory: Path) -> list[Path]:
    """The plots (matplotlib, Agg): every ratio, the service rows' latencies, batching.
    Without matplotlib, a note and no plots."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed; no plots")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    return [draw_ratios(plt, report, directory / "ratios.png"),
            draw_latency(plt, report, directory / "service_latency.png"),
            draw_batching(plt, report, directory / "batching.png")]


def draw_ratios(plt: Any, report: Report, path: Path) -> Path:
    """Every ratio as a bar (log scale), coloured by its target when it has one."""
    ratios = report.ratios()
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(ratios) + 1.2))
    labels = [label for label, _, _ in ratios]
    values = [value for _, value, _ in ratios]
    colours = ["tab:grey" if goal is None else "tab:green" if goal.met else "tab:red"
               for _, _, goal in ratios]
    ax.barh(range(len(ratios)), values, color=colours)
    for k, (_, value, goal) in enumerate(ratios):
        note = f" {value:.2f}x" + (f" (target {goal.target})" if goal else "")
        # right of the bar and of its target's mark
        at = max(value, goal.bound) * 1.03 if goal is not None and goal.unit == "x" else value
        ax.text(at, k, note, va="center", fontsize=7)
        if goal is not None and goal.unit == "x":
            ax.plot([goal.bound], [k], marker="|", color="black", markersize=10)
    ax.set_yticks(range(len(ratios)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.5)
    ax.set_xlabel("ratio (log scale); green: target met, red: missed, |: the target")
    ax.set_title("Every ratio of the run")
    return save(plt, fig, path)


def save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_latency(plt: Any, report: Report, path: Path) -> Path:
    """p50 and p99 of every one-example service row."""
    rows = [r for r in report.load if r.case.section == SERVICE]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.2))
    names = [f"{r.case.server}, {r.case.mode}, c{r.case.concurrency}" for r in rows]
    at = np.arange(len(rows))
    ax.barh(at - 0.2, [r.p50 * 1e6 for r in rows], height=0.4, label="p50")
    ax.barh(at + 0.2, [r.p99 * 1e6 for r in rows], height=0.4, label="p99")
    ax.set_yticks(at, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("latency per call, us (log scale)")
    ax.set_title("Service latency: the 21-op expression, one example per call")
    ax.legend()
    return save(plt, fig, path)


def draw_batching(plt: Any, report: Report, path: Path) -> Path:
    """Examples/s with batching on and off, by workload, calls in flight and examples per
    request."""
    pairs = [(f"{workload}\nc{c}, {n:,}/request",
              report.batching(GRADSERVE, workload, c, n),
              report.batching(BATCHING_OFF, workload, c, n))
             for workload, c, n in BATCHING_TABLE]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    at = np.arange(len(pairs))
    ax.bar(at - 0.2, [on.examples_rate if on else 0 for _, on, _ in pairs], width=0.4,
           label="batching on (default)")
    ax.bar(at + 0.2, [off.examples_rate if off else 0 for _, _, off in pairs], width=0.4,
           label="--max-batch-size 1")
    for k, (_, on, off) in enumerate(pairs):
        if on is not None and off is not None:
            ax.text(k, max(on.examples_rate, off.examples_rate) * 1.3, f"{on.over(off):.2f}x",
                    ha="center", fontsize=8)
    ax.axhline(500_000, color="black", linewidth=0.5, linestyle="--",
               label="target at 1,024 per request: 500,000")
    ax.set_xticks(at, [label for label, _, _ in pairs], fontsize=8)
    ax.set_yscale("log")
    highest = max((r.examples_rate for _, on, off in pairs for r in (on, off) if r), default=1.0)
    ax.set_ylim(top=highest * 30)  # room for the legend above the bars
    ax.set_ylabel("examples/s (log scale)")
    ax.set_title("Dynamic batching on against off (on / off above each pair)")
    ax.legend()
    return save(plt, fig, path)

