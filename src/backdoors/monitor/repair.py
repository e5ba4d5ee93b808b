"""One incident's response: run the rule's diagnosis unit, then its actions, in order.

Runs on a repair worker thread with a client of its own (the pollers keep polling). The
pipeline owns the incident: units get a Context and return their Finding or Outcome,
and only this module writes them into the incident, each step as it finishes. An action
that fails stops the ones after it. Agent errors never escape: they become a failed
step with the error text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import AgentError
from .actions import Outcome
from .context import Context
from .diagnosis import Finding
from .engine import Detection
from .incidents import ActionRecord


def context(det: Detection, client: Any, clock: Callable[[], float],
            hooks: dict[str, Callable[[dict], Any]],
            placement: dict[str, tuple[str, str]],
            fleet: dict[str, tuple[str | None, dict[str, bool]]] | None = None) -> Context:
    """The Context of `det`'s response, its onset refined by the rule's diagnosis (and the
    incident's onset with it) at the first attempt; a retry keeps the incident's onset."""
    diagnosis, inc = det.rule.diagnosis, det.incident
    onset = det.onset
    if det.attempt > 1:
        onset = det.detected - (inc.detected - inc.onset)  # as refined at the first attempt
    elif det.history is not None:
        onset = diagnosis.onset(det.history, det.view, det.onset)
        if onset != det.onset:
            inc.onset = inc.detected - (det.detected - onset)
            inc.onset_to_detect_ms = round((det.detected - onset) * 1000, 1)
    spared = (inc.diagnosis.evidence.get("lineage") or {}).get("old_parents_spared", []) \
        if det.attempt > 1 and inc.diagnosis is not None else []
    return Context(det.rule.name, inc.id, det.view, det.hits, onset, det.detected, client,
                   det.history, clock, hooks, placement,
                   lineage=diagnosis if "lineage" in diagnosis.provides else None,
                   spared_before=frozenset(spared), fleet=fleet or {})


def diagnose(det: Detection, ctx: Context) -> Finding:
    """Run the rule's diagnosis unit; agent errors give a Finding that says so."""
    unit = det.rule.diagnosis
    try:
        return unit.run(ctx)
    except AgentError as e:
        return Finding(unit.kind_name(), f"diagnosis failed: {e}", evidence={"error": str(e)})


def respond(det: Detection, ctx: Context, on_step: Callable[[str, Any], None]) -> str:
    """Diagnose, then run the actions; `on_step(kind, payload)` after each step.

    Returns the incident's state: "repaired" (every action done, a kill among them),
    "recovered" (its sessions moved), "recorded" (no kill was configured), "failed" (an
    action failed), or "nothing to do".
    """
    inc = det.incident
    finding = inc.diagnosis = diagnose(det, ctx)
    on_step("diagnosis", finding)
    state = "recorded"
    for action in det.rule.actions:
        started = ctx.clock()
        try:
            outcome = action.run(ctx, finding)
            error = outcome.detail.get("error") if outcome.status == "failed" else None
        except AgentError as e:
            outcome, error = Outcome("failed"), str(e)
        if outcome.finding is not None:
            finding = inc.diagnosis = outcome.finding
        rec = ActionRecord(action.kind_name(), outcome.status,
                           round((started - ctx.detected) * 1000, 1),
                           round((ctx.clock() - started) * 1000, 1), outcome.detail, error)
        inc.actions.append(rec)
        on_step("action", rec)
        if outcome.status == "failed":
            return "failed"
        done = outcome.status == "done"
        if done and action.effect != "record":
            ctx.repaired = True
        if action.effect == "repair":
            state = "repaired" if done else ("nothing to do" if state == "recorded" else state)
        elif action.effect == "recover" and done:
            state = "recovered"
    return state
