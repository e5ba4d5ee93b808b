"""One incident's response: run the rule's diagnosis unit, then its actions, in order.

Runs on a repair worker thread with a client of its own (the pollers keep polling). Every
step is recorded in the incident as it finishes; an action that fails stops the ones
after it. Agent errors never escape: they become a failed step with the error text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import AgentError
from . import diagnosis as D
from . import rules as R
from .actions import RUNNERS
from .detectors import Hit, NodeView
from .history import History
from .incidents import ActionRecord, Incident


@dataclass
class Context:
    """What a diagnosis or action may use; times are the monitor's clock()."""

    rule: R.Rule
    incident: Incident
    view: NodeView
    hits: list[Hit]
    onset: float
    detected: float
    client: Any  # AgentClient of this worker, for the node's agent
    history: History | None = None  # the node's sensor history at detection
    clock: Callable[[], float] = time.monotonic
    hooks: dict[str, Callable[[dict], Any]] = field(default_factory=dict)
    placement: dict[str, tuple[str, str]] = field(default_factory=dict)  # node -> (host, agent)

    @property
    def node(self) -> str:
        return self.view.node

    @property
    def host(self) -> str:
        return self.view.host

    def since_detection_ms(self) -> float:
        return (self.clock() - self.detected) * 1000


def diagnose(ctx: Context) -> D.Finding:
    """Run the rule's diagnosis unit; agent errors give a Finding that says so."""
    cfg = ctx.rule.diagnosis
    kind = cfg.__struct_config__.tag
    try:
        if isinstance(cfg, R.MemoryHogDiagnosis):
            table = ctx.client.processes(ctx.node)
            f = D.memory_hog(cfg, table.rows)
        elif isinstance(cfg, R.LargestRssDiagnosis):
            table = ctx.client.processes(ctx.node)
            f = D.largest_rss(cfg, table.rows)
        elif isinstance(cfg, R.ForkBombDiagnosis):
            if ctx.history is not None:
                ctx.onset = D.bomb_onset(ctx.history, ctx.view, ctx.onset)
                ctx.incident.onset = ctx.incident.detected - (ctx.detected - ctx.onset)
                ctx.incident.onset_to_detect_ms = round((ctx.detected - ctx.onset) * 1000, 1)
            return D.fork_bomb(cfg, ctx.view, ctx.hits, ctx.onset)
        elif isinstance(cfg, R.HangDiagnosis):
            table = ctx.client.processes(ctx.node)
            later, interval = None, 0.0
            if cfg.sample_ms > 0:
                t0 = ctx.clock()
                time.sleep(cfg.sample_ms / 1000)
                later = ctx.client.processes(ctx.node).rows
                interval = ctx.clock() - t0
            f = D.hang(ctx.view, ctx.hits, table.rows, later, interval)
        else:
            return D.Finding("none", "no diagnosis configured",
                             evidence={"detectors": [h.summary for h in ctx.hits]})
    except AgentError as e:
        return D.Finding(kind, f"diagnosis failed: {e}", evidence={"error": str(e)})
    if table.truncated:
        f.evidence["table_truncated"] = {"shown": len(table.rows), "total": table.total}
    return f


def respond(ctx: Context, on_step: Callable[[str, Any], None]) -> str:
    """Diagnose, then run the actions; `on_step(kind, payload)` after each step.

    Returns the incident's state: "repaired" (every action done, a kill among them),
    "recovered" (its sessions moved), "recorded" (no kill was configured), "failed" (an
    action failed), or "nothing to do".
    """
    finding = diagnose(ctx)
    ctx.incident.diagnosis = finding
    on_step("diagnosis", finding)
    state = "recorded"
    for action in ctx.rule.actions:
        kind = action.__struct_config__.tag
        started = ctx.clock()
        try:
            status, detail = RUNNERS[type(action)](action, ctx, finding)
            error = detail.get("error") if status == "failed" else None
        except AgentError as e:
            status, detail, error = "failed", {}, str(e)
        rec = ActionRecord(kind, status, round((started - ctx.detected) * 1000, 1),
                           round((ctx.clock() - started) * 1000, 1), detail, error)
        ctx.incident.actions.append(rec)
        on_step("action", rec)
        if status == "failed":
            return "failed"
        if isinstance(action, (R.KillCulprit, R.LockKillLineage, R.Refresh)):
            state = "repaired" if status == "done" else ("nothing to do" if state == "recorded"
                                                          else state)
        elif isinstance(action, R.Recover) and status == "done":
            state = "recovered"
    return state
