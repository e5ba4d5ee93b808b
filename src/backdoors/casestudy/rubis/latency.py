"""Response times apart for each session's first request and for the rest, and over the
measurement interval, from the file the load driver writes (locustfile.py,
`$RUBIS_LATENCIES`): one line per request,

    <response time, ms> <1: the first request of its user (a new session) | 0: a later one> <end, Unix ms>

Each locust user keeps one keep-alive connection, so its first request is the one that
opens a session at the front end (a recoverable site registers the session's boxes with
the agents then), and its later ones run on a session already set up. locust's own p99
mixes both; in a short run with every user spawned in the first second, its slowest
1 % are mostly first requests. `summary` gives both kinds of figure apart, and those of
the measurement interval as TPC-W defines it: the requests started after a ramp-up
(`ramp_s` from the first request's start), when every session is set up and the queue
of their set-up has drained.

Pure: nothing here runs the site or the load.
"""

from __future__ import annotations

import math
import os
import time
from typing import NamedTuple

from ...errors import LabError
from .throughput import LineLog, logged_lines


class LatencyLog(LineLog):
    def add(self, ms: float, first: bool, at: float | None = None) -> None:
        """A request answered in `ms` (`at`: its end, Unix seconds; now by default)."""
        end = time.time() if at is None else at
        self._file.write(f"{ms:.3f} {int(first)} {round(end * 1000)}\n")


class Latency(NamedTuple):
    ms: float
    first: bool
    end_ms: int  # Unix ms


def read_lines(path: str | os.PathLike) -> list[Latency]:
    """Every request of the file (logged_lines); a line that is not a time, a 0 or 1 and
    an end is a LabError naming the file and line."""
    out: list[Latency] = []
    for n, line in logged_lines(path, "latencies"):
        try:
            ms, kind, end = line.split()
            value = float(ms)
            if kind not in ("0", "1") or not math.isfinite(value) or value < 0:
                raise ValueError
            out.append(Latency(value, kind == "1", int(end)))
        except ValueError:
            raise LabError(f"{path}:{n}: not a latency line (<ms> <0|1> <end ms>): "
                           f"{line[:80]!r}") from None
    return out


def read_latencies(path: str | os.PathLike) -> tuple[list[float], list[float]]:
    """(first requests' times, later requests' times), ms, from the file (read_lines)."""
    lines = read_lines(path)
    return [r.ms for r in lines if r.first], [r.ms for r in lines if not r.first]


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank q-th percentile (0 < q <= 100) of `values`; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(path: str | os.PathLike, ramp_s: float = 0.0) -> dict:
    """{sessions, first_p50_ms, first_p99_ms, steady_p50_ms, steady_p99_ms, interval_p50_ms,
    interval_p99_ms, interval_requests, interval_rps}: the first requests' figures
    (sessions: how many), those of every later request, and those of the requests that
    started `ramp_s` or more after the first one did (their rate: over the time from the
    interval's start to the last request's end; None when no request is that late)."""
    lines = read_lines(path)
    out: dict = {"sessions": sum(r.first for r in lines)}
    start = min((r.end_ms - r.ms for r in lines), default=0.0) + ramp_s * 1000
    interval = [r.ms for r in lines if r.end_ms - r.ms >= start]
    for kind, values in (("first", [r.ms for r in lines if r.first]),
                         ("steady", [r.ms for r in lines if not r.first]),
                         ("interval", interval)):
        for q in (50, 99):
            got = percentile(values, q)
            out[f"{kind}_p{q}_ms"] = None if got is None else round(got, 2)
    span_s = (max((r.end_ms for r in lines), default=0) - start) / 1000
    out["interval_requests"] = len(interval)
    out["interval_rps"] = round(len(interval) / span_s, 1) if interval and span_s > 0 else None
    return out
