"""Rulesets: detectors -> one diagnosis -> ordered actions, configured in TOML.

    [[rule]]
    name = "memory-hog"
    detectors = [{ kind = "level_out_of_bounds", box = "kernel", sensors = ["memory_mb"] }]
    diagnosis = { kind = "memory_hog", min_rate_mb_s = 1.0 }
    actions = [{ kind = "kill_culprit" }]

Every unit is a tagged Struct (`kind` picks it); `load_ruleset` decodes a file and checks
what types cannot (patterns, bounds, actions that need a particular diagnosis), raising
ConfigError with the file, line and key. docs/monitor.md is the reference; the shipped
defaults are in `rules/default.toml`.
"""

from __future__ import annotations

import fnmatch
import math
import os
from importlib import resources
from typing import Annotated, Literal, Union

import msgspec

from ..common import configfile
from ..common.configfile import Invalid
from ..errors import ConfigError

NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Pos = Annotated[float, msgspec.Meta(gt=0)]


class _Unit(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag_field="kind"):
    pass


# ---- detectors ---------------------------------------------------------------------------


class ProgressStalled(_Unit, tag="progress_stalled"):
    """A progress counter that has not moved for longer than its deadline.

    `box` is a glob over the node's box (region) names; `sensors` names sensors (globs
    too), empty meaning every progress sensor of the matching boxes. `deadline_ms`
    replaces the deadline the sensor carries.
    """

    box: str = "*"
    sensors: list[str] = []
    deadline_ms: Pos | None = None
    for_ms: NonNeg = 0.0


class LevelOutOfBounds(_Unit, tag="level_out_of_bounds"):
    """A gauge outside [min, max]; the sensor's own bounds unless replaced here."""

    box: str = "*"
    sensors: list[str] = []
    min: float | None = None
    max: float | None = None
    for_ms: NonNeg = 0.0


class PressureOverRate(_Unit, tag="pressure_over_rate"):
    """More events in the sensor's window than its maximum (or `max_events`)."""

    box: str = "*"
    sensors: list[str] = []
    max_events: Pos | None = None
    for_ms: NonNeg = 0.0


class NodeFrozen(_Unit, tag="node_frozen"):
    """The node's cgroup is frozen while nobody holds its lock (not a repair's freeze)."""

    for_ms: NonNeg = 0.0


class AgentUnreachable(_Unit, tag="agent_unreachable"):
    """The node's agent has not answered for `after_ms` (down, partitioned or stuck)."""

    after_ms: Pos = 1000.0


Detector = Union[ProgressStalled, LevelOutOfBounds, PressureOverRate, NodeFrozen, AgentUnreachable]
SENSOR_DETECTORS = (ProgressStalled, LevelOutOfBounds, PressureOverRate)

# ---- diagnosis units ---------------------------------------------------------------------


class MemoryHogDiagnosis(_Unit, tag="memory_hog"):
    """The culprit is the process growing fastest (rss_rate), never the largest as such.

    Processes growing slower than `min_rate_mb_s` are never chosen (no culprit at all if
    none grows); registered services and `protect_comms` never are. `top` candidates go
    to the evidence.
    """

    min_rate_mb_s: Pos = 1.0
    top: Annotated[int, msgspec.Meta(ge=1, le=50)] = 5
    protect_comms: list[str] = []


class ForkBombDiagnosis(_Unit, tag="fork_bomb"):
    """The bomb is the lineage created since onset, identified while the node is locked.

    Onset comes from the sensor history; processes younger than onset + `onset_slack_ms`
    and their unprotected ancestors are the bomb. An ancestor older than onset joins only
    with at least `old_ancestor_min_children` young children alive (a shell that forks
    the bomb does; a service that started one helper does not). Registered services, the
    node's first process and `protect_comms` are never part of it.
    """

    onset_slack_ms: NonNeg = 250.0
    old_ancestor_min_children: Annotated[int, msgspec.Meta(ge=1)] = 3
    protect_comms: list[str] = []


class HangDiagnosis(_Unit, tag="hang"):
    """Which process is stuck, in what state; whole node frozen vs one process stalled.

    A second process table `sample_ms` later tells a spinning process from a blocked one
    (0: one table only).
    """

    sample_ms: NonNeg = 100.0


