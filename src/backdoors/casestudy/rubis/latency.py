"""Response times apart for each session's first request and for the rest, from the file
the load driver writes (locustfile.py, `$RUBIS_LATENCIES`): one line per request,

    <response time, ms> <1: the first request of its user (a new session) | 0: a later one>

Each locust user keeps one keep-alive connection, so its first request is the one that
opens a session at the front end (a recoverable site registers the session's boxes with
the agents then), and its later ones run on a session already set up. locust's own p99
mixes both; in a short run with every user spawned in the first second, its slowest
1 % are mostly first requests. `summary` gives both kinds of figure apart.

Pure: nothing here runs the site or the load.
"""

from __future__ import annotations

import math
import os

from ...errors import LabError
from .throughput import LineLog, logged_lines


class LatencyLog(LineLog):
    def add(self, ms: float, first: bool) -> None:
        self._file.write(f"{ms:.3f} {int(first)}\n")


def read_latencies(path: str | os.PathLike) -> tuple[list[float], list[float]]:
    """(first requests' times, later requests' times), ms, from the file (logged_lines);
    a line that is not a time and a 0 or 1 is a LabError naming the file and line."""
    first: list[float] = []
    later: list[float] = []
    for n, line in logged_lines(path, "latencies"):
        try:
            ms, kind = line.split()
            value = float(ms)
            if kind not in ("0", "1") or not math.isfinite(value) or value < 0:
                raise ValueError
        except ValueError:
            raise LabError(f"{path}:{n}: not a latency line (<ms> <0|1>): {line[:80]!r}") from None
        (first if kind == "1" else later).append(value)
    return first, later


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank q-th percentile (0 < q <= 100) of `values`; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(path: str | os.PathLike) -> dict:
    """{sessions, first_p50_ms, first_p99_ms, steady_p50_ms, steady_p99_ms}: the first
    requests' figures (sessions: how many) and those of every later request."""
    first, later = read_latencies(path)
    out: dict = {"sessions": len(first)}
    for kind, values in (("first", first), ("steady", later)):
        for q in (50, 99):
            got = percentile(values, q)
            out[f"{kind}_p{q}_ms"] = None if got is None else round(got, 2)
    return out
