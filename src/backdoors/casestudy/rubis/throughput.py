"""Requests per 100 ms across a fault, and the throughput's dip, from the requests file the
load driver writes (locustfile.py, `$RUBIS_REQUESTS`): one line per request, written when
its answer was checked,

    <end: Unix time, ms> <1 ok | 0 failed> <front end: its index in $RUBIS_HOSTS>

    series = per_100ms(path, fault_at, node=0)   # {t0, bucket_ms, ok, failed, node_ok}
    dip(series) -> {dip_ms, dip_from_ms, dip_recovered, baseline, fraction}

Pure: nothing here runs the site or the load.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from ...errors import LabError

BUCKET_MS = 100


class LineLog:
    """The load driver's side of a file of one line per request, appended to `path`.
    Buffered (one write per 64 KiB, a few thousand requests); flush() or close() at exit
    writes the rest."""

    def __init__(self, path: str | os.PathLike):
        self._file = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - closed at exit

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class RequestLog(LineLog):
    def add(self, ok: bool, fe: int, at: float | None = None) -> None:
        """A request answered (`at`: its end, Unix seconds; now by default)."""
        self._file.write(f"{round((time.time() if at is None else at) * 1000)} {int(ok)} {fe}\n")


def logged_lines(path: str | os.PathLike, what: str) -> list[tuple[int, str]]:
    """(number, line) of each complete line of a LineLog's file: a last line without its
    newline is a write cut short (the driver killed) and is left out. LabError naming the
    file (`what`: its kind) if it cannot be read."""
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError as e:
        raise LabError(f"{path}: cannot read the {what} file: {e.strerror}") from None
    return list(enumerate(text.split("\n")[:-1], 1))  # the last: "" or a torn tail


def read_requests(path: str | os.PathLike) -> list[tuple[int, bool, int]]:
    """(end ms, ok, front end) of every request in the file (logged_lines); a line that
    is not three integers is a LabError naming the file and line."""
    out = []
    for n, line in logged_lines(path, "requests"):
        parts = line.split()
        try:
            t, ok, fe = map(int, parts)
            if ok not in (0, 1):
                raise ValueError
        except ValueError:
            raise LabError(f"{path}:{n}: not a request line (<Unix ms> <0|1> <front end>): "
                           f"{line[:80]!r}") from None
        out.append((t, bool(ok), fe))
    return out


def per_100ms(path: str | os.PathLike, fault_at: float, *, before_s: float = 3.0,
              after_s: float = 6.0, bucket_ms: int = BUCKET_MS, node: int | None = None) -> dict:
    """Requests completed per `bucket_ms`, ok and failed apart, from `before_s` before the
    fault (`fault_at`, Unix seconds) to `after_s` after it:

        {"t0": -3000, "bucket_ms": 100, "ok": [...], "failed": [...]}

    Bucket i counts the requests that ended in [t0 + i * bucket_ms, t0 + (i+1) * bucket_ms)
    ms from the fault; the fault is a bucket boundary. The series stops before the bucket
    holding the file's last request: the load ended there, a partial bucket is no dip.
    With `node` (a front end's index), `node_ok` counts the ok requests of that front
    end's users alone (the sessions a fault of that node stalls)."""
    requests = read_requests(path)
    n_before = round(before_s * 1000 / bucket_ms)
    start = fault_at * 1000 - n_before * bucket_ms
    n = n_before + round(after_s * 1000 / bucket_ms)
    if requests:
        n = min(n, max(0, math.floor((max(t for t, _, _ in requests) - start) / bucket_ms)))
    else:
        n = 0
    ok, failed, node_ok = [0] * n, [0] * n, [0] * n
    for t, good, fe in requests:
        i = math.floor((t - start) / bucket_ms)
        if 0 <= i < n:
            (ok if good else failed)[i] += 1
            node_ok[i] += good and fe == node
    out = {"t0": -n_before * bucket_ms, "bucket_ms": bucket_ms, "ok": ok, "failed": failed}
    if node is not None:
        out["node_ok"] = node_ok
    return out


def dip(series: dict, *, fraction: float = 0.5, baseline_s: float = 1.0) -> dict:
    """How long the throughput stayed low after the fault, from a per_100ms series.

    The throughput is `node_ok` when the series has it (the failed node's sessions), else
    `ok` (the whole site); failed requests are no throughput. Its `baseline` is the mean
    per bucket over the `baseline_s` before the fault, leaving out the buckets before the
    load's first request (a load still starting). A bucket from the fault on is *low*
    when it holds fewer than `fraction` x baseline. `dip_ms` is the longest run of
    consecutive low buckets (the earliest of equal ones) times the bucket's length, from
    `dip_from_ms` (ms after the fault); 0 when no bucket is low. A run lasting to the
    series' end has `dip_recovered` False, and its dip_ms is a lower bound. dip_ms is
    None when nothing can be said: no request in the baseline's window, or no bucket
    after the fault."""
    b = series["bucket_ms"]
    counts = series["node_ok"] if "node_ok" in series else series["ok"]
    n_before = round(-series["t0"] / b)
    first = next((i for i, (o, f) in enumerate(zip(series["ok"], series["failed"])) if o + f),
                 None)
    after = counts[n_before:]
    out = {"dip_ms": None, "dip_from_ms": None, "dip_recovered": None, "baseline": None,
           "fraction": fraction}
    if first is None or first >= n_before or not after:
        return out
    window = counts[max(first, n_before - round(baseline_s * 1000 / b)):n_before]
    baseline = sum(window) / len(window)
    out["baseline"] = round(baseline, 2)
    if baseline == 0:
        return out
    best, best_at, run = 0, None, 0
    for i, c in enumerate(after):
        run = run + 1 if c < fraction * baseline else 0
        if run > best:
            best, best_at = run, i - run + 1
    out.update(dip_ms=float(best * b), dip_from_ms=None if best_at is None else best_at * b,
               dip_recovered=best_at is None or best_at + best < len(after))
    return out
