"""Detector units: does a condition hold on one poll of a node?

A NodeView is what one poll learnt about a node: a tracked Snapshot per Sensor Box (the
agent's kernel box included), whether its cgroup is frozen and who holds its lock, and
how long its agent has been silent. Each detector unit `check`s a view and returns a Hit
naming the sensors that violate, with their values and bounds, or None; it also says
when the trouble it detected began (`onset`, from the node's history). Whether a sensor
violates is the judgement of `backdoors.sensors.judgement`, with the rule's overrides of
the bounds. Holding a condition for `for_ms` is the engine's business.

To add a detector: a Detector subclass with `tag=`, its `check` and `onset`, listed in
DETECTORS.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Protocol, Union

import msgspec

from ..sensors import (
    KERNEL_BOX, KERNEL_SENSORS, SensorState, SensorType, Snapshot, out_of_bounds, over_rate,
    stalled,
)
from .unit import NonNeg, Path, Pos, Unit


@dataclass
class NodeView:
    """One poll of one node, as the detectors see it (times are time.monotonic())."""

    node: str
    host: str
    at: float
    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    frozen: bool | None = None
    locked_by: list[str] = field(default_factory=list)
    fenced: bool = False  # fenced after a recovery: out of service, left to the operator
    agent_ok: bool = True
    agent_silent_s: float = 0.0
    agent_error: str = ""  # why the agent's last poll failed (its words, or the transport's)
    #: peer agents whose fresh `peers` view says this node's agent does not answer them
    down_reports: list[str] = field(default_factory=list)
    event: dict | None = None  # an event pushed by the agent (monitor.events), not a poll
    via: str = "poll"  # how this view came: "poll" or "event"
    #: boxes of the node the agent could not read, or that did not parse: what they would
    #: say is unknown, so this view says no rule's condition is clear
    unread: tuple[str, ...] = ()

    def sensor(self, box: str, name: str) -> SensorState | None:
        snap = self.snapshots.get(box)
        return snap.get(name) if snap else None


class Violation(msgspec.Struct):
    """One sensor beyond its bound: `bound` is the deadline (s), the max/min, or the
    max events it exceeded."""

    box: str
    sensor: str
    type: SensorType
    value: float
    bound: float | None
    measure: float  # stalled_for (progress), value (level), events in window (pressure)


class Hit(msgspec.Struct):
    """A detector that fired: `index` in its rule, a one-line `summary`."""

    index: int
    kind: str
    summary: str
    violations: list[Violation] = []


class SensorHistory(Protocol):
    """What onsets read of a node's sensor history (monitor.history.History)."""

    def rise_start(self, key: tuple[str, str], before: float, gap: float = 0.5,
                   min_step: float = 0.0) -> float | None: ...

    def violation_start(self, key: tuple[str, str], violated, before: float) -> float | None: ...


class Detector(Unit):
    """A condition on one poll of a node."""

    #: evaluated while the agent is silent (the view then holds no fresh sensor data)
    judges_stale: ClassVar[bool] = False
    #: needs each poll to ask the agent for the nodes' state (frozen, locked, fenced)
    needs_node_state: ClassVar[bool] = False
    #: needs each poll to ask the agent for its view of its peer agents (op peers)
    needs_peers: ClassVar[bool] = False
    def takes(self, event: dict) -> bool:
        """Whether this detector judges `event`, an agent's pushed event (a view with
        `event`); others see polls only, and an event leaves their state as it is."""
        return False

    @property
    def hold_ms(self) -> float:
        """How long the condition must hold before the detector fires."""
        return 0.0

    def check(self, index: int, view: NodeView) -> Hit | None:
        """The Hit of this detector (the `index`-th of its rule) on `view`, or None."""
        raise NotImplementedError

    @classmethod
    def onset(cls, hit: Hit, view: NodeView, history: SensorHistory) -> float:
        """When the trouble of `hit` began: by default, now."""
        return view.at


# ---- sensor detectors --------------------------------------------------------------------


