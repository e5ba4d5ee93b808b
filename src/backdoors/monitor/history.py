"""A short history of a node's sensor values, for onsets and incident timelines.

One entry per poll: the time and, per (box, sensor), the value (MAX_KEYS sensors at
most). Bounded by age (`seconds`) and by count, so a fast poll cannot make it grow without
end.
"""

from __future__ import annotations

import itertools
from collections import deque

from .detectors import NodeView

Key = tuple[str, str]  # (box, sensor)
#: sensors of a node kept per entry: a node chooses how many it has (4,096 a box, boxes
#: in their dozens), not how much of the monitor's memory its history takes
MAX_KEYS = 512


class History:
    """Recent (time, {(box, sensor): value}) samples of one node, oldest first."""

    def __init__(self, seconds: float = 5.0, max_entries: int = 2000):
        self.seconds = seconds
        self._entries: deque[tuple[float, dict[Key, float]]] = deque(maxlen=max_entries)

    def add(self, view: NodeView) -> None:
        every = ((box, s) for box, snap in view.snapshots.items() for s in snap.sensors)
        values = {(box, s.name): s.value for box, s in itertools.islice(every, MAX_KEYS)}
        self._entries.append((view.at, values))
        while self._entries and self._entries[0][0] < view.at - self.seconds:
            self._entries.popleft()

    def copy(self) -> History:
        """A snapshot of this history (for a repair worker while polling goes on)."""
        h = History(self.seconds, self._entries.maxlen or 2000)
        h._entries.extend(self._entries)
        return h

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[tuple[float, dict[Key, float]]]:
        return list(self._entries)

    def series(self, key: Key, since: float = float("-inf")) -> list[tuple[float, float]]:
        """(time, value) of one sensor, from `since` on."""
        return [(t, v[key]) for t, v in self._entries if t >= since and key in v]

    def rise_start(self, key: Key, before: float, gap: float = 0.5,
                   min_step: float = 0.0) -> float | None:
        """When the counter `key` began its latest rise up to time `before`.

        Walks back from `before` over increases of the counter; flat stretches shorter than
        `gap` seconds do not end the rise (the agent counts forks from a process table it
        reads less often under load). Increases smaller than `min_step` count as flat (a
        service's occasional fork is not a fork bomb's rise). Returns the time of the last
        sample before the first increase, i.e. the last time the counter was still at its
        old value; None if the counter did not rise within `gap` before `before`.
        """
        points = [(t, v) for t, v in self.series(key) if t <= before]
        start, last_rise = None, before
        for i in range(len(points) - 1, 0, -1):
            (t0, v0), (t1, v1) = points[i - 1], points[i]
            if v1 > v0 and v1 - v0 >= min_step:
                start, last_rise = t0, t0
            elif last_rise - t0 > gap:
                break
        return start

    def violation_start(self, key: Key, violated, before: float) -> float | None:
        """The first time of the unbroken run, ending at `before`, in which
        `violated(value)` held for sensor `key`; None if it did not hold at `before`."""
        points = [(t, v) for t, v in self.series(key) if t <= before]
        start = None
        for t, v in reversed(points):
            if not violated(v):
                break
            start = t
        return start

    def around(self, keys: list[Key], start: float, end: float, max_points: int = 60) -> dict:
        """Values of `keys` between `start` and `end`, thinned to at most `max_points`
        per sensor, as {"box/sensor": [[t, value], ...]} with absolute times."""
        out = {}
        for key in keys:
            pts = [(t, v) for t, v in self.series(key, start) if t <= end]
            if len(pts) > max_points:
                step = len(pts) / max_points
                pts = [pts[int(i * step)] for i in range(max_points - 1)] + [pts[-1]]
            out[f"{key[0]}/{key[1]}"] = [[t, v] for t, v in pts]
        return out
