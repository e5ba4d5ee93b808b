"""Ground truth for scenarios, measured beside the monitor, not through it.

`ProgressWatch` reads the service's Sensor Box directly (through /proc/PID/fd, no agent)
every few milliseconds and keeps the longest gap between two moves of its progress
counter, and the time each watched process was first seen dead. `ForkProbe` tries to
start a process in a node every interval and measures how long that was impossible.
Both keep what they saw, so `series()` gives it back as a compact time series, and
`recording()` hands a benchmark the watches and probes a scenario created.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..common.procs import alive
from ..errors import BackdoorsError


class Recording:
    """The ProgressWatch and ForkProbe objects created while a `recording()` was open."""

    def __init__(self) -> None:
        self.watches: list[ProgressWatch] = []
        self.probes: list[ForkProbe] = []


_recordings: list[Recording] = []
_recordings_lock = threading.Lock()


@contextmanager
def recording() -> Iterator[Recording]:
    """Collect every ProgressWatch and ForkProbe created inside the block (by any thread),
    so a benchmark can read their time series after the scenario returned."""
    rec = Recording()
    with _recordings_lock:
        _recordings.append(rec)
    try:
        yield rec
    finally:
        with _recordings_lock:
            _recordings.remove(rec)


def _recorded(obj) -> None:
    with _recordings_lock:
        for rec in _recordings:
            (rec.watches if isinstance(obj, ProgressWatch) else rec.probes).append(obj)


def _downsample(points: list[tuple[float, float | None]], since: float, until: float, n: int,
                per_bin: int, reduce: Callable[[list], list]) -> list[list]:
    """`points` (time, value), sorted, as at most `n` points [ms after `since`, value]:
    when there are more, [first point, until] is cut into n // per_bin equal bins, each
    reduced by `reduce` to at most `per_bin` points."""
    points = [p for p in points if p[0] <= until]
    if len(points) > n:
        t0, count = points[0][0], max(1, n // per_bin)
        width = max(until - t0, 1e-9) / count
        bins: dict[int, list] = {}
        for p in points:
            bins.setdefault(min(int((p[0] - t0) / width), count - 1), []).append(p)
        points = [q for _, b in sorted(bins.items()) for q in reduce(b)]
    return [[round((t - since) * 1000, 1), v] for t, v in points]


class ProgressWatch:
    """A thread sampling a service's progress counter and the liveness of processes."""

    def __init__(self, lab, node: str, pids: dict[str, int], *, interval: float = 0.002,
                 sensor: str = "progress"):
        self.reader = lab.sensor_reader(node)
        self._pids = dict(pids)
        self._pids_lock = threading.Lock()
        self.interval, self.sensor = interval, sensor
        self.died: dict[str, float] = {}  # name -> time.monotonic() first seen dead
        self._gaps: list[tuple[float, float]] = []  # (gap start, gap length)
        self._last: tuple[float, float] | None = None  # (value, changed_at)
        self._changes: list[tuple[float, float | None]] = []  # (time, value; None: unreadable)
        self.started: float | None = None
        self.window: tuple[float, float] | None = None  # the last max_gap_ms() window
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bd-progress-watch", daemon=True)
        _recorded(self)

    def start(self) -> ProgressWatch:
        self.started = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def track(self, name: str, pid: int) -> None:
        """Watch one more process (safe while the sampling thread runs)."""
        with self._pids_lock:
            self._pids[name] = pid

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.reader.close()

    def _sample(self) -> None:
        now = time.monotonic()
        try:
            image = self.reader.image()
            value = next(s.value for s in image.sensors if s.name == self.sensor)
        except (BackdoorsError, StopIteration):
            value = None
        if not self._changes or self._changes[-1][1] != value:
            self._changes.append((now, value))
        if value is not None:
            if self._last is None or value != self._last[0]:
                if self._last is not None:
                    self._gaps.append((self._last[1], now - self._last[1]))
                self._last = (value, now)
        with self._pids_lock:
            pids = list(self._pids.items())
        for name, pid in pids:
            if name not in self.died and not alive(pid):
                self.died[name] = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def max_gap_ms(self, since: float = float("-inf"), until: float | None = None) -> float:
        """The longest time the counter stood still within [since, until], in ms
        (a gap still open at `until` counts up to then)."""
        until = time.monotonic() if until is None else until
        self.window = (since, until)
        gaps = [length for start, length in self._gaps if start + length >= since and start <= until]
        if self._last is not None and self._last[1] <= until:
            gaps.append(until - max(self._last[1], since))
        return round(max(gaps, default=0.0) * 1000, 1)

    def first_death(self) -> str | None:
        return min(self.died, key=self.died.get) if self.died else None

    def series(self, since: float, until: float | None = None, *,
               points: int = 300) -> list[list]:
        """The counter from the watch's start to `until`: at most `points` points
        [ms after `since`, value], value None while the box was unreadable (its owner
        gone). Each bin keeps its first and last change, so a stall longer than a bin
        (2 * (until - start) / points) keeps its exact edges."""
        until = time.monotonic() if until is None else until
        out = _downsample(self._changes, since, until, points - 1, 2,
                          lambda b: [b[0], b[-1]] if len(b) > 1 else b)
        end = round((until - since) * 1000, 1)
        if out and out[-1][1] is not None and out[-1][0] < end:
            out.append([end, out[-1][1]])  # held until the end
        return out