class SensorDetector(Detector):
    """A detector over the sensors of one type: `box` is a glob over the node's box
    (region) names; `sensors` names sensors (globs too), empty meaning every sensor of
    the type in the matching boxes."""

    sensor_type: ClassVar[SensorType]
    box: str = "*"
    sensors: list[str] = []
    for_ms: NonNeg = 0.0

    @property
    def hold_ms(self) -> float:
        return self.for_ms

    def problems(self) -> Iterator[tuple[Path, str]]:
        if not self.box:
            yield ("box",), "must be a box name or glob"
        if self.box == KERNEL_BOX:  # its sensors are known: a misspelt one never fires
            names = [n for n, t in KERNEL_SENSORS.items() if t == self.sensor_type]
            for i, pattern in enumerate(self.sensors):
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    yield ("sensors", i), (f"no {self.sensor_type} sensor of the kernel box "
                                           f"is {pattern!r}; it has {', '.join(names)}")

    def matching(self, view: NodeView) -> Iterator[tuple[str, SensorState]]:
        for box, snap in view.snapshots.items():
            if not fnmatch.fnmatchcase(box, self.box):
                continue
            for s in snap.sensors:
                if s.type == self.sensor_type and (not self.sensors or any(
                        fnmatch.fnmatchcase(s.name, p) for p in self.sensors)):
                    yield box, s

    def violation(self, box: str, s: SensorState) -> Violation | None:
        raise NotImplementedError

    @staticmethod
    def describe(v: Violation) -> str:
        raise NotImplementedError

    def takes(self, event: dict) -> bool:
        """A `violation` or `cleared` the agent's watcher judged for this kind of
        detector, about a box and sensor this one watches."""
        return _pushed(self, event) and fnmatch.fnmatchcase(str(event.get("box")), self.box) \
            and (not self.sensors or any(fnmatch.fnmatchcase(str(event.get("sensor")), p)
                                         for p in self.sensors))

    def pushed_state(self, event: dict) -> SensorState:
        """The sensor as the agent's violation event describes it."""
        raise NotImplementedError

    def pushed_violation(self, box: str, event: dict) -> Violation | None:
        """The violation of the agent's violation `event`, judged with this detector's
        bounds."""
        return self.violation(box, self.pushed_state(event))

    def check(self, index: int, view: NodeView) -> Hit | None:
        if view.event is not None:  # judged with the same rule as a poll's reading
            if view.event.get("kind") != "violation" or not self.takes(view.event):
                return None
            v = self.pushed_violation(str(view.event["box"]), view.event)
            if v is None:
                return None
            summary = self.describe(v)
            if view.event.get("reason") == "died":
                summary = (f"{v.box}/{v.sensor} stopped for good: its process "
                           f"{view.event.get('owner_pid')} died")
            return Hit(index, self.kind_name(), summary, [v])
        found = [v for box, s in self.matching(view) if (v := self.violation(box, s))]
        if not found:
            return None
        return Hit(index, self.kind_name(), "; ".join(self.describe(v) for v in found[:4]),
                   found)


class ProgressStalled(SensorDetector, tag="progress_stalled"):
    """A progress counter that has not moved for longer than its deadline.

    `deadline_ms` replaces the deadline the sensor carries.
    """

    sensor_type: ClassVar[SensorType] = SensorType.PROGRESS
    deadline_ms: Pos | None = None

    def pushed_state(self, event: dict) -> SensorState:
        """The stall as the agent saw it, less the time the node was starved of CPU
        (`starved_ms`: not counted against a deadline, agent/watch.py)."""
        unchanged = float(event["unchanged_ms"]) - float(event.get("starved_ms", 0))
        return SensorState(0, str(event["sensor"]), SensorType.PROGRESS,
                           float(event.get("value", 0)), True,
                           stalled_for=max(unchanged, 0.0) / 1000,
                           deadline=float(event["deadline_ms"]) / 1000)

    def pushed_violation(self, box: str, event: dict) -> Violation | None:
        """The agent judged the stall against the sensor's own deadline, with its exact
        times (`stalled`, strictly longer); a stall it pushes at its first sighting past
        the deadline exceeds it by a hair, which the event's milliseconds need not show.
        So only a rule's own `deadline_ms` judges the event again. A counter whose
        process died (`reason` "died", pushed at the death) violates at once."""
        s = self.pushed_state(event)
        if event.get("reason") == "died" and s.stalled_for is not None:
            # its process is gone: the counter cannot move again, whatever the deadline
            return Violation(box, s.name, s.type, s.value, s.deadline, s.stalled_for)
        if self.deadline_ms is None and s.deadline is not None and s.stalled_for is not None:
            return Violation(box, s.name, s.type, s.value, s.deadline, s.stalled_for)
        return self.violation(box, s)

    def violation(self, box: str, s: SensorState) -> Violation | None:
        deadline = self.deadline_ms / 1000 if self.deadline_ms is not None else s.deadline
        if s.stalled_for is not None and deadline is not None and stalled(s.stalled_for, deadline):
            return Violation(box, s.name, s.type, s.value, deadline, s.stalled_for)
        return None

    @staticmethod
    def describe(v: Violation) -> str:
        return f"{v.box}/{v.sensor} stalled {v.measure * 1000:.0f} ms > {v.bound * 1000:.0f} ms"

    @classmethod
    def onset(cls, hit: Hit, view: NodeView, history: SensorHistory) -> float:
        """When the counter last moved."""
        return min([view.at] + [view.at - v.measure for v in hit.violations])


