"""A VM node's kernel-derived sensors, read from its RAM: the guest kernel's box.

Like a container node's kernel box (agent/sampler.py) it is a Sensor Box the agent keeps,
named `GUEST_BOX:<node>`, so monitors judge it the same way. Its progress sensor `jiffies`
counts the guest kernel's ticks since the sampler started: a hung guest kernel (or one
whose vCPUs are stopped) stops ticking, and the sensor stalls past its deadline with no
agent inside the guest. From the task list (its process table, walked every
TASKS_EVERY_S): `tasks` counts its processes (a fork bomb in the guest is seen from
outside), `blocked` those in uninterruptible sleep (D: stuck on I/O or a lock), and
`top_rss_mb` is the largest one's resident memory (a memory hog's size). `load1` is the
guest kernel's 1-minute load average; `available_mb` and `threads` are its own counters
(memory.Readings), bounded like Orion's plain detectors (vm.orion). The level `tampered`
counts the open kernel integrity findings (guard.py; 0 where none runs). `table` keeps the
last process table read. Orion's other inputs, as levels for rules and the live view:
`running` (runnable tasks on the guest's run queues, the mean over half a second: a
wake-up burst is a moment's), `refault_rate` (pages evicted and faulted back per second
over the last second: page-cache churn, thrashing) and `data_churn_pct` (the share of
the kernel's data pages changed between two visits, over the last full pass of
churn.DataChurn: how much of the kernel's state moves).

With a Predictor (vm.orion), each sample feeds it too: `predicted_oom`,
`predicted_forks` and `predicted_starvation` are 1 while its memory-exhaustion, fork-bomb
or starvation alarm is open (max 0.5: a violation, ahead of the bounds of `available_mb`,
`threads` and `running`), and `on_predicted` is told at once, with the Alarm as it is
raised and None as its episode ends.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable

from ..errors import VmError
from ..sensors import GUEST_BOX, SensorBox
from .churn import DataChurn
from .memory import GuestMemory, GuestTask
from .orion import Alarm, Predictor
from .periodic import Periodic

#: the box's sensor of each Orion alarm kind
PREDICTED = {"memory-exhaustion": "predicted_oom", "fork-bomb": "predicted_forks",
             "starvation": "predicted_starvation"}
OnPredicted = Callable[[str, "Alarm | None"], None]  # (kind, the alarm, or None: it ended)

#: how often the task list is walked (the guest sets its length: a long one costs the host)
TASKS_EVERY_S = 0.5
#: the window of `refault_rate`, and of `running`'s mean (one sample is a moment's)
REFAULT_WINDOW_S = 1.0
RUNNING_WINDOW_S = 0.5


class WalkFailed(VmError):
    """A walk of the guest's task list failed (torn by a fork or an exit, or a hostile
    list): the other readings were taken; the next walk reads it again."""


class GuestSensors:
    """The kernel box of one VM node, updated from its memory by `update()`."""

    def __init__(self, node: str, memory: GuestMemory, *, jiffies_deadline: float = 1.0,
                 max_tasks: float | None = None, min_available_mb: float = 0.0,
                 max_threads: float | None = None, max_running: float | None = None,
                 max_load: float | None = None,
                 max_blocked: float | None = None, predictor: Predictor | None = None,
                 on_predicted: OnPredicted | None = None):
        self.memory = memory
        self.predictor, self.on_predicted = predictor, on_predicted
        self.box = SensorBox.create(f"{GUEST_BOX}:{node}", capacity=16)
        # stamped: when this reader saw the guest's clock move, so the agent's watcher
        # reads the box near its deadline only (agent/watch.py)
        self.jiffies = self.box.progress("jiffies", deadline=jiffies_deadline, stamped=True)
        self.tasks = self.box.level("tasks", min=1.0, max=max_tasks)
        self.blocked = self.box.level("blocked", min=0.0, max=max_blocked)
        self.top_rss = self.box.level("top_rss_mb", min=0.0)
        self.load1 = self.box.level("load1", min=0.0, max=max_load)
        self.table: list[GuestTask] = []
        self.available = self.box.level("available_mb", min=min_available_mb)
        self.threads = self.box.level("threads", min=1.0, max=max_threads)
        # open kernel integrity findings (guard.IntegrityGuard sets it): any violates
        self.tampered = self.box.level("tampered", min=0.0, max=0.5)
        self.predicted = {kind: self.box.level(PREDICTED[kind], min=0.0, max=0.5)
                          for kind in predictor.kinds} if predictor is not None else {}
        self.running = self.box.level("running", min=0.0, max=max_running)
        self.refault_rate = self.box.level("refault_rate", min=0.0)
        self.data_churn = self.box.level("data_churn_pct", min=0.0)
        self.churn = DataChurn(memory)
        self._refaults: deque[tuple[float, int]] = deque()  # (when, refaults) of the last second
        self._running: deque[tuple[float, int]] = deque()  # (when, runnable tasks)
        self._tasks_due = 0.0
        try:
            self._base = memory.jiffies()
            with contextlib.suppress(WalkFailed):  # (the sampler walks again, and says so)
                self.update()
        except BaseException:
            self.box.close()
            raise

    def update(self) -> None:
        ticks = self.memory.jiffies() - self._base
        if ticks > self.jiffies.value:
            self.jiffies.add(ticks - self.jiffies.value)
        r = self.memory.readings()
        self.available.set(r.available / (1 << 20))
        self.threads.set(float(r.threads))
        self.load1.set(self.memory.load()[0])
        now = time.monotonic()
        self._running.append((now, r.running))
        while now - self._running[0][0] > RUNNING_WINDOW_S:
            self._running.popleft()
        self.running.set(sum(n for _, n in self._running) / len(self._running))
        self._refaults.append((now, r.refaults))
        while now - self._refaults[0][0] > REFAULT_WINDOW_S:
            self._refaults.popleft()
        first, span = self._refaults[0][1], now - self._refaults[0][0]
        if span > 0:
            self.refault_rate.set(max(0, r.refaults - first) / span)
        self.churn.visit()
        if self.churn.share is not None:
            self.data_churn.set(100 * self.churn.share)
        if self.predictor is not None:
            self._predict(r)
        if time.monotonic() >= self._tasks_due:  # a walk of the guest's list: not every period
            self._tasks_due = time.monotonic() + TASKS_EVERY_S
            try:
                table = self.memory.process_table()
            except VmError as e:  # the list changed under the walk (the guest runs), or a
                # hostile one: the sampler counts and logs it, the next walk reads it again
                raise WalkFailed(f"the process table walk: {e}") from None
            self.table = table
            self.tasks.set(float(len(table)))
            self.blocked.set(float(sum(1 for t in table if t.state == "D")))
            self.top_rss.set(max(t.rss for t in table) / (1 << 20))

    def _predict(self, r) -> None:
        p = self.predictor
        was = p.open_kinds()
        raised = p.observe(time.monotonic(), r)
        for alarm in raised:
            self.predicted[alarm.kind].set(1.0)
        ended = was - p.open_kinds()
        for kind in ended:
            self.predicted[kind].set(0.0)
        if self.on_predicted is not None:
            for alarm in raised:
                self.on_predicted(alarm.kind, alarm)
            for kind in sorted(ended):
                self.on_predicted(kind, None)

    def close(self) -> None:
        self.box.close()


class GuestSampler(Periodic):
    """Updates a GuestSensors every `period` seconds in a thread of its own. The guest
    writes what is read: a read that fails (a corrupt or hostile kernel structure) is
    counted and logged once, and the next period reads again; it never stops the thread."""

    def __init__(self, sensors: GuestSensors, *, period: float = 0.05):
        super().__init__(period, "guest-sampler")
        self.sensors = sensors

    def step(self) -> None:
        try:
            self.sensors.update()
            self.last_error = None  # (a failure that comes back is said again)
        except Exception as e:  # noqa: BLE001 - whatever the guest wrote, sampling goes on
            self.failed(f"{self.sensors.box.name}: reading the guest kernel", e)
