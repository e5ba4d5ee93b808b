"""Log lines of something an attacker can repeat at will, limited: a token bucket per key,
the suppressed ones counted and reported with the next line (the agent's refused
registrations, a monitor's refused warnings, a NATS connection's errors)."""

from __future__ import annotations

import threading
import time


class LogLimiter:
    """A token bucket per key (a node, a kind of error): `admit(key)` says whether one
    more line may be logged and how many were suppressed before it; `pending()` hands
    over the suppressed counts not reported yet (at most once per `1/rate` seconds per
    key)."""

    def __init__(self, *, rate: float = 1.0, burst: int = 20, clock=time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, refilled_at, suppressed]
        self._lock = threading.Lock()

    def admit(self, key: str) -> tuple[bool, int]:
        """(log this one?, lines suppressed since the last one logged, to report now)."""
        with self._lock:
            now = self._clock()
            b = self._buckets.setdefault(key, [float(self.burst), now, 0])
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
            if b[0] < 1:
                b[2] += 1
                return False, 0
            b[0] -= 1
            suppressed, b[2] = int(b[2]), 0
            return True, suppressed

    def pending(self, *, every: bool = False) -> list[tuple[str, int]]:
        """(key, count) of suppressed lines whose key may log again (`every`: all of
        them, at the end); counts reset."""
        out = []
        with self._lock:
            now = self._clock()
            for key, b in self._buckets.items():
                tokens = min(self.burst, b[0] + (now - b[1]) * self.rate)
                if b[2] and (tokens >= 1 or every):
                    b[0], b[1] = tokens - 1, now
                    out.append((key, int(b[2])))
                    b[2] = 0
        return out
