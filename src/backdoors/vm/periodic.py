"""A step run every period in a thread of its own, started and stopped with its owner
(the guest's sensors, the kernel integrity watch): both read a running guest's memory
from outside, at their own pace, and stop between two steps."""

from __future__ import annotations

import logging
import threading

from ..common.ratelimit import LogLimiter

log = logging.getLogger("backdoors.vm")


class Periodic:
    """Calls `step()` (subclasses define it) every `period` seconds until `stop()`."""

    def __init__(self, period: float, name: str):
        self.period = period
        self.errors, self.last_error = 0, None  # steps that failed, and the last one's error
        self._logs = LogLimiter(rate=1 / 60, burst=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def step(self) -> None:
        raise NotImplementedError

    def failed(self, what: str, e: Exception) -> None:
        """Count a step that failed (`what` failed with `e`); log it when its error
        changed, at most once a minute (the guest wrote what was read, addresses it
        chose in the message: the next step reads again)."""
        self.errors += 1
        if str(e) != self.last_error:
            admit, suppressed = self._logs.admit(what)
            if admit:
                log.warning("%s failed: %s%s", what, e, f" ({suppressed} other errors since "
                            "the last one logged)" if suppressed else "")
        self.last_error = str(e)

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop between two steps (a step bounded by its walks' limits ends first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("%s: a step still runs after %g s: left to end (a daemon "
                            "thread)", self._thread.name, timeout)

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
