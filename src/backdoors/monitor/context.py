"""What a diagnosis or an action unit may use while it responds to one incident.

The response pipeline (repair.py) builds it from the detection and owns it: units read
it, they do not reach into the rule, the incident or each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..agent.protocol import ProcessRow
from .detectors import Hit, NodeView
from .history import History


class LineageFinder(Protocol):
    """Finds a fork bomb's lineage in a (frozen) node's process table: a diagnosis that
    provides "lineage"."""

    def young_age_s(self, since_onset_s: float) -> float:
        """The largest age of the bomb's processes and threads, `since_onset_s` after its
        onset: the table is read with threads_within_s set to it."""

    def lineage(self, table: Sequence[ProcessRow], young_age_s: float,
                spared_before: Collection[int] = ()) -> tuple[list[ProcessRow], dict[str, Any]]:
        """(the bomb's processes, the evidence); `spared_before`: Context.spared_before."""


@dataclass
class Context:
    """One incident's response; times are the monitor's clock()."""

    rule: str  # the rule's name
    incident: str  # the incident's id
    view: NodeView
    hits: list[Hit]
    onset: float
    detected: float
    client: Any  # AgentClient of this worker, for the node's agent
    history: History | None = None  # the node's sensor history at detection
    clock: Callable[[], float] = time.monotonic
    hooks: dict[str, Callable[[dict], Any]] = field(default_factory=dict)
    placement: dict[str, tuple[str, str]] = field(default_factory=dict)  # node -> (host, agent)
    #: every agent of the monitor's config: host -> (its last poll error or None, {node: fenced})
    fleet: dict[str, tuple[str | None, dict[str, bool]]] = field(default_factory=dict)
    lineage: LineageFinder | None = None  # from the diagnosis, when it provides "lineage"
    #: a retry's: the pids of the old parents of young processes the last attempt spared
    spared_before: frozenset[int] = frozenset()
    repaired: bool = False  # an earlier action of this response changed the node

    @property
    def node(self) -> str:
        return self.view.node

    @property
    def host(self) -> str:
        return self.view.host
