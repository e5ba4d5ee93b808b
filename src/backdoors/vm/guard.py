"""What an agent runs for one VM node's guest: its kernel box, and its kernel integrity.

`GuestWatch` bundles the two threads that read a guest's RAM from outside: the sampler of
its kernel box (sensors.py) and the `IntegrityGuard`, which takes the clean baseline from
the kernel image (integrity.Baseline: a few seconds, in its own thread, so the agent
serves meanwhile) and then checks a slice of the kernel per tick (integrity.Checker).
What differs from the image at attach (a kernel tampered before) is open from then on.
The open findings are the box's level `tampered` (max 0.5: any finding violates), read
by monitors like any level; its changes are also told to `on_change` at once (the agent
pushes them as events). `heal()` restores what is open (integrity.Healer) through the
node's debug interface, then checks again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .integrity import Baseline, Checker, Finding, Healer
from .memory import GuestMemory
from .orion import Predictor
from .periodic import Periodic
from .sensors import GuestSampler, GuestSensors, OnPredicted

log = logging.getLogger("backdoors.vm")

#: a baseline that could not be taken (the guest still booting, a torn read) is tried again
BASELINE_RETRY_S = 5.0
MAX_FINDINGS_TOLD = 16  # findings an on_change call carries (the count says how many in all)
MAX_HEALED = 256  # findings one heal() restores (the vCPUs stay stopped meanwhile); the rest next
#: findings gone this long before the guard tells the guest clean again: a byte that a
#: rootkit keeps flipping is one episode, not an event (and an audit line) per tick
CLEAN_S = 0.5

OnChange = Callable[[bool, list[Finding], int], None]  # (violated, new findings, open count)


class IntegrityGuard(Periodic):
    """The kernel integrity watch of one guest, a slice every `tick_s` (`pages_per_tick`
    pages: the whole kernel in len(pages) / pages_per_tick ticks)."""

    def __init__(self, memory: GuestMemory, sensors: GuestSensors, *, on_change: OnChange,
                 tick_s: float = 0.02, pages_per_tick: int = 128):
        super().__init__(tick_s, "integrity-guard")
        self.memory, self.sensors, self.on_change = memory, sensors, on_change
        self.pages_per_tick = pages_per_tick
        self.checker: Checker | None = None
        self.baseline_s: float | None = None
        self._retry_at = 0.0
        self._violated = False
        self._clean_since: float | None = None
        self._shown = threading.Lock()  # the guard's ticks and a heal both show the count

    def step(self) -> None:
        try:
            if self.checker is None:
                self._take_baseline()
                return
            new = self.checker.tick()
        except Exception as e:  # noqa: BLE001 - whatever the guest wrote, the watch goes on
            self.failed(f"{self.sensors.box.name}: integrity check", e)
            return
        self._show(new)

    def _take_baseline(self) -> None:
        if time.monotonic() < self._retry_at:
            return
        self._retry_at = time.monotonic() + BASELINE_RETRY_S
        began = time.monotonic()
        baseline = Baseline.take(self.memory)
        self.checker = Checker(baseline, pages_per_tick=self.pages_per_tick)
        self.baseline_s = time.monotonic() - began
        log.info("%s: integrity baseline taken in %.1f s (%d pages)", self.sensors.box.name,
                 self.baseline_s, len(baseline.pages))
        if baseline.unexplained:  # tampered before we attached: told at once
            log.warning("%s: the guest kernel differs from its image at attach: %s",
                        self.sensors.box.name, ", ".join(
                            f"{f.kind} {f.where}" for f in baseline.unexplained[:MAX_FINDINGS_TOLD]))
        self._show(self.checker.current())

    def _show(self, new: list[Finding]) -> None:
        with self._shown:
            count = len(self.findings())
            self.sensors.tampered.set(float(count))
            if count:
                self._clean_since = None
                if not self._violated:
                    self._violated = True
                    self.on_change(True, new[:MAX_FINDINGS_TOLD], count)
            elif self._violated:
                now = time.monotonic()
                if self._clean_since is None:
                    self._clean_since = now
                elif now - self._clean_since >= CLEAN_S:
                    self._violated = False
                    self.on_change(False, [], 0)

    def findings(self) -> list[Finding]:
        """The open findings (none before the baseline is taken)."""
        return self.checker.current() if self.checker is not None else []

    def heal(self, vm) -> tuple[list[Finding], list[Finding], int]:
        """Restore the open findings (up to MAX_HEALED) through `vm` (a VmNode); (healed,
        not restored, left for the next call). Callers serialise heals."""
        findings = self.findings()
        if not findings:
            return [], [], 0
        batch = findings[:MAX_HEALED]
        failed = Healer(vm).heal(batch)
        healed = [f for f in batch if f not in failed]
        self.checker.forget(healed)
        self._show([])
        return healed, failed, len(findings) - len(batch)


class GuestWatch:
    """The guest kernel box of VM node `node` and its integrity guard, on `memory`; with
    `on_predicted`, Orion on the box's samples (bounds `min_available_mb`, `max_threads`,
    `max_running`)."""

    def __init__(self, node: str, memory: GuestMemory, *, on_change: OnChange,
                 jiffies_deadline: float = 1.0, sample_period: float = 0.05,
                 min_available_mb: float = 0.0, max_threads: float | None = None,
                 max_running: float | None = None,
                 on_predicted: OnPredicted | None = None):
        predictor = None
        if on_predicted is not None:
            predictor = Predictor(memory_floor=int(min_available_mb * (1 << 20)),
                                  max_threads=int(max_threads or 1 << 22),
                                  max_running=None if max_running is None else int(max_running))
        self.sensors = GuestSensors(node, memory, jiffies_deadline=jiffies_deadline,
                                    min_available_mb=min_available_mb, max_threads=max_threads,
                                    max_running=max_running,
                                    predictor=predictor, on_predicted=on_predicted)
        self.sampler = GuestSampler(self.sensors, period=sample_period)
        self.integrity = IntegrityGuard(memory, self.sensors, on_change=on_change)

    def start(self) -> None:
        self.sampler.start()
        self.integrity.start()

    def stop(self) -> None:
        self.sampler.stop()
        self.integrity.stop()

    def close(self) -> None:
        self.sensors.close()
