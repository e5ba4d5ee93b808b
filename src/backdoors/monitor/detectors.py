"""Detectors: does a condition hold on one poll of a node? Pure functions over a NodeView.

A NodeView is what one poll learnt about a node: a tracked Snapshot per Sensor Box (the
agent's "kernel" box included), whether its cgroup is frozen and who holds its lock, and
how long its agent has been silent. `evaluate` returns a Hit naming the sensors that
violate, with their values and bounds, or None. Holding a condition for `for_ms` is the
engine's business, not this module's.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import msgspec

from ..sensors import Snapshot, SensorState
from . import rules as R

KERNEL_BOX = "kernel"


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
    box_errors: dict[str, str] = field(default_factory=dict)

    def sensor(self, box: str, name: str) -> SensorState | None:
        snap = self.snapshots.get(box)
        return snap.get(name) if snap else None


class Violation(msgspec.Struct):
    """One sensor beyond its bound: `bound` is the deadline (s), the max/min, or the
    max events it exceeded."""

    box: str
    sensor: str
    type: str
    value: float
    bound: float | None
    measure: float  # stalled_for (progress), value (level), events in window (pressure)


class Hit(msgspec.Struct):
    """A detector that fired: `index` in its rule, a one-line `summary`."""

    index: int
    kind: str
    summary: str
    violations: list[Violation] = []


def _matching(view: NodeView, det, type_: str):
    for box, snap in view.snapshots.items():
        if not fnmatch.fnmatchcase(box, det.box):
            continue
        for s in snap.sensors:
            if s.type == type_ and (not det.sensors or any(
                    fnmatch.fnmatchcase(s.name, p) for p in det.sensors)):
                yield box, s


def _progress(view: NodeView, det: R.ProgressStalled) -> list[Violation]:
    out = []
    for box, s in _matching(view, det, "progress"):
        deadline = det.deadline_ms / 1000 if det.deadline_ms is not None else s.deadline
        if s.stalled_for is not None and deadline is not None and s.stalled_for > deadline:
            out.append(Violation(box, s.name, "progress", s.value, deadline, s.stalled_for))
    return out


def _level(view: NodeView, det: R.LevelOutOfBounds) -> list[Violation]:
    out = []
    for box, s in _matching(view, det, "level"):
        lo = det.min if det.min is not None else s.min
        hi = det.max if det.max is not None else s.max
        if not math.isfinite(s.value):
            out.append(Violation(box, s.name, "level", s.value, hi, s.value))
        elif hi is not None and s.value > hi:
            out.append(Violation(box, s.name, "level", s.value, hi, s.value))
        elif lo is not None and s.value < lo:
            out.append(Violation(box, s.name, "level", s.value, lo, s.value))
    return out


def _pressure(view: NodeView, det: R.PressureOverRate) -> list[Violation]:
    out = []
    for box, s in _matching(view, det, "pressure"):
        limit = det.max_events if det.max_events is not None else s.max_events
        if s.rate is not None and limit is not None and s.rate > limit:
            out.append(Violation(box, s.name, "pressure", s.value, limit, s.rate))
    return out


_SENSOR_CHECKS = {R.ProgressStalled: _progress, R.LevelOutOfBounds: _level,
                  R.PressureOverRate: _pressure}


def _describe(v: Violation) -> str:
    if v.type == "progress":
        return f"{v.box}/{v.sensor} stalled {v.measure * 1000:.0f} ms > {v.bound * 1000:.0f} ms"
    if v.type == "pressure":
        return f"{v.box}/{v.sensor} {v.measure:g} events/window > {v.bound:g}"
    rel = ">" if v.bound is None or v.value > v.bound else "<"
    return f"{v.box}/{v.sensor} = {v.value:.4g} {rel} {v.bound if v.bound is None else f'{v.bound:.4g}'}"


def evaluate(det: R.Detector, index: int, view: NodeView) -> Hit | None:
    """The Hit of detector `det` (the `index`-th of its rule) on `view`, or None."""
    kind = det.__struct_config__.tag
    if isinstance(det, R.AgentUnreachable):
        if not view.agent_ok and view.agent_silent_s * 1000 >= det.after_ms:
            return Hit(index, kind, f"agent of host {view.host} silent for "
                                    f"{view.agent_silent_s * 1000:.0f} ms")
        return None
    if not view.agent_ok:
        return None  # stale data: only agent_unreachable speaks while the agent is silent
    if isinstance(det, R.NodeFrozen):
        if view.frozen and not view.locked_by:
            return Hit(index, kind, f"node {view.node} is frozen and nobody holds its lock")
        return None
    found = _SENSOR_CHECKS[type(det)](view, det)
    if not found:
        return None
    return Hit(index, kind, "; ".join(_describe(v) for v in found[:4]), found)