# Runs inside the node: fork (the child exits at once) every INTERVAL s and print
# "<1 ok | 0 failed> <CLOCK_MONOTONIC>" per attempt. Moving a process into a cgroup is
# not subject to its pids limit, so only a fork made inside the node tests the wedge.
_PROBE = r"""
import ctypes, os, sys, time
ctypes.CDLL(None).prctl(15, b"bd-forkprobe", 0, 0, 0)
interval = float(sys.argv[1])
while True:
    t = time.monotonic()
    try:
        pid = os.fork()
    except OSError:
        ok = 0
    else:
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        ok = 1
    sys.stdout.write(f"{ok} {t:.6f}\n")
    sys.stdout.flush()
    time.sleep(interval)
"""


class ForkProbe:
    """A process in the node that tries to fork every `interval`, as a service would;
    measures how long forking was impossible there (`wedged_ms`)."""

    def __init__(self, lab, node: str, *, interval: float = 0.02):
        self.lab, self.node, self.interval = lab, node, interval
        self.first_failure: float | None = None
        self.recovered_at: float | None = None
        self.last_ok: float | None = None
        self.failures = 0
        self.attempts = 0
        self._tries: list[tuple[float, float]] = []  # (CLOCK_MONOTONIC, 1 ok | 0 failed)
        self.proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name="bd-fork-probe", daemon=True)
        _recorded(self)

    def start(self, timeout: float = 10.0) -> ForkProbe:
        import sys
        self.proc = self.lab.run_in_node(self.node, [sys.executable, "-c", _PROBE,
                                                     str(self.interval)], stdout=subprocess.PIPE)
        self._thread.start()
        end = time.monotonic() + timeout
        while self.last_ok is None:
            if time.monotonic() > end or self.proc.poll() is not None:
                self.stop()
                raise BackdoorsError(f"the fork probe in node {self.node} did not start")
            time.sleep(0.01)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(5)
        self._thread.join(5)

    def _run(self) -> None:
        for line in self.proc.stdout:
            try:
                ok, t = line.split()
                t = float(t)
            except ValueError:
                continue
            self.attempts += 1
            self._tries.append((t, 1.0 if ok == b"1" else 0.0))
            if ok == b"1":
                self.last_ok = t
                if self.first_failure is not None and self.recovered_at is None:
                    self.recovered_at = t
            else:
                self.failures += 1
                if self.first_failure is None:
                    self.first_failure = t
                self.recovered_at = None

    def wedged_ms(self, until: float | None = None) -> float:
        """From the first failed fork to the first success after the last failure (or
        `until`, when it never recovered); 0 if no fork ever failed."""
        if self.first_failure is None:
            return 0.0
        end = self.recovered_at if self.recovered_at is not None else (
            time.monotonic() if until is None else until)
        return round((end - self.first_failure) * 1000, 1)

    def can_fork_since(self, t: float) -> bool:
        """Whether a fork succeeded in the node after time `t` (time.monotonic())."""
        return self.last_ok is not None and self.last_ok > t

    def series(self, since: float, until: float | None = None, *,
               points: int = 300) -> list[list]:
        """Whether a fork worked, from the first attempt to `until`: at most `points`
        points [ms after `since`, 1 or 0] (0 when any attempt of the bin failed). No
        point while the probe could not run (the node frozen)."""
        until = time.monotonic() if until is None else until
        return _downsample(self._tries, since, until, points, 1,
                           lambda b: [(b[0][0], min(v for _, v in b))])
