"""When a sensor is beyond its bound: the one judgement of each sensor type.

The reader's tracker, the monitor's detectors and `backdoors status` measure differently
(a tracked history, rule overrides, two readings), but judge with these functions:

- progress: stalled for longer than its deadline;
- level: out of its bounds, or not a number;
- pressure: more events in its window than its maximum.
"""

from __future__ import annotations

import math
from typing import Literal

Breach = Literal["nan", "above", "below"]


def stalled(stalled_for: float, deadline: float) -> bool:
    """A progress counter that has not moved for longer than `deadline` seconds."""
    return stalled_for > deadline


def out_of_bounds(value: float, lo: float | None, hi: float | None) -> Breach | None:
    """How a level breaks its bounds: "nan" (not a finite number), "above" `hi`,
    "below" `lo`; None within them (a missing bound is no bound)."""
    if not math.isfinite(value):
        return "nan"
    if hi is not None and value > hi:
        return "above"
    if lo is not None and value < lo:
        return "below"
    return None


def over_rate(events: float, max_events: float) -> bool:
    """More pressure events in the window than `max_events`."""
    return events > max_events
