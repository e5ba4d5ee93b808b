"""A step run every period in a thread of its own, started and stopped with its owner
(the guest's sensors, the kernel integrity watch): both read a running guest's memory
from outside, at their own pace, and stop between two steps."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("backdoors.vm")


class Periodic:
    """Calls `step()` (subclasses define it) every `period` seconds until `stop()`."""

    def __init__(self, period: float, name: str):
        self.period = period
        self.errors, self.last_error = 0, None  # steps that failed, and the last one's error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def step(self) -> None:
        raise NotImplementedError

    def failed(self, what: str, e: Exception) -> None:
        """Count a step that failed (`what` failed with `e`); log an error once, not every
        period (the guest wrote what was read: the next step reads again)."""
        self.errors += 1
        if str(e) != self.last_error:
            log.warning("%s failed: %s", what, e)
        self.last_error = str(e)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a guest read mid-write: the thread must live on
                self.failed(type(self).__name__, e)
