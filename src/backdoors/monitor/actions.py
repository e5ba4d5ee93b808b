"""Action units: what the monitor does about a diagnosis, through the node's agent.

Each runner takes the action's config, the repair context and the Finding, and returns
(status, detail): "done", "failed" or "skipped", with a dict of what happened. A runner
raises only for the unexpected; agent errors become a "failed" status with the error.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from ..common.procs import running
from ..errors import AgentError
from . import rules as R
from .diagnosis import Finding, Target, bomb_lineage, subtree_roots

Outcome = tuple[str, dict[str, Any]]


def _rows(ctx) -> list:
    return ctx.client.processes(ctx.node).rows


def _wait_gone(ctx, targets: list[Target], timeout: float) -> tuple[list[Target], float]:
    """Poll the process table until none of `targets` is alive; (survivors, seconds)."""
    start = ctx.clock()
    want = {(t.pid, t.start_time) for t in targets}
    while True:
        alive = {(p.pid, p.start_time) for p in _rows(ctx) if running(p.state)}
        left = [t for t in targets if (t.pid, t.start_time) in alive & want]
        waited = ctx.clock() - start
        if not left or waited >= timeout:
            return left, waited
        time.sleep(0.01)


def kill_culprit(cfg: R.KillCulprit, ctx, finding: Finding) -> Outcome:
    """SIGKILL each culprit (pid + start time), then wait for it to be gone."""
    if not finding.culprits:
        return "skipped", {"reason": "the diagnosis named no culprit"}
    killed = []
    for t in finding.culprits:
        if ctx.client.kill(ctx.node, t.pid, t.start_time):
            killed.append({"pid": t.pid, "comm": t.comm})
    left, waited = _wait_gone(ctx, finding.culprits, cfg.wait_ms / 1000)
    detail = {"killed": killed, "gone_after_ms": round(waited * 1000, 1),
              "survivors": [t.pid for t in left]}
    return ("failed" if left else "done"), detail


def lock_kill_lineage(cfg: R.LockKillLineage, ctx, finding: Finding) -> Outcome:
    """Freeze, find the lineage born since onset, kill it frozen, thaw, check survivors."""
    slack = ctx.rule.diagnosis.onset_slack_ms / 1000
    protect = ctx.rule.diagnosis.protect_comms
    rounds, killed_total, survivors = [], 0, []
    for n in range(cfg.max_rounds):
        t0 = ctx.clock()
        lock = ctx.client.lock(ctx.node, cfg.lease_s)
        frozen_at = ctx.clock()
        error, table, lineage, evidence, roots, singles = None, None, [], {}, [], []
        try:
            table = ctx.client.processes(ctx.node)
            young_age = ctx.clock() - ctx.onset + slack
            lineage, evidence = bomb_lineage(table.rows, young_age, protect,
                                             ctx.rule.diagnosis.old_ancestor_min_children)
            roots, singles = subtree_roots(lineage, table.rows)
            for root in roots:
                ctx.client.kill_tree(ctx.node, root.pid)
            for p in singles:
                ctx.client.kill(ctx.node, p.pid, p.start_time)
        except AgentError as e:
            error = str(e)
        finally:
            try:
                thaw_ms = round(ctx.client.unlock(ctx.node).thaw_ms, 2)
            except AgentError as e:
                thaw_ms = None
                error = f"{error + '; ' if error else ''}unlock failed: {e} (the lease thaws " \
                        f"the node within {cfg.lease_s:g} s)"
        thawed_at = ctx.clock()
        targets = [Target(p.pid, p.start_time, p.comm) for p in lineage]
        left, waited = _wait_gone(ctx, targets, cfg.verify_ms / 1000) if targets else ([], 0.0)
        killed_total += len(targets) - len(left)
        rounds.append({
            "freeze_ms": round(lock.freeze_ms, 2), "thaw_ms": thaw_ms,
            "locked_ms": round((thawed_at - t0) * 1000, 1),
            "frozen_ms": round((thawed_at - frozen_at) * 1000, 1),
            "table_total": table.total if table else None,
            "table_truncated": table.truncated if table else None,
            "killed_trees": [r.pid for r in roots], "killed_singly": len(singles),
            "lineage": len(targets), "gone_after_ms": round(waited * 1000, 1),
            "survivors": [t.pid for t in left], "error": error,
        })
        if n == 0:
            finding.evidence["lineage"] = evidence
            finding.culprits = targets[:64]
            finding.summary = (f"fork bomb of {len(targets)} processes "
                               f"({', '.join(f'{c}×{k}' for c, k in evidence.get('comms', {}).items())}) "
                               f"born since onset; {evidence.get('spared_count', 0)} processes spared")
        survivors = left
        if error is None and not left and not (table and table.truncated):
            break
    status = "done" if not survivors and rounds[-1]["error"] is None else "failed"
    return status, {"rounds": rounds, "killed": killed_total,
                    "survivors": [t.pid for t in survivors]}


def refresh(cfg: R.Refresh, ctx, finding: Finding) -> Outcome:
    """Restart the service: an in-process hook, or a command run by the monitor."""
    pid = finding.culprits[0].pid if finding.culprits else None
    info = {"node": ctx.node, "host": ctx.host, "rule": ctx.rule.name,
            "incident": ctx.incident.id, "pid": pid}
    if cfg.hook is not None:
        hook = ctx.hooks.get(cfg.hook)
        if hook is None:
            return "failed", {"error": f"no hook named {cfg.hook!r} is registered with the monitor"}
        result = hook(info)
        return "done", {"hook": cfg.hook, "result": result}
    argv = [a.format(**{k: "" if v is None else v for k, v in info.items()}) for a in cfg.command]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=cfg.timeout_s, text=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "failed", {"command": argv, "error": str(e)}
    detail = {"command": argv, "returncode": proc.returncode,
              "output": (proc.stdout + proc.stderr)[-400:]}
    return ("done" if proc.returncode == 0 else "failed"), detail


def record(cfg: R.Record, ctx, finding: Finding) -> Outcome:
    return "done", ({"note": cfg.note} if cfg.note else {})


def recover(cfg: R.Recover, ctx, finding: Finding) -> Outcome:
    """Fence the node, then evacuate its sessions to the target node's agent."""
    if cfg.when == "unrepaired" and any(a.status == "done" and a.kind != "record"
                                        for a in ctx.incident.actions):
        return "skipped", {"reason": "an earlier action repaired the node"}
    target = cfg.target or next((n for n, (host, _) in sorted(ctx.placement.items())
                                 if host != ctx.host), None)
    if target is None or target not in ctx.placement:
        return "failed", {"error": f"no recovery node: {target or 'none'} is not served by a "
                                   "reachable agent; set target in the rule"}
    to_host, to_address = ctx.placement[target]
    t0 = ctx.clock()
    fence = ctx.client.call("fence", node=ctx.node)
    fenced_at = ctx.clock()
    ev = ctx.client.call("evacuate", node=ctx.node, to=to_address, to_node=target,
                         timeout=cfg.timeout_s)
    detail = {"target": target, "target_host": to_host,
              "fence_ms": round((fenced_at - t0) * 1000, 1),
              "evacuate_ms": round((ctx.clock() - fenced_at) * 1000, 1),
              "fence": fence, "sessions": ev["sessions"], "moved": ev["moved"],
              "failed": ev["failed"], "dump_ms": ev["dump_ms"], "transfer_ms": ev["transfer_ms"],
              "adopt": ev["adopt"]}
    if cfg.after == "release":
        ctx.client.kill_node(ctx.node)
        ctx.client.unlock(ctx.node, force=True)
        detail["released"] = True
    ok = ev["moved"] == ev["sessions"] and not ev["failed"]
    return ("done" if ok else "failed"), detail


RUNNERS = {R.KillCulprit: kill_culprit, R.LockKillLineage: lock_kill_lineage,
           R.Refresh: refresh, R.Record: record, R.Recover: recover}

__all__ = ["RUNNERS"]
