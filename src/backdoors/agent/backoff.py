"""Sensor Boxes of one node whose reads keep failing, skipped for a while.

A box whose layout generation never settles (a writer that died mid-update, or a hostile
one that leaves it odd) costs a reader about READ_RETRIES tries before it gives up, tens
of milliseconds. The `sensors` op reads such a box again only after a back-off that
doubles with each failure in a row (BASE_S, up to MAX_S), and says so in its reply; one
good read clears it. The box is named by (region name, registration time), so a box
registered anew starts clean.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

BASE_S = 0.5
MAX_S = 30.0

Key = tuple[str, float]  # (region name, registered_at)


@dataclass
class Failing:
    failures: int  # in a row
    until: float  # time.monotonic() before which the box is not read
    error: str  # the last one


class BoxBackoff:
    """The failing boxes of one node; thread-safe (the node's read workers share it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing: dict[Key, Failing] = {}

    def failures(self, key: Key) -> int:
        with self._lock:
            f = self._failing.get(key)
            return f.failures if f else 0

    def skipped(self, key: Key, now: float) -> Failing | None:
        """The box's record while it is to be skipped at `now`, else None."""
        with self._lock:
            f = self._failing.get(key)
            return f if f is not None and now < f.until else None

    def failed(self, key: Key, error: str, now: float) -> Failing:
        with self._lock:
            f = self._failing.get(key)
            n = f.failures + 1 if f else 1
            self._failing[key] = f = Failing(n, now + min(MAX_S, BASE_S * 2 ** (n - 1)), error)
            return f

    def succeeded(self, key: Key) -> None:
        with self._lock:
            self._failing.pop(key, None)

    def keep(self, keys: set[Key]) -> None:
        """Forget the boxes not in `keys` (unregistered)."""
        with self._lock:
            for key in self._failing.keys() - keys:
                del self._failing[key]

    def count(self, now: float) -> int:
        """Boxes skipped at `now`."""
        with self._lock:
            return sum(now < f.until for f in self._failing.values())