class LargestRssDiagnosis(_Unit, tag="largest_rss"):
    """Baseline policy (the kernel's and earlyoom's): the largest process is the culprit."""

    top: Annotated[int, msgspec.Meta(ge=1, le=50)] = 5
    protect_registered: bool = False


class NoDiagnosis(_Unit, tag="none"):
    """No diagnosis: actions run on the detection alone."""


Diagnosis = Union[MemoryHogDiagnosis, ForkBombDiagnosis, HangDiagnosis, LargestRssDiagnosis,
                  NoDiagnosis]

# ---- actions -----------------------------------------------------------------------------


class KillCulprit(_Unit, tag="kill_culprit"):
    """Kill the diagnosed culprit through the agent (pid + start time, so never a reused
    pid), then wait up to `wait_ms` for it to be gone."""

    wait_ms: Pos = 1000.0


class LockKillLineage(_Unit, tag="lock_kill_lineage"):
    """Lock (freeze) the node, identify the lineage, kill it frozen, unlock, verify.

    The lock has a lease of `lease_s`, so a monitor dying mid-repair cannot leave the
    node frozen. Up to `max_rounds` rounds if survivors are found within `verify_ms`.
    """

    lease_s: Pos = 5.0
    verify_ms: Pos = 2000.0
    max_rounds: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3


class Refresh(_Unit, tag="refresh"):
    """Restart the service: an in-process hook (`hook`, registered with the Monitor) or a
    command run by the monitor (`command`; {node}, {host}, {pid}, {incident} expand)."""

    hook: str | None = None
    command: list[str] | None = None
    timeout_s: Pos = 30.0


class Record(_Unit, tag="record"):
    """Record the incident only."""

    note: str = ""


class Recover(_Unit, tag="recover"):
    """Move the node's client sessions to a healthy node (another agent's, normally):
    fence the failed node (freeze it, cut its network), then have its agent evacuate the
    sessions to `target` (default: the first node, by name, of another reachable agent).
    The failed node stays fenced for inspection unless `after` is "release" (unfence and
    kill what ran there: a refresh is then up to the operator). With `when` =
    "unrepaired" it runs only if no earlier action of the incident repaired the node (a
    memory hog that is the service itself cannot be killed: its sessions move instead)."""

    target: str | None = None
    when: Literal["always", "unrepaired"] = "always"
    after: Literal["fenced", "release"] = "fenced"
    timeout_s: float = 30.0


Action = Union[KillCulprit, LockKillLineage, Refresh, Record, Recover]

# ---- rules -------------------------------------------------------------------------------