class LevelOutOfBounds(SensorDetector, tag="level_out_of_bounds"):
    """A gauge outside [min, max]; the sensor's own bounds unless replaced here."""

    sensor_type: ClassVar[SensorType] = SensorType.LEVEL
    min: float | None = None
    max: float | None = None

    def pushed_state(self, event: dict) -> SensorState:
        lo, hi = event.get("min"), event.get("max")
        return SensorState(0, str(event["sensor"]), SensorType.LEVEL, float(event["value"]),
                           True, min=None if lo is None else float(lo),
                           max=None if hi is None else float(hi))

    def pushed_violation(self, box: str, event: dict) -> Violation | None:
        """A PSI trigger's event (`trigger`) is the kernel's judgement: the node stalled
        at least `value` % of the window, its sensor's max. A rule's own `max` above
        that is not shown passed, so it does not fire on it."""
        s = self.pushed_state(event)
        if not event.get("trigger"):
            return self.violation(box, s)
        if self.max is not None and self.max > s.value:
            return None
        return Violation(box, s.name, s.type, s.value, s.max if self.max is None else self.max,
                         s.value)

    def problems(self) -> Iterator[tuple[Path, str]]:
        for bound in ("min", "max"):
            v = getattr(self, bound)
            if v is not None and not math.isfinite(v):
                yield (bound,), "must be finite"
        if self.min is not None and self.max is not None and self.min > self.max:
            yield ("min",), f"min {self.min} > max {self.max}"
        yield from super().problems()

    def violation(self, box: str, s: SensorState) -> Violation | None:
        lo = self.min if self.min is not None else s.min
        hi = self.max if self.max is not None else s.max
        breach = out_of_bounds(s.value, lo, hi)
        if breach is None:
            return None
        return Violation(box, s.name, s.type, s.value, lo if breach == "below" else hi, s.value)

    @staticmethod
    def describe(v: Violation) -> str:
        rel = ">" if v.bound is None or v.value > v.bound else "<"
        if v.bound is not None and v.value == v.bound:
            rel = ">="  # a PSI trigger's: at least its share
        bound = "None" if v.bound is None else f"{v.bound:.4g}"
        return f"{v.box}/{v.sensor} = {v.value:.4g} {rel} {bound}"

    @classmethod
    def onset(cls, hit: Hit, view: NodeView, history: SensorHistory) -> float:
        """The start of the unbroken run out of bounds."""
        times = [view.at]
        for v in hit.violations:
            if v.bound is None or not math.isfinite(v.value):
                bad = lambda x: not math.isfinite(x)  # noqa: E731
            elif v.value >= v.bound:
                bad = lambda x, b=v.bound: x > b  # noqa: E731
            else:
                bad = lambda x, b=v.bound: x < b  # noqa: E731
            t = history.violation_start((v.box, v.sensor), bad, view.at)
            times.append(t if t is not None else view.at)
        return min(times)


class PressureOverRate(SensorDetector, tag="pressure_over_rate"):
    """More events in the sensor's window than its maximum (or `max_events`)."""

    sensor_type: ClassVar[SensorType] = SensorType.PRESSURE
    max_events: Pos | None = None

    def pushed_state(self, event: dict) -> SensorState:
        limit = event.get("max_events")
        return SensorState(0, str(event["sensor"]), SensorType.PRESSURE, float(event["value"]),
                           True, rate=float(event["events"]),
                           max_events=None if limit is None else float(limit),
                           window=event.get("window_s"))

    def violation(self, box: str, s: SensorState) -> Violation | None:
        limit = self.max_events if self.max_events is not None else s.max_events
        if s.rate is not None and limit is not None and over_rate(s.rate, limit):
            return Violation(box, s.name, s.type, s.value, limit, s.rate)
        return None

    @staticmethod
    def describe(v: Violation) -> str:
        return f"{v.box}/{v.sensor} {v.measure:g} events/window > {v.bound:g}"

    @classmethod
    def onset(cls, hit: Hit, view: NodeView, history: SensorHistory) -> float:
        """The start of the counter's rise."""
        times = [view.at]
        for v in hit.violations:
            t = history.rise_start((v.box, v.sensor), view.at)
            times.append(t if t is not None else view.at)
        return min(times)


# ---- node detectors ----------------------------------------------------------------------


