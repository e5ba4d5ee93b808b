"""What the agent derives from the Sensor Boxes it reads: stalls and event rates.

A stall is a fact of time, not of one reading: how long since a progress counter last
changed. The agent reads every box of a node on each sample (the sampler's tracking pass,
`sample_period_s`) and on each `sensors` call, and keeps, per box, a `SensorTracker` (the
monitor's own): when each progress counter was last seen to move, and each pressure
counter's events in its window. The `sensors` reply carries both, so anyone that reads
once (`backdoors status`, a monitor just started) judges a stall with
`sensors.judgement` as a monitor that has polled all along would. A box registered anew
(another registration time) or recreated (another owner) starts clean: its first sighting
counts as a move. The agent's watcher (agent/watch.py) reads the progress counters far
more often; `watched` hands over its record of a box once (it updates it in place: when
it last read the box, when it saw each counter move). Where this pass saw no move since
the watcher's read, the counter (which only goes forward) has not moved since the
watcher saw it move: the reply counts from then, less the time the node was starved of
CPU in that stretch (agent/watch.py), counted up to this read once the stretch is half
its deadline (the watcher's own excuse counts only to its last judgement).
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple, Protocol

from ..errors import SensorBoxError
from ..sensors import SensorTracker, SensorType, parse_box

Key = tuple[str, float]  # (region name, registered_at), as in backoff.py


class Observed(NamedTuple):
    """What one read of a box tells, per sensor: progress counters' seconds unchanged
    (less starvation), pressure counters' events in their window, and the seconds of
    CPU starvation taken off each unchanged stretch (counters with any)."""

    unchanged: dict[str, float]
    events: dict[str, float]
    starved: dict[str, float]


class _Moved(Protocol):
    name: str
    changed_at: float  # time.monotonic() the watcher saw it move
    excused: float  # seconds since then the node was starved of CPU (not counted)


class Watched(Protocol):
    """The watcher's record of one box, updated in place as it reads."""

    read_at: float  # time.monotonic() of its last read
    counters: list[_Moved]

    def excuse(self, since: float, now: float) -> float:
        """Seconds from `since` to `now` (monotonic) its node was starved of CPU."""


class BoxTracking:
    """Trackers of one node's boxes; thread-safe (the sampler's pass and the node's read
    workers share it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._trackers: dict[Key, SensorTracker] = {}
        self._watched: dict[Key, Watched] = {}  # the watcher's record of each box
        self.passed_at = -math.inf  # time.monotonic() of the last pass over every box

    def watched(self, key: Key, record: Watched) -> None:
        """The watcher's record of a box (kept, and read when a reply needs it)."""
        self._watched[key] = record

    def unwatched(self, key: Key) -> None:
        """The watcher dropped the box (unregistered)."""
        self._watched.pop(key, None)

    def observe(self, key: Key, data: bytes, now: float) -> Observed | None:
        """Track one consistent copy of a box read at `now` (time.monotonic()); None for
        a box that does not parse (the reader sees why itself)."""
        try:
            image = parse_box(data)
        except SensorBoxError:
            return None
        with self._lock:
            tracker = self._trackers.get(key)
            if tracker is None:
                tracker = self._trackers[key] = SensorTracker()
            snap = tracker.update(image, now)
            record = self._watched.get(key)
        read_at = record.read_at if record is not None else 0.0
        moved = {c.name: c for c in record.counters} if record is not None else {}
        unchanged, starved = {}, {}
        for s in snap.sensors:
            if s.type is SensorType.PROGRESS and s.stalled_for is not None:
                since = s.stalled_for
                c = moved.get(s.name)
                if c is not None and now - since <= read_at:  # no move after that read
                    since = max(since, now - c.changed_at)
                    # less the time the node was denied the CPU
                    excused = c.excused
                    if s.deadline is not None and since - excused > s.deadline / 2:
                        excused = max(excused, record.excuse(now - since, now))
                    since -= excused
                    if excused:
                        starved[s.name] = round(excused, 3)
                unchanged[s.name] = round(max(since, 0.0), 3)
        events = {s.name: s.rate for s in snap.sensors
                  if s.type is SensorType.PRESSURE and s.rate is not None}
        return Observed(unchanged, events, starved)

    def keep(self, keys: set[Key]) -> None:
        """Forget the boxes not in `keys` (unregistered; the watcher's records go when
        the watcher drops them, `unwatched`)."""
        with self._lock:
            for key in self._trackers.keys() - keys:
                del self._trackers[key]
