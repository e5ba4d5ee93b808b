"""Kernel-derived sensors: one sampler thread per node writes a real Sensor Box.

Every `period` the sampler reads what the kernel accounts for the node (memory, tasks,
failed forks, OOM kills, PSI) and stores it in the node's kernel box (`KERNEL_BOX`), which monitors read
like any application box. It also reads the process table (at most `max_procs` processes,
and at most a fifth of the thread's time: a big table is read less often) to count new
processes (fork rate) and keep each process's RSS history over `RSS_WINDOW_S`, from
which `rss_rate` gives its growth in bytes/s: with every sample while the node's
processes (their pids), task count or memory use move, every TABLE_IDLE_S while all
stand still (reading each process's /proc files is most of a sample's cost; the list of
pids, one read per cgroup, tells whether a process came or went). A process that comes
and goes between two reads is not counted: a fork-and-exit churn that never holds many
processes does not show in `forks` (measured from outside: ~1,000 forks/s of processes
living a few ms went uncounted), only as CPU use. One
thread per node: a node whose cgroupfs or /proc reads stall stalls only its own
sampler, visible as a growing sample age.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..net.links import LinkWatch
from ..nodes import Node, NodeStats, ProcessInfo, process_table
from ..sensors import KERNEL_BOX, SensorBox
from .config import KernelSensorLimits

log = logging.getLogger("backdoors.agent")

MiB = 1 << 20
RSS_WINDOW_S = 1.0
RSS_POINT_S = 0.05  # keep at most one history point per process per this many seconds
TABLE_DUTY = 0.2  # the process table takes at most this share of the sampler's time
TABLE_IDLE_S = 5.0  # and is read this often while the node's processes and memory stand still
TABLE_MEMORY_MOVE = 1 << 20  # memory use moved this much (bytes) since the last table


OOM_WINDOW_S = 10.0  # the oom_kills sensor's window (its bound: oom_kills_per_10s)
FORK_WINDOW_S = 1.0  # the forks and fork_failures sensors' (bounds: *_per_s)


class KernelSensors:
    """The kernel-sensor box of one node; thresholds depend on the limits it was made for."""

    def __init__(self, node: str, limits: KernelSensorLimits, memory_limit: int | None,
                 pids_limit: int | None, link: bool = False):
        self.memory_limit, self.pids_limit = memory_limit, pids_limit
        self.box = box = SensorBox.create(f"{KERNEL_BOX}:{node}", capacity=16)
        high = limits.memory_high(memory_limit)
        if high is not None:
            self.memory = box.level("memory_mb", min=0.0, max=high / MiB)
        else:
            self.memory = box.level("memory_mb", min=0.0)
        if pids_limit:
            self.pids = box.level("pids", min=0.0, max=pids_limit * limits.pids_high_pct / 100)
        else:
            self.pids = box.level("pids", min=0.0)
        self.forks = box.pressure("forks", max_events=limits.forks_per_s, window=FORK_WINDOW_S)
        self.fork_failures = box.pressure("fork_failures", max_events=limits.fork_failures_per_s,
                                          window=FORK_WINDOW_S)
        self.oom_kills = box.pressure("oom_kills", max_events=limits.oom_kills_per_10s,
                                      window=OOM_WINDOW_S)
        self.psi = {
            "memory": box.level("psi_memory_some", min=0.0, max=limits.psi_memory_some),
            "cpu": box.level("psi_cpu_some", min=0.0, max=limits.psi_cpu_some),
            "io": box.level("psi_io_some", min=0.0, max=limits.psi_io_some),
        }
        # 1 while the node's service interface is up with carrier (a failed network driver)
        self.link_up = box.level("link_up", min=0.5, initial=1.0) if link else None

    def update(self, stats: NodeStats, forks: int, fork_failures: int,
               link_up: bool | None = None) -> None:
        if self.link_up is not None and link_up is not None:
            self.link_up.set(1.0 if link_up else 0.0)
        self.memory.set(stats.memory_bytes / MiB)
        self.pids.set(float(stats.pids))
        _set_counter(self.forks, forks)
        _set_counter(self.fork_failures, fork_failures)
        _set_counter(self.oom_kills, stats.oom_kills)
        for resource, level in self.psi.items():
            level.set(float(stats.pressure.get(resource, {}).get("some_avg10", 0.0)))

    def close(self) -> None:
        self.box.close()


def _set_counter(sensor, total: int) -> None:
    if total > sensor.value:
        sensor.add(total - sensor.value)


@dataclass
class Sample:
    """The latest sample of a node (`taken_at` is time.monotonic())."""

    stats: NodeStats
    fork_failures: int
    table: list[ProcessInfo]
    taken_at: float
    duration_s: float


class RssHistory:
    """RSS of each process over the last RSS_WINDOW_S, and when it last reaped a child;
    bounded by the sampled processes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._points: dict[tuple[int, float], deque[tuple[float, int]]] = {}
        #: (child_faults, when a table first showed it higher) of each process
        self._reaped: dict[tuple[int, float], tuple[int, float | None]] = {}

    def record(self, table: list[ProcessInfo], now: float) -> None:
        with self._lock:
            alive = set()
            for p in table:
                key = (p.pid, p.start_time)
                alive.add(key)
                points = self._points.setdefault(key, deque())
                if points and now - points[-1][0] < RSS_POINT_S:
                    points[-1] = (points[-1][0], p.rss_bytes)  # keep the newest value
                else:
                    points.append((now, p.rss_bytes))
                while len(points) > 2 and now - points[1][0] >= RSS_WINDOW_S:
                    points.popleft()
                faults, at = self._reaped.get(key, (p.child_faults, None))
                self._reaped[key] = (p.child_faults, now if p.child_faults > faults else at)
            for key in self._points.keys() - alive:
                del self._points[key], self._reaped[key]

    def rate(self, p: ProcessInfo, now: float) -> float:
        """Bytes/s of `p`'s RSS growth from the oldest point in the window to `p` now."""
        with self._lock:
            points = self._points.get((p.pid, p.start_time))
            if not points:
                return 0.0
            t0, rss0 = points[0]
        span = now - t0
        return (p.rss_bytes - rss0) / span if span >= 0.05 else 0.0

    def reaped_s(self, p: ProcessInfo, now: float) -> float | None:
        """Seconds since a table first showed `p` had reaped its latest child (its
        `child_faults` rose), None if none did since the first table that showed `p`."""
        with self._lock:
            at = self._reaped.get((p.pid, p.start_time), (0, None))[1]
        return None if at is None else round(max(0.0, now - at), 3)