class NodeFrozen(Detector, tag="node_frozen"):
    """The node's cgroup is frozen while nobody holds its lock (not a repair's freeze)."""

    needs_node_state: ClassVar[bool] = True
    for_ms: NonNeg = 0.0

    @property
    def hold_ms(self) -> float:
        return self.for_ms

    def takes(self, event: dict) -> bool:
        return _pushed(self, event)

    def check(self, index: int, view: NodeView) -> Hit | None:
        if view.event is not None:  # the agent saw it frozen, by nobody's lock
            return Hit(index, self.kind_name(), f"node {view.node} is frozen and nobody "
                       "holds its lock") if view.event.get("kind") == "violation" else None
        if view.frozen and not view.locked_by:
            return Hit(index, self.kind_name(),
                       f"node {view.node} is frozen and nobody holds its lock")
        return None


class AgentUnreachable(Detector, tag="agent_unreachable"):
    """The node's agent has not answered for `after_ms` (down, partitioned or stuck)."""

    judges_stale: ClassVar[bool] = True
    after_ms: Pos = 1000.0

    def check(self, index: int, view: NodeView) -> Hit | None:
        if not view.agent_ok and view.agent_silent_s * 1000 >= self.after_ms:
            why = f": {view.agent_error[:200]}" if view.agent_error else ""
            return Hit(index, self.kind_name(), f"agent of host {view.host} silent for "
                                                f"{view.agent_silent_s * 1000:.0f} ms{why}")
        return None

    @classmethod
    def onset(cls, hit: Hit, view: NodeView, history: SensorHistory) -> float:
        """Now minus how long the agent has been silent."""
        return view.at - view.agent_silent_s


class AgentDown(Detector, tag="agent_down"):
    """The node's agent answers neither the monitor nor at least `min_peers` of its peer
    agents (their op `peers`): dead or hung, not a partition between monitor and agent.
    The incident names the reporting peers."""

    judges_stale: ClassVar[bool] = True
    needs_peers: ClassVar[bool] = True
    min_peers: Annotated[int, msgspec.Meta(ge=1)] = 1

    def check(self, index: int, view: NodeView) -> Hit | None:
        if not view.agent_ok and len(view.down_reports) >= self.min_peers:
            return Hit(index, self.kind_name(),
                       f"agent of host {view.host} is down: silent to the monitor and to its "
                       f"peers {', '.join(sorted(view.down_reports))}")
        return None

    @classmethod
    def onset(cls, hit: Hit, view: NodeView, history: SensorHistory) -> float:
        """Now minus how long the agent has been silent (as for agent_unreachable)."""
        return AgentUnreachable.onset(hit, view, history)


class SessionsOrphaned(Detector, tag="sessions_orphaned"):
    """A server died holding client sessions (the agent's event "owner_died", pushed the
    moment its pidfd said so; or found by the monitor asking after a gap in events)."""

    def takes(self, event: dict) -> bool:
        return event.get("kind") == "owner_died"

    def check(self, index: int, view: NodeView) -> Hit | None:
        ev = view.event
        if ev is None or ev.get("kind") != "owner_died" or not ev.get("sessions"):
            return None
        return Hit(index, self.kind_name(), f"server pid {ev.get('pid')} of node {view.node} "
                                            f"died holding {len(ev['sessions'])} sessions")

    @classmethod
    def onset(cls, hit: Hit, view: NodeView, history: SensorHistory) -> float:
        """When the agent saw the death (its Unix time, on the monitor's clock)."""
        import time
        died = (view.event or {}).get("died")
        return min(view.at, view.at - max(0.0, time.time() - died)) if died else view.at


def _pushed(det: Detector, event: dict) -> bool:
    """A violation (or its end) the agent judged for detectors of `det`'s kind."""
    return event.get("kind") in ("violation", "cleared") and event.get("detector") == det.kind_name()


# ---- registration ------------------------------------------------------------------------

DETECTORS = (ProgressStalled, LevelOutOfBounds, PressureOverRate, NodeFrozen, AgentUnreachable,
             AgentDown, SessionsOrphaned)
DetectorUnit = Union[DETECTORS]  # the TOML `detectors = [...]` entries
BY_KIND: dict[str, type[Detector]] = {d.kind_name(): d for d in DETECTORS}


def evaluate(det: Detector, index: int, view: NodeView) -> Hit | None:
    """The Hit of detector `det` (the `index`-th of its rule) on `view`, or None.

    While the agent is silent only detectors that judge stale views speak."""
    if not view.agent_ok and not det.judges_stale:
        return None
    return det.check(index, view)
