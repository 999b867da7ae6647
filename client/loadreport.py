"""What ``gradserve loadtest`` prints: a summary like ghz's, as text, JSON or CSV, and a plot.

Latency figures count answered (OK) calls only, as ghz does; every call, failed or not,
counts in the status distribution, and failures' messages are listed with their counts. When
the server's metrics endpoint is given, the batches it formed during the run are read from
it: the requests and examples per engine pass.
"""

from __future__ import annotations

import csv
import io
import json
import math
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from gradserve.client.loadtest import Run

PERCENTILES = (50, 90, 95, 99)
BINS = 10  # latency histogram bars


@dataclass(frozen=True)
class Batching:
    """Engine passes the server ran during the run, and their average size."""

    passes: float
    requests_per_pass: float
    examples_per_pass: float


@dataclass(frozen=True)
class Summary:
    """A run in figures. Latencies in seconds."""

    count: int
    seconds: float
    requests_per_second: float
    examples_per_second: float
    latency: dict[str, float]  # min, mean, p50 ... max over OK calls
    histogram: list[tuple[float, int]]  # (upper bound, calls)
    statuses: dict[str, int]
    errors: dict[str, int]  # message -> calls
    checked: int
    wrong: int
    batching: Batching | None = None


def summarize(run: Run, batching: Batching | None = None) -> Summary:
    ok = np.array([c.latency for c in run.calls if c.code == "OK"])
    latency: dict[str, float] = {}
    histogram: list[tuple[float, int]] = []
    if ok.size:
        latency = {"min": float(ok.min()), "mean": float(ok.mean()),
                   **{f"p{p}": float(np.percentile(ok, p)) for p in PERCENTILES},
                   "max": float(ok.max())}
        counts, edges = np.histogram(ok, bins=BINS)
        histogram = [(float(e), int(c)) for e, c in zip(edges[1:], counts, strict=True)]
    seconds = run.seconds or math.nan
    return Summary(
        count=len(run.calls), seconds=run.seconds,
        requests_per_second=len(run.calls) / seconds,
        examples_per_second=ok.size * run.examples_per_request / seconds,
        latency=latency, histogram=histogram,
        statuses=dict(Counter(c.code for c in run.calls).most_common()),
        errors=dict(Counter(f"{c.code}: {c.error}" for c in run.calls
                            if c.code != "OK").most_common()),
        checked=sum(c.checked for c in run.calls), wrong=sum(c.wrong for c in run.calls),
        batching=batching)


# --- the server's batches, from its metrics -------------------------------------------------

_PASS_SERIES = ("gradserve_batch_requests_count", "gradserve_batch_requests_sum",
                "gradserve_batch_examples_sum")


def read_metrics(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """The unlabelled samples called ``names`` at ``url`` (a /metrics endpoint)."""
    from prometheus_client.parser import text_string_to_metric_families

    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"--metrics takes an http(s) URL, not {url!r}")
    # The scheme is checked just above: no file: or custom URLs.
    with urllib.request.urlopen(url, timeout=5) as reply:  # nosec B310
        text = reply.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name in names}


def read_batching(url: str) -> dict[str, float]:
    """The batch counters at ``url``, to subtract before from after."""
    return read_metrics(url, _PASS_SERIES)


def batching_between(before: dict[str, float], after: dict[str, float]) -> Batching:
    passes, requests, examples = (after.get(n, 0.0) - before.get(n, 0.0) for n in _PASS_SERIES)
    return Batching(passes, requests / passes if passes else 0.0,
                    examples / passes if passes else 0.0)


# --- rendering ------------------------------------------------------------------------------


def render(summary: Summary, run: Run, form: str) -> str:
    """The report as ``text``, ``json`` (the summary) or ``csv`` (one row per call)."""
    if form == "json":
        return json.dumps(asdict(summary), indent=2)
    if form == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["due_s", "latency_s", "status", "checked", "wrong", "error"])
        for c in sorted(run.calls, key=lambda c: c.due):
            writer.writerow([f"{c.due:.6f}", f"{c.latency:.6f}", c.code, int(c.checked),
                             int(c.wrong), c.error])
        return out.getvalue()
    return _text(summary, run)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _text(s: Summary, run: Run) -> str:
    c = run.config
    lines = ["Summary:",
             f"  Workload:     {c.workload.name} ({c.workload.doc}), "
             f"{run.examples_per_request} example(s) per request, {c.mode}",
             "  Load:         " + (f"open loop at {c.rps:g} requests/s" if c.rps else
                                    f"closed loop, {c.concurrency} callers"),
             f"  Count:        {s.count}",
             f"  Total:        {s.seconds:.2f} s",
             f"  Requests/sec: {s.requests_per_second:,.1f}",
             f"  Examples/sec: {s.examples_per_second:,.1f}"]
    if s.latency:
        lines += [f"  Fastest:      {_ms(s.latency['min'])}",
                  f"  Slowest:      {_ms(s.latency['max'])}",
                  f"  Average:      {_ms(s.latency['mean'])}",
                  "", "Latency distribution (OK calls):"]
        lines += [f"  {p}% in {_ms(s.latency[f'p{p}'])}" for p in PERCENTILES]
        widest = max(n for _, n in s.histogram) or 1
        lines += ["", "Response time histogram:"]
        lines += [f"  {_ms(bound):>12s} [{n}]\t|{'∎' * round(40 * n / widest)}"
                  for bound, n in s.histogram]
    lines += ["", "Status code distribution:"]
    lines += [f"  [{code}]\t{n} responses" for code, n in s.statuses.items()]
    if s.errors:
        lines += ["", "Error distribution:"]
        lines += [f"  [{n}]\t{message}" for message, n in s.errors.items()]
    if s.checked:
        lines += ["", f"Verified: {s.checked} answers against the local engine, "
                      f"{s.wrong} wrong"]
    if s.batching is not None:
        b = s.batching
        lines += ["", f"Server batching: {b.passes:g} engine passes, "
                      f"{b.requests_per_pass:.1f} requests and {b.examples_per_pass:.1f} "
                      "examples per pass"]
    return "\n".join(lines)


def plot(run: Run, path: str) -> None:
    """Latency over the run (each call at the time it was due) and its histogram, as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    ok = [c for c in run.calls if c.code == "OK"]
    failed = [c for c in run.calls if c.code != "OK"]
    fig, (over_time, spread) = plt.subplots(1, 2, figsize=(12, 4.5))
    over_time.scatter([c.due for c in ok], [c.latency * 1e3 for c in ok], s=4, label="OK")
    if failed:
        over_time.scatter([c.due for c in failed], [c.latency * 1e3 for c in failed], s=6,
                          color="red", label="failed")
    over_time.set(xlabel="time into the run (s)", ylabel="latency (ms)",
                  title=f"{run.config.workload.name}: latency over time")
    over_time.legend()
    spread.hist([c.latency * 1e3 for c in ok], bins=40)
    spread.set(xlabel="latency (ms)", ylabel="calls", title="latency histogram (OK calls)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
