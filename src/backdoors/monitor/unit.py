"""The base of every ruleset unit (detector, diagnosis, action).

A unit is a frozen msgspec Struct: its fields are its TOML keys, its `kind` tag picks it
in a ruleset, and its methods are its behaviour. What a unit needs from the others it
declares in class variables (e.g. an action's `needs = {"culprits"}`), so the engine and
the rule checks stay generic. docs/monitor.md says how to add one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import msgspec

NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Pos = Annotated[float, msgspec.Meta(gt=0)]

Path = tuple[Any, ...]  # a key path inside the unit, e.g. ("min",)


class Unit(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag_field="kind"):
    """A ruleset unit; subclasses set `tag=` (their `kind`)."""

    @classmethod
    def kind_name(cls) -> str:
        return cls.__struct_config__.tag

    def problems(self) -> Iterator[tuple[Path, str]]:
        """What the types cannot check: (key path inside the unit, message) per problem."""
        return iter(())


def kinds(units: Iterable[type[Unit]]) -> list[str]:
    """The `kind` names of unit classes, in order."""
    return [u.kind_name() for u in units]