class Rule(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Detectors (any or all must fire) -> one diagnosis -> ordered actions.

    An incident opens when the rule fires on a node and closes when its detectors have
    been clear for `clear_ms`. Still firing `retry_after_ms` after its actions, it is
    closed unresolved, and the rule may fire again after `cooldown_ms`.
    """

    name: str
    detectors: Annotated[list[Detector], msgspec.Meta(min_length=1)]
    match: Literal["any", "all"] = "any"
    diagnosis: Diagnosis = NoDiagnosis()
    actions: list[Action] = []
    nodes: list[str] = msgspec.field(default_factory=lambda: ["*"])
    clear_ms: NonNeg = 500.0
    cooldown_ms: NonNeg = 1000.0
    retry_after_ms: Pos = 3000.0
    enabled: bool = True

    def applies_to(self, node: str) -> bool:
        return self.enabled and any(fnmatch.fnmatchcase(node, p) for p in self.nodes)


class Ruleset(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A file of rules; `source` is where it came from (set by the loader)."""

    rule: list[Rule] = []
    description: str = ""
    source: str = ""


def _validate(rs: Ruleset) -> None:
    seen: set[str] = set()
    for i, rule in enumerate(rs.rule):
        at = ("rule", i)
        if not rule.name or len(rule.name) > 64 or any(c.isspace() for c in rule.name):
            raise Invalid(at + ("name",), "must be 1-64 characters without spaces")
        if rule.name in seen:
            raise Invalid(at + ("name",), f"rule name {rule.name!r} is used twice")
        seen.add(rule.name)
        if not rule.nodes:
            raise Invalid(at + ("nodes",), "must name at least one node pattern (\"*\" for all)")
        for j, d in enumerate(rule.detectors):
            if isinstance(d, LevelOutOfBounds):
                for bound in ("min", "max"):
                    v = getattr(d, bound)
                    if v is not None and not math.isfinite(v):
                        raise Invalid(at + ("detectors", j, bound), "must be finite")
                if d.min is not None and d.max is not None and d.min > d.max:
                    raise Invalid(at + ("detectors", j, "min"), f"min {d.min} > max {d.max}")
            if isinstance(d, SENSOR_DETECTORS) and not d.box:
                raise Invalid(at + ("detectors", j, "box"), "must be a box name or glob")
        for j, a in enumerate(rule.actions):
            where = at + ("actions", j)
            if isinstance(a, KillCulprit) and not isinstance(
                    rule.diagnosis, (MemoryHogDiagnosis, LargestRssDiagnosis, HangDiagnosis)):
                raise Invalid(where + ("kind",), "kill_culprit needs a diagnosis that names a "
                              "culprit: memory_hog, largest_rss or hang")
            if isinstance(a, LockKillLineage) and not isinstance(rule.diagnosis, ForkBombDiagnosis):
                raise Invalid(where + ("kind",), "lock_kill_lineage needs diagnosis fork_bomb")
            if isinstance(a, Refresh) and (a.hook is None) == (a.command is None):
                raise Invalid(where, "refresh needs exactly one of hook or command")
            if isinstance(a, Refresh) and a.command is not None and not a.command:
                raise Invalid(where + ("command",), "must not be empty")
        if sum(isinstance(a, (KillCulprit, LockKillLineage)) for a in rule.actions) > 1:
            raise Invalid(at + ("actions",), "a rule may have at most one kill action")


def _kinds(union) -> list[str]:
    return [t.__struct_config__.tag for t in union.__args__]


KINDS = {"detectors": _kinds(Detector), "diagnosis": _kinds(Diagnosis), "actions": _kinds(Action)}


def _hint(path, message: str) -> str:
    if path and path[-1] == "kind" and message.startswith(("Invalid value", "Expected")):
        for part in reversed(path[:-1]):
            if part in KINDS:
                return f"expected one of: {', '.join(KINDS[part])}"
    if message.startswith("Object missing required field `kind`"):
        for part in reversed(path):
            if part in KINDS:
                return f"kind is one of: {', '.join(KINDS[part])}"
    return ""


def parse_ruleset(text: str, source: str = "<ruleset>") -> Ruleset:
    """Decode and check ruleset TOML; ConfigError naming source, line and key."""
    rs = configfile.decode(text, Ruleset, source, _hint, check=_validate)
    return msgspec.structs.replace(rs, source=source)


def packaged() -> list[str]:
    """Names of the rulesets shipped with backdoors (rules/NAME.toml)."""
    folder = resources.files("backdoors.monitor") / "rules"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_ruleset(spec: str) -> Ruleset:
    """A ruleset by packaged name ("default") or by path to a TOML file."""
    if os.sep not in spec and not spec.endswith(".toml"):
        res = resources.files("backdoors.monitor") / "rules" / f"{spec}.toml"
        if not res.is_file():
            raise ConfigError(f"no packaged ruleset {spec!r} (packaged: {', '.join(packaged())}); "
                              "give a path to a TOML file instead")
        return parse_ruleset(res.read_text("utf-8"), f"<packaged {spec}.toml>")
    return parse_ruleset(configfile.read(spec, "ruleset"), spec)


def load_rulesets(specs: list[str]) -> list[Rule]:
    """The rules of several rulesets, in order; a rule name may be used only once."""
    rules: list[Rule] = []
    origin: dict[str, str] = {}
    for spec in specs:
        rs = load_ruleset(spec)
        for r in rs.rule:
            if r.name in origin:
                raise ConfigError(f"{rs.source}: rule {r.name!r} is already defined in {origin[r.name]}")
            origin[r.name] = rs.source
            rules.append(r)
    return rules


def default_rules() -> list[Rule]:
    """The rules of the packaged default ruleset."""
    return list(load_ruleset("default").rule)
