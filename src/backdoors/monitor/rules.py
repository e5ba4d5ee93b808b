"""Rulesets: detectors -> one diagnosis -> ordered actions, configured in TOML.

    [[rule]]
    name = "memory-hog"
    detectors = [{ kind = "level_out_of_bounds", box = "kernel", sensors = ["memory_mb"] }]
    diagnosis = { kind = "memory_hog", min_rate_mb_s = 1.0 }
    actions = [{ kind = "kill_culprit" }]

Every unit is a tagged Struct (`kind` picks it) that owns its behaviour: detectors in
detectors.py, diagnoses in diagnosis.py, actions in actions.py, each registered in its
module's tuple (DETECTORS, DIAGNOSES, ACTIONS). `load_ruleset` decodes a file and checks
what types cannot (each unit's own `problems`, actions whose `needs` the diagnosis does
not provide), raising ConfigError with the file, line and key. docs/monitor.md is the
reference; the shipped defaults are in `rules/default.toml`.
"""

from __future__ import annotations

import fnmatch
import os
from importlib import resources
from typing import Annotated, Literal

import msgspec

from ..common import configfile
from ..common.configfile import Invalid
from ..errors import ConfigError
from .actions import ACTIONS, ActionUnit
from .diagnosis import CAPABILITIES, DIAGNOSES, DiagnosisUnit, NoDiagnosis
from .detectors import DETECTORS, DetectorUnit
from .unit import NonNeg, Pos, kinds

# ---- rules -------------------------------------------------------------------------------


class Rule(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Detectors (any or all must fire) -> one diagnosis -> ordered actions.

    An incident opens when the rule fires on a node and closes when its detectors have
    been clear for `clear_ms`; the rule may fire again there after `cooldown_ms`. Still
    firing `retry_after_ms` after its actions, the actions run again in the same incident,
    up to `max_attempts` responses in all (not when they only record); then it stays open,
    `unresolved`, until the condition clears.
    """

    name: str
    detectors: Annotated[list[DetectorUnit], msgspec.Meta(min_length=1)]
    match: Literal["any", "all"] = "any"
    diagnosis: DiagnosisUnit = NoDiagnosis()
    actions: list[ActionUnit] = []
    nodes: list[str] = msgspec.field(default_factory=lambda: ["*"])
    clear_ms: NonNeg = 500.0
    cooldown_ms: NonNeg = 1000.0
    retry_after_ms: Pos = 3000.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
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
            for path, message in d.problems():
                raise Invalid(at + ("detectors", j) + path, message)
        for j, a in enumerate(rule.actions):
            where = at + ("actions", j)
            for need in sorted(a.needs - rule.diagnosis.provides):
                raise Invalid(where + ("kind",), _unmet(a.kind_name(), need))
            for path, message in a.problems():
                raise Invalid(where + path, message)
        if sum(a.kills for a in rule.actions) > 1:
            raise Invalid(at + ("actions",), "a rule may have at most one kill action")


def _unmet(action: str, need: str) -> str:
    """The error for an action whose need no configured diagnosis provides."""
    providers = [d.kind_name() for d in DIAGNOSES if need in d.provides]
    if len(providers) == 1:
        return f"{action} needs diagnosis {providers[0]}"
    listed = ", ".join(providers[:-1]) + f" or {providers[-1]}"
    return f"{action} needs a diagnosis that {CAPABILITIES[need]}: {listed}"


KINDS = {"detectors": kinds(DETECTORS), "diagnosis": kinds(DIAGNOSES), "actions": kinds(ACTIONS)}


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
