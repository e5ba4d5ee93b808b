"""Orion: an unstable guest predicted from its kernel's counters, before a bound fires.

The plain detectors wait for a bound: the guest's available memory below a floor, its
thread count above a ceiling. Orion watches the same counters (memory.Readings, sampled
from the guest's RAM) as trends: a least-squares line through the samples of the last
`window_s`, and from its slope the time left until the bound. An alarm is raised when
that time is shorter than the kind's horizon and the trend is a trend, not noise: the line fits
(r^2 at least `min_r2`), the window is full, and the counter moved by a material amount
within it (`min_drop` bytes of memory, `min_rise` threads). An alarm is cleared when its
condition no longer holds for a whole window; it is raised again only after that.

    memory-exhaustion   available memory falling towards `memory_floor` (`horizon_s`)
    fork-bomb           threads rising towards `max_threads` (`fork_horizon_s`: shorter,
                        as busy work starts and ends processes in bursts, and a bomb,
                        growing exponentially, is seconds from its ceiling at most)
    starvation          runnable tasks piling up on the run queues towards `max_running`
                        (`fork_horizon_s`; with `max_running` only): the livelock of a
                        CPU-bound runaway -- the kernel ticks, the service is starved

Lead time is what the prediction gains over the bound (the same counter, the same
samples); false alarms are alarms during benign work, which never reaches a bound.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from ..errors import VmError
from .churn import DataChurn
from .memory import GuestMemory, Readings
from .periodic import Periodic


@dataclass(frozen=True)
class Alarm:
    """A predicted unstable state: its kind, when (the sample's time, seconds), the
    time left until the bound at the current slope, and the trend behind it."""

    kind: str
    at: float
    eta_s: float
    slope: float  # units per second (bytes or threads)
    r2: float
    value: float


class Trend:
    """The least-squares line through the (t, value) samples of the last `window_s`."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, t: float, value: float) -> None:
        self.samples.append((t, value))
        while self.samples and self.samples[0][0] < t - self.window_s:
            self.samples.popleft()

    @property
    def span(self) -> float:
        return self.samples[-1][0] - self.samples[0][0] if self.samples else 0.0

    def fit(self) -> tuple[float, float] | None:
        """(slope per second, r^2), or None with fewer than 3 samples or a flat line."""
        n = len(self.samples)
        if n < 3:
            return None
        mt = sum(t for t, _ in self.samples) / n
        mv = sum(v for _, v in self.samples) / n
        stt = sum((t - mt) ** 2 for t, _ in self.samples)
        svv = sum((v - mv) ** 2 for _, v in self.samples)
        if stt == 0 or svv == 0:
            return None
        stv = sum((t - mt) * (v - mv) for t, v in self.samples)
        return stv / stt, stv * stv / (stt * svv)

    def moved(self) -> float:
        """Highest minus lowest value in the window."""
        values = [v for _, v in self.samples]
        return max(values) - min(values) if values else 0.0


class Predictor:
    """Raises an Alarm, once per episode, when a counter heads for its bound."""

    def __init__(self, *, memory_floor: int, max_threads: int, max_running: int | None = None,
                 window_s: float = 1.0, horizon_s: float = 5.0, fork_horizon_s: float = 2.0,
                 min_r2: float = 0.8, min_drop: int = 4 << 20, min_rise: int = 32,
                 min_rise_running: int = 4):
        if not 0 < min_r2 <= 1 or window_s <= 0 or min(horizon_s, fork_horizon_s) <= 0:
            raise ValueError("Predictor: need 0 < min_r2 <= 1, window_s > 0, horizons > 0")
        self.memory_floor, self.max_threads = memory_floor, max_threads
        self.max_running = max_running
        self.window_s, self.min_r2 = window_s, min_r2
        self.horizon_s, self.fork_horizon_s = horizon_s, fork_horizon_s
        self.min_drop, self.min_rise = min_drop, min_rise
        self.memory, self.threads = Trend(window_s), Trend(window_s)
        self.running = Trend(window_s)
        # kind -> (its trend, bound, direction, least move in a window, horizon)
        self.kinds = {"memory-exhaustion": (self.memory, memory_floor, -1, min_drop, horizon_s),
                      "fork-bomb": (self.threads, max_threads, 1, min_rise, fork_horizon_s)}
        if max_running is not None:
            self.kinds["starvation"] = (self.running, max_running, 1, min_rise_running,
                                        fork_horizon_s)
        self.alarms: list[Alarm] = []
        self._raised: dict[str, float] = {}  # kind -> when its condition last held

    def observe(self, t: float, r: Readings) -> list[Alarm]:
        """Take one sample (at `t` seconds); the alarms it raises."""
        self.memory.add(t, float(r.available))
        self.threads.add(t, float(r.threads))
        self.running.add(t, float(r.running))
        out = []
        for kind, (trend, bound, sign, least, horizon) in self.kinds.items():
            alarm = self._judge(kind, t, trend, bound, sign, least, horizon)
            if alarm is not None:
                out.append(alarm)
        self.alarms.extend(out)
        return out

    def open_kinds(self) -> set[str]:
        """The kinds whose alarm episode is open (raised, not yet cleared)."""
        return set(self._raised)

    def _judge(self, kind: str, t: float, trend: Trend, bound: float, sign: int,
               least: float, horizon: float) -> Alarm | None:
        fit = trend.fit() if trend.span >= 0.8 * self.window_s else None
        value = trend.samples[-1][1]
        holds = False
        if fit is not None:
            slope, r2 = fit
            heading = slope * sign > 0 and (bound - value) * sign > 0
            if heading and r2 >= self.min_r2 and trend.moved() >= least:
                eta = (bound - value) / slope
                holds = eta <= horizon
        if kind in self._raised:
            if holds:
                self._raised[kind] = t
            elif t - self._raised[kind] >= self.window_s:
                del self._raised[kind]  # a whole window without it: the episode is over
            return None
        if not holds:
            return None
        self._raised[kind] = t
        return Alarm(kind, t, round(eta, 3), slope, round(r2, 4), value)


def first_crossing(samples: list[tuple[float, Readings]], *, memory_floor: int,
                   max_threads: int, max_running: int | None = None) -> dict[str, float]:
    """When the plain bound detectors fire on the same samples: kind -> time."""
    out: dict[str, float] = {}
    for t, r in samples:
        if r.available < memory_floor:
            out.setdefault("memory-exhaustion", t)
        if r.threads > max_threads:
            out.setdefault("fork-bomb", t)
        if max_running is not None and r.running > max_running:
            out.setdefault("starvation", t)
    return out


class OrionWatch(Periodic):
    """Samples a guest's counters every `period` seconds (host monotonic time) into a
    Predictor; keeps every sample, so the plain bounds can be judged on the same ones.
    With `churn`, visits the kernel's data pages too: `shares` keeps (time, share) of
    each full pass."""

    def __init__(self, memory: GuestMemory, predictor: Predictor, *, period: float = 0.02,
                 churn: DataChurn | None = None):
        super().__init__(period, "orion")
        self.memory, self.predictor, self.churn = memory, predictor, churn
        self.samples: list[tuple[float, Readings]] = []
        self.shares: list[tuple[float, float]] = []
        self.misses = 0  # samples not taken (a read failed: the guest changed under it)
        self._lock = threading.Lock()

    def step(self) -> None:
        try:
            r = self.memory.readings()
        except VmError:
            self.misses += 1
            return
        t = time.monotonic()
        with self._lock:
            self.samples.append((t, r))
            self.predictor.observe(t, r)
        if self.churn is not None:
            passes = self.churn.passes
            self.churn.visit()
            if self.churn.passes > passes and self.churn.share is not None:
                with self._lock:
                    self.shares.append((t, self.churn.share))

    def since(self, t0: float) -> tuple[list[Alarm], dict[str, float]]:
        """The alarms raised and the bounds first crossed at or after `t0`."""
        p = self.predictor
        with self._lock:
            alarms = [a for a in p.alarms if a.at >= t0]
        return alarms, first_crossing(self.samples_since(t0), memory_floor=p.memory_floor,
                                      max_threads=p.max_threads, max_running=p.max_running)

    def samples_since(self, t0: float) -> list[tuple[float, Readings]]:
        """The samples taken at or after `t0` (a copy)."""
        with self._lock:
            return [(t, r) for t, r in self.samples if t >= t0]

    def inputs(self, t0: float, t1: float) -> dict:
        """Orion's other inputs over [t0, t1): the run queues' runnable tasks, page-cache
        churn (refaults per second) and the share of kernel data pages changed per pass."""
        with self._lock:
            samples = [(t, r) for t, r in self.samples if t0 <= t < t1]
            shares = [100 * s for t, s in self.shares if t0 <= t < t1]
        out: dict = {"samples": len(samples)}
        if len(samples) > 1:
            (ta, a), (tb, b) = samples[0], samples[-1]
            running = sorted(r.running for _, r in samples)
            out.update(running_p50=running[len(running) // 2], running_max=running[-1],
                       refaults_per_s=round((b.refaults - a.refaults) / (tb - ta), 1))
        if shares:
            shares.sort()
            out.update(data_churn_pct_p50=round(shares[len(shares) // 2], 2),
                       data_churn_pct_max=round(shares[-1], 2), passes=len(shares))
        return out

    def last(self) -> Readings | None:
        with self._lock:
            return self.samples[-1][1] if self.samples else None