class NodeSampler:
    """Samples one node every `period` on a thread of its own; `start()`, `stop()`."""

    def __init__(self, node: Node, limits: KernelSensorLimits, *, period: float, max_procs: int,
                 on_new_box: Callable[[KernelSensors], None], gauge=None,
                 interface: str | None = None):
        self.node, self.limits, self.period, self.max_procs = node, limits, period, max_procs
        node.cgroup.keep_files_open()  # a sample reads ~10 of them: ~1 us each, not ~20
        self.link = LinkWatch(node.netns, interface) if node.netns and interface else None
        self.on_new_box, self.gauge = on_new_box, gauge  # gauge: the sample duration metric
        #: called after each sample on the sampler's thread (the daemon queues the node's
        #: box tracking pass, agent/tracking.py); must not block
        self.after: Callable[[], None] | None = None
        self.history = RssHistory()
        self.sensors: KernelSensors | None = None
        self.latest: Sample | None = None
        self.error: str | None = None
        self.errors = 0
        self._forks = 0
        self._known: set[tuple[int, float]] | None = None
        self._table: list[ProcessInfo] = []
        self._table_due = self._table_idle_due = 0.0
        #: (pids, tasks, memory) at the last table
        self._table_at: tuple[list[int], int, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bd-sample-{node.name}",
                                        daemon=True)

    def start(self) -> None:
        """Keep sampling on the sampler's thread; the first sample (`sample_once()`, which
        makes the kernel box) is taken now unless it was already."""
        if self.latest is None:
            self.sample_once()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(max(1.0, 3 * self.period))

    def close(self) -> None:
        if self.sensors is not None and not self._thread.is_alive():
            self.sensors.close()
        if self.link is not None:
            self.link.close()
        self.node.cgroup.close_files()

    def age(self) -> float | None:
        return None if self.latest is None else time.monotonic() - self.latest.taken_at

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += self.period
            try:
                self.sample_once()
                if self.after is not None:
                    self.after()
            except Exception as e:  # noqa: BLE001 - a sampler must survive anything
                self.errors += 1
                if self.error != str(e):
                    log.warning("node %s: sampling failed: %s", self.node.name, e)
                self.error = str(e)
            delay = next_at - time.monotonic()
            if delay < 0:  # overran: skip the missed periods rather than catch up
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def sample_once(self) -> Sample:
        start = time.monotonic()
        cg = self.node.cgroup
        stats = self.node.stats()
        failures = cg.fork_failures()
        link_up = self.link.up() if self.link is not None else None
        if start >= self._table_due:
            # the pids hierarchy: every task the node is charged for (a node cannot move
            # its processes out of one hierarchy: it cannot write the host's cgroupfs)
            pids = cg.procs("pids")[: self.max_procs]
            if start >= self._table_idle_due or self._moved(stats, pids):
                self._table = process_table(pids)
                now = time.monotonic()
                self.history.record(self._table, now)
                self._count_forks(self._table)
                self._table_due = now + max(0.0, (now - start) * (1 / TABLE_DUTY - 1))
                self._table_idle_due = now + TABLE_IDLE_S
                self._table_at = (pids, stats.pids, stats.memory_bytes)
        sensors = self.sensors
        if sensors is None or (sensors.memory_limit, sensors.pids_limit) != (
                stats.memory_limit, stats.pids_limit):
            self._replace_box(stats, failures, link_up)
        else:
            sensors.update(stats, self._forks, failures, link_up)
        now = time.monotonic()
        self.latest = Sample(stats, failures, self._table, now, now - start)
        self.error = None
        if self.gauge is not None:
            self.gauge.set(now - start)
        return self.latest

    def _moved(self, stats: NodeStats, pids: list[int]) -> bool:
        """Whether the node's processes, task count or memory use moved since the last
        table."""
        if self._table_at is None:
            return True
        listed, tasks, memory = self._table_at
        return (pids != listed or stats.pids != tasks
                or abs(stats.memory_bytes - memory) >= TABLE_MEMORY_MOVE)

    def _count_forks(self, table: list[ProcessInfo]) -> None:
        keys = {(p.pid, p.start_time) for p in table}
        if self._known is not None:
            self._forks += len(keys - self._known)
        self._known = keys

    def _replace_box(self, stats: NodeStats, failures: int, link_up: bool | None) -> None:
        """Make a box with thresholds for the current limits, filled before it is shown."""
        fresh = KernelSensors(self.node.name, self.limits, stats.memory_limit, stats.pids_limit,
                              link=self.link is not None)
        old = self.sensors
        try:
            if old is not None:  # counters continue, so no reader sees a jump
                _set_counter(fresh.forks, old.forks.value)
                _set_counter(fresh.fork_failures, old.fork_failures.value)
                _set_counter(fresh.oom_kills, old.oom_kills.value)
            fresh.update(stats, self._forks, failures, link_up)
            self.on_new_box(fresh)
        except BaseException:
            fresh.close()
            raise
        self.sensors = fresh
        if old is not None:
            old.close()
